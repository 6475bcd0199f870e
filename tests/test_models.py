"""Model builders and loading: the tiny SD1 folder, reference configs, family, errors, builtins."""

from __future__ import annotations

import pickle
import shutil
import socket
import types
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from xti import builtin as builders
from xti.builtin import (
    CLIP_L_TEXT_CONFIG,
    OPENCLIP_H_TEXT_CONFIG,
    SD1_SCHEDULER_CONFIG,
    SD2_SCHEDULER_CONFIG,
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    build_meta_text_encoder,
    build_meta_unet,
    build_tiny_sd1,
    build_tiny_sd1_components,
    resolve_builtin,
)
from xti.config import ModelConfig
from xti.errors import XTIError
from xti.families import SD1, SD2, SDXL, detect
from xti.models import ModelBundle, load_model, training_scheduler


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these tests on one torch thread: tiny models gain nothing from two, and on a shared
    2-core machine two spinning OpenMP threads turn 0.1 s steps into multi-second stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1", seed=0)


@pytest.fixture(scope="module")
def bundle(tiny_folder: Path) -> ModelBundle:
    return load_model(ModelConfig(path=str(tiny_folder)))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any socket connection fail, so a load that reaches for the network errors out."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def cross_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Transformer2DModel)
        and any(getattr(b.attn2, "is_cross_attention", False) for b in module.transformer_blocks)
    ]


def split(names: list[str]) -> tuple[int, int, int]:
    down = sum(n.startswith("down_blocks") for n in names)
    mid = sum(n.startswith("mid_block") for n in names)
    up = sum(n.startswith("up_blocks") for n in names)
    return down, mid, up


# --------------------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------------------


def test_tiny_folder_layout(tiny_folder: Path) -> None:
    names = {p.name for p in tiny_folder.iterdir()}
    assert {"model_index.json", "tokenizer", "text_encoder", "unet", "vae", "scheduler"} <= names
    assert not [p for p in tiny_folder.parent.iterdir() if ".tmp-" in p.name]  # no leftovers


def test_tiny_components(bundle: ModelBundle) -> None:
    unet, te, vae = bundle.unet, bundle.text_encoder, bundle.vae
    layers = cross_attention_layers(unet)
    assert len(layers) == 16 and split(layers) == (6, 1, 9)
    assert unet.config.cross_attention_dim == te.config.hidden_size == 32
    assert te.config.vocab_size == 49408
    assert (te.config.bos_token_id, te.config.eos_token_id, te.config.pad_token_id) == (
        49406,
        49407,
        49407,
    )
    # 32x32 images become 16x16x4 latents and decode back to 32x32.
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        assert latents.shape == (1, 4, 16, 16)
        assert vae.decode(latents).sample.shape == (1, 3, 32, 32)
    assert vae.config.scaling_factor > 0


def test_pooled_output_reads_true_eos(bundle: ModelBundle) -> None:
    # With eos 49407 in the config, transformers pools at the first EOS, also after added tokens.
    tok = bundle.tokenizer
    ids = tok("a photo of a cat", return_tensors="pt").input_ids
    with torch.no_grad():
        out = bundle.text_encoder(ids)
    eos_pos = int((ids[0] == 49407).nonzero()[0])
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, eos_pos])


def test_tiny_roundtrip_same_outputs(bundle: ModelBundle) -> None:
    built = build_tiny_sd1_components(seed=0)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = built["unet"](sample, t, context).sample
        got = bundle.unet(sample, t, context).sample
        assert torch.equal(ref, got)
        ids = bundle.tokenizer("a photo of a cat", return_tensors="pt").input_ids
        assert torch.equal(
            built["text_encoder"](ids).last_hidden_state,
            bundle.text_encoder(ids).last_hidden_state,
        )
    # A different seed gives different weights.
    other = builders.build_unet(builders.TINY_UNET_CONFIG, seed=123)
    with torch.no_grad():
        assert not torch.equal(other(sample, t, context).sample, ref)


def test_pipeline_runs_from_folder(tiny_folder: Path, no_network: None) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_folder), local_files_only=True)
    assert pipe.safety_checker is None
    out = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3)
    assert bool(torch.isfinite(torch.from_numpy(out.images)).all())


def test_tiny_training_step_reaches_context(bundle: ModelBundle) -> None:
    # The frozen UNet still passes gradients to the context (what XTI trains through).
    # Speed is measured, not asserted: ~0.05-0.1 s here, but shared CPUs give multi-second spikes.
    context = torch.randn(2, 77, 32, requires_grad=True)
    sample = torch.randn(2, 4, 16, 16)
    out = bundle.unet(sample, torch.tensor([100, 900]), context).sample
    out.square().mean().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert all(p.grad is None for p in bundle.unet.parameters())


# --------------------------------------------------------------------------------------------------
# load_model on good input
# --------------------------------------------------------------------------------------------------


def test_load_model_bundle(bundle: ModelBundle, tiny_folder: Path) -> None:
    assert isinstance(bundle.tokenizer, CLIPTokenizer)
    assert isinstance(bundle.text_encoder, CLIPTextModel)
    assert isinstance(bundle.unet, UNet2DConditionModel)
    assert isinstance(bundle.vae, AutoencoderKL)
    assert isinstance(bundle.noise_scheduler, DDPMScheduler)
    assert bundle.family.name == "sd1"
    assert bundle.prediction_type == "epsilon"
    assert bundle.source == str(tiny_folder)
    assert bundle.tokenizer("a photo of a cat").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
    ]
    for model in (bundle.text_encoder, bundle.unet, bundle.vae):
        assert not model.training
        params = list(model.parameters())
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
        assert not any(p.requires_grad for p in params)
    sched = bundle.noise_scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert sched.num_train_timesteps == 1000


def test_load_model_is_offline(tiny_folder: Path, no_network: None) -> None:
    bundle = load_model(ModelConfig(path=str(tiny_folder), family="sd1"))
    assert bundle.family.name == "sd1"


def test_family_override(tiny_folder: Path) -> None:
    assert load_model(ModelConfig(path=str(tiny_folder), family="sd2")).family is SD2


def test_family_that_contradicts_the_model_is_one_line(tiny_folder: Path, tiny_sdxl: Path) -> None:
    """sd1 and sd2 may relabel each other; SDXL against SD 1.x/2.x is an error naming
    model.family."""
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(tiny_sdxl), family="sd1"))
    assert_one_line(err, "model.family", "sd1", "sdxl", str(tiny_sdxl))
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(tiny_folder), family="sdxl"))
    assert_one_line(err, "model.family", "sdxl", "sd1", str(tiny_folder))


def test_training_scheduler_keeps_model_settings() -> None:
    sd1 = training_scheduler(SD1_SCHEDULER_CONFIG)
    assert isinstance(sd1, DDPMScheduler)
    assert sd1.config.prediction_type == "epsilon" and sd1.config.steps_offset == 1
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(sd1.alphas_cumprod, ref.alphas_cumprod)
    sd2 = training_scheduler(SD2_SCHEDULER_CONFIG)
    assert sd2.config.prediction_type == "v_prediction"
    zsnr = training_scheduler(
        {**SD2_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    )
    assert zsnr.config.rescale_betas_zero_snr and zsnr.config.timestep_spacing == "trailing"
    assert float(zsnr.alphas_cumprod[-1]) < 1e-6


# --------------------------------------------------------------------------------------------------
# Reference configs and family detection
# --------------------------------------------------------------------------------------------------


def test_reference_unets_on_meta() -> None:
    sd15 = build_meta_unet(SD15_UNET_CONFIG)
    sd21 = build_meta_unet(SD21_UNET_CONFIG)
    assert next(sd15.parameters()).device.type == "meta"
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    for unet in (sd15, sd21):
        assert split(cross_attention_layers(unet)) == (6, 1, 9)
    assert isinstance(sd21.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert isinstance(sd15.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    # attention_head_dim [5, 10, 20, 20] is the head count per block: 64-wide heads everywhere.
    assert sd21.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads == 5
    assert sd21.down_blocks[2].attentions[0].transformer_blocks[0].attn2.heads == 20

    te_l = build_meta_text_encoder(CLIP_L_TEXT_CONFIG)
    te_h = build_meta_text_encoder(OPENCLIP_H_TEXT_CONFIG)
    assert te_l.config.num_hidden_layers == 12 and te_l.config.hidden_size == 768
    assert te_h.config.num_hidden_layers == 23 and te_h.config.hidden_act == "gelu"
    layers = [n for n, m in te_h.named_modules() if type(m).__name__ == "CLIPEncoderLayer"]
    assert len(layers) == 23
    assert detect(sd15, te_l) is SD1 and SD1.name == "sd1"
    assert detect(sd21, te_h) is SD2 and SD2.name == "sd2"
    assert detect(sd21, None) is SD2
    assert detect(None, te_h) is SD2
    with pytest.raises(XTIError, match="768.*1024|1024.*768"):
        detect(sd21, te_l)


def test_detect_family_tiny_and_sdxl(bundle: ModelBundle) -> None:
    assert detect(bundle.unet, bundle.text_encoder) is SD1
    sdxl = types.SimpleNamespace(
        config=types.SimpleNamespace(cross_attention_dim=2048, addition_embed_type="text_time")
    )
    assert detect(sdxl, None) is SDXL and SDXL.name == "sdxl"


# --------------------------------------------------------------------------------------------------
# builtin:
# --------------------------------------------------------------------------------------------------


def test_builtin_builds_once_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("XTI_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    real = builders.build_tiny_sd1

    def counting(folder, **kwargs):
        calls.append(str(folder))
        return real(folder, **kwargs)

    monkeypatch.setattr(builders, "build_tiny_sd1", counting)
    first = resolve_builtin("builtin:tiny-sd1-v")
    assert first is not None and first.is_relative_to(tmp_path / "cache")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    second = resolve_builtin("builtin:tiny-sd1-v")
    assert second == first and len(calls) == 1
    assert (first / "model_index.json").stat().st_mtime_ns == stamp

    bundle = load_model(ModelConfig(path="builtin:tiny-sd1-v"))
    assert len(calls) == 1
    assert bundle.prediction_type == "v_prediction"
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"
    assert bundle.source == "builtin:tiny-sd1-v"
    assert bundle.family.name == "sd1"


def test_builtin_names() -> None:
    assert resolve_builtin("/some/folder") is None
    assert resolve_builtin("org/model") is None
    with pytest.raises(XTIError, match="builtin:tiny-sd1.*builtin:tiny-sd1-v") as info:
        resolve_builtin("builtin:huge-sdxl")
    assert "builtin:huge-sdxl" in str(info.value)


def test_build_replaces_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.txt").write_text("x")
    build_tiny_sd1(target, prediction_type="v_prediction")
    assert not (target / "stale.txt").exists()
    assert (target / "unet" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(XTIError, match="prediction_type"):
        build_tiny_sd1(tmp_path / "bad", prediction_type="sample")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Bad input: one-line XTIError naming the path and what to do
# --------------------------------------------------------------------------------------------------


def assert_one_line(err: pytest.ExceptionInfo[XTIError], *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=missing))
    assert_one_line(err, missing, "does not exist")
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path="just-a-name"))
    assert_one_line(err, "just-a-name", "does not exist")


def test_hub_id_offline_not_cached(no_network: None) -> None:
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path="xti-test-nobody/no-such-model"))
    assert_one_line(err, "xti-test-nobody/no-such-model", "offline")


def test_folder_missing_components(tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(folder)))
    assert_one_line(err, str(folder), "tokenizer/", "text_encoder/", "scheduler/", "needs")
    assert "missing tokenizer/, text_encoder/, scheduler/" in str(err.value)


def test_component_that_fails_to_load(tiny_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(broken)))
    assert_one_line(err, str(broken), "unet/")


def test_missing_variant(tiny_folder: Path) -> None:
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(tiny_folder), variant="fp16"))
    assert_one_line(err, str(tiny_folder), "text_encoder/", "fp16")


def test_single_file_without_config_offline(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(file))
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(file)))
    assert_one_line(err, str(file), "single_file_config")
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(file), single_file_config=str(tmp_path / "no-config")))
    assert_one_line(err, str(tmp_path / "no-config"), "does not exist")


def test_single_file_plumbing(
    tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    # No LDM-format checkpoint can be made offline, so stand in for diffusers' converter and check
    # what load_model asks of it and does with the pipeline it returns.
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(file))
    seen: dict = {}

    def fake_from_single_file(path, **kwargs):
        seen.update(kwargs, path=path)
        return StableDiffusionPipeline.from_pretrained(str(tiny_folder), local_files_only=True)

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", fake_from_single_file)
    bundle = load_model(ModelConfig(path=str(file), single_file_config=str(tiny_folder)))
    assert seen["path"] == str(file)
    assert seen["config"] == str(tiny_folder)
    assert seen["local_files_only"] is True
    assert bundle.source == str(file)
    assert bundle.family.name == "sd1" and bundle.prediction_type == "epsilon"
    assert isinstance(bundle.noise_scheduler, DDPMScheduler)
    assert not any(p.requires_grad for p in bundle.unet.parameters())


def test_single_file_that_fails_to_load(
    tmp_path: Path, tiny_folder: Path, no_network: None
) -> None:
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(file))
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(file), single_file_config=str(tiny_folder)))
    assert_one_line(err, str(file), "cannot load")


class _Trap:
    """Unpickling this object creates a file: proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_refused_without_allow_pickle(tmp_path: Path, tiny_folder: Path) -> None:
    file = tmp_path / "model.ckpt"
    marker = tmp_path / "code-ran"
    file.write_bytes(pickle.dumps({"state_dict": _Trap(marker)}, protocol=2))
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(file), single_file_config=str(tiny_folder)))
    assert_one_line(err, str(file), "allow_pickle", ".safetensors")
    assert not marker.exists()


def test_ckpt_with_allow_pickle_loads_weights_only(
    tmp_path: Path, tiny_folder: Path, no_network: None
) -> None:
    file = tmp_path / "model.ckpt"
    marker = tmp_path / "code-ran"
    file.write_bytes(pickle.dumps({"state_dict": _Trap(marker)}, protocol=2))
    cfg = ModelConfig(path=str(file), allow_pickle=True, single_file_config=str(tiny_folder))
    with pytest.raises(XTIError) as err:
        load_model(cfg)
    assert_one_line(err, str(file), "cannot load")
    assert not marker.exists()  # torch.load(weights_only=True) refused the code

    # A plain tensor checkpoint passes the gate and reaches the converter, which reports what
    # is missing.
    torch.save({"state_dict": {"w": torch.zeros(2)}}, str(file))
    with pytest.raises(XTIError) as err:
        load_model(cfg)
    assert_one_line(err, str(file), "cannot load")
    assert "set model.allow_pickle" not in str(err.value)


def test_unknown_file_type(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("hello")
    with pytest.raises(XTIError) as err:
        load_model(ModelConfig(path=str(file)))
    assert_one_line(err, str(file), "not a model checkpoint")


# ----------------------------------------------------------------------------- one model-path resolver


def fake_converter(monkeypatch: pytest.MonkeyPatch, cls: type, folder: Path) -> dict:
    """Stand in for diffusers' single-file converter (no original-format checkpoint can be made
    offline): record what it is asked and return the pipeline of `folder`."""
    seen: dict = {}

    def from_single_file(path, **kwargs):
        seen.update(kwargs, path=path)
        return cls.from_pretrained(str(folder), local_files_only=True)

    monkeypatch.setattr(cls, "from_single_file", from_single_file)
    return seen


def fake_hub_cache(monkeypatch: pytest.MonkeyPatch, root: Path, repo_id: str, folder: Path) -> None:
    """Put `folder` into a hub cache at `root` as a download of `repo_id` would leave it."""
    import huggingface_hub.constants as hub

    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(root))


def test_resolver_kinds_and_errors(tmp_path: Path, tiny_folder: Path) -> None:
    from xti.models import resolve_model_path

    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(file))
    assert resolve_model_path(str(tiny_folder)).kind == "folder"
    assert resolve_model_path(f" {file} ").kind == "file"
    assert resolve_model_path("org/name").kind == "hub"
    assert resolve_model_path("builtin:tiny-sd1", build=False).location == ""
    for bad, needle in [
        ("", "give a diffusers folder"),
        ("builtin:nope", "known builtin models"),
        (str(tmp_path / "missing"), "does not exist"),
    ]:
        with pytest.raises(XTIError) as err:
            resolve_model_path(bad, build=False)
        assert_one_line(err, needle)


def test_single_file_sdxl_with_a_hub_id_config(
    tmp_path: Path, tiny_sdxl: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    # The config's model_index.json says SDXL: the SDXL pipeline converts the file (it used to be
    # built with SD1's specs whenever the config was a hub id).
    from diffusers import StableDiffusionXLPipeline

    fake_hub_cache(monkeypatch, tmp_path / "hub", "org/tiny-sdxl", tiny_sdxl)
    seen = fake_converter(monkeypatch, StableDiffusionXLPipeline, tiny_sdxl)
    file = tmp_path / "sdxl.safetensors"
    save_file({"w": torch.zeros(2)}, str(file))
    bundle = load_model(ModelConfig(path=str(file), single_file_config="org/tiny-sdxl"))
    assert seen["path"] == str(file) and seen["config"] == "org/tiny-sdxl"
    assert seen["local_files_only"] is True  # offline: the hub cache only
    assert bundle.family.name == "sdxl"
    assert bundle.text_encoder_2 is not None and bundle.tokenizer_2 is not None


def test_checkpoint_family_from_tensor_names(tmp_path: Path) -> None:
    from xti.models import _checkpoint_specs

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(sdxl))
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, str(sd1))
    assert _checkpoint_specs(sdxl) == SDXL.specs
    assert _checkpoint_specs(sd1) == SD1.specs


def test_single_file_everywhere(
    tmp_path: Path,
    tiny_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_network: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # generate's pipeline, `xti layers`, `xti inspect --model` and `xti generate` take a single
    # file with its config, and refuse it offline without one with the same line as training.
    from xti.cli import main
    from xti.export import build_metadata, save_embedding_file
    from xti.layers import layer_scheme
    from xti.models import load_text_encoder, load_unet_structure
    from xti.pipelines import load_pipeline

    seen = fake_converter(monkeypatch, StableDiffusionPipeline, tiny_folder)
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(file))
    pipe = load_pipeline(str(file), device="cpu", config=str(tiny_folder))
    assert isinstance(pipe, StableDiffusionPipeline) and seen["config"] == str(tiny_folder)
    unet = load_unet_structure(str(file), str(tiny_folder))
    assert len(layer_scheme(unet, "block")) == 16 and unet.device.type == "meta"
    tokenizer, _ = load_text_encoder(str(file), SD1.specs[0], str(tiny_folder))
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    for call in (
        lambda: load_pipeline(str(file), device="cpu"),
        lambda: load_unet_structure(str(file)),
        lambda: load_model(ModelConfig(path=str(file))),
    ):
        with pytest.raises(XTIError) as err:
            call()
        assert_one_line(err, str(file), "single_file_config")

    emb = tmp_path / "c.xti.safetensors"
    layers = layer_scheme(unet, "block").names
    meta = build_metadata(
        layers=layers, granularity="block", placeholder="<c>", initializer="box", n_vectors=1,
        family="sd1", base_model="tiny", text_dims={"text": 32}, steps=0, kde_weight=0.0,
    )  # fmt: skip
    save_embedding_file(emb, {n: torch.randn(1, 32) for n in layers}, meta)
    out = tmp_path / "images"
    args = ["generate", "--model", str(file), "--model-config", str(tiny_folder), "-e", str(emb),
            "--prompt", "a <c>", "--steps", "1", "--size", "32", "--out-dir", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert len(list(out.glob("*.png"))) == 1
    capsys.readouterr()
    assert main(["layers", str(file), "--model-config", str(tiny_folder)]) == 0
    assert capsys.readouterr().out.split() == layers
    assert main(["generate", *args[1:3], *args[5:]]) == 2
    assert "single_file_config" in capsys.readouterr().err
