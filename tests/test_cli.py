"""The command line: `python train.py` end to end, `xti layers`, `xti config`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from xti.cli import main

REPO = Path(__file__).parents[1]


def test_train_py_runs_the_tiny_config_end_to_end(tmp_path):
    env = dict(os.environ, XTI_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", f"output_dir={out}", "train.max_steps=3",
         "train.checkpoint_every=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    file = out / "tiny-concept.xti.safetensors"
    assert f"wrote {file}" in proc.stdout
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
        assert len(list(f.keys())) == 16 + 1  # the layers and their mean ("clip_l" fallback)
    assert meta["xti.placeholder"] == "<striped-box>" and meta["xti.steps"] == "3"
    assert (tmp_path / "cache").is_dir(), "the builtin model is built into XTI_CACHE"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_layers_command(tiny_model, capsys):
    assert main(["layers", str(tiny_model)]) == 0
    names = capsys.readouterr().out.split()
    assert names[:3] == ["IN01", "IN02", "IN04"] and names[6] == "MID" and len(names) == 16
    assert main(["layers", str(tiny_model), "--modules"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "IN01\tdown_blocks.0.attentions.0"


def test_config_command_lists_and_resolves(capsys):
    assert main(["config"]) == 0
    listing = capsys.readouterr().out
    assert "train.lr = 0.005  # Learning rate of AdamW." in listing
    assert main(["config", "--config", str(REPO / "configs" / "tiny.yaml"), "train.lr=0.1"]) == 0
    assert "lr: 0.1" in capsys.readouterr().out
    assert main(["config", "--config", str(REPO / "configs" / "tiny.yaml"), "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


def test_train_mixed_precision_no_from_the_command_line_and_from_yaml(tiny_model, tmp_path, capsys):
    """An fp16 config (like configs/sd15.yaml) trains in fp32 with `train.mixed_precision=no`, and a
    YAML file with an unquoted `mixed_precision: no` does too."""
    common = [f"model.path={tiny_model}", f"data.dir={REPO / 'data' / 'tiny-concept'}", "train.resolution=32",
              "train.max_steps=1", "concept.placeholder=<box>", "tracking.report_to=none"]  # fmt: skip
    fp16 = tmp_path / "fp16.yaml"
    fp16.write_text("train:\n  mixed_precision: fp16\n")
    plain = tmp_path / "no.yaml"
    plain.write_text("train:\n  mixed_precision: no\n")
    for name, config, extra in [("cli", fp16, ["train.mixed_precision=no"]), ("yaml", plain, [])]:
        out = tmp_path / name
        args = ["train", "--config", str(config), "--no-progress", f"output_dir={out}"]
        assert main([*args, *common, *extra]) == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["mixed_precision"] == "no" and summary["steps"] == 1


def test_train_with_a_family_that_contradicts_the_model_is_one_error_line(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("XTI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--no-progress",
            "model.path=builtin:tiny-sdxl", "model.family=sd1", f"output_dir={out}",
            "train.max_steps=1"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    # stderr may also hold the progress bars of building and loading the model (transformers)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert "model.family=sd1" in errors[0] and "sdxl" in errors[0], errors
    assert not out.exists(), "nothing may be written on bad input"
