"""Causal LMs with a KV cache (``rewriter.deploy``) in ONNX Runtime: the prefill and decode graphs
exported, checked and opened as sessions that ``rewriter.deploy.generate`` runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from rewriter.backends.onnx import runtime
from rewriter.backends.onnx.exporter import export

from rewriter.errors import RewriterError

__all__ = ["OrtCausalLM", "export_causal_lm"]


@dataclasses.dataclass
class OrtCausalLM:
    """ONNX Runtime sessions of a prefill and a decode graph, run by ``rewriter.deploy.generate``.

    The cache stays in ORT-owned memory between steps when ``io_binding`` is on: each step's
    outputs are bound as the next step's inputs without a copy through numpy.
    """

    prefill: Any
    decode: Any
    cache: tuple[tuple[int, int], ...]
    vocab: Any = None
    io_binding: bool = True

    def run_prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, list[Any]]:
        feeds = dict(zip(_names(self.prefill), (ids.numpy(), mask.numpy(), pos.numpy())))
        if not self.io_binding:
            out = self.prefill.run(None, feeds)
            return torch.from_numpy(out[0]), list(out[1:])
        binding = self.prefill.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for output in self.prefill.get_outputs():
            binding.bind_output(output.name, "cpu")
        self.prefill.run_with_iobinding(binding)
        values = binding.get_outputs()
        return torch.from_numpy(values[0].numpy()), list(values[1:])

    def run_decode(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: list[Any]
    ) -> tuple[torch.Tensor, list[Any]]:
        names = _names(self.decode)
        if not self.io_binding:
            feeds = dict(zip(names, (ids.numpy(), mask.numpy(), pos.numpy(), *cache)))
            out = self.decode.run(None, feeds)
            return torch.from_numpy(out[0]), list(out[1:])
        binding = self.decode.io_binding()
        for name, value in zip(names[:3], (ids.numpy(), mask.numpy(), pos.numpy())):
            binding.bind_cpu_input(name, value)
        for name, value in zip(names[3:], cache):
            binding.bind_ortvalue_input(name, value)  # the previous step's output, no copy
        for output in self.decode.get_outputs():
            binding.bind_output(output.name, "cpu")
        self.decode.run_with_iobinding(binding)
        values = binding.get_outputs()
        return torch.from_numpy(values[0].numpy()), list(values[1:])


def _names(session: Any) -> list[str]:
    return [i.name for i in session.get_inputs()]


def export_causal_lm(
    graphs: Any,
    directory: str | Path,
    *,
    threads: int | None = None,
    io_binding: bool = True,
    check: bool = True,
    **export_options: Any,
) -> OrtCausalLM:
    """Export the prefill and decode graphs of ``rewriter.deploy.split`` to ``directory``
    (``prefill.onnx``, ``decode.onnx``), check each in ONNX Runtime against its graph (``check``;
    turn it off for approximate lowerings such as ``accuracy_level=4``), and return sessions that
    ``rewriter.deploy.generate`` runs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sessions = []
    for name, gm in (("prefill", graphs.prefill), ("decode", graphs.decode)):
        exported = export(gm, None, directory / f"{name}.onnx", **export_options)
        if check:
            report = runtime.check(gm, exported.path)  # ``check`` is the flag here
            if not report.ok:
                raise RewriterError(
                    f"the {name} graph in ONNX Runtime differs from torch: {report}"
                )
        sessions.append(runtime.session(exported.path, threads=threads))
    return OrtCausalLM(sessions[0], sessions[1], graphs.cache, graphs.vocab, io_binding)
