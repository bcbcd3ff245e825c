"""The rewriter command line."""

from __future__ import annotations

import json

from rewriter.cli import main


def test_passes_lists_names_docs_and_options(capsys) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize: Remove dropout" in out
    assert "max_iterations: int = 10" in out


def test_demo_writes_its_artifacts_and_can_run_twice(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    for _ in range(2):
        assert main(["demo", "--out", str(out), "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "canonicalize" in printed and "exact" in printed and "verified" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["error"]["ok"] is True
    assert "rms_norm" in (out / "graph_after.txt").read_text()
