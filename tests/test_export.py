"""Tests for xti.export: file round trip, kohya files, pickles, atomic writes, plain-TI export."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import xti.export as export
from xti.cli import main
from xti.errors import XTIError
from xti.export import (
    FORMAT_VERSION,
    SD1_LAYER_NAMES,
    EmbeddingFile,
    build_metadata,
    export_kohya,
    kohya_keys,
    load_embedding_file,
    save_embedding_file,
    to_ti_vectors,
)
from xti.families import SDXL
from xti.paths import atomic_write_bytes

SDXL_LAYERS = [
    "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05",
]  # fmt: skip


def sd1_vectors(n: int = 2, d: int = 768, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, d, generator=g) for name in SD1_LAYER_NAMES}


def sd1_metadata(layers: list[str] | None = None, n: int = 2) -> dict[str, str]:
    return build_metadata(
        layers=layers or SD1_LAYER_NAMES,
        granularity="block",
        placeholder="<cat-toy>",
        initializer="toy",
        n_vectors=n,
        family="sd1",
        base_model="builtin:tiny-sd1",
        text_dims={"clip_l": 768},
        steps=500,
        kde_weight=0.001,
    )


def sdxl_file(n: int = 2, pool: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(1)
    vectors: dict[str, torch.Tensor] = {}
    for name in SDXL_LAYERS:
        vectors[f"clip_l.{name}"] = torch.randn(n, 768, generator=g)
        vectors[f"clip_g.{name}"] = torch.randn(n, 1280, generator=g)
    if pool:
        vectors["clip_g.POOL"] = torch.randn(n, 1280, generator=g)
    meta = build_metadata(
        layers=SDXL_LAYERS,
        granularity="block",
        placeholder="<toy>",
        initializer="toy",
        n_vectors=n,
        family="sdxl",
        base_model="builtin:tiny-sdxl",
        text_dims={"clip_l": 768, "clip_g": 1280},
        steps=10,
        kde_weight=0.0,
        title="Toy",
    )
    return vectors, meta


# --------------------------------------------------------------------------- round trip


def test_sd1_round_trip(tmp_path: Path) -> None:
    vectors = sd1_vectors()
    meta = sd1_metadata()
    # Given in reverse order: the layer order must still come from the metadata.
    shuffled = dict(reversed(list(vectors.items())))
    out = save_embedding_file(tmp_path / "sub" / "cat.xti.safetensors", shuffled, meta)
    assert out == tmp_path / "sub" / "cat.xti.safetensors" and out.is_file()

    ef = load_embedding_file(out)
    assert ef.kind == "xti"
    assert ef.layers == SD1_LAYER_NAMES
    assert list(ef.vectors) == SD1_LAYER_NAMES
    assert ef.metadata == meta
    assert ef.family == "sd1" and ef.n_vectors == 2 and ef.model_family.name == "sd1"
    for name, t in vectors.items():
        got = ef.vectors[name]
        assert got.dtype == torch.float32 and got.shape == (2, 768)
        assert torch.equal(got, t)

    # The file itself holds contiguous float32 tensors and the metadata.
    # Plus the layer mean under "clip_l", the key ComfyUI's plain-embedding loader reads.
    raw = load_file(out)
    assert set(raw) == set(SD1_LAYER_NAMES) | {"clip_l"}
    assert all(t.dtype == torch.float32 for t in raw.values())
    mean = torch.stack([vectors[n] for n in SD1_LAYER_NAMES]).mean(dim=0)
    assert torch.equal(raw["clip_l"], mean) and not torch.equal(raw["clip_l"], vectors["IN01"])
    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata() == meta


def test_custom_layer_order_is_kept(tmp_path: Path) -> None:
    layers = ["IN01", "IN04", "MID", "OUT03"]  # a tiny UNet's scheme
    g = torch.Generator().manual_seed(3)
    vectors = {name: torch.randn(1, 32, generator=g) for name in reversed(layers)}
    path = save_embedding_file(tmp_path / "tiny.xti.safetensors", vectors, sd1_metadata(layers, 1))
    ef = load_embedding_file(path)
    assert ef.layers == layers and list(ef.vectors) == layers


def test_family_is_derived_once_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_embedding_file(tmp_path / "a.xti.safetensors", sd1_vectors(), sd1_metadata())
    ef = load_embedding_file(path)
    derived = []
    of_file = export.of_file
    monkeypatch.setattr(export, "of_file", lambda *a: derived.append(1) or of_file(*a))
    for name in SD1_LAYER_NAMES:
        assert torch.equal(ef.layer_vectors(name, "text"), ef.vectors[name])
    assert ef.family == "sd1" and len(derived) <= 1


def test_save_converts_dtype_device_views(tmp_path: Path) -> None:
    base = torch.randn(16, 3, 64, dtype=torch.float64)
    # Views of one parameter tensor (shared storage), non-contiguous, and fp16/bf16 are all fine.
    vectors = {name: base[i] for i, name in enumerate(SD1_LAYER_NAMES)}
    vectors["IN01"] = base[0].t().contiguous().t()  # non-contiguous view
    vectors["IN02"] = base[1].to(torch.bfloat16)
    path = save_embedding_file(tmp_path / "v.safetensors", vectors, sd1_metadata(n=3))
    ef = load_embedding_file(path)
    assert torch.equal(ef.vectors["OUT11"], base[15].float())
    assert torch.equal(ef.vectors["IN01"], base[0].float())
    assert torch.equal(ef.vectors["IN02"], base[1].to(torch.bfloat16).float())
    assert all(t.dtype == torch.float32 for t in ef.vectors.values())
    assert base.dtype == torch.float64  # inputs untouched


def test_save_refuses_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        bad: dict = {"xti.steps": 5}
        save_embedding_file(tmp_path / "x.safetensors", sd1_vectors(), bad)
    assert not (tmp_path / "x.safetensors").exists()


def test_metadata_fields(tmp_path: Path) -> None:
    meta = sd1_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["xti.format_version"] == FORMAT_VERSION == "1"
    assert json.loads(meta["xti.layers"]) == SD1_LAYER_NAMES
    assert json.loads(meta["xti.text_dims"]) == {"clip_l": 768}
    assert int(meta["xti.n_vectors"]) == 2 and int(meta["xti.steps"]) == 500
    assert float(meta["xti.kde_weight"]) == 0.001
    assert meta["xti.family"] == "sd1" and meta["xti.granularity"] == "block"
    assert meta["xti.placeholder"] == "<cat-toy>" and meta["xti.initializer"] == "toy"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v1")
    assert meta["modelspec.title"] == "<cat-toy>"
    datetime.date.fromisoformat(meta["modelspec.date"])

    _, xl = sdxl_file()
    assert xl["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert xl["modelspec.title"] == "Toy"
    assert json.loads(xl["xti.text_dims"]) == {"clip_l": 768, "clip_g": 1280}

    extra = build_metadata(**_meta_kwargs(), extra={"modelspec.architecture": "x/y", "a": "b"})
    assert extra["modelspec.architecture"] == "x/y" and extra["a"] == "b"
    with pytest.raises(ValueError):
        build_metadata(**_meta_kwargs(), extra={"xti.layers": "[]"})
    with pytest.raises(ValueError):
        build_metadata(**{**_meta_kwargs(), "family": "sd3"})


def _meta_kwargs() -> dict[str, object]:
    return dict(
        layers=["IN01"],
        granularity="block",
        placeholder="<x>",
        initializer="x",
        n_vectors=1,
        family="sd2",
        base_model="m",
        text_dims={"clip_h": 1024},
        steps=1,
        kde_weight=0,
    )


def test_sdxl_round_trip(tmp_path: Path) -> None:
    vectors, meta = sdxl_file()
    path = save_embedding_file(tmp_path / "xl.xti.safetensors", vectors, meta)
    ef = load_embedding_file(path)
    assert ef.kind == "xti" and ef.family == "sdxl" and ef.model_family is SDXL
    assert ef.layers == SDXL_LAYERS
    expected_keys = [f"{e}.{n}" for n in SDXL_LAYERS for e in ("clip_l", "clip_g")] + [
        "clip_g.POOL"
    ]
    assert list(ef.vectors) == expected_keys
    for key, t in vectors.items():
        assert torch.equal(ef.vectors[key], t)
    assert ef.layer_vectors("IN04", "clip_g").shape == (2, 1280)

    # Without POOL is fine too.
    vectors2, meta2 = sdxl_file(pool=False)
    ef2 = load_embedding_file(save_embedding_file(tmp_path / "xl2.safetensors", vectors2, meta2))
    assert "clip_g.POOL" not in ef2.vectors


# --------------------------------------------------------------------------- kohya / bad layouts


def test_kohya_16_key_file(tmp_path: Path) -> None:
    vectors = {k: v.half() for k, v in sd1_vectors(n=3, seed=5).items()}
    path = tmp_path / "kohya_xti.safetensors"
    save_file(dict(sorted(vectors.items())), str(path))  # alphabetical, no metadata
    ef = load_embedding_file(path)
    assert ef.kind == "kohya"
    assert ef.layers == SD1_LAYER_NAMES
    assert list(ef.vectors) == SD1_LAYER_NAMES
    assert ef.metadata == {}
    assert ef.family == "sd1" and ef.n_vectors == 3
    for name in SD1_LAYER_NAMES:
        assert ef.vectors[name].dtype == torch.float32
        assert torch.equal(ef.vectors[name], vectors[name].float())


def test_bad_layout_refused_with_keys(tmp_path: Path) -> None:
    path = tmp_path / "weird.safetensors"
    save_file({"foo": torch.zeros(1, 4), "bar.baz": torch.zeros(1, 4)}, str(path))
    with pytest.raises(XTIError) as info:
        load_embedding_file(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "foo" in msg and "bar.baz" in msg

    # A plain TI file is refused with a hint.
    ti = tmp_path / "ti.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(ti))
    with pytest.raises(XTIError, match="plain textual-inversion.*emb_params"):
        load_embedding_file(ti)

    # 15 of the 16 kohya keys.
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd1_vectors().items() if k != "MID"}, str(partial))
    with pytest.raises(XTIError, match="OUT11"):
        load_embedding_file(partial)


def test_xti_metadata_keys_mismatch(tmp_path: Path) -> None:
    vectors = sd1_vectors()
    del vectors["MID"]
    path = tmp_path / "m.safetensors"
    save_file(vectors, str(path), metadata=sd1_metadata())
    with pytest.raises(XTIError, match="missing MID"):
        load_embedding_file(path)

    bad_version = tmp_path / "v.safetensors"
    save_file(
        sd1_vectors(), str(bad_version), metadata={**sd1_metadata(), "xti.format_version": "9"}
    )
    with pytest.raises(XTIError, match="version"):
        load_embedding_file(bad_version)

    bad_layers = tmp_path / "l.safetensors"
    save_file(sd1_vectors(), str(bad_layers), metadata={**sd1_metadata(), "xti.layers": "IN01"})
    with pytest.raises(XTIError, match="xti.layers"):
        load_embedding_file(bad_layers)


def test_missing_and_non_safetensors_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(XTIError, match="nope.safetensors"):
        load_embedding_file(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(XTIError, match="junk.safetensors"):
        load_embedding_file(junk)
    truncated = tmp_path / "trunc.safetensors"
    save_file(sd1_vectors(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(XTIError, match="trunc.safetensors"):
        load_embedding_file(truncated)


# --------------------------------------------------------------------------- pickles


class NotATensor:
    def __init__(self) -> None:
        self.x = 1


def test_pickle_refused_by_default_and_loaded_with_flag(tmp_path: Path) -> None:
    vectors = sd1_vectors(n=1, seed=7)
    for suffix in (".pt", ".bin", ".ckpt"):
        path = tmp_path / f"kohya{suffix}"
        torch.save(vectors, path)
        with pytest.raises(XTIError) as info:
            load_embedding_file(path)
        msg = str(info.value)
        assert str(path) in msg and "allow_pickle" in msg and "--allow-pickle" in msg
        ef = load_embedding_file(path, allow_pickle=True)
        assert ef.kind == "kohya" and ef.layers == SD1_LAYER_NAMES
        assert all(torch.equal(ef.vectors[k], vectors[k]) for k in SD1_LAYER_NAMES)


def test_pickle_uses_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "evil.pt"
    torch.save({**sd1_vectors(n=1), "payload": NotATensor()}, path)
    calls: list[dict[str, object]] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(XTIError, match="evil.pt"):
        load_embedding_file(path, allow_pickle=True)
    assert calls and calls[0].get("weights_only") is True


def test_pickle_with_wrong_content(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1, 4)], path)
    with pytest.raises(XTIError, match="dict"):
        load_embedding_file(path, allow_pickle=True)


# --------------------------------------------------------------------------- atomic writes


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_failure_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cat.xti.safetensors"
    save_embedding_file(path, sd1_vectors(seed=1), sd1_metadata())
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_embedding_file(path, sd1_vectors(seed=2), sd1_metadata())
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()

    monkeypatch.setattr(os, "fsync", boom)  # fails after the temp file has been written
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()

    monkeypatch.setattr(export, "_safetensors_save", boom)  # serialisation fails
    with pytest.raises(OSError, match="disk full"):
        save_embedding_file(path, sd1_vectors(seed=3), sd1_metadata())
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_write_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.json"
    atomic_write_bytes(path, b"{}")
    assert path.read_bytes() == b"{}"
    atomic_write_bytes(path, b'{"x": 1}')
    assert path.read_bytes() == b'{"x": 1}'
    assert _leftovers(path.parent) == []
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------- plain TI export


def test_to_ti_vectors_sd1(tmp_path: Path) -> None:
    vectors = sd1_vectors(n=3)
    ef = EmbeddingFile(layers=list(SD1_LAYER_NAMES), vectors=vectors, metadata={}, kind="kohya")

    one = to_ti_vectors(ef, layer="MID")
    assert list(one) == ["emb_params"]
    assert torch.equal(one["emb_params"], vectors["MID"])
    assert one["emb_params"].data_ptr() != vectors["MID"].data_ptr()

    avg = to_ti_vectors(ef, mean=True)
    expected = torch.mean(torch.stack([vectors[k] for k in SD1_LAYER_NAMES]), dim=0)
    torch.testing.assert_close(avg["emb_params"], expected)
    assert avg["emb_params"].shape == (3, 768) and avg["emb_params"].dtype == torch.float32

    with pytest.raises(XTIError, match="IN01.*OUT11"):
        to_ti_vectors(ef, layer="IN03")
    with pytest.raises(XTIError):
        to_ti_vectors(ef)
    with pytest.raises(XTIError):
        to_ti_vectors(ef, layer="MID", mean=True)


def test_to_ti_vectors_sdxl(tmp_path: Path) -> None:
    vectors, meta = sdxl_file(n=2)
    ef = load_embedding_file(save_embedding_file(tmp_path / "xl.safetensors", vectors, meta))
    one = to_ti_vectors(ef, layer="OUT02")
    assert set(one) == {"clip_l", "clip_g"}
    assert torch.equal(one["clip_l"], vectors["clip_l.OUT02"])
    assert torch.equal(one["clip_g"], vectors["clip_g.OUT02"])
    avg = to_ti_vectors(ef, mean=True)
    for enc, d in (("clip_l", 768), ("clip_g", 1280)):
        expected = torch.mean(torch.stack([vectors[f"{enc}.{n}"] for n in SDXL_LAYERS]), dim=0)
        torch.testing.assert_close(avg[enc], expected)  # POOL is not part of the mean
        assert avg[enc].shape == (2, d)
    with pytest.raises(XTIError):
        to_ti_vectors(ef, layer="POOL")


class _FakeTokenizer:
    def __init__(self) -> None:
        self.added_tokens_encoder: dict[str, int] = {}

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "cat": 1}


def test_ti_file_matches_diffusers_loader(tmp_path: Path) -> None:
    """diffusers reads a single-key state dict as (token, [n, d]) and splits it into n tokens."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin as Mixin

    ef = EmbeddingFile(layers=list(SD1_LAYER_NAMES), vectors=sd1_vectors(n=3), kind="kohya")
    ti = to_ti_vectors(ef, mean=True)
    path = tmp_path / "learned_embeds.safetensors"
    save_file(ti, str(path))
    state_dict = load_file(path)
    assert list(state_dict) == ["emb_params"] and state_dict["emb_params"].shape == (3, 768)

    tok = _FakeTokenizer()
    tokens, embeddings = Mixin._retrieve_tokens_and_embeddings([None], [state_dict], tok)
    assert tokens == ["emb_params"] and embeddings[0].shape == (3, 768)
    tokens, embeddings = Mixin._retrieve_tokens_and_embeddings(["<cat-toy>"], [state_dict], tok)
    tokens, embeddings = Mixin._extend_tokens_and_embeddings(tokens, embeddings, tok)
    assert tokens == ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    assert all(e.shape == (768,) for e in embeddings)
    assert torch.equal(torch.stack(embeddings), ti["emb_params"])


# --------------------------------------------------------------------------- kohya export


def transformer_file(path: Path, layers: list[str], seed: int = 11) -> dict[str, torch.Tensor]:
    """An SD1 ``transformer``-granularity file (layer names like ``IN01.0``); its vectors."""
    g = torch.Generator().manual_seed(seed)
    vectors = {name: torch.randn(2, 32, generator=g) for name in layers}
    meta = build_metadata(
        layers=layers, granularity="transformer", placeholder="<t>", initializer="toy",
        n_vectors=2, family="sd1", base_model="tiny", text_dims={"text": 32}, steps=1,
        kde_weight=0.0,
    )  # fmt: skip
    save_embedding_file(path, vectors, meta)
    return vectors


def test_transformer_granularity_sd1_file_exports_to_kohya(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A UNet with one transformer block per layer has one transformer layer per kohya name:
    ``IN01.0`` ... ``OUT11.0`` map one to one onto the 16 kohya keys."""
    source = tmp_path / "t.xti.safetensors"
    vectors = transformer_file(source, [f"{name}.0" for name in SD1_LAYER_NAMES])
    assert kohya_keys(load_embedding_file(source)) == {n: f"{n}.0" for n in SD1_LAYER_NAMES}

    def check(path: Path) -> None:
        raw = load_file(path)
        assert sorted(raw) == sorted(SD1_LAYER_NAMES)
        assert all(torch.equal(raw[n], vectors[f"{n}.0"]) for n in SD1_LAYER_NAMES)
        ef = load_embedding_file(path)
        assert ef.kind == "kohya" and ef.layers == SD1_LAYER_NAMES

    out = export_kohya(source)
    assert out == tmp_path / "t.kohya.safetensors"
    check(out)
    cli_out = tmp_path / "cli.kohya.safetensors"
    assert main(["export", str(source), "--format", "kohya", "-o", str(cli_out)]) == 0
    assert f"wrote {cli_out}" in capsys.readouterr().out
    check(cli_out)


def test_files_whose_layers_do_not_map_onto_kohya_are_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a transformer layer that no kohya key holds (MID.1: a second transformer block)
    extra = tmp_path / "extra.xti.safetensors"
    transformer_file(extra, [f"{name}.0" for name in SD1_LAYER_NAMES] + ["MID.1"])
    # SDXL layers
    xl = tmp_path / "xl.xti.safetensors"
    save_embedding_file(xl, *sdxl_file(n=1))
    # 15 of the 16 layers, in an xti file
    partial = tmp_path / "partial.xti.safetensors"
    fifteen = [n for n in SD1_LAYER_NAMES if n != "MID"]
    save_embedding_file(
        partial, {n: v for n, v in sd1_vectors().items() if n != "MID"}, sd1_metadata(fifteen)
    )
    for path in (extra, xl, partial):
        assert kohya_keys(load_embedding_file(path)) is None
        with pytest.raises(XTIError) as info:
            export_kohya(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and "16" in msg, msg
        assert main(["export", str(path), "--format", "kohya"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and path.name in err, err
    assert not list(tmp_path.glob("*.kohya.safetensors")), "nothing written"


# --------------------------------------------------------------------------- fallback keys


def test_sdxl_files_carry_layer_mean_fallback_keys_that_the_readers_ignore(tmp_path: Path) -> None:
    vectors, meta = sdxl_file(n=2)
    path = save_embedding_file(tmp_path / "xl.xti.safetensors", vectors, meta)
    raw = load_file(path)
    layers = json.loads(meta["xti.layers"])
    for enc in ("clip_l", "clip_g"):
        mean = torch.stack([vectors[f"{enc}.{n}"] for n in layers]).mean(dim=0)
        assert torch.equal(raw[enc], mean)  # the layer mean, not POOL, not the first layer
    ef = load_embedding_file(path)
    assert "clip_l" not in ef.vectors and "clip_g" not in ef.vectors
    assert set(ef.vectors) == set(vectors)


def test_kohya_readers_see_exactly_the_16_layers(tmp_path: Path) -> None:
    """kohya's gen_img_diffusers XTI loader demands exactly the 16 layer keys: the native SD1 file
    now has one more (clip_l), `export_kohya` writes the 16; a 16-key file with a clip_l key and no
    metadata is still read as a kohya file."""
    path = save_embedding_file(tmp_path / "cat.xti.safetensors", sd1_vectors(), sd1_metadata())
    kohya = load_file(export_kohya(path))
    assert set(kohya) == set(SD1_LAYER_NAMES)
    raw = load_file(path)
    save_file(raw, str(tmp_path / "bare.safetensors"))  # no metadata
    ef = load_embedding_file(tmp_path / "bare.safetensors")
    assert ef.kind == "kohya" and list(ef.vectors) == SD1_LAYER_NAMES
