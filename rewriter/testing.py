"""Helpers for tests of passes, ours and users': fingerprints and cached traces.

``fingerprint(model)`` hashes every tensor, name, dtype, ``requires_grad`` flag and train/eval
flag of a module: equal before and after proves a pipeline left the caller's model untouched.
``traced(spec)`` builds and traces a :class:`~rewriter.families.ModelSpec` once per process.
"""

from __future__ import annotations

import functools
import hashlib

import torch
import torch.fx

from rewriter.ir.trace import trace
from rewriter.verify.families import ModelSpec

__all__ = ["TinyPreLN", "fingerprint", "graph_fingerprint", "op_samples", "traced"]


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's tensors (values, names, dtypes, grad flags) and train flags."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(bool(getattr(tensor, "requires_grad", False))).encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    for name, sub in module.named_modules():
        digest.update(f"{name}:{sub.training}".encode())
    return digest.hexdigest()


def graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    """A hash of a graph's code and its tensors."""
    return hashlib.sha256((gm.code + fingerprint(gm)).encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def traced(
    spec: ModelSpec, dynamic: bool = True, seq: int = 8
) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """The model of ``spec`` and its traced graph, built once per process (do not mutate)."""
    model = spec.build()
    gm = trace(model, spec.example_inputs(seq=seq), dynamic_shapes="auto" if dynamic else None)
    return model, gm


class TinyPreLN(torch.nn.Module):
    """A one-block Pre-LN language model small enough for golden graph listings.

    Token and position embeddings, one residual block ``x + W2 gelu(W1 LN1(x))``, a final
    LayerNorm and a linear head (tied to the token embedding when ``tied``).
    """

    def __init__(self, vocab: int = 11, width: int = 4, tied: bool = False, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Embedding(8, width)
        self.ln1 = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.ln_f = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        x = x + self.down(torch.nn.functional.gelu(self.up(self.ln1(x))))
        return self.head(self.ln_f(x))


# --- sample inputs of every rewriter:: op ---------------------------------------------------------


def op_samples(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    size: int = 1,
) -> list[tuple]:
    """Argument tuples for ``rewriter::<name>`` covering its variants (optional inputs absent
    and present, widths not a power of two), small enough for interpreted kernels; ``size``
    scales the shapes. Backends and kernel tests compare against the op's reference on these.
    Each op declares them in its contract (``OpContract.samples``)."""
    from rewriter.ops import OPS, SampleSource

    contract = OPS.get(name)
    if contract is None or contract.samples is None:
        raise KeyError(f"no samples for rewriter::{name}: give its OpContract a samples function")
    source = SampleSource(torch.Generator().manual_seed(seed), device, dtype, size)
    return contract.samples(source)
