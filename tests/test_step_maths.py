"""The pure step functions: batch sampling, targets, SNR weights, loss."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from xti.data import LatentCache
from xti.step import (
    PromptTable,
    diffusion_loss,
    diffusion_target,
    sample_batch,
    snr,
    snr_weights,
)


def cache(num_images=3):
    k = num_images * 2
    g = torch.Generator().manual_seed(0)
    return LatentCache(
        mean=torch.randn(k, 4, 4, 4, generator=g),
        std=torch.rand(k, 4, 4, 4, generator=g),
        image_index=torch.arange(num_images).repeat_interleave(2),
        flipped=torch.tensor([False, True] * num_images),
        scaling_factor=0.5,
    )


def prompts(num_images=3):
    ids = torch.arange(num_images * 2 * 5).reshape(num_images * 2, 5)
    return PromptTable(
        ids={"text": ids},
        first_row=torch.arange(num_images) * 2,
        count=torch.full((num_images,), 2),
    )


def draw(**kw):
    args = dict(
        num_train_timesteps=1000,
        global_batch=4,
        rank=0,
        world_size=1,
        seed=1,
        micro_step=0,
        flip_p=0.5,
    )
    args.update(kw)
    return sample_batch(cache(), prompts(), **args)


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = draw(), draw()
    assert a.ids.keys() == b.ids.keys() == {"text"}
    assert torch.equal(a.ids["text"], b.ids["text"])
    for name in ("latents", "noise", "timesteps", "image_ids", "time_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert not torch.equal(draw(micro_step=1).noise, a.noise)
    assert not torch.equal(draw(seed=2).noise, a.noise)


def test_rank_slices_make_up_the_global_batch():
    whole = draw(global_batch=4)
    parts = [draw(global_batch=4, rank=r, world_size=2) for r in range(2)]
    for field in ("latents", "noise", "timesteps", "image_ids"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))
    assert torch.equal(torch.cat([p.ids["text"] for p in parts]), whole.ids["text"])


def test_prompts_come_from_the_sampled_image():
    b = draw(global_batch=64)
    rows = b.ids["text"][:, 0] // 5  # row r holds r*5 .. r*5+4
    assert torch.equal(rows // 2, b.image_ids)


def test_noise_offset_adds_a_per_channel_constant():
    plain, offset = draw(), draw(noise_offset=0.1)
    diff = offset.noise - plain.noise
    assert diff.abs().max() > 0
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff))


def test_targets_and_snr_weights_follow_their_formulas():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x, n = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(diffusion_target(sched, x, n, t, "epsilon"), n)
    torch.testing.assert_close(
        diffusion_target(sched, x, n, t, "v_prediction"), ac.sqrt() * n - (1 - ac).sqrt() * x
    )
    s = snr(sched, t)
    torch.testing.assert_close(s, (ac / (1 - ac)).flatten())
    w_eps = snr_weights(s, 5.0, "epsilon")
    torch.testing.assert_close(w_eps, torch.minimum(s, torch.tensor(5.0)) / s)
    w_v = snr_weights(s, 5.0, "v_prediction")
    torch.testing.assert_close(w_v, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    assert w_eps[0] < 1 and w_eps[2] == 1  # high-SNR (early) timesteps are down-weighted


def test_weighted_loss():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert diffusion_loss(pred, target).item() == 2.5
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.0])).item() == 0.5
