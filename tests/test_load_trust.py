"""A file we load never runs code: tampered .pt2 archives get a clear LoadError and no side
effect (issue: trust). Each archive is a real save with one entry replaced, as an attacker would;
the payloads create a marker file when unpickled or imported, and the marker must not exist."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import rewriter
from rewriter.errors import LoadError
from rewriter.verify.families import ModelSpec


class _Payload:
    """Unpickling calls open(marker, 'w'): a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec("gpt2", layers=1)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs())
    return rewriter.save(gm, tmp_path_factory.mktemp("saved") / "model.pt2")


def _tampered(src: Path, dst: Path, suffix: str, change) -> Path:
    """Copy ``src`` to ``dst`` with the entry ending in ``suffix`` replaced by
    ``change(old_bytes)``."""
    hits = 0
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith(suffix):
                data, hits = change(data), hits + 1
            new.writestr(info, data)
    assert hits == 1, f"{suffix}: {hits} entries"
    return dst


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buffer)
    return buffer.getvalue()


def test_an_untampered_archive_loads(saved: Path) -> None:
    assert isinstance(rewriter.load(saved), torch.fx.GraphModule)


def test_sample_inputs_replaced_by_a_pickle_payload(saved: Path, tmp_path: Path) -> None:
    # torch falls back from weights_only=True to weights_only=False for the sample inputs
    marker = tmp_path / "ran"
    bad = _tampered(
        saved, tmp_path / "bad.pt2", "data/sample_inputs/model.pt", lambda _: _pickled(marker)
    )
    with pytest.raises(LoadError, match=r"sample_inputs/model\.pt: not plain tensors"):
        rewriter.load(bad)
    assert not marker.exists()


def test_a_weight_stored_as_a_pickle(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    def use_pickle(data: bytes) -> bytes:
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()

    step = _tampered(
        saved, tmp_path / "step.pt2", "data/weights/weight_0", lambda _: _pickled(marker)
    )
    bad = _tampered(step, tmp_path / "bad.pt2", "model_weights_config.json", use_pickle)
    with pytest.raises(LoadError, match="stored as a pickle"):
        rewriter.load(bad)
    assert not marker.exists()


def test_a_constant_that_is_a_custom_object(saved: Path, tmp_path: Path) -> None:
    def custom(data: bytes) -> bytes:
        return json.dumps(
            {"config": {"c": {"path_name": "custom_obj_0", "use_pickle": False}}}
        ).encode()

    bad = _tampered(saved, tmp_path / "bad.pt2", "model_constants_config.json", custom)
    with pytest.raises(LoadError, match="custom object"):
        rewriter.load(bad)


def test_an_output_structure_naming_a_module_in_the_working_directory(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "evil_outputs.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Output(tuple):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def evil(data: bytes) -> bytes:
        structure = json.loads(data)
        structure["type"] = "evil_outputs.Output"
        return json.dumps(structure).encode()

    bad = _tampered(saved, tmp_path / "bad.pt2", "extra/rewriter_output_structure.json", evil)
    with pytest.raises(LoadError, match=r"evil_outputs\.Output"):
        rewriter.load(bad)
    assert not marker.exists() and "evil_outputs" not in sys.modules


@pytest.mark.parametrize(
    "name",
    ["os.system", "transformers.PreTrainedModel", "transformers.modeling_outputs.no_such_class"],
)
def test_output_classes_outside_the_allow_list_are_refused(name: str) -> None:
    from rewriter.io.archive import output_type

    with pytest.raises(LoadError, match="output structure names"):
        output_type(name)


def test_output_classes_on_the_allow_list_resolve() -> None:
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    from rewriter.io.archive import output_type

    assert output_type("builtins.tuple") is tuple
    name = "transformers.modeling_outputs.CausalLMOutputWithCrossAttentions"
    assert output_type(name) is CausalLMOutputWithCrossAttentions


def test_a_file_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(LoadError, match=r"not a \.pt2 archive"):
        rewriter.load(path)
