"""Dashboards: wandb (offline, read back) and tensorboard logs, validation samples, model card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xti.config import load_config
from xti.tracking import Smoother, read_wandb_offline_run
from xti.training import train

REPO = Path(__file__).parents[1]


def cfg(model: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.path={model}", f"output_dir={out}", f"data.dir={REPO / 'data' / 'tiny-concept'}",
        "train.max_steps=4", "train.checkpoint_every=0", "validation.num_inference_steps=2",
        "validation.seeds=[0, 1]", "validation.prompts=[a photo of <striped-box>]", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def mix_file(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mix")
    return train(
        cfg(tiny_model, out, "train.max_steps=1", "train.seed=9"), progress=False
    ).output_file


SCALARS = {"loss", "loss_smoothed", "mse", "kde", "lr", "grad_norm", "step_time", "samples_per_s",
           "peak_memory_gb", "norm/IN01", "norm/MID", "kde/OUT11", "vectors/moved",
           "grad_norm/diffusion", "grad_norm/kde", "kde/effective_weight"}  # fmt: skip


def test_wandb_offline_run_holds_scalars_images_and_tables(
    tiny_model, mix_file, tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    result = train(
        cfg(tiny_model, tmp_path, "tracking.report_to=wandb", "tracking.tags=[ci, tiny]",
            "tracking.run_name=tiny-run", "validation.every=2", f"validation.mix_with={mix_file}"),
        progress=False,
    )  # fmt: skip
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "no API key configured: the run must be offline"
    run = read_wandb_offline_run(runs[0])
    scalar_rows = [r for r in run.history if "loss" in r]
    assert [r["_step"] for r in scalar_rows] == [1, 2, 3, 4]
    assert set(scalar_rows[0]) >= SCALARS
    assert [r["loss"] for r in scalar_rows] == pytest.approx([loss for _, loss in result.losses])
    image_rows = [r for r in run.history if "validation" in r]
    assert [r["_step"] for r in image_rows] == [2, 4], (
        "one grid per validation, at the scalars' step"
    )
    assert image_rows[0]["validation"]["_type"] == "image-file"
    assert "row 1:" in image_rows[0]["validation"]["caption"], "the mixing row is part of the grid"
    assert sum(1 for r in run.history if "nearest_tokens" in r) == 2
    images = [p for p in run.media if p.suffix == ".png"]
    assert len(images) == 2
    assert (
        run.config["concept.placeholder"] == "<striped-box>" and run.config["train.max_steps"] == 4
    )
    # the same grids are saved in the output folder
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == [
        "tiny-concept-step000002.png", "tiny-concept-step000004.png"]  # fmt: skip


def test_tensorboard_event_files_hold_the_scalars_and_images(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        cfg(tiny_model, tmp_path, "tracking.report_to=tensorboard", "validation.every=4"),
        progress=False,
    )
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags: dict[str, list] = {"scalars": [], "images": []}
    loss_steps = []
    for e in events:
        acc = EventAccumulator(str(e.parent), size_guidance={"images": 0, "scalars": 0}).Reload()
        tags["scalars"] += acc.Tags()["scalars"]
        tags["images"] += acc.Tags()["images"]
        if "loss" in acc.Tags()["scalars"]:
            loss_steps = [ev.step for ev in acc.Scalars("loss")]
    assert set(tags["scalars"]) >= SCALARS
    assert loss_steps == [1, 2, 3, 4]
    assert "validation" in tags["images"]


def test_validation_does_not_change_the_training_trajectory(tiny_model, tmp_path):
    plain = train(cfg(tiny_model, tmp_path / "a"), progress=False)
    sampled = train(cfg(tiny_model, tmp_path / "b", "validation.every=1"), progress=False)
    assert plain.losses == sampled.losses
    assert torch.equal(plain.vectors, sampled.vectors)
    assert len(list((tmp_path / "b" / "validation").iterdir())) == 4


def test_model_card_names_the_file_and_the_loading_code(tiny_model, tmp_path):
    train(cfg(tiny_model, tmp_path, "validation.every=4"), progress=False)
    card = (tmp_path / "README.md").read_text()
    assert "tiny-concept.xti.safetensors" in card
    assert 'load_embedding_file("tiny-concept.xti.safetensors")' in card
    assert "validation/tiny-concept-step000004.png" in card
    assert "<striped-box>" in card


def test_smoother_is_a_bias_corrected_ema():
    s = Smoother(beta=0.5)
    assert s.update(4.0) == 4.0
    assert s.update(0.0) == pytest.approx((0.5 * 0.5 * 4.0) / (1 - 0.25))
