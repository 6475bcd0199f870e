"""The web UI's work without a browser: the Train form as a config and a command, the image
check, the board presets and mixes, a saved mix, charts, paths and one-line errors.
(`tests/test_ui_browser.py` drives the whole app in Chromium.)"""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from xti.config import load_config
from xti.errors import XTIError
from xti.export import build_metadata, load_embedding_file, save_embedding_file
from xti.inference import load_xti
from xti.pipelines import load_pipeline
from xti.ui.common import error, guarded, ok
from xti.ui.inspection import cosine_matrix, layer_vectors, norm_chart, similarity
from xti.ui.mix import PROMPT, level_groups, mix_of, preset_assignment, save_mix
from xti.ui.paths import embedding_entries, entry_text, model_path
from xti.ui.plots import heatmap
from xti.ui.train import (
    TrainForm,
    _seconds_left,
    check_images,
    checked_config,
    command_line,
    form_from_config,
    overrides,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "data" / "demo-model")
CONFIG = str(ROOT / "configs" / "demo.yaml")
CONCEPT = str(ROOT / "data" / "demo-concepts" / "striped-cross")
STYLE = str(ROOT / "data" / "demo-concepts" / "teal-dotted.xti.safetensors")


def demo_form(**changes) -> TrainForm:
    values = {
        "config": CONFIG,
        "model": MODEL,
        "images": CONCEPT,
        "placeholder": "<striped-cross>",
        "initializer": "cross",
        "steps": 12,
        "seeds": "0 1",
        "output_dir": "outputs/ui-test",
    }
    return TrainForm(**{**values, **changes})


# ----------------------------------------------------------------------------- Train


def test_form_becomes_overrides_that_load_config_reads_back() -> None:
    prompts = ["a <striped-cross>: 'quoted' # not a comment", 'a "blue" <striped-cross>', "yes"]
    form = demo_form(prompts="\n".join(prompts) + "\n\n", lr=0.003, kde_weight=0.0, batch=4.0)
    cfg = load_config(CONFIG, overrides(form))
    assert cfg.validation.prompts == prompts
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.batch_size) == (12, 0.003, 4)
    assert cfg.kde.weight == 0.0 and cfg.validation.seeds == [0, 1]
    assert cfg.concept.placeholder == "<striped-cross>" and cfg.name == "striped-cross"
    assert cfg.tracking.report_to == "jsonl" and cfg.train.resume is None
    assert load_config(CONFIG, overrides(demo_form(resume=True))).train.resume == "latest"
    # the command line is those overrides, quoted for a shell
    args = shlex.split(command_line(form))
    assert args[:4] == ["python", "train.py", "--config", CONFIG]
    assert args[4:] == overrides(form)


def test_form_from_config_is_the_config() -> None:
    values = form_from_config(CONFIG)
    cfg = load_config(CONFIG, [])
    assert values["steps"] == cfg.train.max_steps and values["lr"] == cfg.train.lr
    assert values["prompts"].splitlines() == cfg.validation.prompts
    assert values["seeds"] == " ".join(map(str, cfg.validation.seeds))
    assert Path(values["images"]).resolve() == Path(CONCEPT).resolve()


def test_one_form_config_mapping_round_trips() -> None:
    import dataclasses
    import functools

    from xti.ui.train import FORM

    # one row per form field, in the form's order; a base config read into the form and written
    # back as overrides gives the same config values for every mapped key
    assert [f.name for f in FORM] == [f.name for f in dataclasses.fields(TrainForm)]
    values = form_from_config(CONFIG)
    form = TrainForm(config=CONFIG, **values)
    base, again = load_config(CONFIG, []), load_config(CONFIG, overrides(form))
    for f in FORM:
        if f.from_config is not None:
            got = functools.reduce(getattr, f.key.split("."), again)
            want = functools.reduce(getattr, f.key.split("."), base)
            assert got == want or Path(got).resolve() == Path(want).resolve(), f.key


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"images": "no/such/folder"}, "image folder: no/such/folder does not exist"),
        ({"steps": 2.5}, "steps: give a whole number"),
        ({"lr": None}, "lr: give a number"),
        ({"seeds": "0 x"}, "validation seeds: give whole numbers"),
        ({"model": "no/such/model.safetensors"}, "model: no/such/model.safetensors does not"),
        ({"lr": -1}, "train.lr"),
    ],
)
def test_bad_forms_are_one_line(changes: dict, message: str) -> None:
    with pytest.raises(XTIError, match=message) as err:
        checked_config(demo_form(**changes))
    assert "\n" not in str(err.value)


def test_check_images(tmp_path: Path) -> None:
    found = check_images(CONCEPT, "<striped-cross>")
    assert len(found.thumbnails) == 6
    assert found.message == "6 images, 6 with captions; every caption contains <striped-cross>"
    assert found.thumbnails[0][1] == "00.png: a <striped-cross> on a white background"
    with pytest.raises(XTIError, match="does not contain the placeholder '<other>'"):
        check_images(CONCEPT, "<other>")
    with pytest.raises(XTIError, match="contains no images"):
        check_images(str(tmp_path), "<x>")
    (tmp_path / "a.png").write_bytes((Path(CONCEPT) / "00.png").read_bytes())
    assert check_images(str(tmp_path), "<x>").message == (
        "1 images, 0 with captions; the others use the object templates"
    )


def test_time_left_is_the_median_step_time_times_the_steps_left() -> None:
    rows = [{"step": s, "step_time": t} for s, t in enumerate([9.0, 0.2, 0.3, 0.25], start=1)]
    assert _seconds_left(rows, 10) == pytest.approx(0.3 * 6)
    assert _seconds_left([], 10) is None


# ----------------------------------------------------------------------------- Mix


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline(MODEL, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> str:
    """A second concept for the demo model: random vectors, different in every layer."""
    g = torch.Generator().manual_seed(0)
    layers = load_embedding_file(STYLE).layers
    vectors = {name: torch.randn(1, 64, generator=g) * 0.5 for name in layers}
    meta = build_metadata(
        layers=layers,
        granularity="block",
        placeholder="<blob>",
        initializer="circle",
        n_vectors=1,
        family="sd1",
        base_model=MODEL,
        text_dims={"text": 64},
        steps=0,
        kde_weight=0.0,
    )
    path = tmp_path_factory.mktemp("blob") / "blob.xti.safetensors"
    return str(save_embedding_file(path, vectors, meta))


def test_presets_and_their_mix(pipe, blob: str) -> None:
    with load_xti(pipe, [blob, STYLE]) as adapter:
        scheme, concepts = adapter.scheme, list(adapter.concepts)
    assert concepts == ["<blob>", "<teal-dotted>"]
    board = preset_assignment(scheme, concepts, "shape/colour")
    assert mix_of(scheme, board, concepts) == {
        "<blob>": "IN04-OUT08",
        "<teal-dotted>": "IN01-IN02,OUT09-OUT11",
    }
    assert mix_of(scheme, preset_assignment(scheme, concepts, "coarse/fine"), concepts) == {
        "<blob>": "IN07-OUT05",
        "<teal-dotted>": "IN01-IN05,OUT06-OUT11",
    }
    dmu = preset_assignment(scheme, concepts, "down/mid/up")
    assert mix_of(scheme, dmu, concepts) == {"<blob>": "IN01-IN08", "<teal-dotted>": "MID"}
    assert {dmu[n] for n in scheme.names if n.startswith("OUT")} == {PROMPT}
    assert set(preset_assignment(scheme, concepts, "all").values()) == {"<blob>"}
    assert mix_of(scheme, preset_assignment(scheme, concepts, "clear"), concepts) == {}
    with pytest.raises(XTIError, match="not loaded"):
        mix_of(scheme, {"IN01": "<gone>"}, concepts)
    groups = level_groups(scheme, 16)
    assert [label for label, _ in groups] == [
        "down 16x16", "down 8x8", "down 4x4", "mid 2x2", "up 4x4", "up 8x8", "up 16x16"
    ]  # fmt: skip
    assert sum((names for _, names in groups), []) == scheme.names


def test_a_saved_mix_holds_each_layers_vectors_and_generates_the_mix(
    pipe, blob: str, tmp_path: Path
) -> None:
    prompt = "a <blob> on a black background"
    with load_xti(pipe, [blob, STYLE]) as adapter:
        scheme, concepts = adapter.scheme, list(adapter.concepts)
        board = preset_assignment(scheme, concepts, "shape/colour")
        board["OUT11"] = PROMPT  # left to the prompt: the prompt's concept, <blob>
        path = save_mix(adapter, board, prompt, tmp_path / "m.xti.safetensors",
                        placeholder="<mix>", model=MODEL)  # fmt: skip
        mixed = adapter(
            prompt,
            mix=mix_of(scheme, board, concepts),
            num_inference_steps=6,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    saved = load_embedding_file(path)
    style, other = load_embedding_file(STYLE), load_embedding_file(blob)
    assert saved.metadata["xti.placeholder"] == "<mix>" and saved.layers == scheme.names
    for name in scheme.names:
        source = style if board[name] == "<teal-dotted>" else other
        assert torch.equal(saved.vectors[name], source.vectors[name]), name
    with load_xti(pipe, path) as adapter:
        again = adapter(
            prompt.replace("<blob>", "<mix>"),
            num_inference_steps=6,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    assert np.array_equal(again, mixed)
    no_concept = "keeps the prompt, which names no loaded concept"
    with load_xti(pipe, [blob, STYLE]) as adapter, pytest.raises(XTIError, match=no_concept):
        save_mix(adapter, {}, "a red square", tmp_path / "x.xti.safetensors",
                 placeholder="<mix>", model=MODEL)  # fmt: skip


# ----------------------------------------------------------------------------- Inspect


def test_layer_similarity_is_the_cosine_of_each_layers_vectors() -> None:
    ef = load_embedding_file(STYLE)
    rows = layer_vectors(ef)
    assert rows.shape == (16, 64)
    reference = torch.nn.functional.cosine_similarity(
        torch.tensor(rows)[:, None, :], torch.tensor(rows)[None, :, :], dim=-1
    )
    assert np.allclose(cosine_matrix(rows), reference.numpy(), atol=1e-12)
    assert norm_chart(ef).width > 400 and similarity(ef).width > 16 * 30


def test_heatmap_colours_follow_the_values() -> None:
    m = np.array([[1.0, -1.0], [-1.0, 1.0]])
    img = heatmap(["a", "b"], m, "t", cell=30)
    top = 28 + 56  # title row + label margin
    red = img.getpixel((56 + 25, top + 25))
    blue = img.getpixel((56 + 30 + 25, top + 25))
    assert red[0] > 200 and red[2] < 80
    assert blue[2] > 200 and blue[0] < 80


# ----------------------------------------------------------------------------- paths, errors


def test_embedding_entries_as_generate_takes_them(tmp_path: Path) -> None:
    entries = embedding_entries(f"{STYLE}\n\n<b>={STYLE}\n", "files")
    assert entries == [(None, STYLE), ("<b>", STYLE)]
    assert [entry_text(e) for e in entries] == [STYLE, f"<b>={STYLE}"]
    with pytest.raises(XTIError, match="files: .*missing.safetensors does not exist"):
        embedding_entries(str(tmp_path / "missing.safetensors"), "files")
    with pytest.raises(XTIError, match="at least one file"):
        embedding_entries("  \n", "files")
    assert model_path("builtin:tiny-sd1") == "builtin:tiny-sd1"
    with pytest.raises(XTIError, match="does not exist"):
        model_path(str(tmp_path / "nothing"))


def test_handlers_show_one_line_and_keep_other_outputs() -> None:
    import gradio as gr

    @guarded(3)
    def fails(kind: str) -> tuple:
        if kind == "xti":
            raise XTIError("data.dir x contains no images <png>")
        raise ValueError("bad value\nsecond line")

    line, *rest = fails("xti")
    assert line == error("data.dir x contains no images <png>")
    assert "&lt;png&gt;" in line and all(isinstance(r, type(gr.skip())) for r in rest)
    assert fails("other")[0] == error("ValueError: bad value")
    assert "xti-ok" in ok("fine")


def test_ui_binds_to_loopback_unless_told() -> None:
    from xti.cli import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    assert build_parser().parse_args(["ui", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_ui_on_a_taken_port_is_one_line(capsys) -> None:
    from xti.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["ui", "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot serve on 127.0.0.1:")
