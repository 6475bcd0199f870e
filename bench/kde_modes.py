"""Where the KDE's density has its maxima: on the reference tokens or between them (DESIGN §4)?

    python bench/kde_modes.py            # the demo's word reference and two 49,408-row tables
    python bench/kde_modes.py --smoke    # seconds (CI)

The density of `xti.kde` is ``p(x) ∝ Σ_j exp(-‖x - r_j‖² / 2h²)`` over the reference rows R with h =
scale × the median nearest-neighbour distance (`xti.kde.nearest_neighbour_bandwidth`). Mean shift
(``x ← Σ_j w_j r_j / Σ_j w_j``, ``w_j`` the kernel weights at x) climbs it monotonically to a
stationary point; started from every token of R (or a sample of them) and from the midpoint of each
token and its nearest neighbour, it finds the maxima a vector pulled by the KDE would drift toward.
For each bandwidth scale the table gives the number of distinct maxima found, and the distance of
each maximum to its nearest token in units of h (median and maximum) — 0 means the maxima sit on
the tokens, values near or above 1 mean they lie between them — and how far the token starts moved.

Tables: the demo's 22-word reference (configs/demo.yaml's ``kde.reference`` rows of the demo
model), the tiny SD1 test model's whole 49,408-row table (hidden 32, untrained rows), and a
49,408 × 768 table of the shape and scale of CLIP-L's (Gaussian rows with per-dimension std
0.014; the real one cannot be downloaded here).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xti import quality as Q
from xti.kde import nearest_neighbour_bandwidth

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ModeReport:
    """What mean shift found at one bandwidth scale."""

    scale: float
    h: float
    starts: int
    modes: int
    token_start_median: float  # distance from a token start's maximum to the nearest token, in h
    token_start_max: float
    midpoint_start_median: float
    midpoint_start_max: float
    moved_median: float  # how far token starts moved, in h


@torch.no_grad()
def mean_shift(x: torch.Tensor, rows: torch.Tensor, h: float, iters: int = 200) -> torch.Tensor:
    """Climb the Gaussian KDE of `rows` from every row of `x` (float64) until it stops moving."""
    x = x.double().clone()
    r = rows.double()
    r_sq = r.square().sum(1)
    for _ in range(iters):
        d2 = (x.square().sum(1, keepdim=True) - 2 * x @ r.t() + r_sq).clamp_min(0)
        w = torch.softmax(-d2 / (2 * h * h), dim=1)
        new = w @ r
        step = (new - x).norm(dim=1).max()
        x = new
        if float(step) < 1e-7 * h:
            break
    return x


@torch.no_grad()
def nearest_distance(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    r = rows.double()
    d2 = (x.square().sum(1, keepdim=True) - 2 * x @ r.t() + r.square().sum(1)).clamp_min(0)
    return d2.min(dim=1).values.sqrt()


def modes_report(rows: torch.Tensor, scale: float, sample: int, seed: int = 0) -> ModeReport:
    """Mean shift from `sample` tokens of `rows` and from their nearest-neighbour midpoints."""
    rows = rows.double()
    h = nearest_neighbour_bandwidth(rows.float()) * scale
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(rows), generator=g)[: min(sample, len(rows))]
    starts = rows[picked]
    d2 = torch.cdist(starts, rows).square()
    d2[torch.arange(len(picked)), picked] = float("inf")
    mids = (starts + rows[d2.argmin(1)]) / 2
    from_tokens = mean_shift(starts, rows, h)
    from_mids = mean_shift(mids, rows, h)
    found = torch.cat([from_tokens, from_mids])
    # distinct maxima: closer than 1e-3 h counts as the same
    distinct: list[torch.Tensor] = []
    for m in found:
        if not any(float((m - d).norm()) < 1e-3 * h for d in distinct):
            distinct.append(m)
    t = nearest_distance(from_tokens, rows) / h
    m = nearest_distance(from_mids, rows) / h
    return ModeReport(
        scale, h, len(found), len(distinct),
        float(t.median()), float(t.max()), float(m.median()), float(m.max()),
        float(((from_tokens - starts).norm(dim=1) / h).median()),
    )  # fmt: skip


def demo_reference() -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    from xti.config import load_config
    from xti.kde import reference_row_ids

    tok = CLIPTokenizer.from_pretrained(REPO / "data/demo-model/tokenizer")
    enc = CLIPTextModel.from_pretrained(REPO / "data/demo-model/text_encoder")
    table = enc.get_input_embeddings().weight.detach()
    words = load_config(REPO / Q.DEMO_CONFIGS["striped-cross"]).kde.reference
    return table[reference_row_ids(tok, words, table.shape[0])].float()


def tiny_sd1_table(work: Path) -> torch.Tensor:
    from transformers import CLIPTextModel

    from xti.builtin import build_tiny_sd1

    folder = work / "tiny-sd1"
    if not (folder / "text_encoder").is_dir():
        build_tiny_sd1(folder, seed=0)
    enc = CLIPTextModel.from_pretrained(folder / "text_encoder")
    return enc.get_input_embeddings().weight.detach()[:49406].float()  # without BOS/EOS


def clip_shaped_table(rows: int = 49406, dim: int = 768) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, dim, generator=g) * 0.014


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scales", default="0.25,0.5,1", help="bandwidth scales (× the NN median)")
    ap.add_argument("--sample", type=int, default=64, help="token starts per large table")
    ap.add_argument("--work-dir", default="outputs/bench-kde-modes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="the demo reference only, one scale")
    args = ap.parse_args()
    os.chdir(REPO)
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    scales = [float(s) for s in ("1" if args.smoke else args.scales).split(",")]
    tables = {"demo, 22 words (d 64)": lambda: demo_reference()}
    if not args.smoke:
        tables["tiny SD1, 49,406 rows (d 32)"] = lambda: tiny_sd1_table(Path(args.work_dir))
        tables["CLIP-L-shaped, 49,406 × 768"] = clip_shaped_table
    header = ["table", "h scale", "h", "starts", "distinct maxima", "token start: mode→nearest token / h (median, max)", "midpoint start (median, max)", "token start moved / h"]  # fmt: skip
    rows = []
    t0 = time.perf_counter()
    for name, load in tables.items():
        ref = load()
        for scale in scales:
            r = modes_report(ref, scale, args.sample)
            rows.append([name, f"{scale:g}", f"{r.h:.3g}", str(r.starts), str(r.modes),
                         f"{r.token_start_median:.3f}, {r.token_start_max:.3f}",
                         f"{r.midpoint_start_median:.3f}, {r.midpoint_start_max:.3f}",
                         f"{r.moved_median:.3f}"])  # fmt: skip
            print(f"  {name}, scale {scale:g}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n".join(Q.markdown_table(header, rows)))


if __name__ == "__main__":
    main()
