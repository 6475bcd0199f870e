"""The KDE regulariser's weight λ on the demo model: quality scores and where the vectors go.

    python bench/kde.py                  # λ 0, 0.01, 0.03, 0.1, 1; 50, 150, 300 steps; 8 seeds
    python bench/kde.py --steps 2,4 --weights 0,0.1 --seeds 1 --modes block \\
        --concepts striped-cross --threads 1 --work-dir /tmp/kdetest       # a short run
    python bench/kde.py --smoke          # seconds: the smallest of the above in a temporary folder (CI)

For every concept of --concepts (default: the demo object striped-cross and the demo style
teal-dotted, each with its config in `xti.quality.DEMO_CONFIGS`), every mode of --modes (`block` =
XTI, `shared` = TI) and every λ of --weights it trains once, to the largest of --steps, passing
``kde.weight=λ`` (the configs set the reference rows ``kde.reference``), with an embedding snapshot
at every budget (`xti.quality.train_snapshots`). Each snapshot gets a table row:

  recon all, recon dist   the training captions: shape, colour and background at once, and the RMS
                          pixel distance to the nearest training image (as in bench/quality.py; for
                          the style, "a <teal-dotted> star on a black background" for each of its
                          images' shape and background, `xti.quality.style_probes`);
  edit colour, edit shape the object: "a blue <striped-cross> …", the asked colour and the object's
                          shape kept; the style: a shape it was never shown ("a <teal-dotted> cross
                          …"), the style's colour kept and the asked shape;
  mix both                the object in the layers that decide shape (--mix-layers), the style in
                          the others: the object's shape in the style's colour. The other concept
                          of the pair (--style for objects, --object for styles) is its λ = 0
                          snapshot of the same mode and budget, so a row's mixing score moves with
                          that row's λ only;
  norm ratio              mean L2 norm of the learned vectors over the mean norm of the reference
                          rows R (`xti.kde.KDERegularizer.reference_norm`);
  NN dist / h             mean distance of each vector to its nearest row of R, in bandwidths h;
  moved                   mean L2 distance of the vectors from their initializer's vectors.

Vectors are counted over all layers (in TI mode the layers are equal). Editing at every budget up to
300 steps shows whether a λ stops XTI's editing score from falling as steps grow.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import REPO, add_common_arguments, smoke, start

from xti import quality as Q
from xti.config import load_config
from xti.demo import procedural as P
from xti.embeddings import initializer_vectors
from xti.export import load_embedding_file
from xti.kde import KDERegularizer
from xti.pipelines import load_pipeline

MODES = {"block": "XTI", "shared": "TI"}
COLUMNS = ["recon all", "recon dist", "edit colour", "edit shape", "mix both"]
VECTOR_COLUMNS = {"norm ratio": "norm_ratio", "NN dist / h": "nn_over_h", "moved": "moved"}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--weights", default="0,0.01,0.03,0.1,1", help="comma-separated λ values")
    ap.add_argument("--steps", default="50,150,300", help="comma-separated step budgets")
    ap.add_argument("--modes", default="block,shared", help="granularities to compare")
    ap.add_argument(
        "--concepts",
        default="striped-cross,teal-dotted",
        help="comma-separated concepts (names in xti.demo.procedural.DEMO_CONCEPTS)",
    )
    ap.add_argument("--object", default="striped-cross", help="object mixed with style concepts")
    ap.add_argument("--style", default="teal-dotted", help="style mixed into object concepts")
    add_common_arguments(ap, "outputs/bench-kde")
    args = ap.parse_args()
    smoke(args, steps="2", weights="0,0.1", seeds=1, modes="block", concepts="striped-cross")
    budgets = sorted({int(s) for s in args.steps.split(",")})
    weights = sorted({float(w) for w in args.weights.split(",")})
    modes = args.modes.split(",")
    names = args.concepts.split(",")
    start(ap, args, [*names, args.object, args.style])
    kinds = {name: P.DEMO_CONCEPTS[name]["kind"] for name in Q.DEMO_CONFIGS}
    if kinds[args.object] != "object" or kinds[args.style] != "style":
        ap.error("--object must be an object concept and --style a style concept")
    partner = {name: args.style if kinds[name] == "object" else args.object for name in names}
    work = Path(args.work_dir)
    seeds = list(range(args.seeds))
    t_start = time.perf_counter()

    # every (concept, mode, λ) once, and each mixing partner at λ = 0
    runs = {(name, mode, w) for name in names for mode in modes for w in weights}
    runs |= {(partner[name], mode, 0.0) for name in names for mode in modes}
    files = {}
    for name, mode, w in sorted(runs):
        config = REPO / Q.DEMO_CONFIGS[name]
        files[name, mode, w] = Q.train_snapshots(
            config,
            budgets,
            work / mode / f"kde-{w:g}" / config.stem,
            [f"xti.granularity={mode}", f"kde.weight={w:g}", *args.overrides],
            reuse=args.reuse,
        )
    t_trained = time.perf_counter()

    pipe = load_pipeline("data/demo-model")
    pipe.set_progress_bar_config(disable=True)
    table = pipe.text_encoder.get_input_embeddings()
    concepts = {n: Q.load_concept(f"data/demo-concepts/{n}") for n in {*names, *partner.values()}}
    regularizers: dict[tuple, KDERegularizer] = {}
    rows = []
    n_scored = 0
    t0 = time.perf_counter()
    for name in names:
        cfg = load_config(REPO / Q.DEMO_CONFIGS[name], list(args.overrides))
        reference = cfg.kde.reference
        key = (tuple(reference) if isinstance(reference, list) else reference, cfg.kde.bandwidth)
        if key not in regularizers:
            regularizers[key] = KDERegularizer.from_reference(
                table.weight, pipe.tokenizer, reference, bandwidth=cfg.kde.bandwidth
            )
        kde = regularizers[key]
        initial = initializer_vectors(
            pipe.tokenizer, table, cfg.concept.initializer, cfg.concept.n_vectors
        )
        this, other = concepts[name], concepts[partner[name]]
        if kinds[name] == "object":
            probes = Q.demo_probes(this, other, shape_layers=args.mix_layers)
        else:
            probes = Q.style_probes(this, other, shape_layers=args.mix_layers)
        for mode in modes:
            for w in weights:
                for budget in budgets:
                    file = files[name, mode, w][budget]
                    loaded = {
                        this.subject: file,
                        other.subject: files[partner[name], mode, 0.0][budget],
                    }
                    scores = Q.score_embeddings(pipe, loaded, probes, seeds)
                    stats = Q.vector_stats(load_embedding_file(file).vectors, initial, kde)
                    n_scored += 1
                    rows.append(
                        [
                            name,
                            MODES.get(mode, mode),
                            f"{w:g}",
                            str(budget),
                            *Q.score_cells(scores, COLUMNS),
                            *(Q.format_score(k, stats[k]) for k in VECTOR_COLUMNS.values()),
                        ]
                    )
                    print(f"  scored {name}, {rows[-1][1]}, λ {w:g} at {budget} steps", flush=True)
    t_end = time.perf_counter()
    print(
        f"trained {len(runs)} runs in {t_trained - t_start:.0f} s, scored {n_scored} snapshots in "
        f"{t_end - t0:.0f} s ({len(seeds)} seed(s) per prompt); total {t_end - t_start:.0f} s"
    )
    header = ["concept", "mode", "λ", "steps", *COLUMNS, *VECTOR_COLUMNS]
    print("\n".join(Q.markdown_table(header, rows)))


if __name__ == "__main__":
    main()
