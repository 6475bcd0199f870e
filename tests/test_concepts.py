"""Several concepts in one run (`xti.concepts`): each concept's vectors equal its one-concept run's
bit for bit, each gets its own folder, file, summary and model card; resume, the non-finite guard
and config errors work per concept."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from xti.callbacks import CheckpointSaved, TrainCallback
from xti.concepts import concept_configs, read_index, train_concepts
from xti.config import load_config
from xti.errors import XTIError
from xti.export import load_embedding_file
from xti.models import load_model
from xti.runs import RunInterrupted
from xti.training import train

DATA = Path(__file__).parents[1] / "data" / "tiny-concept"
COMMON = [
    "train.resolution=32", "train.batch_size=2", "train.max_steps=4", "train.lr=0.01",
    "train.lr_warmup_steps=0", "train.seed=5", "kde.weight=0.1", "tracking.report_to=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def dots(tmp_path_factory) -> Path:
    """A second concept's images: three 32 px noise pictures."""
    folder = tmp_path_factory.mktemp("dots")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def two_concepts(model: Path, out: Path, dots: Path, *extra: str, start: Path | None = None):
    concepts = [
        {"placeholder": "<box>", "initializer": "box", "data": str(DATA)},
        {"name": "dots", "placeholder": "<dot>", "initializer": "dot", "data": str(dots),
         "n_vectors": 2, "init_from": str(start) if start else None},
    ]  # fmt: skip
    base = [f"model.path={model}", f"output_dir={out}", f"concepts={json.dumps(concepts)}"]
    return load_config(None, base + COMMON + list(extra))


def one_concept(model: Path, out: Path, data: Path, placeholder: str, init: str, *extra: str):
    base = [
        f"model.path={model}", f"data.dir={data}", f"output_dir={out}",
        f"concept.placeholder={placeholder}", f"concept.initializer={init}",
    ]  # fmt: skip
    return load_config(None, base + COMMON + list(extra))


def test_two_concepts_in_one_run_equal_two_one_concept_runs(tiny_model, dots, tmp_path):
    start = tmp_path / "start.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}, start)
    both = train_concepts(
        two_concepts(tiny_model, tmp_path / "both", dots, start=start), progress=False
    )
    assert both.failed == {} and list(both.results) == ["box", "dots"]

    box = train(one_concept(tiny_model, tmp_path / "box", DATA, "<box>", "box"), progress=False)
    dot = train(
        one_concept(
            tiny_model, tmp_path / "dot", dots, "<dot>", "dot", "concept.n_vectors=2",
            f"concept.init_from={start}", "name=dots",
        ),
        progress=False,
    )  # fmt: skip
    for alone, name in ((box, "box"), (dot, "dots")):
        together = both.results[name]
        assert torch.equal(together.vectors, alone.vectors), name  # bit for bit
        assert together.losses == alone.losses
        folder = tmp_path / "both" / name
        assert together.output_file == folder / f"{name}.xti.safetensors"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["final_loss"] == alone.losses[-1][1]
        assert (folder / "README.md").read_text().count(f"{name} — XTI embedding") == 1
    assert load_embedding_file(both.results["dots"].output_file).n_vectors == 2
    assert "xti.init_from" in load_embedding_file(both.results["dots"].output_file).metadata
    index = read_index(tmp_path / "both")
    assert [(c["name"], c["state"], c["steps"]) for c in index] == [
        ("box", "finished", 4),
        ("dots", "finished", 4),
    ]

    # SIGINT while the first concept saves its step-2 checkpoint: the round finishes, every
    # concept saves a checkpoint and its vectors; train.resume=latest (each concept from its own
    # folder) then ends where the straight run ended
    cfg = two_concepts(
        tiny_model, tmp_path / "resumed", dots, "train.checkpoint_every=2", start=start
    )

    class Interrupt(TrainCallback):
        def on_checkpoint_saved(self, event: CheckpointSaved) -> None:
            if event.step == 2 and event.path.parent.parent.name == "box":
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted):
        train_concepts(cfg, progress=False, callbacks=[Interrupt()])
    for name in ("box", "dots"):
        folder = tmp_path / "resumed" / name
        assert (folder / f"{name}.interrupted.xti.safetensors").is_file()
        assert [c.name for c in (folder / "checkpoints").iterdir()] == ["step-000002"]
    again = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": "latest"})})
    resumed = train_concepts(again, progress=False)
    for name in ("box", "dots"):
        assert torch.equal(resumed.results[name].vectors, both.results[name].vectors), name


def test_a_diverged_concept_stops_alone(tiny_model, dots, tmp_path):
    start = tmp_path / "huge.safetensors"  # finite, but no text encoder survives it
    save_file({"emb_params": torch.full((2, 32), 3e38)}, start)
    cfg = two_concepts(tiny_model, tmp_path / "out", dots, "train.max_steps=2", start=start)
    out = train_concepts(cfg, progress=False)
    assert list(out.results) == ["box"] and out.results["box"].output_file.is_file()
    assert "not finite" in out.failed["dots"] or "non-finite" in out.failed["dots"]
    assert not list((tmp_path / "out" / "dots").glob("*.xti.safetensors"))
    states = {c["name"]: c["state"] for c in read_index(tmp_path / "out")}
    assert states == {"box": "finished", "dots": "diverged"}


def test_concepts_config_errors_are_one_line(tiny_model, dots, tmp_path):
    def error(*extra: str, **kw) -> str:
        with pytest.raises(XTIError) as info:
            concept_configs(two_concepts(tiny_model, tmp_path, dots, *extra, **kw))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "concept must not be set" in error("concept.placeholder=<x>")
    assert "data.dir must not be set" in error(f"data.dir={DATA}")
    assert "use train.resume=latest" in error("train.resume=/some/checkpoint")
    same = json.dumps([{"placeholder": "<a>", "data": "x"}, {"placeholder": "<a>", "data": "y"}])
    with pytest.raises(XTIError, match="two concepts have the name 'a'"):
        load_config(None, [f"concepts={same}"])
    with pytest.raises(XTIError, match=r"concepts\.0\.data"):
        load_config(None, ['concepts=[{"placeholder": "<a>"}]'])
    one = two_concepts(tiny_model, tmp_path, dots)
    with pytest.raises(XTIError, match="train it with xti.concepts.train_concepts"):
        train(one, progress=False)
    missing = json.dumps([{"placeholder": "<a>", "data": str(tmp_path / "nothing")}])
    cfg = load_config(
        None, [f"model.path={tiny_model}", f"output_dir={tmp_path / 'o'}", f"concepts={missing}"]
    )
    with pytest.raises(XTIError, match=r"concepts\[0\]\.data: .* is not a folder"):
        train_concepts(cfg, bundle=load_model(cfg.model), progress=False)


def test_the_train_tab_runs_a_concepts_config_and_shows_every_concept(tiny_model, dots, tmp_path):
    import time

    import yaml

    from xti.ui.train import TrainForm, TrainJob, checked_config, form_from_config, overrides
    from xti.ui.train_tab import _loss_frame

    base = tmp_path / "two.yaml"
    base.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "ui"), "model": {"path": str(tiny_model)},
        "concepts": [
            {"placeholder": "<box>", "initializer": "box", "data": str(DATA)},
            {"name": "dots", "placeholder": "<dot>", "initializer": "dot", "data": str(dots)},
        ],
        "train": {"resolution": 32, "batch_size": 2, "lr": 0.01, "lr_warmup_steps": 0},
        "validation": {"num_inference_steps": 2},
    }))  # fmt: skip
    values = form_from_config(str(base))
    assert (values["placeholder"], values["images"]) == ("<box>", str(DATA))  # the first concept's
    form = TrainForm(config=str(base), steps=3, validate_every=3, seeds="0", output_dir=str(tmp_path / "ui"), **{
        k: values[k] for k in ("model", "images", "placeholder", "initializer")
    })  # fmt: skip
    sent = overrides(form)
    assert not [o for o in sent if o.startswith(("concept.", "data.dir=", "name="))]
    assert [c.placeholder for c in checked_config(form).concepts] == ["<box>", "<dot>"]

    job = TrainJob()
    job.start(form)
    deadline = time.time() + 120
    while job.running and time.time() < deadline:
        time.sleep(0.5)
    snap = job.progress()
    assert not snap.failed, snap.log
    assert snap.step == 3 and snap.max_steps == 3
    assert {r["concept"] for r in snap.metrics} == {"box", "dots"}
    assert set(_loss_frame(snap.metrics)["series"]) == {"box", "dots"}
    assert snap.grid is not None and snap.grid.parent.parent.name in ("box", "dots")
    assert "wrote" in snap.state and "box.xti.safetensors" in snap.state
    assert "dots.xti.safetensors" in snap.state
