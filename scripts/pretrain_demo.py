"""Pretrain the tiny demo text-to-image model (``data/demo-model``) from scratch on procedural shapes.

Recipe (deterministic from ``--seed``; one CPU thread):

1. draw ``--dataset-size`` labelled 32x32 images with `xti.demo.procedural` (held-out combinations
   excluded, see `xti.demo.procedural.HELD_OUT`);
2. train an AutoencoderKL (32x32x3 → 16x16x4) for ``--vae-steps`` steps (MSE + tiny KL);
3. encode the dataset once (latent mean/std cached), set the VAE scaling factor to 1/std;
4. train the SD1-layout UNet (16 cross-attention layers) and the CLIP text encoder (real 49,408-token
   tokenizer) jointly for ``--steps`` steps with v-prediction on a zero-terminal-SNR schedule
   (``rescale_betas_zero_snr``), so that background brightness follows the prompt instead of the
   seed; captions drop attributes at random (`xti.demo.procedural.training_caption`); weights are
   averaged by EMA, and the EMA weights are what is saved;
5. every ``--checkpoint-minutes`` and at the end, write a complete ``StableDiffusionPipeline`` folder
   (``<work-dir>/checkpoint-latest`` while training, ``<out>`` at the end) and a sample grid with
   measured hit rates (`xti.demo.procedural.measure`) into ``--work-dir``.

The learning rate is constant after warm-up, so a run stopped after N steps and a run started with
``--steps N`` end with the same weights. ``--max-minutes`` stops early (and still saves).

The shipped ``data/demo-model`` (see its README.md) is reproduced by

    python scripts/pretrain_demo.py --out data/demo-model --dataset-size 20000 --vae-steps 250 \
        --steps 2485 --lr 8e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from xti.builtin import TINY_VAE_CONFIG
from xti.demo import procedural as P
from xti.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, build_clip_tokenizer

# --------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "attention_head_dim": 2,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
}

# The builtin tiny VAE's architecture (32x32 images to 16x16x4 latents); the scaling factor is
# measured after the VAE is trained.
VAE_CONFIG: dict[str, Any] = {**TINY_VAE_CONFIG, "scaling_factor": 1.0}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
"""Zero-terminal-SNR, v-prediction, trailing timesteps (Lin et al. 2024)."""

EVAL_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "white"),
    ("square", "blue", "black"),
    ("triangle", "yellow", "gray"),
    ("diamond", "green", "black"),
    ("cross", "purple", "white"),
    ("star", "orange", "gray"),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[P.Label]]:
    """`n` pretraining images as a float tensor in [-1, 1] (N, 3, 32, 32), and their labels."""
    images, labels = P.generate_batch(n, seed, exclude=P.is_held_out)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, labels


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------


def train_vae(
    vae: AutoencoderKL, images: torch.Tensor, steps: int, seed: int, batch_size: int = 64
) -> None:
    """Train the autoencoder on `images` (MSE reconstruction + 1e-6 KL), in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = 1e-3 * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()  # summed over latent elements, mean over the batch
        loss = mse + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(
                f"vae step {step}/{steps} mse {mse.item():.4f} kl {kl.item():.3f} "
                f"({time.time() - t0:.0f}s)"
            )
    vae.eval()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), 256):
        post = vae.encode(images[i : i + 256]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------------
# UNet + text encoder
# --------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's parameters (decay warms up as (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.n = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            if p.requires_grad:
                s.lerp_(p.detach(), 1.0 - d)


class TokenCache:
    """Tokenize captions once (padded to 77 like the pipeline does) and keep the ids."""

    def __init__(self) -> None:
        self.tokenizer = build_clip_tokenizer()
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            self.cache.update(zip(missing, ids, strict=True))
        return torch.stack([self.cache[c] for c in captions])


def build_pipeline(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae: AutoencoderKL
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: StableDiffusionPipeline, folder: Path, meta: dict[str, Any]) -> None:
    """Write the pipeline atomically (temp sibling folder, then rename); keeps a README.md there."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    from xti.tokenizer import save_clip_tokenizer

    shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
    save_clip_tokenizer(tmp / "tokenizer")
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    if (folder / "README.md").exists():
        shutil.copy2(folder / "README.md", tmp / "README.md")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def sample_grid(
    pipe: StableDiffusionPipeline,
    path: Path,
    seeds: int = 6,
    steps: int = 20,
    guidance: float = 4.0,
) -> dict[str, float]:
    """Sample `EVAL_PROMPTS` x `seeds`, save a grid PNG and return measured hit rates."""
    rows, hits = [], {"shape": 0, "colour": 0, "background": 0}
    total = 0
    for shape, colour, bg in EVAL_PROMPTS:
        prompt = P.caption_for(shape, colour, bg)
        out = pipe(
            [prompt] * seeds,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for s in range(seeds)],
            output_type="np",
            height=32,
            width=32,
        ).images
        imgs = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        rows.append(np.concatenate(list(imgs), axis=1))
        for im in imgs:
            m = P.measure(im)
            hits["shape"] += m.shape == shape
            hits["colour"] += m.colour == colour
            hits["background"] += m.background == bg
            total += 1
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)
    return {k: v / total for k, v in hits.items()}


def train_diffusion(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    latents: tuple[torch.Tensor, torch.Tensor],
    labels: list[P.Label],
    args: argparse.Namespace,
    meta: dict[str, Any],
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Joint UNet + text-encoder training; returns the EMA copies."""
    out = Path(args.out)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    mean, std = latents
    scale = vae.config.scaling_factor
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    tokens = TokenCache()
    gen = torch.Generator().manual_seed(args.seed + 10)
    rng = np.random.default_rng(args.seed + 11)
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_unet, ema_text = EMA(unet, args.ema), EMA(text_encoder, args.ema)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    last_ckpt = t0
    running = 0.0
    step = 0
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / args.warmup)
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        captions = [P.training_caption(labels[i], rng) for i in idx.tolist()]
        ids = tokens(captions)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        target = sched.get_velocity(z0, noise, t)
        ctx = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        elapsed = time.time() - t0
        if step % 100 == 0:
            log(f"step {step}/{args.steps} loss {running:.4f} {step / elapsed:.2f} it/s")
        stop = args.max_minutes and elapsed > args.max_minutes * 60
        if time.time() - last_ckpt > args.checkpoint_minutes * 60 or stop or step == args.steps:
            last_ckpt = time.time()
            meta.update(steps=step, diffusion_seconds=round(elapsed), loss=round(running, 4))
            pipe = build_pipeline(ema_unet.shadow, ema_text.shadow, vae)
            pipe.set_progress_bar_config(disable=True)
            final = stop or step == args.steps
            folder = out if final else work / "checkpoint-latest"
            save_pipeline(pipe, folder, meta)
            rates = sample_grid(pipe, work / f"samples-{step:06d}.png")
            log(f"saved {folder} at step {step}; measured hit rates {rates}")
            if stop:
                log(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
                break
    return ema_unet.shadow, ema_text.shadow


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/demo-model", help="pipeline folder to write")
    p.add_argument(
        "--work-dir",
        default="/tmp/xti-pretrain-demo",
        help="periodic checkpoint (checkpoint-latest) and sample grids",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-size", type=int, default=30000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=6000, help="UNet + text-encoder steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop early (0: never)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--init-from",
        default=None,
        help="continue training from a saved pipeline folder (its VAE is kept; use another --seed "
        "so that images and noise differ from the first run)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    meta: dict[str, Any] = {
        "command": "python scripts/pretrain_demo.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "dataset_size": args.dataset_size,
        "vae_steps": args.vae_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema": args.ema,
        "held_out": [list(h) for h in P.HELD_OUT],
        "named_colours": list(P.NAMED_COLOURS),
        "torch": torch.__version__,
    }
    t_start = time.time()
    log(f"drawing {args.dataset_size} images")
    images, labels = make_dataset(args.dataset_size, args.seed)

    if args.init_from:
        # continue from a saved pipeline: its VAE (frozen) and its (EMA) UNet / text encoder
        init = Path(args.init_from)
        previous = init / "training.json"
        if previous.is_file():
            meta["previous"] = json.loads(previous.read_text())
        meta["init_from"] = str(init)
        vae = AutoencoderKL.from_pretrained(str(init / "vae")).eval()
        text_encoder = CLIPTextModel.from_pretrained(str(init / "text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(str(init / "unet"))
        mean, std = encode_dataset(vae, images)
        log(f"continuing from {init} (vae scaling factor {vae.config.scaling_factor:.4f})")
    else:
        torch.manual_seed(args.seed + 1)
        vae = AutoencoderKL.from_config(VAE_CONFIG)
        t0 = time.time()
        train_vae(vae, images, args.vae_steps, args.seed + 2)
        meta["vae_seconds"] = round(time.time() - t0)
        mean, std = encode_dataset(vae, images)
        with torch.no_grad():
            rec = vae.decode(mean[:512]).sample
            meta["vae_recon_mse"] = round(F.mse_loss(rec, images[:512]).item(), 5)
        scaling = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scaling)
        log(f"vae recon mse {meta['vae_recon_mse']}, scaling factor {scaling:.4f}")

        torch.manual_seed(args.seed + 3)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        torch.manual_seed(args.seed + 4)
        unet = UNet2DConditionModel.from_config(UNET_CONFIG)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log(f"unet {n_unet:,} params, text encoder {n_text:,} params")
    train_diffusion(unet, text_encoder, vae, (mean, std), labels, args, meta)
    log(f"done in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
