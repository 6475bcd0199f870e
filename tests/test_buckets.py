"""Aspect-ratio buckets (xti.buckets): the bucket rule and assignment against hand computations,
fair and deterministic sampling, square datasets unchanged, the latent cache and the run
fingerprint, and SDXL's time_ids per bucket."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from xti import runs
from xti.buckets import (
    Bucket,
    BucketedLatents,
    bucket_resolutions,
    cover_size,
    crop_offsets,
    draw_images,
    nearest_bucket,
    prepare_latents,
)
from xti.config import DataConfig, load_config
from xti.data import ImageRecord, augment, encode_latents
from xti.latent_cache import LatentDiskCache, entry_key, vae_identity
from xti.step import PromptTable, sample_batch


def _wh(buckets: list[Bucket]) -> list[tuple[int, int]]:
    return [(b.width, b.height) for b in buckets]


def test_bucket_rule_by_hand_for_sd_512():
    # w=384: 262144/384 = 682.7 -> 640; w=448: 585.1 -> 576; w=576: 455.1 -> 448; w=640: 409.6
    # -> 384; w=320: 819.2 -> 768 is 2.4:1 and w=704: 372.4 -> 320 is 2.2:1, over max_aspect 2.
    got = bucket_resolutions(512, 64, 2.0)
    assert _wh(got) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    # the demo model (VAE factor 2, step 16) at 32 px: w=16: 64; w=48: 21.3 -> 16; w=64: 16
    assert _wh(bucket_resolutions(32, 16, 4.0)) == [
        (16, 64),
        (16, 48),
        (32, 32),
        (48, 16),
        (64, 16),
    ]
    assert _wh(bucket_resolutions(32, 8, 2.0)) == [(24, 40), (32, 32), (40, 24)]
    for b in bucket_resolutions(1024, 64, 4.0):
        assert b.width % 64 == 0 and b.height % 64 == 0 and b.width * b.height <= 1024**2


def test_assignment_and_minimal_crop_by_hand():
    buckets = bucket_resolutions(512, 64, 4.0)
    # 1200x800 (1.5): 640x384 (1.667, |log| 0.105) beats 576x448 (1.286, 0.154)
    b = nearest_bucket(1200, 800, buckets)
    assert (b.width, b.height) == (640, 384)
    # scale max(640/1200, 384/800) = 0.5333: 640 x 426.7 -> 427, crop 43 rows, centre top 21
    assert cover_size(1200, 800, b) == (640, 427)
    rng = np.random.default_rng(0)
    assert crop_offsets((640, 427), b, center_crop=True, random_crops=1, rng=rng) == [(21, 0)]
    assert (
        nearest_bucket(800, 1200, buckets).width,
        nearest_bucket(800, 1200, buckets).height,
    ) == (
        384,
        640,
    )
    assert nearest_bucket(777, 777, buckets) == Bucket(512, 512)


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (32, 8)])
def test_images_keep_their_aspect_within_one_bucket_step(resolution, step):
    """Every aspect within the bucket range lands in a bucket between its neighbours' aspects,
    at most half the way (in log aspect) to the next bucket on its side, and the crop removes no
    more than that mismatch (up to the resize's pixel rounding)."""
    buckets = bucket_resolutions(resolution, step, 4.0)
    lo, hi = math.log(buckets[0].aspect), math.log(buckets[-1].aspect)
    for t in np.linspace(lo, hi, 157):
        width = 3000
        height = round(width / math.exp(t))
        b = nearest_bucket(width, height, buckets)
        i = buckets.index(b)
        below = buckets[max(i - 1, 0)].aspect
        above = buckets[min(i + 1, len(buckets) - 1)].aspect
        assert below - 1e-9 <= width / height <= above + 1e-9
        mismatch = abs(math.log(width / height) - math.log(b.aspect))
        side = above if width / height > b.aspect else below
        assert mismatch <= abs(math.log(side / b.aspect)) / 2 + 1e-9
        w, h = cover_size(width, height, b)
        kept = b.width * b.height / (w * h)
        assert kept >= math.exp(-mismatch) - 1 / min(b.width, b.height), (width, height, b)


def test_draw_is_fair_deterministic_and_plain_with_one_bucket():
    g = torch.Generator().manual_seed(0)
    plain = object()  # one bucket: the cache passes through, ids are one randint
    cache, local, ids = draw_images(plain, 5, 4, g)
    assert cache is plain and torch.equal(
        ids, torch.randint(5, (4,), generator=torch.Generator().manual_seed(0))
    )
    bucketed = BucketedLatents(
        [Bucket(24, 40), Bucket(40, 24)], ["a", "b"], [torch.tensor([0, 2, 3]), torch.tensor([1])]
    )
    seen = {"a": 0, "b": 0}
    for step in range(4000):
        g = torch.Generator().manual_seed(step)
        cache, local, ids = draw_images(bucketed, 4, 6, g)
        members = bucketed.members[["a", "b"].index(cache)]
        assert torch.equal(ids, members[local])  # the whole batch from one bucket
        seen[cache] += 1
    assert abs(seen["a"] / 4000 - 0.75) < 0.03  # proportional to the bucket's images
    again = draw_images(bucketed, 4, 6, torch.Generator().manual_seed(7))
    first = draw_images(bucketed, 4, 6, torch.Generator().manual_seed(7))
    assert again[0] == first[0] and torch.equal(again[2], first[2])


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def _records(*sizes: tuple[int, int]) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    return [
        ImageRecord(
            f"{i}.png", Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), None
        )
        for i, (w, h) in enumerate(sizes)
    ]


def test_square_dataset_with_buckets_is_the_square_path(vae):
    records = _records((40, 32), (32, 32), (50, 36))  # all nearest the square bucket at step 16
    cfg = DataConfig(buckets=True, center_crop=False, random_crops=3, latent_cache=False)
    cache, _ = prepare_latents(
        records, cfg, resolution=32, seed=5, vae=vae, disk=None, device="cpu", progress=False
    )
    aug = augment(records, 32, center_crop=False, random_crops=3, flip_p=0.5, seed=5)
    ref = encode_latents(vae, aug, 4, progress=False)
    assert torch.equal(cache.mean, ref.mean) and torch.equal(cache.std, ref.std)
    assert torch.equal(cache.crop_top_left, ref.crop_top_left)
    prompts = PromptTable(
        {"text": torch.zeros(3, 2, dtype=torch.long)},
        torch.arange(3),
        torch.ones(3, dtype=torch.long),
    )
    kw = dict(
        num_train_timesteps=10,
        global_batch=4,
        rank=0,
        world_size=1,
        seed=1,
        micro_step=3,
        flip_p=0.5,
    )
    a, b = sample_batch(cache, prompts, **kw), sample_batch(ref, prompts, **kw)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.image_ids, b.image_ids)


def test_buckets_in_the_latent_cache_and_the_fingerprint(vae, tmp_path):
    records = _records((48, 32), (32, 48), (32, 32), (47, 31))
    cfg = DataConfig(buckets=True, bucket_step=8, bucket_max_aspect=2.0)
    disk = LatentDiskCache(tmp_path / "lat")
    kw = dict(resolution=32, seed=0, vae=vae, disk=disk, device="cpu", progress=False)
    cache, report = prepare_latents(records, cfg, **kw)
    assert isinstance(cache, BucketedLatents) and report.status == "miss"
    assert _wh(cache.buckets) == [(24, 40), (32, 32), (40, 24)]
    assert [m.tolist() for m in cache.members] == [[1], [2], [0, 3]]
    assert [tuple(c.mean.shape[2:]) for c in cache.caches] == [(20, 12), (16, 16), (12, 20)]
    again, report = prepare_latents(records, cfg, **kw)
    assert report.status == "hit" and torch.equal(again.caches[2].mean, cache.caches[2].mean)
    # the same image in another bucket is another entry: the key holds the pixels' shape
    vid = vae_identity(vae)
    assert entry_key(vid, torch.zeros(3, 24, 40)) != entry_key(vid, torch.zeros(3, 40, 24))
    off = load_config(None, [])
    on = load_config(None, ["data.buckets=true", "data.bucket_step=8"])
    assert "data.buckets" not in runs.data_fingerprint(off.data)
    assert runs.data_fingerprint(on.data) == {
        "data.buckets": True,
        "data.bucket_step": 8,
        "data.bucket_max_aspect": 4.0,
    }


def test_sdxl_time_ids_carry_each_buckets_size_and_crop(tmp_path, tiny_sdxl):
    from xti.models import load_model
    from xti.training import train

    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide": (48, 32), "tall": (32, 48)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    cfg = load_config(None, [
        f"model.path={tiny_sdxl}", f"data.dir={folder}", f"output_dir={tmp_path / 'out'}",
        "concept.placeholder=<thing>", "concept.initializer=thing", "train.resolution=32",
        "train.batch_size=2", "train.max_steps=6", "train.lr_warmup_steps=0", "kde.weight=0",
        "tracking.report_to=none", "data.buckets=true", "data.bucket_step=8",
        "data.bucket_max_aspect=2", "data.flip_p=0",
    ])  # fmt: skip
    bundle = load_model(cfg.model)
    seen = []
    bundle.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0].shape, kw["added_cond_kwargs"]["time_ids"].clone())),
        with_kwargs=True,
    )
    train(cfg, bundle=bundle, progress=False)
    # wide 48x32 -> bucket 40x24: scale 40/48, 40 x 26.7 -> 27, crop top (27-24)//2 = 1
    # tall 32x48 -> bucket 24x40: 27 x 40, crop left 1; rows: (h, w), (top, left), target (h, w)
    expected = {
        (12, 20): [32.0, 48.0, 1.0, 0.0, 24.0, 40.0],
        (20, 12): [48.0, 32.0, 0.0, 1.0, 40.0, 24.0],
    }
    shapes = set()
    for shape, time_ids in seen:
        shapes.add(tuple(shape[2:]))
        for row in time_ids.tolist():
            assert row == expected[tuple(shape[2:])]
    assert shapes == set(expected)  # both buckets were drawn in 6 steps


def test_bucket_step_must_fit_the_vae(tmp_path, tiny_model):
    from xti.checks import check_buckets
    from xti.errors import XTIError
    from xti.models import load_model

    vae = load_model(load_config(None, [f"model.path={tiny_model}"]).model).vae
    cfg = load_config(None, ["data.buckets=true", "data.bucket_step=3"])
    with pytest.raises(XTIError, match=r"data.bucket_step=3 must be a multiple of \d+"):
        check_buckets(cfg, vae)


def test_a_bucketed_masked_run_resumes_exactly_and_only_as_itself(tmp_path, tiny_model):
    from xti.errors import XTIError
    from xti.training import train

    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, (w, h) in {"wide": (64, 16), "square": (32, 32), "tall": (16, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
        Image.fromarray(mask).save(folder / f"{name}.mask.png")

    def cfg(out, *extra):
        return load_config(None, [
            f"model.path={tiny_model}", f"data.dir={folder}", f"output_dir={out}",
            "concept.placeholder=<box>", "concept.initializer=box", "train.resolution=32",
            "train.batch_size=2", "train.max_steps=4", "train.lr=0.01", "train.lr_warmup_steps=0",
            "kde.weight=0", "tracking.report_to=none", "train.checkpoint_every=2",
            "data.buckets=true", "data.masks=true", *extra,
        ])  # fmt: skip

    straight = train(cfg(tmp_path / "a"), progress=False)
    first = train(cfg(tmp_path / "b"), progress=False, stop_at_step=2)
    with pytest.raises(XTIError, match=r"data\.mask_floor: 0\.1 → 0\.5"):
        train(cfg(tmp_path / "b", "train.resume=latest", "data.mask_floor=0.5"), progress=False)
    second = train(cfg(tmp_path / "b", "train.resume=latest"), progress=False)
    assert first.losses + second.losses == straight.losses
    assert torch.equal(second.vectors, straight.vectors)
