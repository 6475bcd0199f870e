"""Median training-step time of XTI vs shared (classic TI) mode, measured side by side.

    python bench/step.py --model tiny                      # tiny SD1-layout model, 16x16 latents
    python bench/step.py --model sd15 --steps 3            # SD1.5-shaped random weights, 64x64 latents
    python bench/step.py --model sd15 --device cuda --mixed-precision bf16 --batch 4

Both modes run the same `xti.training.compute_loss` + AdamW step on the same model and batch in one
process, alternating, so the ratio is meaningful even on a noisy machine. Also counts text-encoder
forward calls per step (XTI encodes all L layer variants in one call), and times the stock UNet
forward+backward alone as a baseline (our overhead = shared minus stock). The VAE is not part of a
training step (latents are cached once), so random latents stand in for it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDPMScheduler

from xti.attention import install_processors
from xti.builders import (
    CLIP_L_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    build_text_encoder,
    build_tiny_sd1_components,
    build_unet,
)
from xti.embeddings import (
    ConceptVectors,
    add_placeholder_tokens,
    install_token_embedding,
    layer_variants,
    tokenize,
)
from xti.layers import layer_scheme
from xti.tokenizer import build_clip_tokenizer
from xti.training import Batch, StepModels, compute_loss


def load(model: str):
    if model == "tiny":
        parts = build_tiny_sd1_components(seed=0)
        return parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["scheduler"], 16
    if model == "sd15":
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        return (
            build_clip_tokenizer(),
            build_text_encoder(CLIP_L_TEXT_CONFIG),
            build_unet(SD15_UNET_CONFIG),
            sched,
            64,
        )
    raise SystemExit(f"unknown --model {model} (tiny or sd15)")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="tiny", help="tiny or sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--latent-size", type=int, default=None, help="default: 16 tiny, 64 sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    t_load = time.perf_counter()
    tokenizer, text_encoder, unet, scheduler, size = load(args.model)
    size = args.latent_size or size
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.mixed_precision
    ]
    device = torch.device(args.device)
    for m in (unet, text_encoder):
        m.requires_grad_(False).eval().to(device, dtype=dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    print(f"built {args.model} in {time.perf_counter() - t_load:.1f} s; batch {args.batch}, latents {size}x{size}, "
          f"{args.mixed_precision}, device {device}, threads {torch.get_num_threads()}")  # fmt: skip

    tokens = add_placeholder_tokens(tokenizer, "<bench>", 1)
    scheme = layer_scheme(unet)
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    ids = tokenize(tokenizer, [tokens.expand("a photo of a <bench>")] * args.batch).to(device)
    batch = Batch(
        latents=torch.randn(args.batch, 4, size, size, generator=g).to(device),
        noise=torch.randn(args.batch, 4, size, size, generator=g).to(device),
        timesteps=torch.randint(0, 1000, (args.batch,), generator=g).to(device),
        input_ids=ids,
        image_ids=torch.zeros(args.batch, dtype=torch.long),
    )
    calls = []
    text_encoder.register_forward_hook(lambda m, a, o: calls.append(1))
    stock_processors = dict(unet.attn_processors)
    install_processors(unet, scheme)
    xti_processors = dict(unet.attn_processors)

    modes = {}
    for granularity in ("block", "shared"):
        variants = 1 if granularity == "shared" else len(scheme)
        concept = ConceptVectors(torch.randn(1, dim, generator=g) * 0.01, variants).to(device)
        modes[granularity] = (concept, torch.optim.AdamW(concept.parameters(), lr=1e-3), variants)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def xti_step(granularity: str) -> tuple[float, int]:
        concept, opt, variants = modes[granularity]
        handle = install_token_embedding(text_encoder, tokens.first_id, concept)
        m = StepModels(unet, text_encoder, scheduler, tokens, layer_variants(len(scheme), granularity).to(device),
                       variants, "epsilon", dtype)  # fmt: skip
        calls.clear()
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = compute_loss(m, batch, concept())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        handle.remove()
        return time.perf_counter() - t, len(calls)

    def stock_step() -> tuple[float, int]:
        """Baseline: the stock UNet and processors, gradient to one context tensor, no text encoder."""
        unet.set_attn_processor(dict(stock_processors))
        ctx = (
            torch.randn(args.batch, ids.shape[1], dim, generator=g)
            .to(device, dtype)
            .requires_grad_(True)
        )
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps).to(dtype)
            pred = unet(noisy, batch.timesteps, encoder_hidden_states=ctx).sample
        (pred.float() - batch.noise).pow(2).mean().backward()
        sync()
        dt = time.perf_counter() - t
        unet.set_attn_processor(dict(xti_processors))
        return dt, 0

    runners = {
        "block": lambda: xti_step("block"),
        "shared": lambda: xti_step("shared"),
        "stock": stock_step,
    }
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    n_calls: dict[str, int] = {}
    for run in runners.values():
        run()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        for mode, run in runners.items():
            dt, n_calls[mode] = run()
            times[mode].append(dt)
    print(
        f"{'mode':<22} {'vector sets':>11} {'median s/step':>14} {'min':>8} {'text-encoder calls/step':>24}"
    )
    rows = (
        ("block", "xti", len(scheme)),
        ("shared", "shared (TI)", 1),
        ("stock", "stock UNet fwd+bwd only", 0),
    )
    for mode, label, sets in rows:
        ts = times[mode]
        print(
            f"{label:<22} {sets:>11} {statistics.median(ts):>14.3f} {min(ts):>8.3f} {n_calls[mode]:>24}"
        )
    ratio = statistics.median(times["block"]) / statistics.median(times["shared"])
    print(f"xti / shared step-time ratio: {ratio:.2f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
