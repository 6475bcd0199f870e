"""`xti.sweep` and ``xti sweep``: which layers take the concept in each row, that rows differ, and
that the ``all`` row is plain generation with the concept (and ``none`` plain generation without
it), pixel for pixel, on the demo model with the shipped ``teal-dotted`` style."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xti.cli import main
from xti.errors import XTIError
from xti.inference import load_xti
from xti.pipelines import load_pipeline
from xti.sweep import neutral_prompt, run_sweep, selection_text, sweep_grid, sweep_selections

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "data" / "demo-model")
STYLE = str(ROOT / "data" / "demo-concepts" / "teal-dotted.xti.safetensors")
PROMPT = "a <teal-dotted> square on a white background"
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline(MODEL, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def adapter(pipe):
    with load_xti(pipe, STYLE) as a:
        yield a


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def plain(pipe_or_adapter, prompt: str, seed: int) -> np.ndarray:
    """One image as ``xti generate --seed`` makes it."""
    out = pipe_or_adapter(
        prompt,
        num_images_per_prompt=1,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator(device="cpu").manual_seed(seed),
    )
    return pixels(out.images[0])


def test_selection_text_reads_back_to_the_same_layers(adapter) -> None:
    scheme = adapter.scheme
    rng = random.Random(0)
    for _ in range(200):
        chosen = sorted(rng.sample(range(len(scheme)), rng.randint(1, len(scheme))))
        assert scheme.select(selection_text(chosen, scheme)) == chosen
    assert selection_text(range(2, 13), scheme) == "IN04-OUT08"
    assert selection_text([0, 1, 13, 14, 15], scheme) == "IN01-IN02,OUT09-OUT11"


def test_row_sets(adapter) -> None:
    scheme = adapter.scheme
    names = scheme.names
    growing = sweep_selections(scheme, "growing")
    assert growing[0] == ("none", [])
    assert [rows for _, rows in growing[1:]] == [list(range(k)) for k in range(1, 17)]
    assert growing[1][0] == "IN01" and growing[2][0] == "IN01-IN02"
    assert growing[-1][0] == "all (IN01-OUT11)"

    single = sweep_selections(scheme, "single")
    assert [rows for _, rows in single[1:-1]] == [[i] for i in range(16)]
    assert [label for label, _ in single[1:-1]] == names and single[-1] == ("all", list(range(16)))
    sliding = sweep_selections(scheme, "sliding", window=3)
    assert [rows for _, rows in sliding[1:-1]] == [[i, i + 1, i + 2] for i in range(14)]

    levels = sweep_selections(scheme, "levels", latent_size=(16, 16))
    assert [label for label, _ in levels] == [
        "none",
        "16x16: IN01-IN02,OUT09-OUT11",
        "8x8: IN04-IN05,OUT06-OUT08",
        "4x4: IN07-IN08,OUT03-OUT05",
        "2x2: MID",
        "all",
    ]
    parts = [set(rows) for _, rows in levels[1:-1]]
    assert set().union(*parts) == set(range(16)) and sum(map(len, parts)) == 16
    with pytest.raises(XTIError, match="window"):
        sweep_selections(scheme, "sliding", window=17)
    with pytest.raises(XTIError, match="unknown sweep kind"):
        sweep_selections(scheme, "diagonal")


def test_neutral_prompt() -> None:
    assert neutral_prompt(PROMPT, "<teal-dotted>", "dotted") == (
        "a dotted square on a white background"
    )
    assert neutral_prompt("a <x>  on <x>", "<x>", "") == "a on"


def test_sweep_rows_differ_and_the_ends_are_plain_generation(pipe, adapter) -> None:
    seen: list[tuple[int, int]] = []
    result = run_sweep(
        adapter,
        "<teal-dotted>",
        PROMPT,
        kind="levels",
        seeds=[0, 3],
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(i, 12) for i in range(1, 13)]
    assert result.neutral_prompt == "a dotted square on a white background"  # the initializer
    assert [r.label.split(":")[0] for r in result.rows] == [
        "none", "16x16", "8x8", "4x4", "2x2", "all"
    ]  # fmt: skip
    # rows differ from each other, for each seed. Except the 2x2 MID row against "none": on
    # the demo model MID's context moves the image by < 1e-5 (under one 8-bit step) - which is
    # what a sweep is for finding out; it still differs from every other row.
    for s in range(2):
        images = [pixels(r.images[s]) for r in result.rows]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                if (result.rows[i].label, result.rows[j].label) == ("none", "2x2: MID"):
                    continue
                assert not np.array_equal(images[i], images[j]), (i, j)
    for s, seed in enumerate([0, 3]):
        # all layers: the concept as plain generation gives it
        assert np.array_equal(pixels(result.rows[-1].images[s]), plain(adapter, PROMPT, seed))
        # no layer: the stock pipeline on the neutral prompt
        assert np.array_equal(
            pixels(result.rows[0].images[s]), plain(pipe, result.neutral_prompt, seed)
        )
    grid = sweep_grid(result.rows)
    assert grid.height == 6 * 96 and (grid.width - 2 * 96) > 0  # 32-px images enlarged 3x


def test_sweep_needs_the_placeholder_in_the_prompt(adapter) -> None:
    with pytest.raises(XTIError, match="does not contain <teal-dotted>"):
        run_sweep(adapter, "<teal-dotted>", "a red square", num_inference_steps=1)
    with pytest.raises(XTIError, match="not a loaded concept"):
        run_sweep(adapter, "<other>", "a <other>", num_inference_steps=1)


def test_cli_writes_one_png_whose_all_row_is_xti_generate(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep.png"
    args = ["sweep", STYLE, "--model", MODEL, "--prompt", PROMPT, "--kind", "levels"]
    args += ["--seeds", "1", "--steps", str(STEPS), "--guidance", "4", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert f"wrote {out} (6 rows x 1 seeds)" in capsys.readouterr().out
    gen = ["generate", "--model", MODEL, "-e", STYLE, "--prompt", PROMPT, "--seed", "1"]
    gen += ["--steps", str(STEPS), "--guidance", "4", "--out-dir", str(tmp_path / "gen")]
    assert main([*gen, "--no-progress"]) == 0
    with Image.open(out) as im:
        meta = json.loads(im.text["xti"])
        grid = im.convert("RGB")
    assert [r["label"] for r in meta["rows"]][-1] == "all" and meta["kind"] == "levels"
    assert meta["rows"][1]["layers"] == ["IN01", "IN02", "OUT09", "OUT10", "OUT11"]
    cell = 96
    assert grid.height == 6 * cell
    left = grid.width - cell
    last_row = grid.crop((left, 5 * cell, left + cell, 6 * cell))
    generated = Image.open(tmp_path / "gen" / "xti-1-00.png").convert("RGB")
    assert np.array_equal(pixels(last_row), pixels(generated.resize((cell, cell), Image.NEAREST)))


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bad = ["sweep", STYLE, "--model", MODEL, "--prompt", "a red square", "--steps", "1"]
    assert main([*bad, "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "<teal-dotted>" in err
    assert main(["sweep", str(tmp_path / "missing.safetensors"), "--model", MODEL]) == 2
    assert "not found" in capsys.readouterr().err
