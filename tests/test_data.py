"""Tests of xti.data: loading, conversions, errors, prompts, augmentation and the latent cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xti.config import DataConfig
from xti.data import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    Augmentations,
    ImageRecord,
    LatentCache,
    augment,
    check_captions,
    encode_latents,
    load_images,
    pick_augmentations,
    prompts_per_image,
)
from xti.errors import XTIError


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(load_images(DataConfig(dir=str(path)))[0].image)


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def _records(*images: Image.Image) -> list[ImageRecord]:
    return [
        ImageRecord(source=f"img{i}.png", image=im, caption=None) for i, im in enumerate(images)
    ]


# ------------------------------------------------------------------------------------ loading


def test_folder_with_metadata_and_txt_captions(tmp_path: Path) -> None:
    _solid((255, 0, 0)).save(tmp_path / "b.png")
    _solid((0, 255, 0)).save(tmp_path / "a.jpg")
    _solid((0, 0, 255)).save(tmp_path / "c.webp")
    _solid((9, 9, 9)).save(tmp_path / ".hidden.png")
    (tmp_path / "notes.md").write_text("not an image")
    lines = [
        {"file_name": "b.png", "text": "a <x> in red"},
        {"file_name": "a.jpg", "text": "  "},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    (tmp_path / "c.txt").write_text("a <x> in blue\n")
    (tmp_path / "b.txt").write_text("ignored: metadata wins")

    records = load_images(DataConfig(dir=str(tmp_path)))

    assert [Path(r.source).name for r in records] == ["a.jpg", "b.png", "c.webp"]
    assert [r.caption for r in records] == [None, "a <x> in red", "a <x> in blue"]
    assert all(r.image.mode == "RGB" and r.image.size == (8, 8) for r in records)
    assert records[1].image.getpixel((0, 0)) == (255, 0, 0)


def test_folder_without_captions(tmp_path: Path) -> None:
    for name in ["2.png", "10.png", "1.bmp"]:
        _solid((1, 2, 3)).save(tmp_path / name)
    records = load_images(DataConfig(dir=str(tmp_path)))
    assert [Path(r.source).name for r in records] == ["1.bmp", "10.png", "2.png"]
    assert all(r.caption is None for r in records)


def test_conversions(tmp_path: Path) -> None:
    gray = tmp_path / "gray"
    gray.mkdir()
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8)).save(gray / "g.png")
    arr = _rgb(gray)
    assert arr.shape == (2, 2, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[..., 0], [[0, 100], [200, 255]])
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])

    rgba_dir = tmp_path / "rgba"
    rgba_dir.mkdir()
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque -> itself
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
    Image.fromarray(rgba, "RGBA").save(rgba_dir / "a.png")
    arr = _rgb(rgba_dir)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 1]) == (10, 20, 30)
    assert all(abs(int(v) - 127) <= 1 for v in arr[0, 2])

    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.uint16)).save(deep / "d.png")
    arr = _rgb(deep)
    np.testing.assert_array_equal(arr[0, :, 1], [255, 128, 0])

    deep32 = tmp_path / "deep32"
    deep32.mkdir()
    Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.int32)).save(deep32 / "d.tif")
    np.testing.assert_array_equal(_rgb(deep32)[0, :, 0], [255, 128, 0])

    pal = tmp_path / "pal"
    pal.mkdir()
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(pal / "p.gif")
    arr = _rgb(pal)
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 1]) == (0, 255, 0)

    cmyk = tmp_path / "cmyk"
    cmyk.mkdir()
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(cmyk / "c.tif")
    assert tuple(_rgb(cmyk)[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    _halves(8, 4).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_images(DataConfig(dir=str(tmp_path)))[0].image.size == (4, 8)


# ------------------------------------------------------------------------------------ errors


def test_no_source_set() -> None:
    with pytest.raises(XTIError, match=r"data\.dir=.*data\.dataset="):
        load_images(DataConfig())


def test_missing_and_empty_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(XTIError, match="nope.*does not exist"):
        load_images(DataConfig(dir=str(missing)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(XTIError, match="empty.*no images"):
        load_images(DataConfig(dir=str(tmp_path / "empty")))


def test_corrupt_image_fails_or_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _solid((1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(XTIError, match=r"bad\.png.*data\.on_corrupt=skip") as info:
        load_images(DataConfig(dir=str(tmp_path)))
    assert "\n" not in str(info.value)

    with caplog.at_level(logging.WARNING, logger="xti.data"):
        records = load_images(DataConfig(dir=str(tmp_path), on_corrupt="skip"))
    assert [Path(r.source).name for r in records] == ["good.png"]
    assert any("bad.png" in m for m in caplog.messages)

    (tmp_path / "good.png").unlink()
    with pytest.raises(XTIError, match="no readable images"):
        load_images(DataConfig(dir=str(tmp_path), on_corrupt="skip"))


def test_truncated_image_is_corrupt(tmp_path: Path) -> None:
    _halves(64, 64).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(XTIError, match=r"t\.png"):
        load_images(DataConfig(dir=str(tmp_path)))


def test_malformed_metadata_line(tmp_path: Path) -> None:
    _solid((1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "<x>"}\n{oops\n')
    with pytest.raises(XTIError, match=r"metadata\.jsonl line 2"):
        load_images(DataConfig(dir=str(tmp_path)))
    (tmp_path / "metadata.jsonl").write_text('["a.png"]\n')
    with pytest.raises(XTIError, match=r"metadata\.jsonl line 1.*file_name"):
        load_images(DataConfig(dir=str(tmp_path)))


# ------------------------------------------------------------------------------------ datasets


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.mark.usefixtures("datasets_cache")
def test_saved_dataset_loads(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {
            "image": [_solid((255, 0, 0)), Image.new("L", (4, 4), 7)],
            "text": ["a red <x>", None],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "saved"))

    records = load_images(DataConfig(dataset=str(tmp_path / "saved")))
    assert [r.caption for r in records] == ["a red <x>", None]
    assert records[0].image.getpixel((0, 0)) == (255, 0, 0)
    assert records[1].image.mode == "RGB" and records[1].image.getpixel((0, 0)) == (7, 7, 7)
    assert records[0].source.startswith(str(tmp_path / "saved") + "[0]")

    no_caps = load_images(DataConfig(dataset=str(tmp_path / "saved"), caption_column="caption"))
    assert [r.caption for r in no_caps] == [None, None]
    with pytest.raises(XTIError, match="no image column 'pic'"):
        load_images(DataConfig(dataset=str(tmp_path / "saved"), image_column="pic"))
    with pytest.raises(XTIError, match="both data.dir"):
        load_images(DataConfig(dataset=str(tmp_path / "saved"), dir=str(tmp_path)))

    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_images(DataConfig(dataset=str(tmp_path / "dict")))) == 2
    with pytest.raises(XTIError, match="no split 'test'"):
        load_images(DataConfig(dataset=str(tmp_path / "dict"), dataset_split="test"))


@pytest.mark.usefixtures("datasets_cache")
def test_imagefolder_dataset_loads(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    _solid((0, 255, 0)).save(folder / "one.png")
    _solid((0, 0, 255)).save(folder / "two.png")
    meta = [
        {"file_name": "one.png", "text": "green <x>"},
        {"file_name": "two.png", "text": "blue <x>"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))

    records = load_images(DataConfig(dataset=str(folder)))
    by_caption = {r.caption: r.image.getpixel((0, 0)) for r in records}
    assert by_caption == {"green <x>": (0, 255, 0), "blue <x>": (0, 0, 255)}


@pytest.mark.usefixtures("datasets_cache")
def test_dataset_not_found_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(XTIError, match="cannot load") as info:
        load_images(DataConfig(dataset="nobody/no-such-dataset-xti"))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ prompts


def test_check_captions() -> None:
    ok = [
        ImageRecord("a.png", _solid((0, 0, 0)), "a <x> toy"),
        ImageRecord("b.png", _solid((0, 0, 0)), None),
    ]
    check_captions(ok, "<x>")
    bad = [*ok, ImageRecord("c.png", _solid((0, 0, 0)), "a toy")]
    with pytest.raises(XTIError, match=r"c\.png.*'<x>'"):
        check_captions(bad, "<x>")


def test_prompts_per_image() -> None:
    recs = [
        ImageRecord("a.png", _solid((0, 0, 0)), "my <x>"),
        ImageRecord("b.png", _solid((0, 0, 0)), None),
    ]
    for name, templates in [("object", OBJECT_TEMPLATES), ("style", STYLE_TEMPLATES)]:
        assert len(templates) >= 12 and all(t.count("{}") == 1 for t in templates)
        prompts = prompts_per_image(recs, "<x>", name)
        assert prompts[0] == ["my <x>"]
        assert prompts[1] == [t.replace("{}", "<x>") for t in templates]
        assert all("<x>" in p for p in prompts[1])
    with pytest.raises(XTIError, match="template"):
        prompts_per_image(recs, "<x>", "portrait")


# ------------------------------------------------------------------------------------ augment


def test_center_crop_pixels_and_flip() -> None:
    aug = augment(
        _records(_halves(64, 32)), 32, center_crop=True, random_crops=4, flip_p=0.5, seed=0
    )
    assert aug.pixels.shape == (2, 3, 32, 32) and aug.pixels.dtype == torch.float32
    assert aug.image_index.tolist() == [0, 0] and aug.flipped.tolist() == [False, True]

    # Independent expectation: columns 16..47 of the image, i.e. 16 red then 16 blue columns.
    expected = np.zeros((32, 32, 3), dtype=np.float32) - 1.0
    expected[:, :16, 0] = 1.0
    expected[:, 16:, 2] = 1.0
    got = aug.pixels[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(aug.pixels[1].permute(1, 2, 0).numpy(), np.fliplr(got))
    assert aug.crop_top_left[0].tolist() == [0, 16]
    assert aug.original_size[0].tolist() == [32, 64]


def test_resize_then_crop_matches_pil() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8))
    aug = augment(_records(img), 20, center_crop=True, random_crops=1, flip_p=0.0, seed=0)
    resized = np.asarray(img.resize((40, 20), Image.Resampling.LANCZOS), dtype=np.float32)
    expected = resized[:, 10:30] / 127.5 - 1.0
    np.testing.assert_allclose(aug.pixels[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert aug.pixels.min() >= -1.0 and aug.pixels.max() <= 1.0


def test_augment_counts_and_determinism() -> None:
    images = [_halves(48, 32), _halves(32, 40), _solid((5, 5, 5), (32, 32))]
    counts = {
        (True, 3, 0.0): 3,
        (True, 3, 0.5): 6,
        # Random crops: 3 per non-square image, 1 for the square one (one possible position).
        (False, 3, 0.0): 7,
        (False, 3, 1.0): 14,
    }
    for (center, n_crops, flip_p), k in counts.items():
        aug = augment(
            _records(*images), 32, center_crop=center, random_crops=n_crops, flip_p=flip_p, seed=1
        )
        assert len(aug) == k and aug.image_index.shape == (k,) and aug.flipped.shape == (k,)
        assert int(aug.flipped.sum()) == (k // 2 if flip_p > 0 else 0)

    a = augment(_records(*images), 32, center_crop=False, random_crops=3, flip_p=0.5, seed=7)
    b = augment(_records(*images), 32, center_crop=False, random_crops=3, flip_p=0.5, seed=7)
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.crop_top_left, b.crop_top_left)
    plain = a.crop_top_left[(a.image_index == 0) & ~a.flipped]
    assert len({tuple(x) for x in plain.tolist()}) == 3  # distinct offsets
    for k in range(0, len(a), 2):  # each crop is followed by its mirror image
        assert torch.equal(a.pixels[k + 1], a.pixels[k].flip(-1))
    other = [
        augment(_records(*images), 32, center_crop=False, random_crops=3, flip_p=0.5, seed=s)
        for s in range(2, 6)
    ]
    assert any(not torch.equal(a.crop_top_left, o.crop_top_left) for o in other)


def test_small_image_is_upscaled_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xti.data"):
        aug = augment(
            _records(_solid((0, 255, 0), (10, 20))),
            16,
            center_crop=True,
            random_crops=1,
            flip_p=0.0,
            seed=0,
        )
    assert aug.pixels.shape == (1, 3, 16, 16)
    assert any("img0.png" in m and "upscal" in m for m in caplog.messages)
    assert torch.allclose(aug.pixels[0, 1], torch.ones(16, 16))


# ------------------------------------------------------------------------------------ latents


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    return vae.eval().requires_grad_(False)


def _random_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, (16 + 4 * i, 24, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_encode_latents_matches_vae(tiny_vae) -> None:
    aug = augment(
        _records(*_random_images(3)), 16, center_crop=False, random_crops=2, flip_p=0.5, seed=0
    )
    cache = encode_latents(tiny_vae, aug, batch_size=3, progress=False)
    k = len(aug)
    assert cache.mean.shape == (k, 4, 8, 8) and cache.std.shape == (k, 4, 8, 8)
    assert cache.mean.dtype == torch.float32 and cache.mean.device.type == "cpu"
    assert cache.scaling_factor == 0.5 and cache.shift_factor == pytest.approx(0.1)
    assert torch.equal(cache.image_index, aug.image_index) and torch.equal(
        cache.flipped, aug.flipped
    )

    with torch.no_grad():
        dist = tiny_vae.encode(aug.pixels).latent_dist
    torch.testing.assert_close(cache.mean, dist.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.std, dist.std, atol=1e-5, rtol=1e-5)

    idx = torch.tensor([0, 3, 3, 1])
    out = cache.sample(idx, torch.Generator().manual_seed(11))
    noise = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    expected = (cache.mean[idx] + cache.std[idx] * noise - 0.1) * 0.5
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32


def test_encode_latents_without_shift_factor() -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32)
    aug = augment(
        _records(*_random_images(1)), 8, center_crop=True, random_crops=1, flip_p=0.0, seed=0
    )
    cache = encode_latents(vae, aug, batch_size=1, progress=False)
    assert cache.shift_factor == 0.0 and cache.scaling_factor == pytest.approx(0.18215)


def _synthetic_cache(crops: int, flip: bool, n_images: int = 3) -> LatentCache:
    index, flipped = [], []
    for i in range(n_images):
        for _ in range(crops):
            index += [i, i] if flip else [i]
            flipped += [False, True] if flip else [False]
    k = len(index)
    return LatentCache(
        mean=torch.arange(k, dtype=torch.float32).view(k, 1, 1, 1),
        std=torch.zeros(k, 1, 1, 1),
        image_index=torch.tensor(index),
        flipped=torch.tensor(flipped),
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def test_pick_augmentations() -> None:
    cache = _synthetic_cache(crops=3, flip=True)
    ids = torch.tensor([0, 1, 2, 2, 1, 0] * 50)

    never = pick_augmentations(cache, ids, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(cache.image_index[never], ids)
    assert not cache.flipped[never].any()
    assert len(set(never.tolist())) == 9  # every crop of every image shows up

    always = pick_augmentations(cache, ids, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(cache.image_index[always], ids) and cache.flipped[always].all()
    # Same generator state: flipped exactly where the unflipped pick was, crop for crop.
    assert torch.equal(always, never + 1)

    some = pick_augmentations(cache, ids, 0.5, torch.Generator().manual_seed(0))
    assert 0.3 < cache.flipped[some].float().mean().item() < 0.7
    again = pick_augmentations(cache, ids, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(some, again)

    # A pure function of the generator state: the same number of draws whatever the data.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    pick_augmentations(cache, torch.tensor([0, 1]), 0.5, g1)
    pick_augmentations(_synthetic_cache(crops=1, flip=False), torch.tensor([2, 2]), 0.9, g2)
    assert torch.equal(g1.get_state(), g2.get_state())

    no_flip = _synthetic_cache(crops=2, flip=False)
    picked = pick_augmentations(
        no_flip, torch.tensor([1] * 20), 1.0, torch.Generator().manual_seed(0)
    )
    assert set(picked.tolist()) <= {2, 3}
    with pytest.raises(ValueError, match="out of range"):
        pick_augmentations(no_flip, torch.tensor([3]), 0.0, torch.Generator())


def test_augmentations_defaults() -> None:
    aug = Augmentations(pixels=torch.zeros(2, 3, 8, 8), image_index=torch.tensor([0, 1]))
    assert aug.flipped.tolist() == [False, False] and len(aug) == 2
