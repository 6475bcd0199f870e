"""Quality probes (`xti.quality`): the prompts they ask and how they score images.

The scores are checked on images whose answer is known: the generator's own renders (right or
deliberately wrong), and the training images themselves. The demo run that uses them on a trained
concept is in test_demo_run.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xti import procedural as P
from xti import quality as Q

REPO = Path(__file__).parents[1]
OBJ = Q.load_concept(REPO / "data" / "demo-concepts" / "striped-cross")
STYLE = Q.load_concept(REPO / "data" / "demo-concepts" / "teal-dotted")
SEEDS = range(6)


def render(shape: str, colour: str, background: str, seed: int) -> np.ndarray:
    img, _ = P.generate(
        seed, shapes=(shape,), colours=(colour,), backgrounds=(background,), patterns=("plain",)
    )
    return img


def test_demo_concepts_load_with_their_placeholders_and_constant_attributes():
    assert OBJ.subject == "<striped-cross>" and STYLE.subject == "<teal-dotted>"
    assert (OBJ.constant("shape"), OBJ.constant("colour"), OBJ.constant("pattern")) == (
        "cross",
        "orange",
        "striped",
    )
    assert STYLE.constant("colour") == "teal" and STYLE.constant("shape") is None
    assert OBJ.describe() == "orange striped cross"


def test_probes_of_the_demo_concepts():
    probes = Q.demo_probes(OBJ, STYLE)
    assert Counter(p.kind for p in probes) == {"reconstruction": 3, "editability": 4, "mixing": 3}
    recon = [p for p in probes if p.kind == "reconstruction"]
    assert [p.prompt for p in recon] == [
        f"a <striped-cross> on a {bg} background" for bg in ("white", "gray", "black")
    ]
    for p in recon:
        bg = p.expect["background"]
        assert p.expect == {"shape": "cross", "colour": "orange", "background": bg}
        # the references are exactly the training images drawn on that background
        expected = [
            img for img, lab in zip(OBJ.images, OBJ.labels, strict=True) if lab.background == bg
        ]
        assert len(p.references) == len(expected) == 2
        assert all(np.array_equal(a, b) for a, b in zip(p.references, expected, strict=True))
    edit = [p for p in probes if p.kind == "editability"]
    assert [p.expect["colour"] for p in edit] == ["blue", "red", "green", "purple"]
    assert edit[0].prompt == "a blue <striped-cross> on a white background"
    for p in (p for p in probes if p.kind == "mixing"):
        assert p.expect == {"shape": "cross", "colour": "teal"}
        assert list(p.mix.items()) == [("<teal-dotted>", "all"), ("<striped-cross>", "IN04-OUT08")]
    # the concept's own colour is no edit; a text subject gets articles right and no mixing
    text = Q.demo_probes(
        Q.Concept(OBJ.describe(), OBJ.images, OBJ.labels), edit_colours=("orange", "red")
    )
    assert [p.prompt for p in text if p.kind != "reconstruction"] == [
        "a red orange striped cross on a white background"
    ]
    assert text[0].prompt == "an orange striped cross on a white background"


def test_mixing_control_swaps_the_style_for_a_word_in_the_same_layers():
    mixing = [p for p in Q.demo_probes(OBJ, STYLE) if p.kind == "mixing"]
    control = Q.mixing_control_probes(OBJ, STYLE, "dotted")
    assert [p.kind for p in control] == ["control"] * 3
    for m, c in zip(mixing, control, strict=True):
        assert c.prompt == m.prompt.replace("a <striped-cross>", "a dotted")
        assert c.layer_prompts == {"IN04-OUT08": m.prompt} and c.mix is None
        assert c.expect == m.expect


def test_generator_renders_of_the_expected_attributes_score_full_marks():
    probes = Q.demo_probes(OBJ, STYLE)

    def right(probe: Q.Probe) -> list[np.ndarray]:
        bg = probe.expect.get("background", "white")
        return [render(probe.expect["shape"], probe.expect["colour"], bg, s) for s in SEEDS]

    scores = Q.evaluate(right, probes)
    distances = scores.pop("reconstruction.distance")
    assert scores == {k: 1.0 for k in scores}
    assert set(scores) == {
        f"{kind}.{m}"
        for kind, metrics in {
            "reconstruction": ("shape", "colour", "background", "all"),
            "editability": ("shape", "colour", "all"),
            "mixing": ("shape", "colour", "all"),
        }.items()
        for m in metrics
    }
    assert 0.0 < distances < 0.5, "plain crosses elsewhere are not the striped training images"


def test_wrong_colours_and_shapes_score_zero_on_that_attribute_only():
    probes = Q.demo_probes(OBJ, STYLE)

    def wrong_colour(probe: Q.Probe) -> list[np.ndarray]:
        colour = "yellow"  # neither orange, teal nor an edit colour
        return [render(probe.expect["shape"], colour, probe.expect.get("background", "white"), s)
                for s in SEEDS]  # fmt: skip

    scores = Q.evaluate(wrong_colour, probes)
    for kind in ("reconstruction", "editability", "mixing"):
        assert scores[f"{kind}.colour"] == 0.0 and scores[f"{kind}.all"] == 0.0
        assert scores[f"{kind}.shape"] == 1.0

    def wrong_shape(probe: Q.Probe) -> list[np.ndarray]:
        return [render("circle", probe.expect["colour"], probe.expect.get("background", "white"), s)
                for s in SEEDS]  # fmt: skip

    scores = Q.evaluate(wrong_shape, probes)
    assert scores["mixing.shape"] == 0.0 and scores["mixing.colour"] == 1.0


def test_the_training_images_reconstruct_themselves_at_distance_zero():
    recon = [p for p in Q.demo_probes(OBJ) if p.kind == "reconstruction"]
    scores = Q.evaluate(lambda p: list(p.references), recon)
    assert scores == {
        "reconstruction.shape": 1.0,
        "reconstruction.colour": 1.0,
        "reconstruction.background": 1.0,
        "reconstruction.all": 1.0,
        "reconstruction.distance": 0.0,
    }


def test_image_distance_is_the_rms_to_the_nearest_reference():
    black = np.zeros((4, 4, 3), np.uint8)
    white = np.full((4, 4, 3), 255, np.uint8)
    half = black.copy()
    half[:2] = 255  # half the pixels differ by 1.0 from black: RMS sqrt(0.5)
    assert Q.image_distance(half, [white]) == pytest.approx(np.sqrt(0.5))
    assert Q.image_distance(black, [white, half]) == pytest.approx(np.sqrt(0.5))
    assert Q.image_distance(black, [white, black]) == 0.0


def test_probes_need_a_constant_shape_and_colour():
    with pytest.raises(ValueError, match="one shape and one colour"):
        Q.demo_probes(STYLE)  # teal-dotted comes in many shapes
