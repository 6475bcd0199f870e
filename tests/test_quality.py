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

from xti import quality as Q
from xti.demo import procedural as P

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


def test_style_probes_ask_for_its_training_captions_and_unseen_shapes():
    probes = Q.style_probes(STYLE, OBJ)
    recon = [p for p in probes if p.kind == "reconstruction"]
    pairs = list(dict.fromkeys((lab.shape, lab.background) for lab in STYLE.labels))
    assert [p.prompt for p in recon] == [
        f"a <teal-dotted> {s} on a {bg} background" for s, bg in pairs
    ]
    for p, (shape, bg) in zip(recon, pairs, strict=True):
        assert p.expect == {"shape": shape, "colour": "teal", "background": bg}
        assert p.references and all(
            any(np.array_equal(r, img) for r in p.references)
            for img, lab in zip(STYLE.images, STYLE.labels, strict=True)
            if (lab.shape, lab.background) == (shape, bg)
        )
    edit = [p for p in probes if p.kind == "editability"]
    # teal-dotted was shown every shape but the cross
    assert [(p.prompt, p.expect) for p in edit] == [
        ("a <teal-dotted> cross on a white background", {"shape": "cross", "colour": "teal"})
    ]
    mixing = [p for p in probes if p.kind == "mixing"]
    assert mixing == [p for p in Q.demo_probes(OBJ, STYLE) if p.kind == "mixing"]
    assert not [p for p in Q.style_probes(STYLE) if p.kind == "mixing"]
    # the training images score full marks on their own reconstruction probes
    scores = Q.evaluate(lambda p: list(p.references), recon)
    assert scores["reconstruction.all"] == 1.0 and scores["reconstruction.distance"] == 0.0
    with pytest.raises(ValueError, match="one colour"):
        Q.style_probes(Q.Concept("<x>", (), (P.Label("circle", "red", "white"),
                                             P.Label("circle", "blue", "white"))))  # fmt: skip


@pytest.mark.parametrize("name", P.DEMO_OBJECTS)
def test_every_demo_object_has_a_config_and_full_probe_set(name):
    from xti.config import load_config

    cfg = load_config(REPO / Q.DEMO_CONFIGS[name])
    assert Path(cfg.data.dir) == Path("data/demo-concepts") / name
    assert cfg.concept.placeholder == f"<{name}>"
    obj = Q.load_concept(REPO / cfg.data.dir)
    probes = Q.demo_probes(obj, STYLE)
    kinds = Counter(p.kind for p in probes)
    assert kinds["reconstruction"] == 3 and kinds["mixing"] == 3 and kinds["editability"] >= 3
    # the initializer names the object's shape: what is left to learn is what words cannot say
    assert cfg.concept.initializer == obj.constant("shape")
    assert set(Q.DEMO_CONFIGS) == set(P.DEMO_CONCEPTS)
    # the giant objects' reconstruction asks for their size too; their images have it
    recon = [p for p in probes if p.kind == "reconstruction"]
    giant = name.startswith("giant-")
    assert all(("size_class" in p.expect) == giant for p in recon)
    scores = Q.evaluate(lambda p: list(p.references), recon)
    assert scores["reconstruction.all"] == 1.0 and scores["reconstruction.distance"] == 0.0
    if giant:  # the right shape and colour at a size pretraining drew misses on size only
        shape, colour = obj.constant("shape"), obj.constant("colour")
        scores = Q.evaluate(
            lambda p: [render(shape, colour, p.expect["background"], s) for s in SEEDS], recon
        )
        assert scores["reconstruction.size_class"] == 0.0 and scores["reconstruction.all"] == 0.0
        assert scores["reconstruction.shape"] == scores["reconstruction.colour"] == 1.0


def test_first_budget_reaching_a_score():
    assert Q.first_budget_reaching({10: 0.5, 25: 0.92, 50: 0.88, 100: 1.0}) == 25
    assert Q.first_budget_reaching({100: 0.95, 10: 0.2, 50: 0.9}) == 50  # exactly 90% counts
    assert Q.first_budget_reaching({10: 0.5, 25: 0.89}) is None
    assert Q.first_budget_reaching({10: None, 25: 1.0}) == 25
    assert Q.first_budget_reaching({10: 0.6}, threshold=0.5) == 10
    assert Q.first_budget_reaching({}) is None


def test_vector_stats_on_a_reference_with_known_answers():
    import torch

    from xti.kde import KDERegularizer

    # four reference rows at distance 3 from the origin: mean norm 3, nearest neighbours 3·√2 apart
    r = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [0.0, -3.0]])
    kde = KDERegularizer(r)
    assert kde.reference_norm == pytest.approx(3.0) and kde.bandwidth == pytest.approx(3 * 2**0.5)
    # two layers, one vector each: on a reference row, and 3 beyond it; both started at the origin
    vectors = {"IN01": torch.tensor([[3.0, 0.0]]), "IN02": torch.tensor([[6.0, 0.0]])}
    stats = Q.vector_stats(vectors, torch.zeros(1, 2), kde)
    assert stats == pytest.approx(
        {"norm_ratio": (3 + 6) / 2 / 3, "nn_over_h": (0 + 3) / 2 / (3 * 2**0.5), "moved": 4.5},
        abs=1e-5,
    )
    # a tensor [layers, n, d] gives the same; vectors that never moved give 0
    assert Q.vector_stats(torch.stack(list(vectors.values())), torch.zeros(1, 2), kde) == stats
    assert Q.vector_stats(vectors, torch.stack(list(vectors.values())), kde)["moved"] == 0.0


def test_table_cells():
    assert Q.format_score("reconstruction.all", 0.875) == "88%"
    assert Q.format_score("reconstruction.distance", 0.12345) == "0.123"
    assert Q.format_score("norm_ratio", 1.5) == "1.500"
    assert Q.format_score("mixing.all", None) == "—"
    assert Q.score_cells({"reconstruction.all": 1.0}, ["recon all", "mix both"]) == ["100%", "—"]
    assert Q.markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
