"""Inference in a stock SD 1.x pipeline (DESIGN §7), what only SD 1.x/2.x has: clip_skip through
the final layer norm, kohya 16-key files, pickled files, FreeU with a scheduler swap, LoRA weights.

The promises SD and SDXL share (bit identity with the stock pipeline and stock TI, per-layer
routing, mixing, per-layer prompts, unload, file errors, plain-TI export) are checked for both in
test_inference_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from xti.errors import XTIError
from xti.export import build_metadata, export_kohya, load_embedding_file, save_embedding_file
from xti.inference import XTIAdapter, load_xti
from xti.layers import layer_scheme
from xti.pipelines import set_scheduler

D = 32  # width of the tiny text encoder
STEPS = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def new_pipe(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return new_pipe(tiny_model)


@pytest.fixture(scope="module")
def layers(pipe) -> list[str]:
    return layer_scheme(pipe.unet).names


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_vectors(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_file(path: Path, vectors: dict[str, torch.Tensor], placeholder: str | None) -> Path:
    layers = list(vectors)
    meta = build_metadata(
        layers=layers,
        granularity="block",
        placeholder=placeholder or "<unused>",
        initializer="box",
        n_vectors=next(iter(vectors.values())).shape[0],
        family="sd1",
        base_model="tiny",
        text_dims={"text": next(iter(vectors.values())).shape[1]},
        steps=0,
        kde_weight=0.0,
    )
    return save_embedding_file(path, vectors, meta)


# ----------------------------------------------------------------------------- encoding


def test_clip_skip_reads_the_final_layer_norm_of_an_earlier_layer(pipe):
    """As diffusers' SD ``clip_skip`` (its stock ``encode_prompt`` reaches for
    ``text_encoder.text_model``, which this transformers version's CLIPTextModel lacks)."""
    with XTIAdapter(pipe) as xti:
        skipped = xti.encode("a red cube", clip_skip=1, do_classifier_free_guidance=False)
    ids = pipe.tokenizer(
        "a red cube", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = pipe.text_encoder.final_layer_norm(hidden)
    assert torch.equal(skipped.prompt_embeds, expected)
    assert skipped.negative_prompt_embeds is None and skipped.contexts.shape[1] == 1
    assert all(torch.equal(c, expected) for c in skipped.contexts)


# ----------------------------------------------------------------------------- files


def test_kohya_files_round_trip_and_load(pipe, layers, tmp_path):
    vectors = {n: random_vectors(10 + i, 1, D) for i, n in enumerate(layers)}
    xti_file = write_file(tmp_path / "c.xti.safetensors", vectors, "<c>")
    kohya = export_kohya(xti_file)
    assert kohya.name == "c.kohya.safetensors"
    ef = load_embedding_file(kohya)
    assert ef.kind == "kohya" and ef.layers == layers
    assert all(torch.equal(ef.vectors[n], vectors[n]) for n in layers)
    with XTIAdapter(pipe) as xti:
        with pytest.raises(XTIError, match="names no placeholder"):
            xti.load(kohya)
        concept = xti.load(kohya, "<k>")
        assert torch.equal(concept.vectors[:, 0], torch.cat([vectors[n] for n in layers]))
        a = xti.encode("a <k>").contexts
        xti.load(xti_file)
        assert torch.equal(a, xti.encode("a <c>").contexts)


def test_pickle_refused_by_default_and_weights_only_when_allowed(pipe, layers, tmp_path):
    pt = tmp_path / "k.pt"
    torch.save({n: random_vectors(7, 1, D) for n in layers}, pt)
    with XTIAdapter(pipe) as xti:
        with pytest.raises(XTIError, match="pickled file refused"):
            xti.load(pt, "<k>")
        assert xti.load(pt, "<k>", allow_pickle=True).vectors.shape == (len(layers), 1, D)


# ----------------------------------------------------------------------------- combinations


def test_freeu_and_scheduler_swap_run_with_per_layer_contexts(tiny_model, layers, tmp_path):
    vec = random_vectors(8, 1, D)
    equal = write_file(tmp_path / "e.xti.safetensors", {n: vec for n in layers}, "<e>")
    distinct = write_file(
        tmp_path / "d.xti.safetensors",
        {n: random_vectors(60 + i, 1, D) for i, n in enumerate(layers)},
        "<d>",
    )
    ours_pipe, stock = new_pipe(tiny_model), new_pipe(tiny_model)
    stock.load_textual_inversion(vec[0].clone(), token="<e>")
    for p in (ours_pipe, stock):
        p.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    with load_xti(ours_pipe, [equal, distinct]) as xti:
        ours = xti("a <e>", negative_prompt="ugly", generator=seeded(), **STEPS).images
        mixed = xti("a <e> and <d>", negative_prompt="ugly", generator=seeded(), **STEPS).images
        set_scheduler(ours_pipe, "dpm++")
        other = xti("a <d>", generator=seeded(), **STEPS).images
    expected = stock("a <e>", negative_prompt="ugly", generator=seeded(), **STEPS).images
    assert (ours == expected).all()
    assert mixed.shape == other.shape == (1, 32, 32, 3) and not (mixed == ours).all()
    assert type(ours_pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(XTIError, match="unknown scheduler"):
        set_scheduler(ours_pipe, "nope")


def test_lora_weights_in_the_pipeline_work_alongside(tiny_model, layers, tmp_path):
    import peft  # a dev dependency: CI installs it, so this test never skips

    vec = random_vectors(9, 1, D)
    path = write_file(tmp_path / "e.xti.safetensors", {n: vec for n in layers}, "<e>")
    ours_pipe, stock, plain = new_pipe(tiny_model), new_pipe(tiny_model), new_pipe(tiny_model)
    for p in (stock, plain):
        p.load_textual_inversion(vec[0].clone(), token="<e>")
    for p in (ours_pipe, stock):
        torch.manual_seed(0)
        unet_lora = peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)  # fmt: skip
        p.unet.add_adapter(unet_lora)
        text_lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # fmt: skip
        p.text_encoder.add_adapter(text_lora)
    args = dict(negative_prompt="ugly", cross_attention_kwargs={"scale": 0.5}, **STEPS)
    with load_xti(ours_pipe, path) as xti:
        ours = xti("a <e>", generator=seeded(), **args).images
    assert (ours == stock("a <e>", generator=seeded(), **args).images).all()
    assert not (ours == plain("a <e>", generator=seeded(), **args).images).all()


def test_layers_left_at_the_plain_prompt_are_encoded_once(pipe, layers, tmp_path):
    """Per-layer rows that are equal (layers without the concept) cost one encoder row."""
    vectors = {n: random_vectors(70 + i, 1, D) for i, n in enumerate(layers)}
    path = write_file(tmp_path / "a.xti.safetensors", vectors, "<a>")
    with load_xti(pipe, path) as xti:
        encoded = xti.encode(
            "a red cube", layer_prompts={"mid": "a <a> cube"}, negative_prompt="ugly"
        )
        plain = xti.encode("a red cube", negative_prompt="ugly")
    assert encoded.num_sequences == 3, "the prompt (15 layers), MID's prompt, the negative"
    mid = layers.index("MID")
    others = [i for i in range(len(layers)) if i != mid]
    assert torch.equal(encoded.contexts[others], plain.contexts[others])
    assert not torch.equal(encoded.contexts[mid], plain.contexts[mid])
