"""Loss masks (xti.masks): the three sources, the one-line errors, masks following crops, flips and
resizes (against references by hand), weights at latent resolution, and the masked loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xti.buckets import Bucket, augment_to_bucket
from xti.config import DataConfig, load_config
from xti.data import ImageRecord, load_images
from xti.errors import XTIError
from xti.masks import attach_masks, latent_weights, masked_mse
from xti.step import diffusion_loss


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    arr = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr)


def _load(folder: Path) -> list[ImageRecord]:
    cfg = DataConfig(dir=str(folder), masks=True)
    records = load_images(cfg)
    attach_masks(records, cfg)
    return records


def test_three_sources_in_order_of_precedence(tmp_path: Path, caplog):
    _rgb(8, 6).save(tmp_path / "a.png")
    _mask(8, 6, (0, 0, 4, 6)).save(tmp_path / "a.mask.png")  # beside: not a training image
    rgba = _rgb(8, 6, 1).convert("RGBA")
    rgba.putalpha(_mask(8, 6, (2, 2, 6, 4)))
    rgba.save(tmp_path / "b.png")
    _rgb(8, 6, 2).save(tmp_path / "c.png")
    (tmp_path / "masks").mkdir()
    _mask(8, 6, (0, 0, 8, 1)).save(tmp_path / "masks" / "c.png")
    _mask(8, 6, (0, 0, 1, 1)).save(tmp_path / "c.mask.png")  # the column wins over the file
    _rgb(8, 6, 3).save(tmp_path / "d.png")  # no mask: counts everywhere, with a warning
    lines = [
        {"file_name": "c.png", "text": "a <x>", "mask": "masks/c.png"},
        {"file_name": "a.png", "text": "a <x>"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    records = _load(tmp_path)
    assert [Path(r.source).name for r in records] == ["a.png", "b.png", "c.png", "d.png"]
    a, b, c, d = (r.mask for r in records)
    assert np.array_equal(a, np.asarray(_mask(8, 6, (0, 0, 4, 6)), np.float32) / 255)
    assert np.array_equal(b, np.asarray(_mask(8, 6, (2, 2, 6, 4)), np.float32) / 255)
    assert c.sum() == 8 and c[0].sum() == 8
    assert d is None and "1 of 4 images have no mask" in caplog.text
    without = load_images(DataConfig(dir=str(tmp_path)))  # masks off: as before, with a warning
    assert len(without) == 6 and "set data.masks=true to use them as masks" in caplog.text


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda f: _mask(8, 5, (0, 0, 2, 2)).save(f / "a.mask.png"), r"a\.mask\.png: the mask is 8x5 but its image .*a\.png is 8x6: save the mask at the image's size"),
        (lambda f: _mask(8, 6, (0, 0, 0, 0)).save(f / "a.mask.png"), r"a\.mask\.png: the mask is empty \(all black\)"),
        (lambda f: (f / "a.mask.png").write_bytes(b"not a png"), r"a\.mask\.png: cannot read the mask of"),
        (lambda f: None, r"data\.masks=true but no image in .* has a mask"),
    ],
)  # fmt: skip
def test_bad_masks_are_one_line_errors_naming_the_file(tmp_path: Path, make, message):
    _rgb(8, 6).save(tmp_path / "a.png")
    make(tmp_path)
    with pytest.raises(XTIError, match=message) as err:
        _load(tmp_path)
    assert "\n" not in str(err.value)


def test_a_mask_column_naming_a_training_image_is_an_error(tmp_path: Path):
    _rgb(8, 6).save(tmp_path / "a.png")
    _mask(8, 6, (0, 0, 2, 2)).save(tmp_path / "m.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "mask": "m.png"}))
    with pytest.raises(XTIError, match=r"the mask of a\.png, m\.png, is itself a training image"):
        _load(tmp_path)


def test_empty_alpha_and_datasets_are_errors(tmp_path: Path):
    im = _rgb(8, 6).convert("RGBA")
    im.putalpha(0)
    im.save(tmp_path / "a.png")
    with pytest.raises(XTIError, match=r"a\.png \(alpha channel\): the mask is empty"):
        _load(tmp_path)
    with pytest.raises(XTIError, match="use data.dir"):
        attach_masks([], DataConfig(dataset="x", masks=True))


def test_masks_follow_crops_and_flips_by_hand():
    mask = np.zeros((8, 12), np.float32)
    mask[1:5, 3:7] = 1.0
    mask[6, 11] = 0.5
    rec = ImageRecord("a.png", _rgb(12, 8), None, mask=mask)
    # square bucket 8: no resize (height 8), centre crop left (12-8)//2 = 2
    aug = augment_to_bucket(
        [rec], Bucket(8, 8), center_crop=True, random_crops=1, flip_p=0.5, seed=0
    )
    expected = mask[:, 2:10]
    assert torch.equal(aug.mask[0, 0], torch.from_numpy(expected))
    assert torch.equal(aug.mask[1, 0], torch.from_numpy(expected[:, ::-1].copy()))
    pixels = np.asarray(rec.image, np.float32)[:, 2:10] / 127.5 - 1
    assert torch.allclose(aug.pixels[1].permute(1, 2, 0), torch.from_numpy(pixels[:, ::-1].copy()))
    # random crops: each mask is cut at its pixels' offsets
    aug = augment_to_bucket(
        [rec], Bucket(8, 8), center_crop=False, random_crops=3, flip_p=0, seed=4
    )
    for k in range(len(aug)):
        top, left = aug.crop_top_left[k].tolist()
        assert torch.equal(aug.mask[k, 0], torch.from_numpy(mask[top : top + 8, left : left + 8]))


def test_masks_follow_the_bucket_resize():
    mask = np.zeros((16, 24), np.float32)
    mask[4:12, 6:14] = 1.0
    rec = ImageRecord("a.png", _rgb(24, 16), None, mask=mask)
    # bucket 12x8 (w x h): scale 0.5 exactly, no crop; the mask resized as PIL does, bilinear
    aug = augment_to_bucket(
        [rec], Bucket(8, 12), center_crop=True, random_crops=1, flip_p=0, seed=0
    )
    ref = Image.fromarray(mask).resize((12, 8), Image.Resampling.BILINEAR)
    assert torch.allclose(aug.mask[0, 0], torch.from_numpy(np.clip(np.asarray(ref), 0, 1)))
    assert aug.mask.shape == (1, 1, 8, 12) and aug.pixels.shape == (1, 3, 8, 12)


def test_latent_weights_are_area_means_with_the_floor():
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0, 0.0, 0.5, 0.5]])
    w = latent_weights(m[None, None], 2, 0.1)
    expected = torch.tensor([[0.75, 0.0], [0.0, 0.25]]) * 0.9 + 0.1
    assert torch.allclose(w[0, 0], expected)


def test_masked_loss_ignores_only_masked_out_errors():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 1.0
    weight = latent_weights(mask.repeat_interleave(2, 2).repeat_interleave(2, 3), 2, 0.0)
    base = masked_mse(pred, target, weight)
    out = weight.expand_as(pred) == 0
    changed = pred.clone()
    changed[out] += 5.0  # only masked-out pixels
    assert torch.equal(masked_mse(changed, target, weight), base)
    inside = pred.clone()
    inside[:, :, 1, 1] += 0.1
    assert masked_mse(inside, target, weight) != base
    # the mean squared error over the subject's pixels
    ref = torch.stack([(pred - target)[i, :, 1:3, 1:3].pow(2).mean() for i in range(2)]).mean()
    assert torch.allclose(base, ref)
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(masked_mse(pred, target, ones), diffusion_loss(pred, target))
    floor = latent_weights(torch.zeros(2, 1, 8, 8), 2, 0.1)  # all background at the floor
    assert torch.allclose(masked_mse(pred, target, floor), diffusion_loss(pred, target))


def test_a_masked_run_uses_the_masked_loss(tmp_path: Path, tiny_model):
    """A training step's loss is the mask-weighted error of the UNet's own prediction, with the
    weights at latent resolution from the mask file."""
    from xti.training import Trainer

    _rgb(32, 32).save(tmp_path / "a.png")
    _mask(32, 32, (8, 8, 24, 24)).save(tmp_path / "a.mask.png")
    cfg = load_config(None, [
        f"model.path={tiny_model}", f"data.dir={tmp_path}", f"output_dir={tmp_path / 'o'}",
        "data.masks=true", "train.batch_size=2", "train.max_steps=1", "kde.weight=0",
        "tracking.report_to=none", "train.resolution=32",
    ])  # fmt: skip
    with Trainer(cfg, progress=False) as t:
        t.setup()
        batch = t.micro_batch(0)
        from xti.step import compute_loss, diffusion_target

        captured = []
        h = t.bundle.unet.register_forward_hook(lambda m, a, out: captured.append(out.sample))
        with torch.no_grad():
            loss, _ = compute_loss(t.models, batch)
        h.remove()
        weight = batch.loss_weight
        assert weight.shape == (2, 1, 16, 16) and float(weight.max()) == 1.0
        # rows 0-7 of the image are outside the box: the default floor 0.1
        assert torch.allclose(weight[:, :, :4], torch.full_like(weight[:, :, :4], 0.1))
        m = t.models
        target = diffusion_target(
            m.scheduler, batch.latents, batch.noise, batch.timesteps, m.prediction_type
        )
        err = (captured[0] - target).pow(2) * weight
        ref = (err.flatten(1).sum(1) / (weight.expand_as(err).flatten(1).sum(1))).mean()
        assert torch.allclose(loss, ref, rtol=1e-5)


def test_the_cluttered_demo_concept_is_what_its_generator_draws():
    from xti.demo.cluttered import NAME, cluttered_concept

    folder = Path(__file__).parents[1] / "data" / "demo-concepts" / NAME
    images, masks, subjects, _ = cluttered_concept()
    records = _load(folder)
    assert len(records) == len(images) == 8
    for rec, img, mask, lab in zip(records, images, masks, subjects, strict=True):
        assert rec.image.size == (40, 24) and np.array_equal(np.asarray(rec.image), img)
        assert np.abs(rec.mask - mask).max() <= 0.51 / 255  # the PNG holds it to 8 bits
        assert rec.caption == f"a <{NAME}> on a {lab.background} background"
        # the mask is the cross: orange (striped: shaded) where it is fully on
        on = np.asarray(rec.image)[rec.mask == 1.0].astype(int)
        assert len(on) > 50 and (on[:, 0] > on[:, 2]).all()
