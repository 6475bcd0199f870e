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


PRECISIONS = [
    ("no", "no"), ("No", "no"), ("NO", "no"), ("'no'", "no"), ("off", "no"), ("false", "no"),
    ("fp32", "no"), ("fp16", "fp16"), ("FP16", "fp16"), ("'fp16'", "fp16"), ("bf16", "bf16"),
    ("BF16", "bf16"), ("null", None),
]  # fmt: skip


@pytest.mark.parametrize("typed, expected", PRECISIONS, ids=[t for t, _ in PRECISIONS])
def test_mixed_precision_on_the_command_line_as_typed(typed, expected):
    cfg = load_config(CONFIGS[0], [f"train.mixed_precision={typed}"])
    assert cfg.train.mixed_precision == expected


@pytest.mark.parametrize("typed, expected", PRECISIONS, ids=[t for t, _ in PRECISIONS])
def test_mixed_precision_in_yaml_as_typed(tmp_path, typed, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  mixed_precision: {typed}\n")
    assert load_config(path).train.mixed_precision == expected


def test_yaml_booleans_in_other_enum_like_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  resume: no\ntracking:\n  report_to: off\n")
    cfg = load_config(path)
    assert cfg.train.resume is None and cfg.tracking.report_to == "none"
    for override, field in [
        ("train.mixed_precision=yes", "train.mixed_precision"),
        ("train.mixed_precision=on", "train.mixed_precision"),
        ("data.template=on", "data.template"),
        ("xti.granularity=no", "xti.granularity"),
        ("concept.initializer=on", "concept.initializer"),
        ("model.family=off", "model.family"),
        ("tracking.tags=[a, on]", "tracking.tags"),
    ]:
        with pytest.raises(XTIError) as err:
            load_config(None, [override])
        msg = str(err.value)
        assert field in msg and "YAML read an unquoted word" in msg and "\n" not in msg, msg
    with pytest.raises(
        XTIError, match="train.mixed_precision: Input should be 'no', 'fp16' or 'bf16'"
    ):
        load_config(None, ["train.mixed_precision=fp8"])
    assert load_config(None, ["concept.initializer='on'"]).concept.initializer == "on"
