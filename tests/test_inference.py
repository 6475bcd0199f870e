"""Inference in stock diffusers pipelines (DESIGN §7): bit identity with stock TI and the stock
pipeline, per-layer routing, style mixing, per-layer prompts, file formats, safety, FreeU,
scheduler swaps and unload."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from xti.attention import XTIAttnProcessor
from xti.errors import XTIError
from xti.export import build_metadata, load_embedding_file, save_embedding_file
from xti.inference import XTIAdapter, export_kohya, export_ti, load_xti, set_scheduler
from xti.layers import layer_scheme

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


@contextlib.contextmanager
def captured_contexts(pipe, scheme):
    """Record the context each layer's cross-attention reads (the input of ``attn2.to_k``) in
    the first UNet call."""
    seen: dict[int, torch.Tensor] = {}
    modules = dict(pipe.unet.named_modules())
    hooks = []
    for i, layer in enumerate(scheme.layers):
        for path in layer.cross_attention_paths:

            def hook(_m, args, i=i):
                seen.setdefault(i, args[0].detach().clone())

            hooks.append(modules[f"{path}.to_k"].register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def stock_contexts(pipe, prompts, negative, n, cfg=True) -> torch.Tensor:
    pos, neg = pipe.encode_prompt(prompts, "cpu", n, cfg, negative)
    return torch.cat([neg, pos]) if cfg else pos


def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


# ----------------------------------------------------------------------------- bit identity


def test_equal_layers_generate_like_stock_textual_inversion(tiny_model, pipe, layers, tmp_path):
    vec = random_vectors(0, 2, D)  # two vectors per layer, the same in every layer
    path = write_file(tmp_path / "a.xti.safetensors", {n: vec for n in layers}, "<a>")
    negative = ["blurry", "blurry"]
    args = dict(negative_prompt=negative, num_images_per_prompt=2, generator=seeded(), **STEPS)
    with load_xti(pipe, path) as xti:
        calls, handle = count_calls(pipe.text_encoder)
        encoded = xti.encode(
            ["a <a> on a table", "<a>"], negative_prompt=negative, num_images_per_prompt=2
        )
        handle.remove()
        assert len(calls) == 1, "one text-encoder call for all layers, prompts and negatives"
        assert encoded.num_sequences == 3  # equal layers collapse: 2 prompts + 1 negative
        ours = xti(["a <a> on a table", "<a>"], **args).images

    stock = new_pipe(tiny_model)
    stock.load_textual_inversion(vec.clone(), token="<a>")
    expected = stock(["a <a> on a table", "<a>"], **{**args, "generator": seeded()}).images
    assert ours.shape == (4, 32, 32, 3)
    assert (ours == expected).all()


def test_no_placeholder_and_equal_layer_prompts_generate_like_stock(pipe, layers, tmp_path):
    processors = pipe.unet.attn_processors
    embedding = pipe.text_encoder.get_input_embeddings()
    weight = embedding.weight.detach().clone()
    vocab = dict(pipe.tokenizer.get_vocab())
    before = pipe("a red cube", generator=seeded(), **STEPS).images

    path = write_file(tmp_path / "a.xti.safetensors", {n: random_vectors(1, 1, D) for n in layers}, "<a>")  # fmt: skip
    xti = load_xti(pipe, path)
    try:
        stock_call = pipe("a red cube", generator=seeded(), **STEPS).images
        plain = xti("a red cube", generator=seeded(), **STEPS).images
        same = xti(layer_prompts={"all": "a red cube"}, generator=seeded(), **STEPS).images
        assert (stock_call == before).all() and (plain == before).all() and (same == before).all()
        split = xti.encode(layer_prompts={"coarse": "a red cube", "fine": "a red cube"})
        assert split.num_sequences == 2  # one prompt and one negative, whatever the layer count
        assert torch.equal(split.contexts, xti.encode("a red cube").contexts)
        assert len(pipe.tokenizer) == len(vocab), "the pipeline's tokenizer is never changed"
    finally:
        xti.unload()
    after = pipe.unet.attn_processors
    assert all(after[k] is processors[k] for k in processors), "original processor objects back"
    assert pipe.text_encoder.get_input_embeddings() is embedding
    assert torch.equal(embedding.weight, weight)
    assert pipe.tokenizer.get_vocab() == vocab and "<a>" not in pipe.tokenizer.get_vocab()
    assert (pipe("a red cube", generator=seeded(), **STEPS).images == before).all()
    with pytest.raises(XTIError, match="unloaded"):
        xti("a red cube")


def test_stock_call_with_encoded_kwargs_and_clip_skip(pipe, layers, tmp_path):
    per_layer = random_vectors(12, len(layers), 1, D)
    path = write_file(
        tmp_path / "p.xti.safetensors", {n: per_layer[i] for i, n in enumerate(layers)}, "<p>"
    )
    with load_xti(pipe, path) as xti:
        ours = xti("a <p>", negative_prompt="ugly", generator=seeded(), **STEPS).images
        encoded = xti.encode("a <p>", negative_prompt="ugly")
        by_hand = pipe(**encoded.pipeline_kwargs(), generator=seeded(), **STEPS).images
        assert (ours == by_hand).all()

        skipped = xti.encode("a red cube", clip_skip=1, do_classifier_free_guidance=False)
        ids = pipe.tokenizer(
            "a red cube", padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            expected = pipe.text_encoder.final_layer_norm(hidden)
        assert torch.equal(skipped.prompt_embeds, expected)
        assert skipped.negative_prompt_embeds is None and skipped.contexts.shape[1] == 1


# ----------------------------------------------------------------------------- routing


def test_each_layer_reads_its_own_vector(tiny_model, pipe, layers, tmp_path):
    per_layer = random_vectors(2, len(layers), 1, D)
    path = write_file(
        tmp_path / "p.xti.safetensors", {n: per_layer[i] for i, n in enumerate(layers)}, "<p>"
    )
    stock = new_pipe(tiny_model)
    tokens = [f"<v{i}>" for i in range(len(layers))]
    stock.load_textual_inversion([v[0].clone() for v in per_layer], token=tokens)
    scheme = layer_scheme(pipe.unet)
    with load_xti(pipe, path) as xti, captured_contexts(pipe, scheme) as seen:
        encoded = xti.encode("a photo of <p>", num_images_per_prompt=1)
        assert encoded.num_sequences == len(layers) + 1
        xti("a photo of <p>", generator=seeded(), **STEPS)
    for i in range(len(layers)):
        expected = stock_contexts(stock, f"a photo of <v{i}>", None, 1)
        assert torch.equal(seen[i], expected), layers[i]


def test_mixing_routes_concepts_by_layer_with_cfg_negative_and_repeats(
    tiny_model, pipe, layers, tmp_path
):
    vec_a, vec_b = random_vectors(3, 1, D), random_vectors(4, 1, D)
    file_a = write_file(tmp_path / "a.xti.safetensors", {n: vec_a for n in layers}, "<a>")
    file_b = write_file(tmp_path / "b.xti.safetensors", {n: vec_b for n in layers}, "<b>")
    stock = new_pipe(tiny_model)
    stock.load_textual_inversion([vec_a[0].clone(), vec_b[0].clone()], token=["<a>", "<b>"])
    prompts = ["a photo of <a>", "<a> on a table"]
    negative = ["blurry", "blurry"]
    expect_a = stock_contexts(stock, prompts, negative, 2)
    expect_b = stock_contexts(stock, [p.replace("<a>", "<b>") for p in prompts], negative, 2)
    assert not torch.equal(expect_a, expect_b)

    scheme = layer_scheme(pipe.unet)
    coarse = set(scheme.select("coarse"))
    assert 0 < len(coarse) < len(layers)
    mix = {"<a>": "coarse", "<b>": "fine"}
    with load_xti(pipe, [file_a, file_b]) as xti:
        with captured_contexts(pipe, scheme) as seen:
            out = xti(
                prompts,
                negative_prompt="blurry",
                mix=mix,
                num_images_per_prompt=2,
                guidance_scale=5.0,
                generator=seeded(),
                **STEPS,
            )
        assert out.images.shape[0] == 4
        for i in range(len(layers)):
            expected = expect_a if i in coarse else expect_b
            assert seen[i].shape[0] == 8  # [negatives x2, prompts x2] for 2 prompts
            assert torch.equal(seen[i], expected), layers[i]

        # the same routing from other spellings: any mixed placeholder, later entries win, ranges
        prompts_b = [p.replace("<a>", "<b>") for p in prompts]
        for texts, other in [
            (prompts_b, mix),
            (prompts, {"<b>": "all", "<a>": "coarse"}),
            (prompts, {"<a>": "IN07-OUT05", "<b>": ["IN01-IN05", "OUT06-OUT11"]}),
        ]:
            contexts = xti.encode(
                texts, negative_prompt="blurry", mix=other, num_images_per_prompt=2
            ).contexts
            assert all(torch.equal(contexts[i], seen[i]) for i in range(len(layers))), other


def test_per_layer_prompts_without_training_and_without_cfg(tiny_model, pipe, layers):
    stock = new_pipe(tiny_model)
    cube = stock_contexts(stock, "a red cube", None, 1, cfg=False)
    lizard = stock_contexts(stock, "a green lizard", None, 1, cfg=False)
    scheme = layer_scheme(pipe.unet)
    mid = scheme.index("MID")
    with XTIAdapter(pipe) as xti, captured_contexts(pipe, scheme) as seen:
        calls, handle = count_calls(pipe.text_encoder)
        xti(
            "a red cube",
            layer_prompts={"mid": "a green lizard"},
            guidance_scale=1.0,
            generator=seeded(),
            **STEPS,
        )
        handle.remove()
    assert len(calls) == 1
    for i in range(len(layers)):
        assert torch.equal(seen[i], lizard if i == mid else cube), layers[i]


def test_selection_errors_are_one_line(pipe, layers, tmp_path):
    path = write_file(tmp_path / "a.xti.safetensors", {n: random_vectors(5, 1, D) for n in layers}, "<a>")  # fmt: skip
    with load_xti(pipe, path) as xti:
        for kwargs, match in [
            (dict(mix={"<zz>": "coarse"}), "not a loaded concept"),
            (dict(mix={"<a>": "IN99"}), "unknown layer"),
            (dict(layer_prompts={"OUT11-IN01": "x"}), "reversed"),
        ]:
            with pytest.raises(XTIError, match=match) as err:
                xti.encode("a <a>", **kwargs)
            assert "\n" not in str(err.value)
        with pytest.raises(XTIError, match="no prompt for layers"):
            xti.encode(None, layer_prompts={"mid": "x"})
        with pytest.raises(XTIError, match="no prompt contains"):
            xti.encode("a cube", mix={"<a>": "coarse"})
        with pytest.raises(XTIError, match="already loaded"):
            xti.load(path)


def test_processors_replaced_by_the_user_are_wrapped_again(pipe, layers, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor

    path = write_file(tmp_path / "a.xti.safetensors", {n: random_vectors(6, 1, D) for n in layers}, "<a>")  # fmt: skip
    original = pipe.unet.attn_processors
    xti = load_xti(pipe, path)
    try:
        pipe.unet.set_attn_processor(AttnProcessor())
        xti("a <a>", generator=seeded(), **STEPS)
        assert all(isinstance(p, XTIAttnProcessor) for p in pipe.unet.attn_processors.values())
        xti.unload()
        restored = pipe.unet.attn_processors
        assert all(isinstance(p, AttnProcessor) for p in restored.values())
    finally:
        xti.unload()
        pipe.unet.set_attn_processor(dict(original))


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


def test_ti_export_loads_with_stock_load_textual_inversion(tiny_model, layers, tmp_path):
    vectors = {n: random_vectors(30 + i, 2, D) for i, n in enumerate(layers)}
    xti_file = write_file(tmp_path / "c.xti.safetensors", vectors, "<c>")
    mean_file = export_ti(xti_file, mean=True)
    layer_file = export_ti(xti_file, tmp_path / "mid.safetensors", layer="MID")
    assert mean_file.name == "c-mean.ti.safetensors"
    assert set(load_file(mean_file)) == {"emb_params"}
    stock = new_pipe(tiny_model)
    stock.load_textual_inversion(str(mean_file), token="<m>")
    stock.load_textual_inversion(str(layer_file), token="<l>")
    weight = stock.text_encoder.get_input_embeddings().weight
    ids = stock.tokenizer.convert_tokens_to_ids(["<m>", "<m>_1", "<l>", "<l>_1"])
    mean = torch.stack(list(vectors.values())).mean(0)
    assert torch.allclose(weight[ids[:2]], mean) and torch.equal(weight[ids[2:]], vectors["MID"])


def test_ti_export_of_an_sdxl_file_gives_clip_l_and_clip_g(tiny_model, tmp_path):
    names = ["IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]  # fmt: skip
    vectors = {}
    for i, n in enumerate(names):
        vectors[f"clip_l.{n}"] = random_vectors(50 + i, 1, D)
        vectors[f"clip_g.{n}"] = random_vectors(80 + i, 1, D)
    meta = build_metadata(
        layers=names, granularity="block", placeholder="<x>", initializer="x", n_vectors=1,
        family="sdxl", base_model="tiny-xl", text_dims={"clip_l": D, "clip_g": D}, steps=0,
        kde_weight=0.0,
    )  # fmt: skip
    xl = save_embedding_file(tmp_path / "x.xti.safetensors", vectors, meta)
    out = load_file(export_ti(xl, layer="MID"))
    assert set(out) == {"clip_l", "clip_g"}
    assert torch.equal(out["clip_l"], vectors["clip_l.MID"])
    assert torch.equal(out["clip_g"], vectors["clip_g.MID"])
    # diffusers' SDXL recipe: one load_textual_inversion per encoder with its tensor
    stock = new_pipe(tiny_model)
    stock.load_textual_inversion(
        out["clip_g"], token="<x>", text_encoder=stock.text_encoder, tokenizer=stock.tokenizer
    )
    row = stock.text_encoder.get_input_embeddings().weight[
        stock.tokenizer.convert_tokens_to_ids("<x>")
    ]
    assert torch.equal(row, vectors["clip_g.MID"][0])
    with XTIAdapter(stock) as xti, pytest.raises(XTIError, match="SDXL file"):
        xti.load(xl)


def test_pickle_refused_by_default_and_weights_only_when_allowed(pipe, layers, tmp_path):
    pt = tmp_path / "k.pt"
    torch.save({n: random_vectors(7, 1, D) for n in layers}, pt)
    with XTIAdapter(pipe) as xti:
        with pytest.raises(XTIError, match="pickled file refused"):
            xti.load(pt, "<k>")
        assert xti.load(pt, "<k>", allow_pickle=True).vectors.shape == (len(layers), 1, D)


def test_mismatched_files_fail_with_one_line_naming_both(pipe, layers, tmp_path):
    wide = write_file(tmp_path / "w.xti.safetensors", {n: torch.zeros(1, 768) for n in layers}, "<w>")  # fmt: skip
    other = write_file(
        tmp_path / "o.xti.safetensors", {f"L{i}": torch.zeros(1, D) for i in range(11)}, "<o>"
    )
    with XTIAdapter(pipe) as xti:
        with pytest.raises(XTIError) as err:
            xti.load(wide)
        msg = str(err.value)
        assert "\n" not in msg and "768" in msg and "32" in msg and "w.xti.safetensors" in msg
        with pytest.raises(XTIError) as err:
            xti.load(other)
        msg = str(err.value)
        assert "\n" not in msg and "L0" in msg and "IN01" in msg and "OUT11" in msg


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
