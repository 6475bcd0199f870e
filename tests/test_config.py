"""Config: every shipped file validates, overrides apply, bad keys and values get one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from xti.config import Config, describe_fields, load_config
from xti.errors import XTIError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "sd15.yaml", "sd21.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("train.py" in first or "xti " in first), first
    assert f"configs/{path.name}" in first


def test_overrides_parse_like_yaml(tmp_path):
    cfg = load_config(
        CONFIGS[0],
        [
            "train.lr=1e-3",
            "train.max_steps=7",
            "output_dir=" + str(tmp_path),
            "kde.bandwidth=null",
            "tracking.tags=[a, b]",
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7
    assert cfg.output_dir == str(tmp_path)
    assert cfg.kde.bandwidth is None
    assert cfg.tracking.tags == ["a", "b"]


def test_the_keys_people_type_most_exist():
    keys = {line.split(" = ")[0] for line in describe_fields()}
    assert keys >= {
        "model.path", "data.dir", "concept.placeholder", "concept.initializer", "concept.n_vectors",
        "xti.granularity", "kde.weight", "train.max_steps", "train.batch_size", "train.lr",
        "train.resolution", "output_dir",
    }  # fmt: skip
    assert all("# None" not in line for line in describe_fields()), "every field has a description"


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("bogus=1", "bogus: unknown key"),
        ("train.lr=0", "train.lr: Input should be greater than 0"),
        ("train.lr=-1", "train.lr"),
        ("train.max_steps=0", "train.max_steps"),
        ("concept.n_vectors=0", "concept.n_vectors"),
        ("concept.initializer=", "concept.initializer"),
        ("concept.placeholder=two words", "concept.placeholder"),
        ("xti.granularity=layers", "xti.granularity"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(XTIError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert field in msg and "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(XTIError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(XTIError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  lr: 1\n  epochs: 3\n")
    with pytest.raises(XTIError, match=r"bad.yaml: train.epochs: unknown key"):
        load_config(bad)
    with pytest.raises(XTIError, match="not key=value"):
        load_config(None, ["train.lr"])
