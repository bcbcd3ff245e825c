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

from rewriter.families import ModelSpec
from rewriter.trace import trace

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
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(kind).to(device)

    def positive(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) + 0.1).to(dtype).to(device)

    width = 24 * size + 5
    if name == "crms_norm":
        return [(rand(3, width), 1e-5), (rand(2, 3, 7), 1e-6)]
    if name == "l1_norm":
        return [
            (rand(3, width), rand(width), rand(width), 1e-5, True, 1.25),
            (rand(2, 2, 7), None, None, 1e-6, False, 1.0),
        ]
    if name == "shiftquant_linear":
        from rewriter.ops.quant import quantize_weight

        cases = []
        for bits, group, act in ((4, 32, 0), (3, 16, 0), (8, 32, 8), (2, 16, 0)):
            weight = torch.randn(10 * size + 3, width, generator=g)
            packed, exponents = quantize_weight(weight, bits, group)
            bias = rand(weight.shape[0]) if bits != 3 else None
            x = rand(2, 5, width)
            cases.append(
                (x, packed.to(device), exponents.to(device), bias, bits, group, width, act)
            )
        return cases
    if name in ("linear_attention", "linear_attention_state", "linear_attention_decode"):
        return _attention_samples(name, rand, positive, device, size)
    if name == "step_part":
        return [(rand(2, 4, 3), 0), (rand(2, 4, 3), 1)]
    if name == "cache_point":
        return [(rand(2, 2, 3, 4), 0, 1)]
    raise KeyError(f"no samples for rewriter::{name}: add them to rewriter.testing.op_samples")


def _attention_samples(name, rand, positive, device, size) -> list[tuple]:
    batch, heads, length, dim, features = 2, 2, 20 * size + 3, 8, 6
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :3] = False
    mask = mask.to(device)
    q, k, v = (rand(batch, heads, length, dim) for _ in range(3))
    pq, pk = positive(batch, heads, length, features), positive(batch, heads, length, features)
    decay = (torch.linspace(0.8, 1.0, heads)).to(device)
    gate = (torch.full((heads,), 0.3)).to(device)
    if name == "linear_attention":
        return [
            (q, k, v, pq, pk, None, None, None, True, 0, dim**-0.5, 1e-6),
            (q, k, v, pq, pk, mask, decay, None, True, 0, dim**-0.5, 1e-6),
            (q, k, v, pq, pk, mask, decay, gate, True, 4, dim**-0.5, 1e-6),
            (q, k, v, pq, pk, mask, None, None, False, 0, dim**-0.5, 1e-6),
        ]
    if name == "linear_attention_state":
        return [(k, v, pk, mask, decay, 0), (k, v, pk, None, None, 4)]
    from rewriter.ops.attention import linear_attention_state_reference

    cases = []
    for window, m, d, gt in ((0, mask, decay, None), (4, None, decay, gate), (0, None, None, None)):
        state = linear_attention_state_reference(k, v, pk, m, d, window)
        one = slice(0, 1)
        cases.append(
            (
                q[:, :, one],
                k[:, :, one],
                v[:, :, one],
                pq[:, :, one],
                pk[:, :, one],
                None if m is None else m[:, 0],
                d,
                gt,
                state,
                window,
                dim**-0.5,
                1e-6,
            )
        )
    return cases
