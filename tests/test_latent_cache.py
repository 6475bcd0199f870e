"""The latent disk cache (`xti.latent_cache`): same latents as a fresh encode, no VAE call on a hit,
corrupt entries re-encoded, concurrent writers, misses for another VAE/resolution/augmentation,
the size cap and `xti cache`; the run's timing in summary.json and the model card."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xti.cli import main
from xti.config import DataConfig, load_config
from xti.data import ImageRecord, augment, encode_latents, load_images
from xti.latent_cache import LatentDiskCache, cached_latents, entry_key, vae_identity
from xti.models import load_model
from xti.training import train

REPO = Path(__file__).parents[1]
DATA = REPO / "data" / "tiny-concept"


@pytest.fixture(scope="module")
def vae(tiny_model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model / "vae").eval().requires_grad_(False)


def _aug(resolution=32, flip_p=0.5, **kw):
    records = load_images(DataConfig(dir=str(DATA)))
    return augment(
        records,
        resolution,
        center_crop=kw.get("center_crop", True),
        random_crops=kw.get("random_crops", 1),
        flip_p=flip_p,
        seed=kw.get("seed", 0),
    )


class Counting:
    """Counts the `encode` calls of a VAE (the same object: its identity is unchanged)."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0
        vae.__dict__.pop("encode", None)
        original = vae.encode

        def encode(x):
            self.calls += 1
            return original(x)

        vae.encode = encode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.vae.encode


def test_disk_cache_returns_the_fresh_latents_and_a_hit_does_not_call_the_vae(vae, tmp_path):
    aug = _aug()
    fresh = encode_latents(vae, aug, 3, progress=False)
    cache = LatentDiskCache(tmp_path / "lc")

    with Counting(vae) as counting:
        first, report = cached_latents(vae, aug, 3, cache=cache, progress=False)
    assert report.status == "miss" and report.encoded == len(aug) == 8 and counting.calls == 3
    assert torch.equal(first.mean, fresh.mean) and torch.equal(first.std, fresh.std)
    assert cache.stats().entries == 8

    with Counting(vae) as counting:
        second, report = cached_latents(vae, aug, 3, cache=cache, progress=False)
    assert report.status == "hit" and report.encoded == 0 and counting.calls == 0
    for name in ("mean", "std", "image_index", "flipped", "crop_top_left", "original_size"):
        assert torch.equal(getattr(second, name), getattr(fresh, name)), name
    assert (second.scaling_factor, second.shift_factor) == (
        fresh.scaling_factor,
        fresh.shift_factor,
    )
    g = torch.Generator().manual_seed(5)
    assert torch.equal(
        second.sample(torch.arange(8), g), fresh.sample(torch.arange(8), g.manual_seed(5))
    )
    # The same memory layout too (a CPU VAE gives channels-last latents): the UNet's convolutions
    # take another code path on another layout, and the run would differ in its last bits.
    for got in (first, second):
        assert got.mean.stride() == fresh.mean.stride() and got.std.stride() == fresh.std.stride()
    assert fresh.mean.is_contiguous(memory_format=torch.channels_last), "what makes this test bite"

    off, report = cached_latents(vae, aug, 3, cache=None, progress=False)
    assert report.status == "off" and torch.equal(off.mean, fresh.mean)


def test_corrupt_or_half_written_entries_are_re_encoded_with_a_warning(vae, tmp_path, caplog):
    aug = _aug()
    fresh = encode_latents(vae, aug, 4, progress=False)
    cache = LatentDiskCache(tmp_path / "lc")
    cached_latents(vae, aug, 4, cache=cache, progress=False)
    vae_id = vae_identity(vae)
    paths = [cache.path(entry_key(vae_id, aug.pixels[i])) for i in range(len(aug))]
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # truncated: a write cut short
    flipped = bytearray(paths[1].read_bytes())
    flipped[-5] ^= 0xFF  # one byte of the tensor data changed on disk
    paths[1].write_bytes(bytes(flipped))
    paths[2].write_bytes(b"not a safetensors file")
    paths[3].write_bytes(paths[4].read_bytes())  # another entry's file under this name
    # what kill -9 in the middle of a write leaves: a temporary file, never the entry itself
    tmp = paths[5].with_name(f".{paths[5].name}.0123456789ab.tmp")
    tmp.write_bytes(data[:100])

    caplog.set_level(logging.WARNING, logger="xti")
    with Counting(vae) as counting:
        again, report = cached_latents(vae, aug, 4, cache=cache, progress=False)
    assert report.status == "partial" and report.corrupt == 4 and report.encoded == 4
    assert counting.calls == 1
    assert torch.equal(again.mean, fresh.mean) and torch.equal(again.std, fresh.std)
    warned = " ".join(r.getMessage() for r in caplog.records)
    for p in paths[:4]:
        assert f"latent cache entry {p} is corrupt" in warned
    assert "another key" in warned and "digest" in warned

    # the entries were rewritten: now a full hit
    with Counting(vae) as counting:
        _, report = cached_latents(vae, aug, 4, cache=cache, progress=False)
    assert report.status == "hit" and report.corrupt == 0 and counting.calls == 0
    # the temporary file is removed once it is old enough not to be another run's write
    cache.prune()
    assert tmp.exists()
    old = time.time() - 2 * 3600
    os.utime(tmp, (old, old))
    cache.prune()
    assert not tmp.exists() and cache.stats().entries == 8


_FILLER = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from xti.config import DataConfig
from xti.data import augment, load_images
from xti.latent_cache import LatentDiskCache, cached_latents

model, data, folder, ready, go, out = sys.argv[1:]
vae = AutoencoderKL.from_pretrained(Path(model) / "vae").eval()
aug = augment(load_images(DataConfig(dir=data)), 32, center_crop=True, random_crops=1, flip_p=0.5, seed=0)
Path(ready).write_text("ready")
while not Path(go).exists():
    time.sleep(0.01)
lc, report = cached_latents(vae, aug, 1, cache=LatentDiskCache(folder), progress=False)
save_file({"mean": lc.mean, "std": lc.std}, out)
print(report.status, report.encoded)
"""


def test_two_runs_filling_the_cache_at_once_both_succeed(vae, tiny_model, tmp_path):
    script = tmp_path / "fill.py"
    script.write_text(_FILLER)
    folder, go = tmp_path / "lc", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = []
    for i in range(2):
        args = [str(tiny_model), str(DATA), str(folder), str(tmp_path / f"ready{i}"), str(go),
                str(tmp_path / f"out{i}.safetensors")]  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    deadline = time.time() + 240
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[1][-2000:] for p in procs if p.poll() is not None
        ]
        time.sleep(0.05)
    go.write_text("go")  # both start encoding (one augmentation per VAE call) at the same moment
    results = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-2000:]
        assert stdout.split()[0] in ("miss", "partial", "hit")

    from safetensors.torch import load_file

    fresh = encode_latents(vae, _aug(), 1, progress=False)
    for i in range(2):
        got = load_file(str(tmp_path / f"out{i}.safetensors"))
        assert torch.equal(got["mean"], fresh.mean) and torch.equal(got["std"], fresh.std)
    cache = LatentDiskCache(folder)
    assert cache.stats().entries == 8
    assert not list(folder.rglob("*.tmp")), "no temporary file is left behind"
    with Counting(vae) as counting:
        hit, report = cached_latents(vae, _aug(), 1, cache=cache, progress=False)
    assert report.status == "hit" and counting.calls == 0 and torch.equal(hit.mean, fresh.mean)


def _wide_records(n=3):
    rng = np.random.default_rng(0)
    return [
        ImageRecord(
            f"wide{i}.png", Image.fromarray(rng.integers(0, 255, (32, 56, 3), np.uint8)), None
        )
        for i in range(n)
    ]


def test_another_vae_resolution_or_augmentation_misses(vae, tmp_path):
    cache = LatentDiskCache(tmp_path / "lc")
    aug = _aug(flip_p=0.0)
    cached_latents(vae, aug, 4, cache=cache, progress=False)
    assert cached_latents(vae, aug, 4, cache=cache, progress=False)[1].status == "hit"

    # another VAE: one encoder weight changed -> every entry misses, and the latents are its own
    other = type(vae).from_config(vae.config)
    other.load_state_dict(vae.state_dict())
    with torch.no_grad():
        other.encoder.conv_in.weight[0, 0, 0, 0] += 0.5
    lc, report = cached_latents(other, aug, 4, cache=cache, progress=False)
    assert report.status == "miss" and report.encoded == 4
    assert torch.equal(lc.mean, encode_latents(other, aug, 4, progress=False).mean)
    # a decoder-only change does not change the latents: it hits
    decoder_only = type(vae).from_config(vae.config)
    decoder_only.load_state_dict(vae.state_dict())
    with torch.no_grad():
        decoder_only.decoder.conv_out.weight.mul_(2.0)
    assert cached_latents(decoder_only, aug, 4, cache=cache, progress=False)[1].status == "hit"
    # the same VAE in another dtype or on another device is another key
    assert vae_identity(vae) != vae_identity(vae, dtype=torch.bfloat16)
    assert vae_identity(vae) != vae_identity(vae, device_type="cuda")

    # another resolution
    assert (
        cached_latents(vae, _aug(resolution=16, flip_p=0.0), 4, cache=cache, progress=False)[
            1
        ].status
        == "miss"
    )
    # another augmentation: flips added -> only the flipped ones are encoded
    lc, report = cached_latents(vae, _aug(flip_p=0.5), 4, cache=cache, progress=False)
    assert (report.status, report.encoded, report.total) == ("partial", 4, 8)
    assert torch.equal(lc.mean, encode_latents(vae, _aug(flip_p=0.5), 4, progress=False).mean)
    # random crops of wide images: exactly the crops not seen before are encoded
    a = augment(_wide_records(), 32, center_crop=False, random_crops=3, flip_p=0.0, seed=0)
    b = augment(_wide_records(), 32, center_crop=False, random_crops=3, flip_p=0.0, seed=1)
    cached_latents(vae, a, 4, cache=cache, progress=False)
    seen = {tuple(x.flatten().tolist()) for x in a.pixels}
    new = sum(tuple(x.flatten().tolist()) not in seen for x in b.pixels)
    assert 0 < new < len(b)
    lc, report = cached_latents(vae, b, 4, cache=cache, progress=False)
    assert report.encoded == new
    torch.testing.assert_close(lc.mean, encode_latents(vae, b, 4, progress=False).mean)


def test_size_cap_removes_the_least_recently_used_and_xti_cache_clears(vae, tmp_path, capsys):
    folder = tmp_path / "lc"
    cache = LatentDiskCache(folder)
    aug = _aug()
    cached_latents(vae, aug, 4, cache=cache, progress=False)
    vae_id = vae_identity(vae)
    paths = [cache.path(entry_key(vae_id, aug.pixels[i])) for i in range(len(aug))]
    size = paths[0].stat().st_size
    for i, p in enumerate(paths):  # entry 0 was used longest ago, entry 7 most recently
        t = time.time() - (len(paths) - i) * 3600
        os.utime(p, (t, t))
    cache.load(entry_key(vae_id, aug.pixels[0]))  # a hit makes entry 0 the most recent
    removed = cache.prune(max_bytes=5 * size)
    assert removed.entries == 3
    assert [p.exists() for p in paths] == [True, False, False, False, True, True, True, True]

    # a run with a small cap keeps the cache under it
    small = LatentDiskCache(folder, max_bytes=2 * size)
    cached_latents(vae, _aug(resolution=16), 4, cache=small, progress=False)
    assert small.stats().bytes <= 2 * size

    (folder / "v1" / "notes.txt").write_text("not ours")
    held = small.stats().entries
    assert held >= 1
    assert main(["cache", "--folder", str(folder)]) == 0
    assert f"latent cache {folder}: {held} entries" in capsys.readouterr().out
    assert main(["cache", "clear", "--folder", str(folder)]) == 0
    assert f"removed {held} entries" in capsys.readouterr().out
    assert LatentDiskCache(folder).stats().entries == 0
    assert (folder / "v1" / "notes.txt").exists(), "only xti's own files are removed"
    assert main(["cache", "prune", "--max-gb", "-1", "--folder", str(folder)]) == 2


def _cfg(model: Path, out: Path, *overrides: str):
    return load_config(
        None,
        [f"model.path={model}", f"data.dir={DATA}", f"output_dir={out}",
         "concept.placeholder=<box>", "concept.initializer=box", "train.resolution=32",
         "train.batch_size=2", "train.max_steps=3", "tracking.report_to=none", *overrides],
    )  # fmt: skip


def test_second_run_does_not_call_the_vae_and_reports_its_times(tiny_model, tmp_path):
    def run(out: str, *overrides: str):
        cfg = _cfg(tiny_model, tmp_path / out, *overrides)
        bundle = load_model(cfg.model)
        with Counting(bundle.vae) as counting:
            result = train(cfg, bundle=bundle, progress=False)
        return result, counting.calls

    first, calls = run("a")
    assert calls > 0
    second, calls = run("b", "xti.granularity=shared")
    assert calls == 0, "a run on the same images does not call the VAE"
    third, calls = run("c")
    assert calls == 0 and third.losses == first.losses, "the cached latents are the encoded ones"
    assert second.steps == 3

    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert (a["latent_cache"], a["latents_encoded"], a["latents_total"]) == ("miss", 8, 8)
    assert (b["latent_cache"], b["latents_encoded"]) == ("hit", 0)
    for s in (a, b):
        assert s["steps_timed"] == 3 and 0 < s["median_step_seconds"] < s["seconds"]
        assert 0 < s["setup_seconds"] < s["seconds"] and s["latent_seconds"] < s["setup_seconds"]
        assert s["launch_to_first_step_seconds"] > s["setup_seconds"]
        assert s["mixed_precision"] == "no" and s["device"] == "cpu"
    card = (tmp_path / "b" / "README.md").read_text()
    assert f"| setup (start to first step) | {b['setup_seconds']:.3g} s" in card
    assert "| VAE latents |" in card and "disk cache hit (0 of 8 encoded by the VAE)" in card
    assert f"| median step time | {b['median_step_seconds']:.3g} s over 3 steps" in card

    off, calls = run("d", "data.latent_cache=false")
    assert calls > 0 and off.losses == first.losses
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["latent_cache"] == "off"


def test_model_card_code_generates_with_the_file(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(tiny_model, out, "train.max_steps=1"), progress=False)
    card = (out / "README.md").read_text()
    code = re.search(r"## Use it\n.*?```python\n(.*?)```", card, re.S).group(1)
    assert "load_xti(pipe" in code and "from_pretrained" in code
    code = code.replace("num_inference_steps=30", "num_inference_steps=2")
    monkeypatch.chdir(out)
    exec(compile(code, "model-card", "exec"), {})
    with Image.open(out / "box-sample.png") as im:
        assert im.size == (32, 32)
