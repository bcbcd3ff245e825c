"""Build the embedded model: the text snapshot, the BPE tokenizer, and the trained tiny GPT-2.

Deterministic and offline. Two steps:

``python -m rewriter.zoo.build corpus``
    Extracts a text snapshot from the Python standard library on this machine: docstrings (in
    definition order) and comment paragraphs of every stdlib module outside its test suites, and
    the language reference topics of ``pydoc_data``. One document per source file or topic;
    about 5% of documents (chosen by a hash of their name) are held out for evaluation, and a
    slice of the training documents is set aside as calibration text for passes. Writes
    ``train.txt.xz``, ``eval.txt``, ``calibration.txt`` and ``corpus.json`` (sizes, SHA-256
    hashes, Python version). The shipped snapshot was made with Python 3.11.7; other versions
    produce other text, so training always reads the shipped snapshot.

``python -m rewriter.zoo.build train``
    Trains a byte-level BPE tokenizer (4096 tokens) on the training text, then a GPT-2-style
    causal LM (4 layers, d=192, 6 heads, context 256, tied embeddings, about 2.6M parameters)
    with AdamW, warmup and cosine decay, a fixed seed and a fixed thread count (same Python and
    torch give the same model within rounding). Measures held-out perplexity against an
    interpolated bigram model on the same tokens, and writes ``model.safetensors`` (float16),
    ``config.json``, ``tokenizer.json`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import lzma
import math
import platform
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
SEED = 1234
VOCAB = 4096
CONTEXT = 256
EOT = "<|endoftext|>"
HELD_OUT_EVERY = 20  # documents whose name hashes to 0 mod 20 are evaluation text
CALIBRATION_EVERY = 20  # ... to 1 mod 20: calibration text (also trained on)

_SKIP_PARTS = ("site-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip")


# --- the text snapshot ------------------------------------------------------------------------


def _docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of a module, its classes and functions, in definition order."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 20:
                found.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _comment_paragraphs(source: str) -> list[str]:
    """Runs of consecutive ``#`` comment lines joined into paragraphs of prose."""
    paragraphs, current = [], []
    for line in source.splitlines():
        match = re.match(r"^\s*#\s?(.*)$", line)
        if match and not line.lstrip().startswith("#!"):
            text = match.group(1).strip()
            if text and not set(text) <= set("-=#*~_ "):
                current.append(text)
                continue
        if current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return [p for p in paragraphs if len(p) >= 60]


def stdlib_documents() -> list[tuple[str, str]]:
    """(name, text) per stdlib source file and per pydoc topic, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in _SKIP_PARTS or part.startswith("test_") for part in relative.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        pieces = _docstrings(tree) + _comment_paragraphs(source)
        if pieces:
            documents.append((relative.as_posix(), "\n\n".join(pieces)))
    from pydoc_data.topics import topics

    for key in sorted(topics):
        documents.append((f"pydoc:{key}", topics[key].strip()))
    return documents


def _bucket(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY


def build_corpus(out: Path) -> dict[str, object]:
    documents = stdlib_documents()
    train = [text for name, text in documents if _bucket(name) != 0]
    held_out = [text for name, text in documents if _bucket(name) == 0]
    calibration = [text for name, text in documents if _bucket(name) == 1]
    separator = f"\n{EOT}\n"
    texts = {
        "train": separator.join(train),
        "eval": separator.join(held_out),
        "calibration": separator.join(calibration),
    }
    out.mkdir(parents=True, exist_ok=True)
    with lzma.open(out / "train.txt.xz", "wt", encoding="utf-8", preset=9) as handle:
        handle.write(texts["train"])
    (out / "eval.txt").write_text(texts["eval"], encoding="utf-8")
    (out / "calibration.txt").write_text(texts["calibration"], encoding="utf-8")
    info = {
        "python": platform.python_version(),
        "documents": {"train": len(train), "eval": len(held_out), "calibration": len(calibration)},
        "characters": {k: len(v) for k, v in texts.items()},
        "sha256": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in texts.items()},
    }
    (out / "corpus.json").write_text(json.dumps(info, indent=2))
    return info


def read_train_text(data: Path = DATA) -> str:
    with lzma.open(data / "train.txt.xz", "rt", encoding="utf-8") as handle:
        text = handle.read()
    expected = json.loads((data / "corpus.json").read_text())["sha256"]["train"]
    actual = hashlib.sha256(text.encode()).hexdigest()
    if actual != expected:
        raise RuntimeError(f"training text hash {actual} != shipped {expected}")
    return text


# --- tokenizer, model, training ------------------------------------------------------------------


def train_tokenizer(text: str):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    documents = text.split(f"\n{EOT}\n")
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def encode_documents(tokenizer, text: str) -> list[int]:
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for document in text.split(f"\n{EOT}\n"):
        ids.extend(tokenizer.encode(document).ids)
        ids.append(eot)
    return ids


def model_config(eot: int):  # -> GPT2Config
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=192,
        n_layer=4,
        n_head=6,
        n_inner=4 * 192,
        activation_function="gelu_new",
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,
    )


def train_model(out: Path, steps: int, batch: int, lr: float, threads: int) -> dict[str, object]:
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    from rewriter.context import progress

    torch.manual_seed(SEED)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    text = read_train_text(out)
    tokenizer = train_tokenizer(text)
    tokenizer.save(str(out / "tokenizer.json"))
    train_ids = torch.tensor(encode_documents(tokenizer, text), dtype=torch.long)
    eot = tokenizer.token_to_id(EOT)
    config = model_config(eot)
    model = GPT2LMHeadModel(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(SEED)
    log = []
    model.train()
    for step in progress(range(steps), total=steps, description="training tiny-gpt2"):
        starts = torch.randint(0, train_ids.numel() - CONTEXT - 1, (batch,), generator=generator)
        windows = torch.stack([train_ids[s : s + CONTEXT] for s in starts.tolist()])
        loss = model(windows, labels=windows, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            log.append(
                {
                    "step": step,
                    "loss": round(float(loss.detach()), 4),
                    "seconds": round(time.time() - started, 1),
                }
            )
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    half = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }  # tied to the token embedding
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(out / "config.json"))

    measured = measure(out)
    metrics = {
        **measured,
        "train_tokens": int(train_ids.numel()),
        "steps": steps,
        "batch": batch,
        "context": CONTEXT,
        "lr": lr,
        "threads": threads,
        "seed": SEED,
        "train_seconds": round(time.time() - started, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "log": log,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def measure(out: Path = DATA) -> dict[str, float | int]:
    """Held-out perplexity of the shipped model and of the bigram baseline, on the same tokens.

    Both use :func:`rewriter.metrics.perplexity`'s tokenization and windows (the whole evaluation
    text through the tokenizer), so the recorded number is what users measure.
    """
    from rewriter import zoo
    from rewriter.pipeline.metrics import bigram_perplexity, encode, perplexity

    model, tokenizer = zoo.tiny_gpt2(data=out)
    text = (out / "eval.txt").read_text(encoding="utf-8")
    eval_ids = encode(tokenizer, text)
    train_ids = encode(tokenizer, read_train_text(out))
    bigram = bigram_perplexity(train_ids, eval_ids, CONTEXT, vocab=VOCAB)
    return {
        "held_out_perplexity": perplexity(model, tokenizer, text),
        "bigram_held_out_perplexity": bigram["perplexity"],
        "bigram_lambda": bigram["lambda"],
        "eval_tokens": int(eval_ids.numel()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewriter.zoo.build", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="step", required=True)
    corpus = sub.add_parser("corpus", help="extract the text snapshot from the stdlib")
    corpus.add_argument("--out", type=Path, default=DATA)
    corpus.add_argument("--check", action="store_true", help="compare with the shipped hashes")
    train = sub.add_parser("train", help="train the tokenizer and the model on the snapshot")
    train.add_argument("--out", type=Path, default=DATA)
    train.add_argument("--steps", type=int, default=1800)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--threads", type=int, default=2)
    sub.add_parser("measure", help="re-measure held-out perplexity of the shipped model")
    args = parser.parse_args(argv)
    if args.step == "measure":
        metrics = json.loads((DATA / "metrics.json").read_text()) | measure(DATA)
        (DATA / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=2))
        return 0
    if args.step == "corpus":
        if args.check:
            shipped = json.loads((DATA / "corpus.json").read_text())
            with tempfile.TemporaryDirectory() as scratch:
                fresh = build_corpus(Path(scratch))
            same = fresh["sha256"] == shipped["sha256"]
            print(
                f"snapshot {'matches' if same else 'differs from'} the shipped one "
                f"(shipped with Python {shipped['python']}, this is {platform.python_version()})"
            )
            return 0 if same else 1
        print(json.dumps(build_corpus(args.out), indent=2))
        return 0
    metrics = train_model(args.out, args.steps, args.batch, args.lr, args.threads)
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
