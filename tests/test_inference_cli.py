"""``xti generate``, ``xti inspect`` and ``xti export`` on the tiny model, in-process."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xti.cli import main
from xti.export import build_metadata, load_embedding_file, save_embedding_file
from xti.tokenizer import build_clip_tokenizer

LAYERS = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05",
          "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]  # fmt: skip
D = 32


def write(path, vectors, placeholder):
    meta = build_metadata(
        layers=list(vectors), granularity="block", placeholder=placeholder, initializer="box",
        n_vectors=1, family="sd1", base_model="tiny", text_dims={"text": D}, steps=0,
        kde_weight=0.0,
    )  # fmt: skip
    return save_embedding_file(path, vectors, meta)


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = write(tmp_path / "a.xti.safetensors", {n: torch.randn(1, D, generator=g) for n in LAYERS}, "<a>")  # fmt: skip
    b = write(tmp_path / "b.xti.safetensors", {n: torch.randn(1, D, generator=g) for n in LAYERS}, "<b>")  # fmt: skip
    return a, b


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_generate_with_mixing_layer_prompts_count_and_grid(
    tiny_model, files, tmp_path, capsys, monkeypatch
):
    import xti.export
    import xti.inference

    reads = []

    def counted(path, **kw):
        reads.append(str(path))
        return load_embedding_file(path, **kw)

    a, b = files
    kohya = tmp_path / "b.kohya.safetensors"
    assert main(["export", str(b), "--format", "kohya", "-o", str(kohya)]) == 0
    out = tmp_path / "images"
    args = [
        "generate", "--model", str(tiny_model), "-e", str(a), "-e", f"<b>={kohya}",
        "--prompt", "a photo of <a>", "--negative-prompt", "blurry",
        "--mix", "<a>=coarse", "<b>=fine", "--layer-prompt", "MID=a green lizard",
        "--steps", "2", "--size", "32", "--count", "2", "--seed", "3", "--scheduler", "euler",
        "--freeu", "0.9,0.2,1.2,1.4", "--grid", "--out-dir", str(out), "--no-progress",
        "--device", "cpu",
    ]  # fmt: skip
    capsys.readouterr()
    for module in (xti.export, xti.inference):
        monkeypatch.setattr(module, "load_embedding_file", counted)
    assert main(args) == 0
    assert sorted(reads) == sorted([str(a), str(kohya)]), "each embedding file is read once"
    printed = capsys.readouterr().out.split()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["xti-3-00.png", "xti-3-01.png", "xti-3-grid.png"]
    assert sum(w == "wrote" for w in printed) == 3
    with Image.open(out / "xti-3-00.png") as img:
        assert img.size == (32, 32)
        params = json.loads(img.text["xti"])
    assert params["mix"] == {"<a>": "coarse", "<b>": "fine"} and params["seed"] == 3
    assert params["layer_prompts"] == {"MID": "a green lizard"}
    with Image.open(out / "xti-3-grid.png") as grid:
        assert grid.size == (64, 32)


def test_generate_errors_are_one_line(tiny_model, files, tmp_path, capsys):
    wide = write(tmp_path / "w.xti.safetensors", {n: torch.zeros(1, 768) for n in LAYERS}, "<w>")
    base = ["generate", "--model", str(tiny_model), "--prompt", "a <w>", "--steps", "1",
            "--size", "32", "--out-dir", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert main([*base, "-e", str(wide)]) == 2
    assert "768" in one_line_error(capsys)
    assert main([*base, "-e", str(files[0]), "--mix", "coarse"]) == 2
    assert "KEY=VALUE" in one_line_error(capsys)
    assert main([*base[:2], str(tmp_path / "nope"), *base[3:]]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_inspect_prints_json_with_nearest_tokens(tiny_model, tmp_path, capsys):
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    table = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").get_input_embeddings()
    cat, dog = tokenizer.convert_tokens_to_ids(["cat</w>", "dog</w>"])
    vectors = {n: table.weight[cat if i % 2 == 0 else dog].detach().clone()[None] for i, n in enumerate(LAYERS)}  # fmt: skip
    path = write(tmp_path / "c.xti.safetensors", vectors, "<c>")
    assert main(["inspect", str(path), "--model", str(tiny_model), "--top-k", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == LAYERS and info["kind"] == "xti" and info["placeholder"] == "<c>"
    assert info["shapes"]["MID"] == [1, D]
    assert info["norms"]["IN01"][0] == pytest.approx(
        float(table.weight[cat].detach().norm()), rel=1e-5
    )
    assert info["metadata"]["xti.layers"] == LAYERS
    assert info["nearest_tokens"]["IN01"][0][0] == "cat</w>"
    assert info["nearest_tokens"]["IN02"][0][0] == "dog</w>"
    assert len(info["nearest_tokens"]["IN02"][0]) == 2

    pt = tmp_path / "k.pt"
    torch.save(dict(vectors), pt)
    assert main(["inspect", str(pt)]) == 2
    assert "--allow-pickle" in one_line_error(capsys)
    assert main(["inspect", str(pt), "--allow-pickle"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "kohya"


def test_export_kohya_and_ti(files, tmp_path, capsys):
    a, _ = files
    assert main(["export", str(a), "--format", "kohya"]) == 0
    kohya = tmp_path / "a.kohya.safetensors"
    assert f"wrote {kohya}" in capsys.readouterr().out
    assert set(load_file(kohya)) == set(LAYERS) and load_embedding_file(kohya).kind == "kohya"

    assert main(["export", str(a), "--format", "ti", "--layer", "MID"]) == 0
    assert "lost" in capsys.readouterr().out
    ti = load_file(tmp_path / "a-MID.ti.safetensors")
    assert torch.equal(ti["emb_params"], load_file(a)["MID"])
    assert (
        main(["export", str(a), "--format", "ti", "--mean", "-o", str(tmp_path / "m.safetensors")])
        == 0
    )
    capsys.readouterr()

    assert main(["export", str(a), "--format", "ti"]) == 2
    assert "--layer" in one_line_error(capsys)
    assert main(["export", str(a), "--format", "ti", "--layer", "NOPE"]) == 2
    assert "NOPE" in one_line_error(capsys)
    assert main(["export", str(a), "--format", "kohya", "-o", str(a)]) == 2
    assert "overwrite" in one_line_error(capsys)


def test_mix_saves_each_layers_concept_as_one_file(tiny_model, files, tmp_path, capsys):
    from xti.layers import layer_scheme
    from xti.models import load_unet_structure

    a, b = files
    out = tmp_path / "mixed.xti.safetensors"
    base = ["mix", "--model", str(tiny_model), "-e", str(a), "-e", str(b), "--placeholder", "<m>",
            "-o", str(out), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main([*base, "--mix", "<b>=coarse"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    coarse = layer_scheme(load_unet_structure(str(tiny_model))).select("coarse")
    assert 0 < len(coarse) < len(LAYERS)
    saved, fa, fb = (load_embedding_file(p) for p in (out, a, b))
    assert saved.layers == LAYERS and saved.metadata["xti.placeholder"] == "<m>"
    for i, name in enumerate(LAYERS):  # coarse from <b>, the rest from the first file's <a>
        source = fb if i in coarse else fa
        assert torch.equal(saved.vectors[name], source.vectors[name]), name
    assert json.loads(saved.metadata["xti.mix"]) == {"<b>": "IN07-OUT05"}

    # unnamed layers hold the prompt's first concept
    assert main([*base, "--prompt", "a photo of <b>"]) == 0
    saved = load_embedding_file(out)
    assert all(torch.equal(saved.vectors[n], fb.vectors[n]) for n in LAYERS)

    out.unlink()
    assert main([*base, "--mix", "<c>=coarse"]) == 2
    assert "'<c>' is not a loaded concept" in one_line_error(capsys)
    assert main([*base, "--mix", "<b>=IN99"]) == 2
    assert "IN99" in one_line_error(capsys)
    assert not out.exists()
