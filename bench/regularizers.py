"""Regularisers compared on concepts the demo model cannot draw (issue 21): which keeps edits?

    python bench/regularizers.py                          # the grid of README "What the regulariser does"
    python bench/regularizers.py --settings off,kde --modes block --seeds 0 --steps 2,4 \\
        --concepts red-ring --samples 2 --work-dir /tmp/regtest        # a short run
    python bench/regularizers.py --smoke                  # seconds (CI)
    for i in 1 2 3; do python bench/regularizers.py --worker --threads 1 & done   # in parallel,
    python bench/regularizers.py --table-only --out results.md                  # then the tables

For every concept of --concepts, mode of --modes (`block` = XTI, `shared` = TI), regulariser
setting of --settings (`SETTINGS`) and training seed of --seeds it trains once, to the largest of
--steps, with an embedding snapshot at every budget (`xti.quality.train_snapshots`), and scores each
snapshot with --samples images per prompt. Every cell (concept, mode, setting, seed) keeps its
scores in ``<work-dir>/<concept>/<mode>/<setting>/seed<k>/scores.json``: a rerun skips the cells
already done, so a crashed grid resumes where it stopped.

Concepts: the novel shapes of `xti.demo.novel` (ring, heart, hourglass: the demo model never drew
them, so the learned vectors must carry the shape) and `striped-cross` (cross and stripes were both
drawn in pretraining). Scores, each a hit rate over the prompts' images:

  recon       "a <c> on a white/gray background": the concept's colour and that background
              (`xti.demo.novel.score_novel`; for striped-cross shape too, `xti.quality`);
  recon IoU   the same images: mean silhouette IoU with the concept's shape (the demo model
              cannot draw a ring's hole or a heart's notch: a degree, not a hit);
  colour edit "a green/purple <c> on a white background": the asked colour;
  edit IoU    the same images: mean silhouette IoU with the concept's shape (the shape kept);
  bg edit     "a <c> on a black background" (never a training background): its colour on black;
  mix         the concept in the layers that decide shape, the shipped teal-dotted style in the
              others: teal.

The tables give, per setting and mode, the mean over seeds ± the spread (max − min over seeds) of the
per-seed mean over the novel concepts, and the worst seed's value.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import REPO, add_common_arguments, smoke, start

from xti import quality as Q
from xti.demo import novel as N
from xti.paths import atomic_write_bytes
from xti.pipelines import load_pipeline

MODES = {"block": "XTI", "shared": "TI"}
SETTINGS: dict[str, list[str]] = {
    "off": ["regularizer.kind=none"],
    "kde": [],  # the shipped default before issue 21: kde.weight 0.01, h = NN median
    "kde h×0.5": ["kde.bandwidth_scale=0.5"],
    "kde fine only": ["kde.layer_weights={coarse: 0}"],
    "norm 0.1": ["regularizer.kind=norm", "regularizer.norm.weight=0.1"],
    "init 0.1": ["regularizer.kind=init_pull", "regularizer.init_pull.weight=0.1"],
}
"""Setting name -> config overrides (on top of configs/demo.yaml)."""
INITIALIZERS = {"ring": "circle", "heart": "circle", "hourglass": "triangle"}
METRICS = ("recon", "recon IoU", "colour edit", "edit IoU", "bg edit", "mix")
STYLE = "<teal-dotted>"
STYLE_FILE = "data/demo-concepts/teal-dotted.xti.safetensors"


def cell_dir(work: Path, concept: str, mode: str, setting: str, seed: int) -> Path:
    safe = setting.replace(" ", "_").replace("×", "x")
    return work / concept / mode / safe / f"seed{seed}"


def concept_overrides(name: str, work: Path) -> list[str]:
    """Overrides that make configs/demo.yaml train `name` (a novel concept's folder is written)."""
    if name == "striped-cross":
        return []
    data = N.write_concept(name, work / "data")
    shape = str(N.NOVEL_CONCEPTS[name]["shape"])
    return [
        f"name={name}",
        f"data.dir={data}",
        f"concept.placeholder=<{name}>",
        f"concept.initializer={INITIALIZERS[shape]}",
    ]


def score_cell(pipe, name: str, file: Path, samples: list[int], mix_layers: str) -> dict:
    """`METRICS` of one snapshot (None where a metric does not apply)."""
    embeddings = {f"<{name}>": file, STYLE: REPO / STYLE_FILE}
    if name == "striped-cross":
        obj = Q.load_concept("data/demo-concepts/striped-cross")
        style = Q.load_concept("data/demo-concepts/teal-dotted")
        s = Q.score_embeddings(
            pipe, embeddings, Q.demo_probes(obj, style, shape_layers=mix_layers), samples
        )
        return {
            "recon": s["reconstruction.all"],
            "recon IoU": None,
            "colour edit": s["editability.colour"],
            "edit IoU": None,
            "bg edit": None,
            "mix": s["mixing.all"],
        }
    from xti.inference import XTIAdapter

    shape = str(N.NOVEL_CONCEPTS[name]["shape"])
    pooled: dict[str, list[dict[str, float]]] = {}
    with XTIAdapter(pipe) as adapter:
        for subject, path in embeddings.items():
            adapter.load(path, subject)
        sample = Q.adapter_sampler(adapter, samples)
        for probe in N.novel_probes(name, STYLE, shape_layers=mix_layers):
            qp = Q.Probe(probe.kind, probe.prompt, {}, mix=probe.mix)
            pooled.setdefault(probe.kind, []).append(N.score_novel(sample(qp), probe, shape))

    def mean(kind: str, key: str) -> float:
        return float(np.mean([p[key] for p in pooled[kind]]))

    return {
        "recon": mean("reconstruction", "all"),
        "recon IoU": mean("reconstruction", "iou"),
        "colour edit": mean("colour_edit", "colour"),
        "edit IoU": mean("colour_edit", "iou"),
        "bg edit": mean("background_edit", "all"),
        "mix": mean("mixing", "colour"),
    }


def claim(work: Path, cell: tuple[str, str, str, int]) -> bool:
    """Claim a cell for this process (True), or find it claimed by another `--worker` (False)."""
    folder = cell_dir(work, *cell)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / "claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def run_cell(args, pipe, work: Path, cell: tuple[str, str, str, int], budgets: list[int]) -> dict:
    """Train and score one cell, or read its cached scores."""
    name, mode, setting, seed = cell
    folder = cell_dir(work, *cell)
    cache = folder / "scores.json"
    if cache.is_file():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    t0 = time.perf_counter()
    overrides = [
        *concept_overrides(name, work),
        f"xti.granularity={mode}",
        f"train.seed={seed}",
        *SETTINGS[setting],
        *args.overrides,
    ]
    files = Q.train_snapshots(REPO / "configs/demo.yaml", budgets, folder / "run", overrides)
    scores = {
        b: score_cell(pipe, name, files[b], args.samples_list, args.mix_layers) for b in budgets
    }
    atomic_write_bytes(cache, json.dumps(scores, indent=1).encode())
    print(f"  cell {cell} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return scores


PICTURE_PROMPTS = ("a {c} on a white background", "a green {c} on a white background",
                   "a {c} on a black background")  # fmt: skip


def edit_picture(pipe, name: str, rows: dict[str, dict[int, Path]], zoom: int = 3):
    """A grid of samples (seed 0): one row per label of `rows` (its snapshot per budget), for every
    budget the `PICTURE_PROMPTS` side by side, a header line of budgets and a label per row."""
    from PIL import Image, ImageDraw

    from xti.inference import XTIAdapter

    tiles = []
    for files in rows.values():
        line = []
        for budget in sorted(files):
            with XTIAdapter(pipe) as adapter:
                adapter.load(files[budget], f"<{name}>")
                sample = Q.adapter_sampler(adapter, [0])
                for prompt in PICTURE_PROMPTS:
                    line.append(sample(Q.Probe("picture", prompt.format(c=f"<{name}>"), {}))[0])
            line.append(np.full_like(line[-1], 255)[:, :4])  # a gap between budgets
        tiles.append(np.concatenate(line[:-1], axis=1))
    grid = Image.fromarray(np.concatenate(tiles, axis=0))
    grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
    label_w, head_h = 120, 16
    canvas = Image.new("RGB", (grid.width + label_w, grid.height + head_h), "white")
    canvas.paste(grid, (label_w, head_h))
    draw = ImageDraw.Draw(canvas)
    block = (3 * 32 + 4) * zoom
    for i, budget in enumerate(sorted(next(iter(rows.values())))):
        draw.text(
            (label_w + i * block + 4, 2), f"{budget} steps: plain, green, black bg", fill="black"
        )
    for i, label in enumerate(rows):
        draw.text((4, head_h + i * 32 * zoom + 40), label, fill="black")
    return canvas


def aggregate(values: list[float]) -> str:
    """``mean ± spread (worst)`` in percent over seeds."""
    v = 100 * np.asarray(values)
    return f"{v.mean():.0f} ± {v.max() - v.min():.0f} ({v.min():.0f})"


def tables(results: dict, novel: list[str], others: list[str], budgets, settings, modes, seeds):
    """Markdown lines: per budget, one row per (setting, mode) over the novel concepts, then the
    drawable concepts' rows. A row counts the seeds whose cells are done for every concept of its
    group (fewer than all: the count is named)."""
    lines = []
    groups = [("concepts the model cannot draw: " + ", ".join(novel), novel)] if novel else []
    groups += [(f"a concept it can draw: {o}", [o]) for o in others]
    for title, names in groups:
        for b in budgets:
            lines += ["", f"**{title} — {b} steps** (mean ± spread over seeds (worst seed), %)", ""]
            rows = []
            for setting in settings:
                for mode in modes:
                    done = [
                        s for s in seeds if all((n, mode, setting, s) in results for n in names)
                    ]
                    if not done:
                        continue
                    label = setting if len(done) == len(seeds) else f"{setting} [{len(done)} seed]"
                    cells = [label, MODES.get(mode, mode)]
                    for metric in METRICS:
                        per_seed = []
                        for seed in done:
                            vals = [results[n, mode, setting, seed][b][metric] for n in names]
                            if any(v is None for v in vals):
                                break
                            per_seed.append(float(np.mean(vals)))
                        cells.append(aggregate(per_seed) if per_seed else "—")
                    rows.append(cells)
            lines += Q.markdown_table(["setting", "mode", *METRICS], rows)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated SETTINGS")
    ap.add_argument("--steps", default="50,150,300", help="comma-separated step budgets")
    ap.add_argument("--modes", default="block,shared", help="granularities to compare")
    ap.add_argument(
        "--ti-settings", default="off,kde", help="the settings also trained as TI (shared)"
    )
    ap.add_argument("--concepts", default="orange-hourglass,blue-heart,red-ring,striped-cross")
    ap.add_argument("--train-seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--samples", type=int, default=4, help="images per prompt")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    ap.add_argument(
        "--worker",
        action="store_true",
        help="share --work-dir with other --worker processes: take only cells nobody has claimed "
        "(a `claim` file in the cell's folder), write no tables; a last run without --worker "
        "trains what is left (claimed or not) and writes the tables",
    )
    ap.add_argument(
        "--ti-seeds", default=None, help="training seeds of the TI cells (default: --train-seeds)"
    )
    ap.add_argument("--picture", default=None, help="write the edit grid of the first concept")
    ap.add_argument(
        "--picture-setting", default="kde", help="comma-separated settings the picture compares"
    )
    ap.add_argument(
        "--table-only", action="store_true", help="only the cells already done: write the tables"
    )
    add_common_arguments(ap, "outputs/bench-regularizers")
    args = ap.parse_args()
    smoke(args, steps="2", settings="off,kde", train_seeds="0", modes="block",
          concepts="red-ring", samples=1)  # fmt: skip
    start(ap, args, [])
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; settings are {', '.join(SETTINGS)}")
    budgets = sorted({int(s) for s in args.steps.split(",")})
    modes, names = args.modes.split(","), args.concepts.split(",")
    seeds = [int(s) for s in args.train_seeds.split(",")]
    args.samples_list = list(range(args.samples))
    work = Path(args.work_dir)
    pipe = load_pipeline("data/demo-model")
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    ti_seeds = seeds if args.ti_seeds is None else [int(x) for x in args.ti_seeds.split(",")]
    # concepts outermost: a grid cut short still has every seed of its first concepts
    cells = [
        (name, mode, setting, seed)
        for name in names
        for seed in seeds
        for setting in settings
        for mode in modes
        if mode == "block" or (setting in args.ti_settings.split(",") and seed in ti_seeds)
    ]
    results = {}
    for cell in cells:
        done = (cell_dir(work, *cell) / "scores.json").is_file()
        if (args.table_only and not done) or (args.worker and not done and not claim(work, cell)):
            continue
        results[cell] = run_cell(args, pipe, work, cell, budgets)
    if args.worker:
        print(f"worker: {len(results)} cells done or read back")
        return
    novel = [n for n in names if n in N.NOVEL_CONCEPTS]
    if args.picture:
        picture_rows = {}
        for mode in ("block", "shared"):
            for setting in dict.fromkeys(("off", *args.picture_setting.split(","))):
                cell = (names[0], mode, setting, seeds[0])
                run_cell(args, pipe, work, cell, budgets)  # cached, or trained now
                run = cell_dir(work, *cell) / "run" / "snapshots"
                files = {b: run / f"{names[0]}-step{b:06d}.xti.safetensors" for b in budgets}
                picture_rows[f"{MODES[mode]}, {setting}"] = files
        edit_picture(pipe, names[0], picture_rows).save(args.picture)
        print(f"wrote {args.picture}")
    done = {c[0] for c in results}
    others = [n for n in names if n not in N.NOVEL_CONCEPTS and n in done]
    lines = tables(
        results, [n for n in novel if n in done], others, budgets, settings, modes, seeds
    )
    print(f"{len(results)} cells in {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    if args.out:
        atomic_write_bytes(Path(args.out), ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
