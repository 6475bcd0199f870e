"""The novel demo concepts (issue 21's probes): shapes the demo generator never draws, read back by
their silhouettes, and their training folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xti.demo import novel as N
from xti.demo import procedural as P


@pytest.mark.parametrize("name", list(N.NOVEL_CONCEPTS))
def test_training_images_read_as_their_novel_shape_colour_and_background(name):
    spec = N.NOVEL_CONCEPTS[name]
    images = N.concept_images(name)
    assert {im.background for im in images} == set(N.TRAIN_BACKGROUNDS)
    for im in images:
        assert N.shape_kept(im.image, spec["shape"])
        assert N.silhouette_iou(im.image, spec["shape"]) > 0.7
        m = P.measure(im.image)
        assert (m.colour, m.background) == (spec["colour"], im.background)


def test_generator_shapes_are_never_read_as_novel_ones():
    images, labels = P.generate_batch(40, 7)
    every = (*P.SHAPES, *N.NOVEL_SHAPES)
    read = [N.classify_silhouette(img, every) for img in images]
    assert not set(read) & set(N.NOVEL_SHAPES)
    plain, plain_labels = P.generate_batch(30, 8, patterns=("plain",))
    assert [N.classify_silhouette(i, every) for i in plain] == [lab.shape for lab in plain_labels]
    # a ring is not a filled circle: the hole is kept in the silhouette
    circle = N.render("circle", "red", "white", 22.0, (16.0, 16.0))
    assert not N.shape_kept(circle, "ring")
    assert N.silhouette_iou(circle, "ring") < N.silhouette_iou(circle, "circle") == 1.0


def test_written_folder_has_placeholder_captions_and_scores_match_its_images(tmp_path):
    out = N.write_concept("red-ring", tmp_path)
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines[:2]] == [
        "a <red-ring> on a white background",
        "a <red-ring> on a gray background",
    ]
    images = [im.image for im in N.concept_images("red-ring")]
    probes = {}
    for p in N.novel_probes("red-ring", "<teal-dotted>"):
        probes.setdefault(p.kind, p)  # the first of each kind (white background, green)
    assert set(probes) == {"reconstruction", "colour_edit", "background_edit", "mixing"}
    white = [im for im, i in zip(images, range(6), strict=True) if i % 2 == 0]
    recon = N.score_novel(white, probes["reconstruction"], "ring")
    assert probes["reconstruction"].prompt == "a <red-ring> on a white background"
    assert recon["all"] == 1.0 and recon["iou"] > 0.7
    # the green edit asked of red images: colour 0, shape kept
    edit = N.score_novel(white, probes["colour_edit"], "ring")
    assert edit["colour"] == 0.0 and edit["iou"] == pytest.approx(recon["iou"])
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(out / "00.png")), images[0])
