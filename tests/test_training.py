"""The training loop on the tiny model: correctness against independent references, resume, bf16."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from xti.config import load_config
from xti.data import augment, encode_latents, load_images, prompts_per_image
from xti.embeddings import add_placeholder_tokens, initializer_vectors
from xti.models import load_model
from xti.step import PromptTable, sample_batch
from xti.training import train

REPO = Path(__file__).parents[1]
DATA = REPO / "data" / "tiny-concept"


def make_cfg(model: Path, out: Path, *overrides: str):
    base = [
        f"model.path={model}",
        f"data.dir={DATA}",
        f"output_dir={out}",
        "concept.placeholder=<box>",
        "concept.initializer=box",
        "train.resolution=32",
        "train.batch_size=2",
        "train.max_steps=4",
        "train.lr=0.01",
        "train.lr_warmup_steps=0",
        "train.seed=3",
        "tracking.report_to=none",
    ]
    return load_config(None, base + list(overrides))


def test_xti_trains_only_the_vectors_and_exports_the_design_file(tiny_model, tmp_path):
    bundle = load_model(make_cfg(tiny_model, tmp_path).model)
    fresh = load_model(make_cfg(tiny_model, tmp_path).model)
    result = train(
        make_cfg(tiny_model, tmp_path, "kde.weight=0.001"), bundle=bundle, progress=False
    )

    # the optimizer saw one [L, n, d] tensor and nothing else
    assert result.trainable_shapes == [(16, 1, 32)]
    # every original vocabulary row and every frozen weight is bit-identical
    table = bundle.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, fresh.text_encoder.get_input_embeddings().weight)
    for (name, a), (_, b) in zip(
        bundle.unet.state_dict().items(), fresh.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # the vectors moved away from the initializer, and apart from each other
    init = initializer_vectors(fresh.tokenizer, fresh.text_encoder.get_input_embeddings(), "box", 1)
    v = result.vectors[:, 0]
    assert not torch.allclose(v, init.expand_as(v))
    assert torch.cdist(v, v).add(torch.eye(16)).min() > 0, "per-layer vectors must diverge"

    path = tmp_path / "box.xti.safetensors"
    assert result.output_file == path
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        assert f.get_tensor("MID").dtype == torch.float32
        assert torch.equal(f.get_tensor("IN01"), result.vectors[0])
        # plus the layer mean under "clip_l", what hosts without an XTI loader read
        assert torch.equal(f.get_tensor("clip_l"), result.vectors.mean(dim=0))
    assert sorted(keys) == sorted([*result.layer_names, "clip_l"]) and len(keys) == 17
    assert json.loads(meta["xti.layers"]) == result.layer_names
    for key in ("xti.format_version", "xti.granularity", "xti.placeholder", "xti.initializer", "xti.n_vectors",
                "xti.family", "xti.base_model", "xti.text_dims", "xti.steps", "xti.kde_weight",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title", "modelspec.date"):  # fmt: skip
        assert key in meta, key
    assert (
        meta["xti.steps"] == "4"
        and meta["xti.placeholder"] == "<box>"
        and meta["xti.family"] == "sd1"
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["nearest_tokens"]) == set(result.layer_names)


def test_shared_mode_equals_an_independent_textual_inversion_step(tiny_model, tmp_path):
    lr = 1e-3
    cfg = make_cfg(
        tiny_model, tmp_path, "xti.granularity=shared", "train.max_steps=1", f"train.lr={lr}",
        "train.max_grad_norm=null", "train.lr_scheduler=constant", "kde.weight=0",
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert result.trainable_shapes == [(1, 1, 32)]

    # Reference: classic TI with stock transformers/diffusers calls on the same batch.
    ref = load_model(cfg.model)
    tok, te, unet, sched = ref.tokenizer, ref.text_encoder, ref.unet, ref.noise_scheduler
    init = initializer_vectors(tok, te.get_input_embeddings(), "box", 1)[0]
    pt = add_placeholder_tokens(tok, "<box>", 1)
    records = load_images(cfg.data)
    aug = augment(
        records, 32, center_crop=True, random_crops=1, flip_p=cfg.data.flip_p, seed=cfg.train.seed
    )
    cache = encode_latents(ref.vae, aug, 4, progress=False)
    prompts = PromptTable.build(
        {"text": tok}, prompts_per_image(records, "<box>", "object"), {"text": pt}
    )
    batch = sample_batch(
        cache, prompts, num_train_timesteps=1000, global_batch=2, rank=0, world_size=1,
        seed=cfg.train.seed, micro_step=0, flip_p=cfg.data.flip_p,
    )  # fmt: skip
    assert (batch.ids["text"] == pt.first_id).any(dim=1).all()
    te = copy.deepcopy(te)
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    table = te.get_input_embeddings().weight
    table.requires_grad_(True)
    with torch.no_grad():
        table[pt.first_id] = init
    contexts = te(batch.ids["text"])[0]
    noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
    pred = unet(noisy, batch.timesteps, encoder_hidden_states=contexts).sample
    loss = torch.nn.functional.mse_loss(pred, batch.noise)
    loss.backward()
    grad = table.grad[pt.first_id]

    assert result.losses[0][1] == pytest.approx(loss.item(), rel=1e-5)
    # AdamW's first step (bias-corrected) moves each coordinate by lr * g / (|g| + eps)
    expected = init - lr * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(result.vectors[0, 0], expected, rtol=1e-5, atol=1e-6)


def test_kde_weight_zero_leaves_training_unchanged(tiny_model, tmp_path):
    runs = {
        "default": make_cfg(tiny_model, tmp_path / "a", "kde.weight=0"),
        "odd_bandwidth": make_cfg(tiny_model, tmp_path / "b", "kde.weight=0", "kde.bandwidth=1e-4"),
        "active": make_cfg(tiny_model, tmp_path / "c", "kde.weight=0.01"),
    }
    res = {k: train(c, progress=False) for k, c in runs.items()}
    assert torch.equal(res["default"].vectors, res["odd_bandwidth"].vectors)
    assert res["default"].losses == res["odd_bandwidth"].losses
    assert not torch.equal(res["default"].vectors, res["active"].vectors)


def test_resume_is_exact(tiny_model, tmp_path):
    common = (
        "train.checkpoint_every=2",
        "train.lr_scheduler=cosine",
        "train.gradient_accumulation_steps=2",
        "kde.weight=0.5",
    )
    straight = train(make_cfg(tiny_model, tmp_path / "straight", *common), progress=False)
    first = train(
        make_cfg(tiny_model, tmp_path / "resumed", *common), progress=False, stop_at_step=2
    )
    assert first.output_file is None
    assert (tmp_path / "resumed" / "checkpoints" / "step-000002" / "xti_state.json").is_file()
    second = train(
        make_cfg(tiny_model, tmp_path / "resumed", *common, "train.resume=latest"), progress=False
    )
    assert [s for s, _ in second.losses] == [3, 4]
    assert first.losses + second.losses == straight.losses
    assert torch.equal(second.vectors, straight.vectors)


def test_bf16_runs_the_frozen_models_in_bf16_and_keeps_vectors_fp32(tiny_model, tmp_path):
    cfg = make_cfg(tiny_model, tmp_path, "train.mixed_precision=bf16", "train.max_steps=2")
    bundle = load_model(cfg.model)
    seen = []
    bundle.unet.conv_in.register_forward_hook(lambda m, a, o: seen.append((a[0].dtype, o.dtype)))
    te_seen = []
    bundle.text_encoder.final_layer_norm.register_forward_hook(
        lambda m, a, o: te_seen.append(o.dtype)
    )
    result = train(cfg, bundle=bundle, progress=False)
    assert seen and all(out == torch.bfloat16 for _, out in seen)
    assert te_seen and all(d == torch.bfloat16 for d in te_seen)
    assert result.vectors.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor([loss for _, loss in result.losses])))
    with safe_open(str(result.output_file), "pt") as f:
        assert f.get_tensor("IN01").dtype == torch.float32


def test_an_error_in_a_step_leaves_the_callers_models_and_accelerate_as_they_were(
    tiny_model, tmp_path, monkeypatch
):
    from accelerate.state import AcceleratorState

    import xti.training

    cfg = make_cfg(tiny_model, tmp_path / "failed", "train.gradient_checkpointing=true")
    bundle = load_model(cfg.model)
    unet, te = bundle.unet, bundle.text_encoder
    processors = dict(unet.attn_processors)
    embedding = te.get_input_embeddings()
    real_compute_loss = xti.training.compute_loss
    calls = []

    def fails_at_step_2(models, batch, **kwargs):
        calls.append(1)
        # the training hooks are in place while a step runs
        assert te.get_input_embeddings() is not embedding
        assert dict(unet.attn_processors) != processors
        if len(calls) == 2:
            raise RuntimeError("boom at step 2")
        return real_compute_loss(models, batch, **kwargs)

    monkeypatch.setattr(xti.training, "compute_loss", fails_at_step_2)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        train(cfg, bundle=bundle, progress=False)
    assert len(calls) == 2

    after = dict(unet.attn_processors)
    assert after.keys() == processors.keys()
    assert all(after[k] is processors[k] for k in processors), "the same processor objects"
    assert te.get_input_embeddings() is embedding
    assert type(embedding) is torch.nn.Embedding
    assert not unet.is_gradient_checkpointing
    assert not AcceleratorState._shared_state, "Accelerate's process-wide state is reset"
    assert not (tmp_path / "failed" / ".xti.lock").exists()

    # the same models train again (the tokenizer keeps <box>, as documented: a new placeholder),
    # in another mixed precision, in the same process
    monkeypatch.setattr(xti.training, "compute_loss", real_compute_loss)
    again = make_cfg(
        tiny_model, tmp_path / "again", "concept.placeholder=<box2>", "train.mixed_precision=bf16",
        "train.max_steps=1",
    )  # fmt: skip
    result = train(again, bundle=bundle, progress=False)
    assert result.steps == 1 and result.output_file is not None
    assert AcceleratorState._shared_state == {}
