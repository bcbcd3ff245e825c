"""Test policy (see docs/testing.md).

* hypothesis profiles: ``ci`` (default: no deadline, few examples) and ``fuzz`` (many examples;
  ``HYPOTHESIS_PROFILE=fuzz make test``);
* every run draws with a new seed, printed in the header and again after a failure;
  ``REWRITER_TEST_SEED=N make test`` repeats run N's draws (so does ``--hypothesis-seed N``);
* torch uses a fixed number of threads, so timings and reductions are repeatable;
* traced graphs are cached per model spec within a session (:func:`rewriter.testing.traced`),
  and every ``torch.export`` that ``rewriter.trace`` makes is remembered by the content of the
  module, its inputs and the dynamic-shape spec (a copy is returned when they repeat);
* a perplexity is computed once per graph content and token ids (a content-addressed memo:
  many tests run pipelines on the same embedded graph, and each run evaluates its input);
* core tests need only CPU torch; backend tests are marked and skip with a reason when their
  tool is missing.
"""

from __future__ import annotations

import collections
import copy
import enum
import functools
import hashlib
import importlib
import os
import random
import warnings

import hypothesis.core
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from transformers import GenerationConfig, PretrainedConfig

import rewriter.pipeline.metrics
from rewriter.analysis.vocab import vocab_map
from rewriter.verify.families import ModelSpec

settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=False,  # the draws follow the run's seed (below): new ones every run
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# benchmarks/mutation.py: a failure is all the campaign needs, so no time goes to shrinking it
settings.register_profile(
    "mutation", settings.get_profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


SEED_VARIABLE = "REWRITER_TEST_SEED"
SEED = pytest.StashKey[int]()


def run_seed(option: str | None, worker: dict | None, environ: dict[str, str]) -> int:
    """The seed of this run's draws: ``--hypothesis-seed``, then the controller's (an xdist
    worker's), then ``REWRITER_TEST_SEED``, else a new random one."""
    for source, value in (
        ("--hypothesis-seed", option),
        ("the controller", (worker or {}).get("rewriter_seed")),
        (SEED_VARIABLE, environ.get(SEED_VARIABLE) or None),
    ):
        if value is not None:
            try:
                return int(value)
            except ValueError:
                message = f"{source}={value!r}: the seed must be an integer"
                raise pytest.UsageError(message) from None
    return random.SystemRandom().randrange(2**32)


def pytest_configure(config: pytest.Config) -> None:
    seed = run_seed(
        config.getoption("--hypothesis-seed", None),
        getattr(config, "workerinput", None),
        dict(os.environ),
    )
    config.stash[SEED] = seed
    hypothesis.core.global_force_seed = seed  # what --hypothesis-seed sets; every worker the same


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # pytest-xdist: the workers draw with the run's seed
    node.workerinput["rewriter_seed"] = node.config.stash[SEED]


def _seed_line(config: pytest.Config) -> str:
    seed = config.stash[SEED]
    return f"test seed {seed}: {SEED_VARIABLE}={seed} make test repeats this run's draws"


def pytest_report_header(config: pytest.Config) -> str:
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if exitstatus not in (0, 5):  # failed or interrupted: say how to rerun the same draws
        terminalreporter.write_line(_seed_line(config), red=True, bold=True)


torch.set_num_threads(int(os.environ.get("REWRITER_TEST_THREADS", "2")))
os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _memoized(plain):
    """``perplexity_of_ids`` computed once per (graph code and tensors, ids, options).

    Only for flat traced graphs with their original vocabulary and no ``over``: their outputs
    are a function of the code and of what the ``get_attr`` nodes read, which the key hashes
    (parameters, buffers and plain tensor attributes alike). Anything else is computed each time.
    """
    memo: dict[tuple, float] = {}

    @functools.wraps(plain)
    def perplexity_of_ids(model, ids, context=None, **options):
        if (
            not isinstance(model, torch.fx.GraphModule)
            or options.get("over") is not None
            or vocab_map(model) is not None
            or any(n.op == "call_module" for n in model.graph.nodes)
        ):
            return plain(model, ids, context, **options)
        data = ids.detach().cpu().contiguous()
        key = (
            _content(model),
            hashlib.sha256(data.numpy().tobytes()).hexdigest(),
            tuple(data.shape),
            str(data.dtype),
            context,
            tuple(sorted(options.items())),
        )
        if key not in memo:
            memo[key] = plain(model, ids, context, **options)
        return memo[key]

    return perplexity_of_ids


def _content(gm: torch.fx.GraphModule) -> str:
    digest = hashlib.sha256(gm.code.encode())
    for node in gm.graph.find_nodes(op="get_attr"):
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        digest.update(str(node.target).encode())
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


rewriter.metrics.perplexity_of_ids = _memoized(rewriter.metrics.perplexity_of_ids)


# --- the export memo ------------------------------------------------------------------------------
#
# Most test files trace the same few models (the embedded model, the default family specs) again
# and again, and ``torch.export`` is a third of the suite's time. ``rewriter.trace`` exports through
# ``rewriter.trace._export_with_fixes``; the memo below returns a copy of an earlier export when the
# module, its inputs and the dynamic-shape spec have the same *content*: class and code of every
# submodule, every non-tensor attribute, every tensor's bytes and the way tensors are tied, the
# Hugging Face config, the input tensors and the spec. A module the key cannot describe (hooks, an
# attribute it does not know how to compare) is exported each time. Exports that fail are never
# remembered, so error tests see the real error.

_PLAIN_MODULE_ATTRS = frozenset(vars(torch.nn.Module()))
_HOOK_ATTRS = tuple(a for a in _PLAIN_MODULE_ATTRS if "hook" in a)
_LIBRARIES = ("torch.", "transformers.")
_DIM_TYPES = (torch.export.Dim, torch.export.dynamic_shapes._DimHint)


class _Uncacheable(Exception):
    pass


def _code_digest(code, digest, seen) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _code_digest(const, digest, seen)
        else:
            digest.update(repr(const).encode())


def _function_digest(fn, digest, seen) -> None:
    fn = getattr(fn, "__func__", fn)  # classmethod / staticmethod / bound method
    if isinstance(fn, property):
        for part in (fn.fget, fn.fset):
            if part is not None:
                _function_digest(part, digest, seen)
        return
    code = getattr(fn, "__code__", None)
    if code is None:
        if not hasattr(fn, "__qualname__"):
            raise _Uncacheable(type(fn).__name__)
        digest.update(f"{getattr(fn, '__module__', '')}.{fn.__qualname__}".encode())
        return
    if id(fn) in seen:
        return
    seen.add(id(fn))
    _code_digest(code, digest, seen)
    for cell in fn.__closure__ or ():
        _value_digest(cell.cell_contents, digest, seen)


def _class_digest(cls, digest, seen) -> None:
    digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    if cls in seen or cls.__module__.startswith(_LIBRARIES) or cls.__module__ == "builtins":
        return
    seen.add(cls)
    for base in cls.__mro__:
        if base is torch.nn.Module or base.__module__.startswith(_LIBRARIES):
            break
        for name, value in sorted(vars(base).items()):
            if name in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"):
                continue
            digest.update(name.encode())
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                _function_digest(value, digest, seen)
            else:
                _value_digest(value, digest, seen)


def _tensor_digest(tensor: torch.Tensor, digest) -> None:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise _Uncacheable(type(tensor).__name__)
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}{tensor.stride()}{tensor.device}".encode())
    digest.update(str(tensor.requires_grad).encode())
    if tensor.device.type != "meta" and tensor.numel():
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes())


def _value_digest(value, digest, seen) -> None:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    elif isinstance(value, (torch.dtype, torch.device, torch.Size, enum.Enum)):
        digest.update(repr(value).encode())
    elif isinstance(value, torch.Tensor):
        _tensor_digest(value, digest)
    elif isinstance(value, (tuple, list, set, frozenset)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value:
            _value_digest(item, digest, seen)
    elif isinstance(value, dict):
        digest.update(f"dict{len(value)}".encode())
        for key, item in value.items():
            _value_digest(key, digest, seen)
            _value_digest(item, digest, seen)
    else:
        _object_digest(value, digest, seen)


def _object_digest(value, digest, seen) -> None:
    if isinstance(value, type):
        _class_digest(value, digest, seen)
    elif isinstance(value, (PretrainedConfig, GenerationConfig)):
        digest.update(value.to_json_string(use_diff=False).encode())
        digest.update(repr(getattr(value, "_attn_implementation", None)).encode())
    elif isinstance(value, _DIM_TYPES):
        digest.update(repr(value).encode())
    elif callable(value) and getattr(value, "__module__", "") and hasattr(value, "__qualname__"):
        digest.update(f"{value.__module__}.{value.__qualname__}".encode())
        if not value.__module__.startswith(_LIBRARIES):
            _function_digest(value, digest, seen)
    else:
        raise _Uncacheable(type(value).__name__)


def _module_digest(model: torch.nn.Module, digest) -> None:
    seen: set = set()
    ids: dict[int, int] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        digest.update(f"<{name}>".encode())
        _class_digest(type(module), digest, seen)
        state = vars(module)
        if any(state.get(attr) for attr in _HOOK_ATTRS):
            raise _Uncacheable("hooks")
        if isinstance(module, torch.fx.GraphModule):
            digest.update(module.code.encode())
            digest.update(repr(getattr(module.graph._codegen, "pytree_info", None)).encode())
        for attr, value in sorted(state.items()):
            if attr in _PLAIN_MODULE_ATTRS or isinstance(module, torch.fx.GraphModule):
                continue
            if attr == "forward" and module is model and isinstance(value, functools.partial):
                # rewriter.trace binds non-tensor kwargs (use_cache=False) this way
                if getattr(value.func, "__func__", None) is not type(model).forward:
                    raise _Uncacheable("instance forward")
                _value_digest(value.keywords, digest, seen)
                continue
            digest.update(attr.encode())
            _value_digest(value, digest, seen)
        for kind in ("_parameters", "_buffers"):
            for attr, tensor in state[kind].items():
                digest.update(f"{kind}.{attr}".encode())
                if tensor is None:
                    continue
                digest.update(str(ids.setdefault(id(tensor), len(ids))).encode())  # ties
                _tensor_digest(tensor, digest)
        digest.update(repr(sorted(state["_non_persistent_buffers_set"])).encode())


def _export_key(model, args, kwargs, spec) -> str | None:
    digest = hashlib.sha256()
    try:
        digest.update(repr((torch.get_default_dtype(), torch.is_grad_enabled())).encode())
        _module_digest(model, digest)
        seen: set = set()
        _value_digest(tuple(args), digest, seen)
        _value_digest(dict(kwargs), digest, seen)
        _value_digest(spec, digest, seen)
    except _Uncacheable:
        return None
    return digest.hexdigest()


def _export_memoized(plain):
    memo: dict[str, tuple] = {}
    counts = collections.Counter()

    @functools.wraps(plain)
    def _export_with_fixes(model, args, kwargs, spec):
        key = _export_key(model, args, kwargs, spec)
        counts["uncacheable" if key is None else "hit" if key in memo else "miss"] += 1
        if key is not None and key in memo:
            program, fixed = memo[key]
            return copy.deepcopy(program), fixed
        program, fixed = plain(model, args, kwargs, spec)
        if key is not None:
            memo[key] = (copy.deepcopy(program), fixed)  # a copy: later edits of the model's
            # weights must not reach it
        return program, fixed

    _export_with_fixes.counts = counts  # read by tests/test_conftest_memos.py
    return _export_with_fixes


_trace_module = importlib.import_module("rewriter.ir.trace")
_trace_module._export_with_fixes = _export_memoized(_trace_module._export_with_fixes)


@pytest.fixture
def gpt2_spec() -> ModelSpec:
    return ModelSpec("gpt2", layers=2, outliers=True)
