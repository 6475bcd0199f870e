"""The inference contract, checked the same way for SD 1.x (tiny SD1) and SDXL (tiny SDXL).

Each test takes the ``family`` fixture (parametrised ``sd1`` / ``sdxl``): a loaded stock pipeline
of that family, its layer names and text-encoder widths, and helpers that write embedding files,
load plain textual inversion into a fresh stock pipeline (in every text encoder) and encode prompts
with the stock ``encode_prompt``. The promises (DESIGN §7):

* a prompt without placeholders, and per-layer prompts that are all equal, give the stock images
  bit for bit; the pipeline is left exactly as it was (processors, embeddings, tokenizers);
* a concept whose layers all hold the same vectors gives the images of stock
  ``load_textual_inversion`` of those vectors (SDXL: in both encoders; this needs text encoders
  configured with the true eos id 49407, as the tiny SDXL is, so that the stock pooled output is
  read at the first EOS);
* each layer's cross-attention reads its own context; style mixing and per-layer prompts route per
  layer, with classifier-free guidance and ``num_images_per_prompt`` laid out as the UNet batch;
* files of the other family, of other widths or other layers fail with one line naming both;
* plain-TI export loads into the stock pipeline; ``transformer``-granularity files load without
  being told; training and inference encode the same contexts for the same ids and vectors.

Family-only promises stay in test_inference.py (SD1: kohya files, FreeU, LoRA, pickles) and
test_inference_sdxl.py (SDXL: the POOL slot, zero negatives, clip_skip sides, training with
validation).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from safetensors.torch import load_file

from xti.attention import XTIAttnProcessor
from xti.cli import main
from xti.embeddings import (
    ConceptVectors,
    add_placeholder_tokens,
    encode_per_layer,
    install_token_embedding,
    layer_variants,
    tokenize,
)
from xti.errors import XTIError
from xti.export import SD1_LAYER_NAMES, build_metadata, export_ti, save_embedding_file
from xti.families import POOL, SD1, SDXL, EncoderPart, ModelFamily, named
from xti.inference import XTIAdapter, load_xti
from xti.layers import LayerScheme, layer_scheme

STEPS = dict(num_inference_steps=2, height=32, width=32, output_type="np")
SDXL_LAYERS = ["IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]  # fmt: skip
LAYOUTS: dict[str, tuple[list[str], dict[str, int]]] = {
    "sd1": (list(SD1_LAYER_NAMES), {"text": 32}),
    "sdxl": (SDXL_LAYERS, {"clip_l": 32, "clip_g": 48}),
}
"""Per family, the tiny model's block layers and text-encoder widths (to write files of a family
without its pipeline)."""

Vectors = Mapping[str, torch.Tensor]
"""``{encoder: [L, n, d]}`` per-layer vectors, or ``{encoder: [n, d]}`` one set."""


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_vectors(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_file(
    path: Path,
    family: ModelFamily,
    layers: Sequence[str],
    vectors: Vectors,
    placeholder: str,
    *,
    pool: torch.Tensor | None = None,
    granularity: str = "block",
) -> Path:
    """An xti file of ``family`` with ``vectors[encoder][i]`` for layer i (and SDXL's POOL)."""
    tensors = {
        family.file_key(enc, layer): vectors[enc][i]
        for i, layer in enumerate(layers)
        for enc in family.encoder_names
    }
    if pool is not None:
        tensors[family.file_key(SDXL.pool_encoder, POOL)] = pool
    first = next(iter(vectors.values()))
    meta = build_metadata(
        layers=list(layers),
        granularity=granularity,
        placeholder=placeholder,
        initializer="box",
        n_vectors=first.shape[-2],
        family=family.name,
        base_model=f"tiny-{family.name}",
        text_dims={enc: v.shape[-1] for enc, v in vectors.items()},
        steps=0,
        kde_weight=0.0,
        extra=family.metadata_extra("slot" if pool is not None else "mean"),
    )
    return save_embedding_file(path, tensors, meta)


class StockEmbeds(NamedTuple):
    """The stock ``encode_prompt``'s outputs; ``contexts`` and ``pooled`` in the UNet batch layout
    (``[negatives, prompts]`` with guidance)."""

    pos: torch.Tensor
    neg: torch.Tensor | None
    pooled: torch.Tensor | None
    neg_pooled: torch.Tensor | None

    @property
    def contexts(self) -> torch.Tensor:
        return self.pos if self.neg is None else torch.cat([self.neg, self.pos])

    @property
    def all_pooled(self) -> torch.Tensor | None:
        if self.pooled is None or self.neg_pooled is None:
            return self.pooled
        return torch.cat([self.neg_pooled, self.pooled])


@dataclass
class Family:
    """One family under test: its tiny model folder, a shared stock pipeline, and helpers."""

    name: str
    family: ModelFamily
    folder: Path
    pipe: Any
    layers: list[str]
    widths: dict[str, int]

    @property
    def label(self) -> str:
        return self.family.label

    @property
    def encoders(self) -> list[str]:
        return self.family.encoder_names

    @property
    def has_pooled(self) -> bool:
        """Whether the pipeline takes pooled text embeds (SDXL)."""
        return self.family.uses_time_ids

    @property
    def zero_negatives(self) -> bool:
        """Whether the stock pipeline uses zero negatives when no negative prompt is given."""
        return bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", False))

    @property
    def width(self) -> int:
        """The context width: the encoders' widths together."""
        return sum(self.widths.values())

    def new_pipe(self) -> Any:
        pipe = self.family.pipeline_type().from_pretrained(self.folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def parts(self, pipe: Any = None) -> list[EncoderPart]:
        return self.family.encoders(pipe if pipe is not None else self.pipe)

    def vectors(self, seed: int, n: int = 1, num_layers: int | None = None) -> dict[str, Any]:
        """Random distinct ``{encoder: [L, n, d]}``."""
        num = len(self.layers) if num_layers is None else num_layers
        return {
            enc: random_vectors(seed + 100 * k, num, n, d)
            for k, (enc, d) in enumerate(self.widths.items())
        }

    def one_set(self, seed: int, n: int = 1) -> dict[str, torch.Tensor]:
        """Random ``{encoder: [n, d]}``."""
        return {enc: v[0] for enc, v in self.vectors(seed, n, 1).items()}

    def write(
        self,
        path: Path,
        vectors: Vectors,
        placeholder: str,
        *,
        pool: torch.Tensor | None = None,
        layers: Sequence[str] | None = None,
        granularity: str = "block",
    ) -> Path:
        """A file of this family; ``{encoder: [n, d]}`` vectors are written to every layer."""
        layers = list(self.layers if layers is None else layers)
        per_layer = {
            enc: v.expand(len(layers), *v.shape) if v.dim() == 2 else v
            for enc, v in vectors.items()
        }
        return write_file(
            path, self.family, layers, per_layer, placeholder, pool=pool, granularity=granularity
        )

    def stock_ti(self, concepts: Mapping[str, Vectors]) -> Any:
        """A fresh stock pipeline with ``{token: {encoder: [n, d]}}`` loaded by stock
        ``load_textual_inversion`` into every text encoder (the diffusers SDXL recipe)."""
        stock = self.new_pipe()
        for part in self.parts(stock):  # one call per encoder for all tokens
            stock.load_textual_inversion(
                [vectors[part.name].clone() for vectors in concepts.values()],
                token=list(concepts),
                text_encoder=part.text_encoder,
                tokenizer=part.tokenizer,
            )
        return stock

    def load_ti_files(self, stock: Any, files: Mapping[str, Path]) -> None:
        """Load exported plain-TI files ``{token: path}`` into a stock pipeline (SD: the files
        themselves; SDXL: each encoder's tensor, diffusers' recipe), one call per encoder."""
        if len(self.encoders) == 1:
            stock.load_textual_inversion([str(p) for p in files.values()], token=list(files))
            return
        tensors = [load_file(path) for path in files.values()]
        for part in self.parts(stock):
            stock.load_textual_inversion(
                [t[self.family.ti_key(part.name)] for t in tensors],
                token=list(files),
                text_encoder=part.text_encoder,
                tokenizer=part.tokenizer,
            )

    def stock_embeds(
        self,
        pipe: Any,
        prompts: str | list[str],
        negative: str | list[str] | None,
        n: int = 1,
        cfg: bool = True,
        clip_skip: int | None = None,
    ) -> StockEmbeds:
        out = pipe.encode_prompt(
            prompts,
            device="cpu",
            num_images_per_prompt=n,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative,
            clip_skip=clip_skip,
        )
        if self.has_pooled:
            return StockEmbeds(*out)
        return StockEmbeds(out[0], out[1] if cfg else None, None, None)


_PIPES: dict[str, Any] = {}
_STOCK: dict[tuple[str, str], Any] = {}
"""Stock pipelines with plain TI loaded, shared by the parametrisations of one test (stock
``load_textual_inversion`` resizes the embedding table with mean resizing: about 1 s a call)."""


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family(request) -> Family:
    name = request.param
    folder = request.getfixturevalue("tiny_model" if name == "sd1" else "tiny_sdxl")
    fam = named(name)
    if name not in _PIPES:
        pipe = fam.pipeline_type().from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[name] = pipe
    pipe = _PIPES[name]
    layers, widths = LAYOUTS[name]
    assert layer_scheme(pipe.unet).names == layers
    return Family(name, fam, folder, pipe, layers, widths)


@pytest.fixture(scope="module", autouse=True)
def _drop_pipes():
    yield
    _PIPES.clear()
    _STOCK.clear()


@contextlib.contextmanager
def captured(pipe: Any, scheme: LayerScheme):
    """Record the context each layer's cross-attention reads (the input of ``attn2.to_k``) and,
    with added conditioning, the pooled ``text_embeds`` the UNet gets, in the first UNet call."""
    seen: dict[int, torch.Tensor] = {}
    added: list[torch.Tensor] = []
    modules = dict(pipe.unet.named_modules())
    hooks = []
    for i, layer in enumerate(scheme.layers):
        for path in layer.cross_attention_paths:

            def hook(_m, args, i=i):
                seen.setdefault(i, args[0].detach().clone())

            hooks.append(modules[f"{path}.to_k"].register_forward_pre_hook(hook))

    def unet_hook(_m, _a, kw):
        cond = kw.get("added_cond_kwargs") or {}
        if not added and "text_embeds" in cond:
            added.append(cond["text_embeds"].detach().clone())

    hooks.append(pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True))
    try:
        yield seen, added
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def counted_calls(modules: Sequence[torch.nn.Module]):
    """The number of forward calls of each module."""
    calls = [0] * len(modules)
    hooks = []
    for k, module in enumerate(modules):

        def hook(*_args, k=k):
            calls[k] += 1

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def images_equal(a: Any, b: Any) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def one_line(err: pytest.ExceptionInfo[XTIError], *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ----------------------------------------------------------------------------- bit identity


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_no_placeholder_and_equal_layer_prompts_generate_like_stock(family, negative, tmp_path):
    pipe = family.pipe
    parts = family.parts()
    processors = pipe.unet.attn_processors
    embeddings = [p.text_encoder.get_input_embeddings() for p in parts]
    weights = [e.weight.detach().clone() for e in embeddings]
    vocabs = [dict(p.tokenizer.get_vocab()) for p in parts]
    prompts = ["a photo of a cat", "a red cube"]
    args = dict(negative_prompt=negative, num_images_per_prompt=2, **STEPS)
    # the stock SD pipeline takes a list of negatives for a list of prompts; xti takes both
    negatives = None if negative is None else [negative] * len(prompts)
    stock_args = {**args, "negative_prompt": negatives}
    before = pipe(prompts, generator=seeded(), **stock_args).images
    assert before.shape == (4, 32, 32, 3)

    path = family.write(tmp_path / "a.xti.safetensors", family.vectors(1), "<a>")
    xti = load_xti(pipe, path)
    try:
        stock_call = pipe(prompts, generator=seeded(), **stock_args).images
        plain = xti(prompts, generator=seeded(), **args).images
        same = xti(layer_prompts={"all": prompts}, generator=seeded(), **args).images
        assert images_equal(stock_call, before), "a stock call while loaded is unchanged"
        assert images_equal(plain, before) and images_equal(same, before)

        encoded = xti.encode(prompts, negative_prompt=negative, num_images_per_prompt=2)
        # prompts and the negative once per encoder, whatever the layer count; zero negatives
        # (SDXL's stock rule without a negative prompt) need no encoding
        zero = negative is None and family.zero_negatives
        assert encoded.num_sequences == len(prompts) + (0 if zero else 1)
        split = xti.encode(
            layer_prompts={"coarse": prompts, "fine": prompts},
            negative_prompt=negative,
            num_images_per_prompt=2,
        )
        assert split.num_sequences == encoded.num_sequences
        assert torch.equal(split.contexts, encoded.contexts)
        if family.has_pooled:
            assert torch.equal(split.pooled_prompt_embeds, encoded.pooled_prompt_embeds)
        for part, vocab in zip(parts, vocabs, strict=True):
            assert len(part.tokenizer) == len(vocab), "the pipeline's tokenizers are never changed"
    finally:
        xti.unload()
    after = pipe.unet.attn_processors
    assert all(after[k] is processors[k] for k in processors), "original processor objects back"
    for part, embedding, weight, vocab in zip(parts, embeddings, weights, vocabs, strict=True):
        assert part.text_encoder.get_input_embeddings() is embedding
        assert torch.equal(embedding.weight, weight)
        assert part.tokenizer.get_vocab() == vocab and "<a>" not in part.tokenizer.get_vocab()
    assert images_equal(pipe(prompts, generator=seeded(), **stock_args).images, before)
    with pytest.raises(XTIError, match="unloaded"):
        xti(prompts)


@pytest.mark.parametrize(
    ("family", "pooled"), [("sd1", None), ("sdxl", "slot"), ("sdxl", "mean")], indirect=["family"]
)
@pytest.mark.parametrize("negative", [None, "blurry <a>"])
def test_equal_layers_generate_like_stock_textual_inversion(family, pooled, negative, tmp_path):
    vecs = family.one_set(0, n=2)  # two vectors per layer, the same in every layer
    pool = vecs["clip_g"] if pooled == "slot" else None
    path = family.write(tmp_path / "a.xti.safetensors", vecs, "<a>", pool=pool)
    prompts = ["a <a> on a table", "<a>"]
    # one negative per prompt (the same: encoded once), as the stock SD pipeline wants them
    negatives = None if negative is None else [negative] * len(prompts)
    args = dict(negative_prompt=negatives, num_images_per_prompt=2, **STEPS)
    encoders = [p.text_encoder for p in family.parts()]
    with load_xti(family.pipe, path) as xti:
        if family.has_pooled:
            assert (xti.concepts["<a>"].pool is not None) == (pooled == "slot")
        with counted_calls(encoders) as calls:
            encoded = xti.encode(prompts, negative_prompt=negatives, num_images_per_prompt=2)
        assert calls == [1] * len(encoders), "one call per text encoder for all layers and sides"
        if pooled != "slot":  # equal layers collapse: the prompts and one negative
            zero = negative is None and family.zero_negatives
            assert encoded.num_sequences == len(prompts) + (0 if zero else 1)
        ours = xti(prompts, generator=seeded(), **args).images
    key = (family.name, "equal-layers")  # the same vectors for every parametrisation
    if key not in _STOCK:
        _STOCK[key] = family.stock_ti({"<a>": vecs})
    expected = _STOCK[key](prompts, generator=seeded(), **args).images
    assert ours.shape == (4, 32, 32, 3)
    assert images_equal(ours, expected)


def test_encoded_kwargs_in_a_stock_call_generate_as_the_adapter(family, tmp_path):
    path = family.write(tmp_path / "p.xti.safetensors", family.vectors(12), "<p>")
    with load_xti(family.pipe, path) as xti:
        ours = xti("a <p>", negative_prompt="ugly", generator=seeded(), **STEPS).images
        encoded = xti.encode("a <p>", negative_prompt="ugly")
        by_hand = family.pipe(**encoded.pipeline_kwargs(), generator=seeded(), **STEPS).images
    assert images_equal(ours, by_hand)


def test_no_guidance_encodes_the_prompts_only_as_stock(family):
    prompts = ["a photo of a cat", "a red cube"]
    stock = family.stock_embeds(family.pipe, prompts, None, cfg=False)
    with XTIAdapter(family.pipe) as xti:
        plain = xti.encode(prompts, do_classifier_free_guidance=False)
    assert torch.equal(plain.prompt_embeds, stock.pos)
    assert plain.negative_prompt_embeds is None
    assert plain.contexts.shape == (len(family.layers), 2, 77, family.width)
    assert all(torch.equal(c, stock.pos) for c in plain.contexts)
    if family.has_pooled:
        assert torch.equal(plain.pooled_prompt_embeds, stock.pooled)
        assert plain.negative_pooled_prompt_embeds is None


# ----------------------------------------------------------------------------- routing


def test_each_layer_reads_its_own_vector(family, tmp_path):
    per_layer = family.vectors(2)
    path = family.write(tmp_path / "p.xti.safetensors", per_layer, "<p>")
    tokens = [f"<v{i}>" for i in range(len(family.layers))]
    stock = family.stock_ti(
        {t: {enc: v[i] for enc, v in per_layer.items()} for i, t in enumerate(tokens)}
    )
    scheme = layer_scheme(family.pipe.unet)
    with load_xti(family.pipe, path) as xti, captured(family.pipe, scheme) as (seen, added):
        encoded = xti.encode("a photo of <p>", num_images_per_prompt=1)
        # one prompt row per layer, and the negative (none for zero negatives)
        assert encoded.num_sequences == len(family.layers) + (0 if family.zero_negatives else 1)
        xti("a photo of <p>", generator=seeded(), **STEPS)
    assert len(seen) == len(family.layers)
    pooled = []
    for i in range(len(family.layers)):
        expected = family.stock_embeds(stock, f"a photo of <v{i}>", None)
        assert torch.equal(seen[i], expected.contexts), family.layers[i]
        pooled.append(expected.all_pooled)
    if family.has_pooled:  # no POOL vectors: the mean of the layers' pooled outputs
        torch.testing.assert_close(added[0], torch.stack(pooled).mean(0))


def test_mixing_routes_concepts_by_layer_with_cfg_negative_and_repeats(family, tmp_path):
    va, vb = family.one_set(3), family.one_set(4)
    pool_a = va.get("clip_g") if family.has_pooled else None
    pool_b = vb.get("clip_g") if family.has_pooled else None
    file_a = family.write(tmp_path / "a.xti.safetensors", va, "<a>", pool=pool_a)
    file_b = family.write(tmp_path / "b.xti.safetensors", vb, "<b>", pool=pool_b)
    stock = family.stock_ti({"<a>": va, "<b>": vb})
    prompts = ["a photo of <a>", "<a> on a table"]
    negative = ["blurry", "blurry"]
    expect_a = family.stock_embeds(stock, prompts, negative, 2)
    expect_b = family.stock_embeds(stock, [p.replace("<a>", "<b>") for p in prompts], negative, 2)
    assert not torch.equal(expect_a.contexts, expect_b.contexts)

    scheme = layer_scheme(family.pipe.unet)
    names = scheme.names
    coarse = scheme.select("coarse")
    assert 0 < len(coarse) < len(names) and coarse == list(range(coarse[0], coarse[-1] + 1))
    mix = {"<a>": "coarse", "<b>": "fine"}
    with load_xti(family.pipe, [file_a, file_b]) as xti:
        with captured(family.pipe, scheme) as (seen, added):
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
        assert len(seen) == len(names)
        for i in range(len(names)):
            expected = expect_a if i in coarse else expect_b
            # [negatives x2, prompts x2] for 2 prompts
            assert seen[i].shape == (8, 77, family.width)
            assert torch.equal(seen[i], expected.contexts), names[i]
        if family.has_pooled:  # pooled: the prompt as written (<a>) at <a>'s POOL vectors
            assert torch.equal(added[0], expect_a.all_pooled)

        # the same routing from other spellings: any mixed placeholder, later entries win, ranges
        # (for SD1: IN07-OUT05, and IN01-IN05 with OUT06-OUT11)
        coarse_range = f"{names[coarse[0]]}-{names[coarse[-1]]}"
        fine_ranges = [f"{names[0]}-{names[coarse[0] - 1]}", f"{names[coarse[-1] + 1]}-{names[-1]}"]
        prompts_b = [p.replace("<a>", "<b>") for p in prompts]
        for texts, other in [
            (prompts_b, mix),
            (prompts, {"<b>": "all", "<a>": "coarse"}),
            (prompts, {"<a>": coarse_range, "<b>": fine_ranges}),
        ]:
            contexts = xti.encode(
                texts, negative_prompt="blurry", mix=other, num_images_per_prompt=2
            ).contexts
            assert all(torch.equal(contexts[i], seen[i]) for i in range(len(names))), other


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_per_layer_prompts_route_every_encoder(family, guidance):
    cfg = guidance > 1
    cube = family.stock_embeds(family.pipe, "a red cube", None, cfg=cfg)
    lizard = family.stock_embeds(family.pipe, "a green lizard", None, cfg=cfg)
    scheme = layer_scheme(family.pipe.unet)
    mid = scheme.index("MID")
    encoders = [p.text_encoder for p in family.parts()]
    with (
        XTIAdapter(family.pipe) as xti,
        captured(family.pipe, scheme) as (seen, added),
        counted_calls(encoders) as calls,
    ):
        xti(
            "a red cube",
            layer_prompts={"mid": "a green lizard"},
            guidance_scale=guidance,
            generator=seeded(),
            **STEPS,
        )
    assert calls == [1] * len(encoders)
    for i in range(len(scheme)):
        expected = lizard if i == mid else cube
        assert torch.equal(seen[i], expected.contexts), scheme.names[i]
    if family.has_pooled:  # pooled: the prompt, not the layer prompts
        assert torch.equal(added[0], cube.all_pooled)


def test_selection_errors_are_one_line(family, tmp_path):
    names = family.layers
    path = family.write(tmp_path / "a.xti.safetensors", family.one_set(5), "<a>")
    with load_xti(family.pipe, path) as xti:
        for kwargs, match in [
            (dict(mix={"<zz>": "coarse"}), "not a loaded concept"),
            (dict(mix={"<a>": "IN99"}), "unknown layer"),
            (dict(layer_prompts={f"{names[-1]}-{names[0]}": "x"}), "reversed"),
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


def test_processors_replaced_by_the_user_are_wrapped_again(family, tmp_path):
    pipe = family.pipe
    path = family.write(tmp_path / "a.xti.safetensors", family.one_set(6), "<a>")
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


def test_files_of_the_other_family_fail_with_one_line_naming_both(family, tmp_path):
    other = SDXL if family.name != "sdxl" else SD1
    layers, widths = LAYOUTS[other.name]
    vectors = {enc: torch.zeros(len(layers), 1, d) for enc, d in widths.items()}
    path = write_file(tmp_path / "o.xti.safetensors", other, layers, vectors, "<o>")
    with XTIAdapter(family.pipe) as xti, pytest.raises(XTIError) as err:
        xti.load(path)
    one_line(err, f"{other.label} file", f"{family.label} pipeline", "o.xti.safetensors")


def test_mismatched_files_fail_with_one_line_naming_both(family, tmp_path):
    wide = family.write(
        tmp_path / "w.xti.safetensors", {enc: torch.zeros(1, 768) for enc in family.encoders}, "<w>"
    )
    layers = [f"L{i}" for i in range(11)]
    other = family.write(
        tmp_path / "o.xti.safetensors", family.one_set(7), "<o>", pool=None, layers=layers
    )
    first_width = str(next(iter(family.widths.values())))
    with XTIAdapter(family.pipe) as xti:
        with pytest.raises(XTIError) as err:
            xti.load(wide)
        one_line(err, "768", first_width, "w.xti.safetensors")
        with pytest.raises(XTIError) as err:
            xti.load(other)
        one_line(err, "L0", family.layers[0], family.layers[-1])


def test_ti_export_loads_with_stock_load_textual_inversion(family, tmp_path):
    per_layer = family.vectors(30, n=2)
    path = family.write(tmp_path / "c.xti.safetensors", per_layer, "<c>")
    mean_file = export_ti(path, mean=True)
    layer_file = export_ti(path, tmp_path / "mid.safetensors", layer="MID")
    assert mean_file.name == "c-mean.ti.safetensors"
    ti_keys = {family.family.ti_key(enc) for enc in family.encoders}
    assert set(load_file(mean_file)) == ti_keys and set(load_file(layer_file)) == ti_keys

    # a file whose layers are equal: its export generates in the stock pipeline as the file
    vecs = family.one_set(8, n=2)
    pool = vecs.get("clip_g") if family.has_pooled else None
    equal = family.write(tmp_path / "e.xti.safetensors", vecs, "<e>", pool=pool)
    exported = export_ti(equal, layer="MID")
    ti = load_file(exported)
    assert all(torch.equal(ti[family.family.ti_key(enc)], vecs[enc]) for enc in family.encoders)

    stock = family.new_pipe()
    family.load_ti_files(stock, {"<m>": mean_file, "<l>": layer_file, "<e>": exported})
    mid = family.layers.index("MID")
    for part in family.parts(stock):
        weight = part.text_encoder.get_input_embeddings().weight
        ids = part.tokenizer.convert_tokens_to_ids(["<m>", "<m>_1", "<l>", "<l>_1"])
        vectors = per_layer[part.name]
        assert torch.allclose(weight[ids[:2]], vectors.mean(0))
        assert torch.equal(weight[ids[2:]], vectors[mid])

    args = dict(negative_prompt="blurry", **STEPS)
    expected = stock("a <e> in the snow", generator=seeded(), **args).images
    with load_xti(family.pipe, equal) as xti:
        ours = xti("a <e> in the snow", generator=seeded(), **args).images
    assert images_equal(ours, expected)


def test_transformer_granularity_files_load_without_being_told(family, tmp_path):
    """A file of the ``transformer`` scheme (one layer per transformer block: ``IN07.0``,
    ``IN07.1`` ...) routes each transformer block its own vectors; `load_xti` takes the scheme
    from the file."""
    scheme = layer_scheme(family.pipe.unet, "transformer")
    names = scheme.names
    assert all(len(layer.cross_attention_paths) == 1 for layer in scheme.layers)
    per_layer = family.vectors(40, num_layers=len(names))
    path = family.write(
        tmp_path / "t.xti.safetensors", per_layer, "<t>", layers=names, granularity="transformer"
    )
    tokens = [f"<v{i}>" for i in range(len(names))]
    stock = family.stock_ti(
        {t: {enc: v[i] for enc, v in per_layer.items()} for i, t in enumerate(tokens)}
    )
    with load_xti(family.pipe, path) as xti, captured(family.pipe, scheme) as (seen, _):
        encoded = xti.encode("a photo of <t>")
        assert encoded.contexts.shape[0] == len(names)
        xti("a photo of <t>", generator=seeded(), **STEPS)
    assert len(seen) == len(names)
    for i, name in enumerate(names):
        expected = family.stock_embeds(stock, f"a photo of <v{i}>", None)
        assert torch.equal(seen[i], expected.contexts), name


def test_cli_generate_accepts_transformer_granularity_files(family, tmp_path, capsys):
    names = layer_scheme(family.pipe.unet, "transformer").names
    path = family.write(
        tmp_path / "t.xti.safetensors",
        family.vectors(41, num_layers=len(names)),
        "<t>",
        layers=names,
        granularity="transformer",
    )
    out = tmp_path / "images"
    args = [
        "generate", "--model", str(family.folder), "-e", str(path), "--prompt", "a photo of <t>",
        "--mix", "<t>=coarse", "--steps", "2", "--size", "32", "--out-dir", str(out),
        "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    images = sorted(out.iterdir())
    assert len(images) == 1
    with Image.open(images[0]) as img:
        assert img.size == (32, 32)


# ----------------------------------------------------------------------------- training


def _training_contexts(
    family: Family, sets: Mapping[str, torch.Tensor], prompt: str, pooled: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training path: placeholder tokens in copies of the tokenizers, `ConceptVectors`
    installed as the token embedding, `encode_per_layer`."""
    fam = family.family
    num_layers = len(family.layers)
    parts, tokens, ids = [], {}, {}
    for part in family.parts():
        tokenizer = copy.deepcopy(part.tokenizer)
        placeholder = add_placeholder_tokens(tokenizer, "<x>", sets[part.name].shape[1])
        tokens[part.name] = placeholder
        ids[part.name] = tokenize(tokenizer, [placeholder.expand(prompt)])
        parts.append(EncoderPart(part.name, tokenizer, part.text_encoder))
    handles: list[Any] = []
    try:
        for part in parts:
            source = sets[part.name]
            vectors = ConceptVectors(torch.zeros_like(source[0]), source.shape[0])
            with torch.no_grad():
                vectors.vectors.copy_(source)
            handles.append(
                install_token_embedding(part.text_encoder, tokens[part.name].first_id, vectors)
            )
        with torch.no_grad():
            return encode_per_layer(
                fam, parts, ids, tokens, layer_variants(num_layers, "block"), num_layers, pooled
            )
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    ("family", "pooled"), [("sd1", "slot"), ("sdxl", "slot"), ("sdxl", "mean")], indirect=["family"]
)
def test_training_and_inference_encode_the_same_contexts(family, pooled, tmp_path):
    fam = family.family
    num_layers, n = len(family.layers), 2
    variants = layer_variants(num_layers, "block")
    sets: dict[str, torch.Tensor] = {}
    for k, (enc, d) in enumerate(family.widths.items()):
        count = fam.vector_sets(enc, num_layers, pooled)  # SDXL slot: clip_g has POOL too
        sets[enc] = random_vectors(50 + k, count, n, d)
    prompt = "a photo of <x>"
    contexts, pooled_train = _training_contexts(family, sets, prompt, pooled)

    tensors = fam.file_vectors(sets, variants, family.layers, num_layers)
    assert (fam.file_key("clip_g", POOL) in tensors) == (family.has_pooled and pooled == "slot")
    meta = build_metadata(
        layers=family.layers, granularity="block", placeholder="<x>", initializer="x",
        n_vectors=n, family=fam.name, base_model="tiny", text_dims=family.widths, steps=0,
        kde_weight=0.0, extra=fam.metadata_extra(pooled),
    )  # fmt: skip
    path = save_embedding_file(tmp_path / "x.xti.safetensors", tensors, meta)
    with XTIAdapter(family.pipe) as xti:
        xti.load(path)
        encoded = xti.encode(prompt, do_classifier_free_guidance=False)

    assert contexts.shape == (num_layers, 1, 77, family.width)
    assert not any(
        torch.equal(contexts[i], contexts[j]) for i in range(num_layers) for j in range(i)
    ), "distinct layer contexts"
    assert torch.equal(encoded.contexts, contexts)
    if family.has_pooled:
        assert pooled_train is not None and pooled_train.shape == (1, family.widths["clip_g"])
        assert torch.equal(encoded.pooled_prompt_embeds, pooled_train)
    else:
        assert pooled_train is None
