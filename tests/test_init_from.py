"""`concept.init_from`: every start layout round-trips into the run's first vectors (an xti file, a
kohya XTI file, plain TI files of A1111 and diffusers, SDXL's two encoders), mismatches are
one-line errors naming the file and the fix, and the source is recorded in the exported file and
the model card."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xti.config import load_config
from xti.errors import XTIError
from xti.export import (
    SD1_LAYER_NAMES,
    build_metadata,
    export_kohya,
    export_ti,
    load_embedding_file,
    save_embedding_file,
)
from xti.models import load_model
from xti.training import Trainer, train

DATA = Path(__file__).parents[1] / "data" / "tiny-concept"
WIDTH = 32  # the tiny SD1 text encoder's
_fresh = itertools.count()


def make_cfg(model: Path, out: Path, *overrides: str, data: Path = DATA):
    """A short run; each config a new placeholder (runs share a bundle, whose tokenizer keeps
    the tokens it gained)."""
    return load_config(None, [
        f"model.path={model}", f"data.dir={data}", f"output_dir={out}",
        f"concept.placeholder=<box{next(_fresh)}>", "concept.initializer=box", "train.resolution=32",
        "train.batch_size=2", "train.max_steps=2", "train.lr=0.01", "train.lr_warmup_steps=0",
        "tracking.report_to=none", *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tiny_model):
    return load_model(make_cfg(tiny_model, Path("unused")).model)


def start_vectors(cfg, bundle) -> dict[str, torch.Tensor]:
    """The run's vectors after setup (before any step), and checks it is a fresh run."""
    with Trainer(cfg, bundle=bundle, progress=False) as trainer:
        trainer.setup()
        assert trainer.step == 0 and trainer.opt.optimizer.state_dict()["state"] == {}
        return {k: v.detach().clone() for k, v in trainer.opt.raw().items()}


def xti_file(path: Path, n: int = 1, width: int = WIDTH, layers=SD1_LAYER_NAMES) -> Path:
    g = torch.Generator().manual_seed(7)
    vectors = {name: torch.randn(n, width, generator=g) for name in layers}
    meta = build_metadata(
        layers=list(layers), granularity="block", placeholder="<old>", initializer="thing",
        n_vectors=n, family="sd1", base_model="tiny", text_dims={"text": width}, steps=5,
        kde_weight=0.0,
    )  # fmt: skip
    return save_embedding_file(path, vectors, meta)


def test_an_xti_file_starts_every_layer_from_its_vectors_and_is_recorded(
    tiny_model, bundle, tmp_path
):
    src = xti_file(tmp_path / "old.xti.safetensors")
    ef = load_embedding_file(src)
    cfg = make_cfg(tiny_model, tmp_path / "run", f"concept.init_from={src}")
    start = start_vectors(cfg, bundle)["text"]
    assert torch.equal(start, torch.stack([ef.vectors[n] for n in SD1_LAYER_NAMES]))

    # a short run exports the source (path + sha256) in the file's metadata and the model card
    result = train(
        cfg.model_copy(
            update={"concept": cfg.concept.model_copy(update={"placeholder": "<again>"})}
        ),
        bundle=bundle,
        progress=False,
    )
    recorded = json.loads(load_embedding_file(result.output_file).metadata["xti.init_from"])
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert recorded == {"path": str(src), "sha256": sha, "layout": "xti"}
    card = (tmp_path / "run" / "README.md").read_text()
    assert sha in card and "started from" in card


def test_shared_granularity_takes_an_equal_layer_files_vector(tiny_model, bundle, tmp_path):
    one = torch.randn(1, WIDTH)
    meta = build_metadata(
        layers=SD1_LAYER_NAMES, granularity="shared", placeholder="<old>", initializer="x",
        n_vectors=1, family="sd1", base_model="tiny", text_dims={"text": WIDTH}, steps=1,
        kde_weight=0.0,
    )  # fmt: skip
    src = save_embedding_file(
        tmp_path / "s.xti.safetensors", {n: one.clone() for n in SD1_LAYER_NAMES}, meta
    )
    cfg = make_cfg(tiny_model, tmp_path / "r", f"concept.init_from={src}", "xti.granularity=shared")
    assert torch.equal(start_vectors(cfg, bundle)["text"], one.unsqueeze(0))


def test_a_kohya_file_written_by_our_exporter_round_trips(tiny_model, bundle, tmp_path):
    src = xti_file(tmp_path / "old.xti.safetensors", n=2)
    kohya = export_kohya(src, tmp_path / "old.kohya.safetensors")
    cfg = make_cfg(tiny_model, tmp_path / "r", f"concept.init_from={kohya}", "concept.n_vectors=2")
    start = start_vectors(cfg, bundle)["text"]
    ef = load_embedding_file(src)
    assert torch.equal(start, torch.stack([ef.vectors[n] for n in SD1_LAYER_NAMES]))


@pytest.mark.parametrize(
    "layout", ["a1111", "string_to_param", "diffusers", "diffusers-1d", "ours"]
)
def test_a_plain_ti_file_is_copied_to_every_layer(tiny_model, bundle, tmp_path, layout):
    vec = torch.randn(2, WIDTH)
    src = tmp_path / "ti.safetensors"
    if layout == "a1111":
        save_file({"emb_params": vec}, src)
    elif layout == "string_to_param":
        save_file({"string_to_param.*": vec}, src)
    elif layout == "diffusers":
        save_file({"<my-thing>": vec}, src)
    elif layout == "diffusers-1d":
        vec = vec[:1]
        save_file({"<my-thing>": vec[0].clone()}, src)
    else:  # `xti export --format ti` of an xti file
        export_ti(xti_file(tmp_path / "x.xti.safetensors", n=2), src, layer="MID")
        vec = load_embedding_file(tmp_path / "x.xti.safetensors").vectors["MID"]
    n = vec.shape[0]
    cfg = make_cfg(tiny_model, tmp_path / "r", f"concept.init_from={src}", f"concept.n_vectors={n}")
    start = start_vectors(cfg, bundle)["text"]
    assert start.shape == (16, n, WIDTH)
    assert torch.equal(start, vec.unsqueeze(0).expand(16, -1, -1))


def one_line_error(cfg, bundle) -> str:
    with pytest.raises(XTIError) as info:
        train(cfg, bundle=bundle, progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_mismatches_are_one_line_errors_naming_the_file_and_the_fix(tiny_model, bundle, tmp_path):
    def run(src, *extra):
        return one_line_error(
            make_cfg(tiny_model, tmp_path / "r", f"concept.init_from={src}", *extra), bundle
        )

    wide = xti_file(tmp_path / "wide.xti.safetensors", width=48)
    msg = run(wide)
    assert str(wide) in msg and "48-wide" in msg and f"is {WIDTH} wide" in msg

    few = xti_file(tmp_path / "few.xti.safetensors", layers=["IN01", "MID", "OUT11"])
    msg = run(few)
    assert str(few) in msg and "has the layers IN01, MID, OUT11" in msg

    two = xti_file(tmp_path / "two.xti.safetensors", n=2)
    msg = run(two)
    assert str(two) in msg and "set concept.n_vectors=2" in msg

    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, sdxl)
    assert "is an SDXL embedding" in run(sdxl)

    pickled = tmp_path / "old.pt"
    torch.save({"emb_params": torch.zeros(1, WIDTH)}, pickled)
    assert "not a safetensors file" in run(pickled) and "never" in run(pickled)
    assert "not found" in run(tmp_path / "missing.safetensors")
    assert not list(tmp_path.glob("r/*.xti.safetensors"))


def test_sdxl_start_files_fill_both_encoders_and_the_pool_slot(tiny_sdxl, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(img / f"{i}.png")
    bundle = load_model(make_cfg(tiny_sdxl, tmp_path, data=img).model)
    widths = {"clip_l": 32, "clip_g": 48}
    plain = tmp_path / "plain.safetensors"
    vec = {k: torch.randn(1, w) for k, w in widths.items()}
    save_file(vec, plain)
    start = start_vectors(
        make_cfg(tiny_sdxl, tmp_path / "a", f"concept.init_from={plain}", data=img), bundle
    )
    assert torch.equal(start["clip_l"], vec["clip_l"].expand(11, -1, -1).unsqueeze(1)[:, 0])
    assert start["clip_g"].shape == (12, 1, 48)  # 11 layers + POOL
    assert torch.equal(start["clip_g"], vec["clip_g"].expand(12, -1, -1).unsqueeze(1)[:, 0])

    # an SDXL xti file (written by a run) round-trips, POOL included
    first = train(make_cfg(tiny_sdxl, tmp_path / "b", data=img), bundle=bundle, progress=False)
    ef = load_embedding_file(first.output_file)
    again = start_vectors(
        make_cfg(tiny_sdxl, tmp_path / "c", f"concept.init_from={first.output_file}", data=img),
        bundle,
    )
    for enc in ("clip_l", "clip_g"):
        assert torch.equal(again[enc], first.all_vectors[enc])
    assert torch.equal(again["clip_g"][-1], ef.vectors["clip_g.POOL"])
