"""How well a demo model follows prompts: colour, shape and background hit rates over seeds.

    python bench/demo_model.py                         # data/demo-model
    python bench/demo_model.py --model /tmp/demo-model-2 --seeds 8
    python bench/demo_model.py --smoke                 # seconds: 2 prompts, 1 seed, 2 steps (CI)

For every named colour x shape pair (on backgrounds cycling white/gray/black) it samples one image per
seed (DDIM, 12 steps, guidance 4: the settings of the acceptance test) and reads it back with
`xti.demo.procedural.measure`. Prints per-shape and overall hit rates; chance for shape is 1/6.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from diffusers import StableDiffusionPipeline

from xti.demo import procedural as P


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="data/demo-model")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--pairs", type=int, default=None, help="only the first N colour x shape pairs")
    ap.add_argument("--smoke", action="store_true", help="2 pairs, 1 seed, 2 steps (seconds, CI)")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.pairs = 1, 2, 2
        torch.set_num_threads(1)

    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    backgrounds = itertools.cycle(P.BACKGROUNDS)
    hits = {"colour": [], "shape": [], "background": [], "all": []}
    by_shape: dict[str, list[bool]] = {s: [] for s in P.SHAPES}
    pairs = list(itertools.product(P.SHAPES, P.NAMED_COLOURS))[: args.pairs]
    for shape, colour in pairs:
        background = next(backgrounds)
        prompt = P.caption_for(shape, colour, background, "plain")
        gens = [torch.Generator().manual_seed(s) for s in range(args.seeds)]
        images = pipe(
            [prompt] * args.seeds,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=gens,
            output_type="np",
        ).images
        for img in images:
            m = P.measure((img * 255).round().astype("uint8"))
            ok = {
                "colour": m.colour == colour,
                "shape": m.shape == shape,
                "background": m.background == background,
            }
            ok["all"] = all(ok.values())
            for k, v in ok.items():
                hits[k].append(v)
            by_shape[shape].append(ok["shape"])
    n = len(hits["all"])
    print(f"{args.model}: {n} images ({len(pairs)} prompts x {args.seeds} seeds)")
    print("  " + "  ".join(f"{k} {sum(v) / n:.0%}" for k, v in hits.items()))
    print(
        "  shape by shape: "
        + ", ".join(f"{s} {sum(v) / len(v):.0%}" for s, v in by_shape.items() if v)
    )


if __name__ == "__main__":
    main()
