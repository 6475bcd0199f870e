"""Bad input through the CLI: one line naming the file or field, exit 2, nothing written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from xti.cli import main
from xti.export import build_metadata

REPO = Path(__file__).parents[1]


def run(model: Path, out: Path, *overrides: str, data: Path | None = None) -> int:
    args = [
        "train",
        "--no-progress",
        f"model.path={model}",
        f"data.dir={data or REPO / 'data' / 'tiny-concept'}",
        f"output_dir={out}",
        "concept.placeholder=<box>",
        "concept.initializer=box",
        "train.resolution=32",
        "train.max_steps=1",
        "tracking.report_to=none",
        *overrides,
    ]
    return main(args)


def image_folder(tmp_path: Path, n: int = 2) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def missing_component(tiny_model: Path, tmp_path: Path) -> tuple[list[str], str]:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    return [f"model.path={broken}"], "vae"


CASES = {
    "missing data folder": (lambda m, t: ([f"data.dir={t / 'nope'}"], "nope")),
    "empty data folder": (
        lambda m, t: ([f"data.dir={(t / 'empty').mkdir() or t / 'empty'}"], "no images")
    ),
    "placeholder in vocabulary": (
        lambda m, t: (["concept.placeholder=cat"], "concept.placeholder")
    ),
    "empty initializer": (lambda m, t: (["concept.initializer="], "concept.initializer")),
    "initializer without words": (lambda m, t: (["concept.initializer= "], "concept.initializer")),
    "unknown key": (lambda m, t: (["train.learning_rate=1"], "train.learning_rate: unknown key")),
    "lr <= 0": (lambda m, t: (["train.lr=0"], "train.lr")),
    "steps <= 0": (lambda m, t: (["train.max_steps=0"], "train.max_steps")),
    "n_vectors < 1": (lambda m, t: (["concept.n_vectors=0"], "concept.n_vectors")),
    "model missing a component": missing_component,
    "model path missing": (lambda m, t: ([f"model.path={t / 'no-model'}"], "no-model")),
    "resolution not a multiple": (lambda m, t: (["train.resolution=31"], "train.resolution")),
    "resume without checkpoint": (lambda m, t: (["train.resume=latest"], "train.resume")),
    # root passes the permission check there, yet no folder can be made in /proc
    "output_dir that cannot be made": (
        lambda m, t: (["output_dir=/proc/xti-out"], "output_dir /proc/xti-out cannot be created")
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_writes_nothing(case, tiny_model, tmp_path, capsys):
    overrides, expected = CASES[case](tiny_model, tmp_path)
    out = tmp_path / "out"
    code = run(tiny_model, out, *overrides)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists(), "nothing may be written on bad input"


def test_corrupt_image_fails_by_default_and_is_skipped_when_configured(
    tiny_model, tmp_path, capsys, caplog
):
    data = image_folder(tmp_path)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    assert run(tiny_model, out, data=data) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "data.on_corrupt=skip" in err
    assert not out.exists()
    with caplog.at_level(logging.WARNING):
        assert run(tiny_model, out, "data.on_corrupt=skip", data=data) == 0
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    assert (out / "box.xti.safetensors").is_file()


def test_caption_without_placeholder_names_the_image(tiny_model, tmp_path, capsys):
    data = image_folder(tmp_path)
    lines = [
        {"file_name": "0.png", "text": "a <box> on a table"},
        {"file_name": "1.png", "text": "a box"},
    ]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert run(tiny_model, tmp_path / "out", data=data) == 2
    err = capsys.readouterr().err
    assert "1.png" in err and "<box>" in err and "0.png" not in err


def test_odd_image_modes_and_small_images_are_converted_with_a_warning(
    tiny_model, tmp_path, caplog
):
    data = tmp_path / "odd"
    data.mkdir()
    Image.fromarray(np.full((40, 40), 128, np.uint8), mode="L").save(data / "gray.png")
    Image.fromarray(np.full((40, 40, 4), 200, np.uint8), mode="RGBA").save(data / "rgba.png")
    Image.fromarray(np.full((40, 40), 60000, np.uint16)).save(data / "sixteen.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "small.png")
    with caplog.at_level(logging.WARNING):
        assert run(tiny_model, tmp_path / "out", data=data) == 0
    assert any("small.png" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "box.xti.safetensors").is_file()


def test_ti_export_of_a_layer_whose_name_is_a_path_gives_one_line(tmp_path, capsys):
    """A file may name a layer anything; the default output name built from it must stay a name."""

    layers = ["IN01", "../../x"]
    meta = build_metadata(
        layers=layers, granularity="block", placeholder="<odd>", initializer="box", n_vectors=1,
        family="sd1", base_model="tiny", text_dims={"text": 8}, steps=1, kde_weight=0.0,
    )  # fmt: skip
    file = tmp_path / "odd.xti.safetensors"
    save_file({name: torch.ones(1, 8) for name in layers}, str(file), metadata=meta)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["export", str(file), "--format", "ti", "--layer", "../../x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "odd-../../x.ti.safetensors" in err[0] and "--output" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "nothing written"
    out = tmp_path / "x.ti.safetensors"
    assert main(["export", str(file), "--format", "ti", "--layer", "../../x", "-o", str(out)]) == 0
    assert torch.equal(load_file(str(out))["emb_params"], torch.ones(1, 8))
