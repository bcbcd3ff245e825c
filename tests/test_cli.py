"""The rewriter command line."""

from __future__ import annotations

import json
import sys

import rewriter
from rewriter.cli import main
from rewriter.verify.families import ModelSpec


def test_passes_lists_names_docs_and_options(capsys) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize: Remove dropout" in out
    assert "max_iterations: int = 10" in out


def test_demo_writes_its_artifacts_and_can_run_twice(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")  # the demo replaces its directory
    assert main(["demo", "--out", str(out), "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "canonicalize" in printed and "exact" in printed
    assert "ppl" in printed and "ONNX Runtime vs the graph" in printed
    summary = json.loads((out / "report.json").read_text())
    assert summary["ok"] and summary["hypothesis_examples"] == 2
    assert summary["report"]["passes"][0]["error"]["ok"] is True
    assert summary["report"]["baseline"]["ppl"] > 1 and summary["onnx"]["check"]["ok"]
    # greedy samples with a KV cache: the default pipeline is exact, so the tokens agree
    assert len(summary["samples"]) == 2 and all(s["same_tokens"] for s in summary["samples"])
    assert "rewritten" in printed and summary["samples"][0]["original"]
    assert {p.name for p in out.iterdir()} == {
        "graph.txt",
        "model.onnx",
        "model.pt2",
        "report.json",
    }


def _run(*args: str) -> int:
    return main(["run", *args])


def test_run_writes_artifacts_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    ModelSpec("llama", layers=1).build().save_pretrained(tmp_path / "hf")
    hf, out = str(tmp_path / "hf"), str(tmp_path / "out")
    assert _run("--model", hf, "--passes", "canonicalize", "--out", out, "--backend", "onnx") == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "model.pt2",
        "model.onnx",
        "report.json",
        "graph.txt",
    }
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] and report["onnx"]["check"]["ok"] and report["error_vs_model"]["ok"]
    assert "canonicalize" in capsys.readouterr().out
    assert _run("--model", hf, "--passes", "canonicalize", "--out", out) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (
        _run("--model", hf, "--passes", "canonicalize", "--out", out, "--force", "--explain") == 0
    )
    explained = capsys.readouterr().out
    assert "canonicalize: " in explained and " rules rewrote this graph" in explained
    assert "never matched: " in explained and "canonicalize.py:" in explained


def test_run_from_a_config_file_and_a_factory(tmp_path) -> None:
    (tmp_path / "config.json").write_text(ModelSpec("gpt2", layers=1).config().to_json_string())
    assert (
        _run(
            "--model",
            str(tmp_path / "config.json"),
            "--passes",
            "canonicalize",
            "--out",
            str(tmp_path / "a"),
        )
        == 0
    )
    (tmp_path / "my_models.py").write_text(
        "from rewriter.verify.families import ModelSpec\n"
        "def small():\n    return ModelSpec('opt', layers=1).build()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        assert (
            _run(
                "--model",
                "my_models:small",
                "--passes",
                "canonicalize",
                "--out",
                str(tmp_path / "b"),
            )
            == 0
        )
    finally:
        sys.path.remove(str(tmp_path))
    assert (tmp_path / "b" / "model.pt2").exists()


def test_run_refuses_remote_code_and_bad_specs(tmp_path, capsys) -> None:
    config = json.loads(ModelSpec("gpt2", layers=1).config().to_json_string())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps(config))
    assert (
        _run(
            "--model",
            str(tmp_path / "remote"),
            "--passes",
            "canonicalize",
            "--out",
            str(tmp_path / "o"),
        )
        == 2
    )
    assert "remote code" in capsys.readouterr().err
    assert (
        _run("--model", "tiny-gpt2", "--passes", "canonicalize,nope", "--out", str(tmp_path / "p"))
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown pass 'nope'" in err and "^" in err
    assert (
        _run("--model", "no/such/thing", "--passes", "canonicalize", "--out", str(tmp_path / "q"))
        == 2
    )


def test_run_writes_the_rebuilt_tokenizer_after_vocab_trim(tmp_path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    assert main(["run", "--model", "tiny-gpt2", "--passes", "vocab-trim", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["vocab"]["kept"] < report["vocab"]["of"] == 4096
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer) == report["vocab"]["kept"]
    loaded = rewriter.load(out / "model.pt2")
    assert rewriter.vocab.vocab_map(loaded).size == len(tokenizer)
