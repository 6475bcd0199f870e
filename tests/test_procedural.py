"""The procedural generator and the measurements that read its labels back (xti.demo.procedural)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from xti.demo import procedural as P

REPO = Path(__file__).parents[1]
CONCEPTS = REPO / "data" / "demo-concepts"


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, list[P.Label]]:
    return P.generate_batch(360, seed=1234)


def test_deterministic_from_seed():
    a, la = P.generate_batch(8, seed=7)
    b, lb = P.generate_batch(8, seed=7)
    c, lc = P.generate_batch(8, seed=8)
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, c)
    img, lab = P.generate(np.random.default_rng(7))
    assert np.array_equal(img, a[0]) and lab == la[0]


def test_images_and_labels_are_consistent(batch):
    images, labels = batch
    assert images.shape == (360, 32, 32, 3) and images.dtype == np.uint8
    for img, lab in zip(images[:60], labels[:60], strict=True):
        cov = P.coverage(lab)
        # the whole shape is inside the image, one pixel clear of the border
        assert cov.sum() > 30
        assert cov[0].max() == 0 and cov[-1].max() == 0
        assert cov[:, 0].max() == 0 and cov[:, -1].max() == 0
        # pixels outside the shape are exactly the background colour
        assert (img[cov == 0] == np.array(P.BACKGROUNDS[lab.background])).all()
        # fully covered pixels are the colour times a factor in [PATTERN_SHADE, 1] (anti-aliased
        # pattern edges), exactly the colour when plain
        full = img[cov == 1].astype(float)
        colour = np.array(P.COLOURS[lab.colour], float)
        f = full @ colour / (colour @ colour)
        assert (f >= P.PATTERN_SHADE - 0.01).all() and (f <= 1.01).all()
        assert (np.abs(full - f[:, None] * colour).max(-1) <= 1.5).all()
        if lab.pattern == "plain":
            assert (np.abs(full - colour).max(-1) <= 1.0).all()


def test_every_attribute_value_occurs(batch):
    _, labels = batch
    assert {lab.shape for lab in labels} == set(P.SHAPES)
    assert {lab.colour for lab in labels} == set(P.COLOURS)
    assert {lab.background for lab in labels} == set(P.BACKGROUNDS)
    assert {lab.pattern for lab in labels} == set(P.PATTERNS)
    sizes = [lab.size for lab in labels]
    assert min(sizes) >= P.SIZE_RANGE[0] and max(sizes) <= P.SIZE_RANGE[1]
    assert len(P.COLOURS) >= 6 and len(P.SHAPES) >= 5 and len(P.BACKGROUNDS) >= 3


def test_captions():
    lab = P.Label("circle", "red", "white")
    assert lab.caption == "a red circle on a white background"
    lab = P.Label("square", "orange", "black", "striped")
    assert lab.caption == "an orange striped square on a black background"
    assert P.caption_for("triangle") == "a triangle"
    assert P.caption_for(None, "blue") == "a blue shape"


def test_label_round_trip():
    _, labels = P.generate_batch(3, seed=3)
    for lab in labels:
        d = json.loads(json.dumps(lab.to_dict()))
        assert d["caption"] == lab.caption
        assert P.Label.from_dict(d) == lab


def test_training_captions_follow_the_rules():
    _, labels = P.generate_batch(400, seed=5, exclude=P.is_held_out)
    assert not any(P.is_held_out(lab) for lab in labels)
    rng = np.random.default_rng(0)
    caps = [P.training_caption(lab, rng) for lab in labels]
    for lab, cap in zip(labels, caps, strict=True):
        assert "teal" not in cap
        words = set(cap.split())
        # attributes may be dropped, never replaced by wrong ones
        assert not words & (set(P.SHAPES) - {lab.shape})
        assert not words & (set(P.COLOURS) - {lab.colour})
        assert not words & (set(P.BACKGROUNDS) - {lab.background})
    empty = sum(c == "" for c in caps) / len(caps)
    assert 0.03 < empty < 0.2
    full = sum(c == lab.caption for c, lab in zip(caps, labels, strict=True)) / len(caps)
    assert full > 0.4


def test_measurements_recover_generator_labels(batch):
    images, labels = batch
    hits: Counter[str] = Counter()
    per_shape: Counter[str] = Counter()
    per_shape_total: Counter[str] = Counter()
    for img, lab in zip(images, labels, strict=True):
        m = P.measure(img)
        for attr in ("shape", "colour", "background", "pattern"):
            hits[attr] += getattr(m, attr) == getattr(lab, attr)
        per_shape_total[lab.shape] += 1
        per_shape[lab.shape] += m.shape == lab.shape
        assert m.matches(lab) == (
            m.shape == lab.shape and m.colour == lab.colour and m.background == lab.background
        )
    n = len(labels)
    assert hits["colour"] / n >= 0.99
    assert hits["background"] / n == 1.0
    assert hits["shape"] / n >= 0.97
    assert hits["pattern"] / n >= 0.95
    for shape in P.SHAPES:
        assert per_shape[shape] / per_shape_total[shape] >= 0.9, shape


def test_foreground_mask_matches_coverage(batch):
    images, labels = batch
    ious = []
    for img, lab in zip(images[:100], labels[:100], strict=True):
        truth = P.coverage(lab) >= 0.5
        mask = P.foreground_mask(img)
        ious.append((truth & mask).sum() / (truth | mask).sum())
    assert np.mean(ious) > 0.93 and np.min(ious) > 0.6


def test_measurements_survive_blur_and_noise(batch):
    """Generated images are soft and noisy: blur and add noise, still readable."""
    images, labels = batch
    rng = np.random.default_rng(0)
    hits: Counter[str] = Counter()
    n = 120
    for img, lab in zip(images[:n], labels[:n], strict=True):
        soft = Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7))
        noisy = np.asarray(soft, float) + rng.normal(0, 8, (32, 32, 3))
        m = P.measure(np.clip(noisy, 0, 255).astype(np.uint8))
        for attr in ("shape", "colour", "background"):
            hits[attr] += getattr(m, attr) == getattr(lab, attr)
    assert hits["colour"] / n >= 0.97
    assert hits["background"] / n >= 0.97
    assert hits["shape"] / n >= 0.9


def test_float_images_and_empty_foreground():
    img, lab = P.generate(11)
    m_uint8 = P.measure(img)
    m_float = P.measure(img.astype(np.float32) / 255.0)
    assert (m_uint8.shape, m_uint8.colour) == (m_float.shape, m_float.colour)
    blank = np.full((32, 32, 3), 245, np.uint8)
    m = P.measure(blank)
    assert m.shape is None and m.colour is None and m.background == "white"
    assert P.background_brightness(np.zeros((32, 32, 3), np.uint8)) == 0.0


def test_colour_names_cover_the_palette():
    for name, rgb in P.COLOURS.items():
        img = np.zeros((32, 32, 3), np.uint8) + np.array(P.BACKGROUNDS["gray"], np.uint8)
        img[8:24, 8:24] = rgb
        assert P.colour_name(P.dominant_hue(img)) == name
        assert P.classify_shape(P.foreground_mask(img)) == "square"


@pytest.mark.parametrize("name", sorted(P.DEMO_CONCEPTS))
def test_demo_concepts_on_disk(name):
    folder = CONCEPTS / name
    meta = json.loads((folder / "labels.json").read_text())
    entries = meta["images"]
    assert 4 <= len(entries) <= 8
    images, labels = P.demo_concept(name, len(entries))
    for entry, img, lab in zip(entries, images, labels, strict=True):
        on_disk = np.asarray(Image.open(folder / entry["file"]).convert("RGB"))
        assert on_disk.shape[0] >= 32 and np.array_equal(on_disk, img)
        assert P.Label.from_dict(entry) == lab
        m = P.measure(on_disk)
        assert (m.shape, m.colour, m.background, m.pattern, m.size_class) == (
            lab.shape,
            lab.colour,
            lab.background,
            lab.pattern,
            lab.size_class,
        )
    if meta["kind"] == "object":
        # never drawn in pretraining, and one object: same shape, colour and pattern throughout
        assert all(P.never_in_pretraining(lab) for lab in labels)
        assert len({(lab.shape, lab.colour, lab.pattern) for lab in labels}) == 1
    else:
        # a style: one colour and pattern over several shapes, colour never named in captions
        assert len({(lab.colour, lab.pattern) for lab in labels}) == 1
        assert len({lab.shape for lab in labels}) >= 3
        assert labels[0].colour not in P.NAMED_COLOURS
    # training captions: the placeholder stands for what is new, the rest in pretraining's grammar
    captions = {}
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        captions[row["file_name"]] = row["text"]
    assert captions == {
        e["file"]: P.demo_caption(name, lab) for e, lab in zip(entries, labels, strict=True)
    }
    kept = "" if meta["kind"] == "object" else f" {labels[0].shape}"
    assert captions["00.png"] == f"a <{name}>{kept} on a {labels[0].background} background"


def test_what_pretraining_never_draws(batch):
    # pretraining's own draws (generate_batch with exclude=is_held_out, defaults otherwise) never are
    _, labels = P.generate_batch(200, seed=99, exclude=P.is_held_out)
    assert not any(P.never_in_pretraining(lab) for lab in labels)
    # and the unconstrained generator's striped crosses are, by HELD_OUT
    _, labels = batch
    assert {P.never_in_pretraining(lab) for lab in labels} == {True, False}
    assert all(P.never_in_pretraining(lab) == P.is_held_out(lab) for lab in labels)
    # sizes outside SIZE_RANGE (at any resolution) are, whatever the combination
    lo, hi = P.SIZE_RANGE
    assert P.never_in_pretraining(P.Label("circle", "red", "white", size=hi + 1))
    assert P.never_in_pretraining(P.Label("circle", "red", "white", size=lo - 1))
    assert not P.never_in_pretraining(P.Label("circle", "red", "white", size=2 * hi, resolution=64))
    assert P.never_in_pretraining(P.Label("circle", "red", "white", size=2 * hi + 2, resolution=64))
    # pretraining's biggest shapes never measure giant; giant labels are exactly the oversized ones
    _, labels = P.generate_batch(60, seed=5, size_range=(P.SIZE_RANGE[1],) * 2)
    assert {P.measure(P.render(lab)).size_class for lab in labels} == {"normal"}
    assert {lab.size_class for lab in labels} == {"normal"}
    assert P.Label("circle", "red", "white", size=P.SIZE_RANGE[1] + 1).size_class == "giant"
    assert P.Label("circle", "red", "white", size=P.SIZE_RANGE[0] - 1).size_class == "small"
    assert P.measure(np.full((32, 32, 3), 128, np.uint8)).size_class is None
    # the demo objects: the giant ones are new by size alone, striped-cross by HELD_OUT alone
    assert P.DEMO_OBJECTS == ("striped-cross", "giant-dotted-diamond", "giant-striped-triangle")
    for name in P.DEMO_OBJECTS:
        _, labels = P.demo_concept(name)
        held_out = {P.is_held_out(lab) for lab in labels}
        assert held_out == ({True} if name == "striped-cross" else {False}), name


def test_coloured_full_frame_has_no_background():
    """A colour filling the whole image is not read as a grey background of similar brightness."""
    img = np.zeros((32, 32, 3), np.uint8) + np.array(P.COLOURS["purple"], np.uint8)
    assert P.measure(img).background is None
    assert not P.background_is_grey(img)
