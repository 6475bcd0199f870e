"""Median training-step time of XTI vs shared (classic TI) mode, measured side by side.

    python bench/step.py --model tiny --batch 2 --steps 8     # tiny SD1-layout model, 16x16 latents
    python bench/step.py --model tiny-sdxl --batch 2          # tiny SDXL-layout model (2 encoders)
    python bench/step.py --model sd15 --steps 3               # SD1.5-shaped random weights, 64x64
    python bench/step.py --model sdxl --device cuda --mixed-precision bf16 [--gradient-checkpointing]
    python bench/step.py --smoke                              # seconds: tiny, one step per mode (CI)

Both modes run the same `xti.step.compute_loss` + AdamW step on the same model and batch in one
process, alternating, so the ratio is meaningful even on a noisy machine. It also counts text-encoder
forward calls per step (XTI encodes all L layer variants in one call per encoder) and the text
encoder's share of the step (its forward, timed by module hooks, plus its backward: from the moment
the gradient reaches its outputs to the end of backward), and times the stock UNet
forward+backward alone as a baseline (our overhead = shared minus stock). The VAE is not part of a
training step (latents are cached once), so random latents stand in for it. On CUDA it prints
peak GPU memory. Run it on a quiet machine: another busy process makes every figure wrong.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import DDPMScheduler

from xti.attention import install_processors
from xti.builtin import (
    CLIP_L_TEXT_CONFIG,
    OPENCLIP_BIGG_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    build_text_encoder,
    build_text_encoder_with_projection,
    build_tiny_sd1_components,
    build_tiny_sdxl_components,
    build_unet,
)
from xti.embeddings import (
    ConceptVectors,
    add_placeholder_tokens,
    install_token_embedding,
    layer_variants,
    tokenize,
)
from xti.families import detect
from xti.layers import layer_scheme
from xti.step import Batch, StepModels, compute_loss
from xti.tokenizer import build_clip_tokenizer

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def load(model: str) -> tuple[dict[str, Any], int]:
    """Components (tokenizer[_2], text_encoder[_2], unet, scheduler) and the default latent size."""
    if model == "tiny":
        return build_tiny_sd1_components(seed=0), 16
    if model == "tiny-sdxl":
        return build_tiny_sdxl_components(seed=0), 16
    if model == "sd15":
        return {
            "tokenizer": build_clip_tokenizer(),
            "text_encoder": build_text_encoder(CLIP_L_TEXT_CONFIG),
            "unet": build_unet(SD15_UNET_CONFIG),
            "scheduler": DDPMScheduler(**SD_SCHEDULER),
        }, 64
    if model == "sdxl":
        return {
            "tokenizer": build_clip_tokenizer(),
            "tokenizer_2": build_clip_tokenizer(),
            "text_encoder": build_text_encoder(CLIP_L_TEXT_CONFIG),
            "text_encoder_2": build_text_encoder_with_projection(OPENCLIP_BIGG_TEXT_CONFIG),
            "unet": build_unet(SDXL_UNET_CONFIG),
            "scheduler": DDPMScheduler(**SD_SCHEDULER),
        }, 128
    raise SystemExit(f"unknown --model {model} (tiny, tiny-sdxl, sd15, sdxl)")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="tiny", help="tiny, tiny-sdxl, sd15 or sdxl")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up)")
    ap.add_argument(
        "--latent-size", type=int, default=None, help="default: 16 tiny, 64 sd15, 128 sdxl"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step per mode, CPU (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batch, args.steps, args.device, args.latent_size = (
            "tiny",
            1,
            1,
            "cpu",
            None,
        )
        torch.set_num_threads(1)

    t_load = time.perf_counter()
    parts, size = load(args.model)
    size = args.latent_size or size
    family = detect(parts["unet"], parts["text_encoder"])
    encoders = family.encoders(SimpleNamespace(**parts))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.mixed_precision
    ]
    device = torch.device(args.device)
    unet, scheduler = parts["unet"], parts["scheduler"]
    for m in [unet] + [e.text_encoder for e in encoders]:
        m.requires_grad_(False).eval().to(device)
        if dtype != torch.float32:
            m.to(dtype=dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    print(f"built {args.model} ({family.name}) in {time.perf_counter() - t_load:.1f} s; batch {args.batch}, latents {size}x{size}, "
          f"{args.mixed_precision}, device {device}, threads {torch.get_num_threads()}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")  # fmt: skip

    scheme = layer_scheme(unet)
    g = torch.Generator().manual_seed(0)
    tokens, ids, dims = {}, {}, {}
    for e in encoders:
        tokens[e.name] = add_placeholder_tokens(e.tokenizer, "<bench>", 1)
        prompts = [tokens[e.name].expand("a photo of a <bench>")] * args.batch
        ids[e.name] = tokenize(e.tokenizer, prompts).to(device)
        dims[e.name] = e.text_encoder.get_input_embeddings().weight.shape[1]
    time_ids = torch.tensor([[size * 8.0, size * 8.0, 0.0, 0.0, size * 8.0, size * 8.0]]).repeat(
        args.batch, 1
    )
    batch = Batch(
        latents=torch.randn(args.batch, 4, size, size, generator=g),
        noise=torch.randn(args.batch, 4, size, size, generator=g),
        timesteps=torch.randint(0, 1000, (args.batch,), generator=g),
        ids=ids,
        image_ids=torch.zeros(args.batch, dtype=torch.long),
        time_ids=time_ids if family.uses_time_ids else None,
    ).to(device)
    calls = []
    te_time = {"forward": 0.0, "grad_at": None}

    def te_pre(module, args) -> None:
        sync()
        te_time["t_pre"] = time.perf_counter()

    def first_grad(grad: torch.Tensor) -> None:
        sync()
        now = time.perf_counter()
        if te_time["grad_at"] is None or now < te_time["grad_at"]:
            te_time["grad_at"] = now

    def te_post(module, args, output) -> None:
        sync()
        calls.append(1)
        te_time["forward"] += time.perf_counter() - te_time["t_pre"]
        outs = output.values() if hasattr(output, "values") else output
        for t in outs:
            for x in t if isinstance(t, tuple) else (t,):
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(first_grad)

    for e in encoders:
        e.text_encoder.register_forward_pre_hook(te_pre)
        e.text_encoder.register_forward_hook(te_post)
    stock_processors = dict(unet.attn_processors)
    install_processors(unet, scheme)
    xti_processors = dict(unet.attn_processors)

    modes = {}
    for granularity in ("block", "shared"):
        variants = 1 if granularity == "shared" else len(scheme)
        sets = {
            e.name: ConceptVectors(
                torch.randn(1, dims[e.name], generator=g) * 0.01,
                family.vector_sets(e.name, variants, "slot"),
            ).to(device)
            for e in encoders
        }
        params = [p for s in sets.values() for p in s.parameters()]
        modes[granularity] = (sets, torch.optim.AdamW(params, lr=1e-3), variants)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def xti_step(granularity: str) -> tuple[float, int, float]:
        """Step time, text-encoder calls, text-encoder time (forward + backward) of one step."""
        sets, opt, variants = modes[granularity]
        handles = [
            install_token_embedding(e.text_encoder, tokens[e.name].first_id, sets[e.name])
            for e in encoders
        ]
        m = StepModels(
            family, encoders, unet, scheduler, tokens,
            layer_variants(len(scheme), granularity).to(device), variants, "epsilon", dtype,
        )  # fmt: skip
        calls.clear()
        te_time.update(forward=0.0, grad_at=None)
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = compute_loss(m, batch)
        loss.backward()
        sync()
        t_backward = time.perf_counter()
        te = te_time["forward"] + (t_backward - (te_time["grad_at"] or t_backward))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        for h in handles:
            h.remove()
        return time.perf_counter() - t, len(calls), te

    def stock_step() -> tuple[float, int, float]:
        """Baseline: the stock UNet and processors, gradient to one context tensor, no text encoder."""
        unet.set_attn_processor(dict(stock_processors))
        ctx = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=g)
        ctx = ctx.to(device, dtype).requires_grad_(True)
        pooled = None  # random pooled embeds of the projecting encoder's width (SDXL's)
        for e, spec in zip(encoders, family.specs, strict=True):
            if spec.projection:
                width = e.text_encoder.config.projection_dim
                pooled = torch.randn(args.batch, width, generator=g).to(device)
        added = family.added_cond(pooled, batch.time_ids, dtype)
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps).to(dtype)
            pred = unet(
                noisy, batch.timesteps, encoder_hidden_states=ctx, added_cond_kwargs=added
            ).sample
        (pred.float() - batch.noise).pow(2).mean().backward()
        sync()
        dt = time.perf_counter() - t
        unet.set_attn_processor(dict(xti_processors))
        return dt, 0, 0.0

    runners = {
        "block": lambda: xti_step("block"),
        "shared": lambda: xti_step("shared"),
        "stock": stock_step,
    }
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    te_times: dict[str, list[float]] = {mode: [] for mode in runners}
    n_calls: dict[str, int] = {}
    peak: dict[str, float] = {}
    for run in runners.values():
        run()  # warm-up
    for _ in range(args.steps):
        for mode, run in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt, n_calls[mode], te = run()
            times[mode].append(dt)
            te_times[mode].append(te)
            if device.type == "cuda":
                peak[mode] = max(peak.get(mode, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    header = (
        f"{'mode':<24} {'vector sets':>11} {'median s/step':>14} {'min':>8} "
        f"{'text-encoder calls/step':>24} {'text-enc s':>10} {'text-enc share':>15}"
    )
    print(header + (f" {'peak GiB':>9}" if peak else ""))
    rows = (
        ("block", "xti", len(scheme)),
        ("shared", "shared (TI)", 1),
        ("stock", "stock UNet fwd+bwd only", 0),
    )
    for mode, label, sets in rows:
        ts, te = statistics.median(times[mode]), statistics.median(te_times[mode])
        line = (
            f"{label:<24} {sets:>11} {ts:>14.3f} {min(times[mode]):>8.3f} {n_calls[mode]:>24} "
            f"{te:>10.3f} {te / ts:>15.1%}"
        )
        print(line + (f" {peak[mode]:>9.2f}" if peak else ""))
    ratio = statistics.median(times["block"]) / statistics.median(times["shared"])
    print(f"xti / shared step-time ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
