"""XTI vs textual inversion on the demo model: reconstruction, editability, mixing, per step budget.

    python bench/quality.py                       # 3 objects; 10, 25, 50, 100, 250, 500 steps; 8 seeds
    python bench/quality.py --steps 50,100 --seeds 4 --concepts striped-cross --work-dir /tmp/q --reuse
    python bench/quality.py --smoke               # seconds: 2 steps, 1 seed, XTI only (CI)
    python bench/quality.py --masks --steps 100,300 --seeds 4 --threads 1  # mask floors 0, 0.1, 1

For each mode (`block` = XTI, `shared` = classic TI through the same code) it trains every object
concept of --concepts (default: all of `xti.demo.procedural.DEMO_OBJECTS`, each with its config in
`xti.quality.DEMO_CONFIGS`: striped-cross, giant-dotted-diamond, giant-striped-triangle) and the style
concept --style (teal-dotted, configs/demo-style.yaml) once, for the largest budget, writing an
embedding snapshot at every budget. The schedule is constant after warm-up and every random draw of a
step depends only on (seed, step), so the snapshot at step k is exactly what a k-step run would export.

Each object's snapshot is then scored by `xti.quality` with the generator's labels (one image per
seed, DDIM 12 steps, guidance 4, the demo model's settings), with the style's snapshot of the same
mode and budget for mixing:
  recon   "a <A> on a {white,gray,black} background": hit rates of A's shape, A's colour, the
          background, for the giant objects the size class (`xti.demo.procedural.GIANT_EXTENT`: wider
          than anything pretraining drew), all of them at once, and the RMS pixel distance (0-1
          scale) to the nearest training image on that background (patterns only show there);
  edit    "a {blue,red,green,purple} <A> on a white background" (less A's own colour): the asked
          colour, A's shape kept;
  mix     "a <A> on a … background" with A in the layers that decide shape (--mix-layers, default
          IN04-OUT08: all but the 16x16 layers, see xti.quality.DEMO_SHAPE_LAYERS) and the style in
          the others: A's shape, the style's colour (teal), both.
A `text` row per object gives the plain words ("an orange striped cross …") for reference: they name
shape and colour, but the model never drew a striped cross, and no words ask for a giant shape. A
control row per mode and object mixes the style's initializer word ("dotted") instead of its learned
vectors into the other layers: teal there would mean the mixing colour is not the style's doing (teal
is the colour the model draws when none is named).

After the table, per object and mode: the first budget at which "recon all" reaches --threshold
(90%), or "not reached", which is the "how many steps does each need" reading.

With --masks it measures instead what a mask changes: the cluttered concept
(`configs/demo-cluttered-cross.yaml`: an orange striped cross among other shapes on 40x24 images,
aspect-ratio buckets, a mask per image) is trained at each --mask-floors value of data.mask_floor
(default 0, 0.1 and 1; 1 weighs every pixel fully, the same as no mask), and each budget's snapshot is scored on reconstruction ("a <cluttered-cross> on a … background":
shape, colour, background, and the distance to the cross alone on that background) and editability.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import REPO, add_common_arguments, smoke, start

from xti import quality as Q
from xti.config import load_config
from xti.demo import procedural as P
from xti.pipelines import load_pipeline

MODES = {"block": "XTI", "shared": "TI"}
COLUMNS = list(Q.SCORES)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", default="10,25,50,100,250,500", help="comma-separated step budgets")
    ap.add_argument("--modes", default="block,shared", help="granularities to compare")
    ap.add_argument(
        "--concepts",
        default=",".join(P.DEMO_OBJECTS),
        help="comma-separated object concepts (names in xti.demo.procedural.DEMO_CONCEPTS)",
    )
    ap.add_argument("--style", default="teal-dotted", help="style concept mixed into the objects")
    ap.add_argument("--threshold", type=float, default=0.9, help="'recon all' level to reach")
    ap.add_argument(
        "--masks", action="store_true", help="the cluttered concept with and without its masks"
    )
    ap.add_argument(
        "--mask-floors", default="0,0.1,1", help="with --masks: data.mask_floor values (1: no mask)"
    )
    add_common_arguments(ap, "outputs/bench-quality")
    args = ap.parse_args()
    smoke(args, steps="2", seeds=1, modes="block", concepts="striped-cross", mask_floors="0,1")
    if args.masks:
        masks_bench(args)
        return
    budgets = sorted({int(s) for s in args.steps.split(",")})
    modes = args.modes.split(",")
    names = args.concepts.split(",")
    start(ap, args, [*names, args.style])
    work = Path(args.work_dir)
    seeds = list(range(args.seeds))
    t_start = time.perf_counter()

    files = {}
    for mode in modes:
        for name in [*names, args.style]:
            config = REPO / Q.DEMO_CONFIGS[name]
            files[mode, name] = Q.train_snapshots(
                config,
                budgets,
                work / mode / config.stem,
                [f"xti.granularity={mode}", *args.overrides],
                reuse=args.reuse,
            )

    style = Q.load_concept(f"data/demo-concepts/{args.style}")
    word = load_config(REPO / Q.DEMO_CONFIGS[args.style], args.overrides).concept.initializer
    pipe = load_pipeline("data/demo-model")
    pipe.set_progress_bar_config(disable=True)
    rows = []
    reached: dict[tuple[str, str], int | None] = {}
    t0 = time.perf_counter()
    for name in names:
        obj = Q.load_concept(f"data/demo-concepts/{name}")
        text = Q.Concept(obj.describe(), obj.images, obj.labels)
        scores = Q.score_embeddings(pipe, {}, Q.demo_probes(text), seeds)
        rows.append((name, "text", "—", scores))
        probes = Q.demo_probes(obj, style, shape_layers=args.mix_layers)
        for mode in modes:
            recon = {}
            for budget in budgets:
                loaded = {
                    obj.subject: files[mode, name][budget],
                    style.subject: files[mode, args.style][budget],
                }
                scores = Q.score_embeddings(pipe, loaded, probes, seeds)
                recon[budget] = scores.get("reconstruction.all")
                rows.append((name, MODES.get(mode, mode), str(budget), scores))
                print(f"  scored {name}, {rows[-1][1]} at {budget} steps", flush=True)
            reached[name, mode] = Q.first_budget_reaching(recon, args.threshold)
            # control: the style's initializer word instead of its vectors
            control = Q.score_embeddings(
                pipe,
                {obj.subject: files[mode, name][budgets[-1]]},
                Q.mixing_control_probes(obj, style, word, shape_layers=args.mix_layers),
                seeds,
            )
            control = {k.replace("control.", "mixing."): v for k, v in control.items()}
            rows.append(
                (name, f"{MODES.get(mode, mode)}, '{word}' mixed in", str(budgets[-1]), control)
            )
    print(
        f"scored {len(rows)} rows in {time.perf_counter() - t0:.0f} s ({len(seeds)} seed(s) per "
        f"prompt; mixing: object in {args.mix_layers}, {args.style} in the rest); "
        f"total {time.perf_counter() - t_start:.0f} s"
    )

    table = [
        [name, mode, steps, *Q.score_cells(scores, COLUMNS)] for name, mode, steps, scores in rows
    ]
    print("\n".join(Q.markdown_table(["concept", "mode", "steps", *COLUMNS], table)))

    print(f"\nFirst budget at which 'recon all' reaches {100 * args.threshold:.0f}%:\n")
    header = ["concept", *(MODES.get(m, m) for m in modes)]
    table = [
        [
            name,
            *(
                f"not reached by {budgets[-1]}"
                if reached[name, m] is None
                else f"{reached[name, m]} steps"
                for m in modes
            ),
        ]
        for name in names
    ]
    print("\n".join(Q.markdown_table(header, table)))


def masks_bench(args) -> None:
    """--masks: the cluttered concept trained at each --mask-floors value (1: no mask), scored per
    budget."""
    import os

    os.chdir(REPO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    budgets = sorted({int(s) for s in args.steps.split(",")})
    floors = [float(f) for f in args.mask_floors.split(",")]
    work, seeds, t0 = Path(args.work_dir), list(range(args.seeds)), time.perf_counter()
    # mask_floor 1 weighs every pixel fully: the same as no mask, while the .mask.png files stay
    # masks (with data.masks=false they would be read as training images)
    files = {
        floor: Q.train_snapshots(
            REPO / Q.CLUTTERED_CONFIG,
            budgets,
            work / f"mask-floor-{floor:g}",
            [f"data.mask_floor={floor}", *args.overrides],
            reuse=args.reuse,
        )
        for floor in floors
    }
    pipe = load_pipeline("data/demo-model")
    pipe.set_progress_bar_config(disable=True)
    probes = Q.cluttered_probes()
    columns = [c for c in COLUMNS if not c.startswith(("mix", "recon size"))]
    rows = []
    for floor in floors:
        for budget in budgets:
            scores = Q.score_embeddings(
                pipe, {"<cluttered-cross>": files[floor][budget]}, probes, seeds
            )
            label = "no mask (floor 1)" if floor == 1 else f"mask, floor {floor:g}"
            rows.append(["cluttered-cross", label, str(budget), *Q.score_cells(scores, columns)])
    print(
        f"trained and scored in {time.perf_counter() - t0:.0f} s ({len(seeds)} seed(s) per prompt)"
    )
    print("\n".join(Q.markdown_table(["concept", "loss", "steps", *columns], rows)))


if __name__ == "__main__":
    main()
