"""``xti batch``: manifests (YAML and CSV, one-line errors), a local batch of the demo concepts with a
broken row, idempotence, the same vectors as `train()` one by one, worker processes, and a Slurm job
array on a local cluster."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xti import batch
from xti.cli import main
from xti.config import load_config
from xti.errors import XTIError

REPO = Path(__file__).parents[1]
DEMO = REPO / "configs" / "demo.yaml"
CONCEPTS = REPO / "data" / "demo-concepts"

# A few cheap steps of the demo config, a one-seed validation grid at the last step.
CHEAP = {
    "train.max_steps": 3,
    "train.batch_size": 2,
    "train.lr_warmup_steps": 0,
    "validation.every": 3,
    "validation.seeds": [0],
    "validation.prompts": [],  # the object templates with each row's placeholder
    "validation.num_inference_steps": 2,
    "validation.mix_with": None,
}
ROWS = [  # the base (configs/demo.yaml) is the striped cross
    {"name": "cross"},
    {"name": "broken", "data.dir": "no/such/folder"},
    {
        "name": "diamond",
        "data.dir": str(CONCEPTS / "giant-dotted-diamond"),
        "concept.placeholder": "<giant-dotted-diamond>",
        "concept.initializer": "diamond",
    },
]


def write_manifest(folder: Path, rows=ROWS, **top) -> Path:
    import yaml

    path = folder / "manifest.yaml"
    data = {"base": str(DEMO), "overrides": CHEAP, "concepts": rows, **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def vectors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def files_and_mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------- manifests


def test_yaml_manifest_resolves_each_row(tmp_path):
    manifest = write_manifest(tmp_path)
    plan = batch.load_manifest(manifest)
    assert [r.name for r in plan.rows] == ["cross", "broken", "diamond"]
    cfg = batch.row_config(plan, plan.rows[2], tmp_path / "out")
    assert cfg.name == "diamond" and cfg.output_dir == str(tmp_path / "out" / "diamond")
    assert cfg.train.resume == "auto" and cfg.train.max_steps == 3
    assert cfg.validation.seeds == [0] and cfg.validation.mix_with is None
    assert (
        cfg.concept.initializer == "diamond" and cfg.concept.placeholder == "<giant-dotted-diamond>"
    )
    assert cfg.kde.weight == 0.01  # from the base, untouched
    # --set applies after the manifest's overrides, --base replaces the manifest's base
    plan = batch.load_manifest(
        manifest, sets=["train.max_steps=7"], base=str(REPO / "configs/tiny.yaml")
    )
    cfg = batch.row_config(plan, plan.rows[0], tmp_path / "out")
    assert (
        cfg.train.max_steps == 7
        and cfg.model.path == load_config(REPO / "configs/tiny.yaml").model.path
    )


def test_csv_manifest_equals_the_yaml_one(tmp_path):
    (tmp_path / "base.yaml").write_text(DEMO.read_text())
    lines = ["# base: base.yaml"] + [f"# override: {k}={json.dumps(v)}" for k, v in CHEAP.items()]
    lines += [
        "name,data.dir,concept.placeholder,concept.initializer",
        "cross,,,",
        "broken,no/such/folder,,",
        f"diamond,{CONCEPTS / 'giant-dotted-diamond'},<giant-dotted-diamond>,diamond",
    ]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    from_csv = batch.load_manifest(tmp_path / "m.csv")
    from_yaml = batch.load_manifest(write_manifest(tmp_path))
    assert from_csv.base == tmp_path / "base.yaml"
    for a, b in zip(from_csv.rows, from_yaml.rows, strict=True):
        assert a.name == b.name
        assert (
            batch.row_config(from_csv, a, tmp_path).model_dump()
            == batch.row_config(from_yaml, b, tmp_path).model_dump()
        )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"concepts": [{"name": "a", "trian.lr": 1}]},
            "concepts row 1 (a): 'trian.lr' is not a config key",
        ),
        (
            {"concepts": [{"name": "a"}, {"name": "b", "train": 1}]},
            "concepts row 2 (b): 'train' is a section",
        ),
        (
            {"concepts": [{"name": "a", "output_dir": "x"}]},
            "row 1 (a): 'output_dir' is set by xti batch",
        ),
        ({"concepts": [{"name": "a"}, {"name": "a"}]}, "rows 1 and 2 share the name 'a'"),
        ({"concepts": [{"data.dir": "x"}]}, "concepts row 1: needs a name"),
        ({"concepts": [{"name": "../a"}]}, "concepts row 1 (../a): name"),
        ({"concepts": []}, "concepts: List should have at least 1 item"),
        ({"concept": []}, "concept: unknown key (a manifest has base, overrides, concepts)"),
        ({"overrides": {"train.lrr": 1}}, "overrides: 'train.lrr' is not a config key"),
        ({"base": "missing.yaml"}, "base config"),
    ],
)
def test_bad_manifests_fail_in_one_line(tmp_path, change, expected):
    manifest = write_manifest(tmp_path, **change)
    with pytest.raises(XTIError) as err:
        batch.load_manifest(manifest)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(manifest) in str(err.value)


def test_bad_csv_and_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("# base: nowhere\nname,train.lrr\na,1\n")
    with pytest.raises(XTIError, match=r"bad.csv: concepts row 1 \(a\): 'train.lrr' is not"):
        batch.load_manifest(bad)
    bad.write_text("# bass: x.yaml\nname\na\n")
    with pytest.raises(XTIError, match="'# base: PATH' or '# override: KEY=VALUE'"):
        batch.load_manifest(bad)
    bad.write_text("data.dir\nx\n")
    with pytest.raises(XTIError, match="one of them 'name'"):
        batch.load_manifest(bad)
    assert main(["batch", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: manifest {tmp_path / 'nope.yaml'} does not exist"
    )
    manifest = write_manifest(tmp_path)
    assert main(["batch", str(manifest), "--out", str(tmp_path), "--set", "train.lrr=1"]) == 2
    assert "--set: 'train.lrr' is not a config key" in capsys.readouterr().err
    assert main(["batch", str(manifest), "--out", str(tmp_path), "--workers", "2", "--slurm"]) == 2
    assert "choose one of --workers, --gpus, --slurm" in capsys.readouterr().err
    assert main(["batch", str(manifest), "--out", str(tmp_path), "--dry-run"]) == 2
    assert "--dry-run goes with --slurm" in capsys.readouterr().err


def test_the_shipped_demo_manifest_resolves(tmp_path):
    path = REPO / "configs" / "batch" / "demo-objects.yaml"
    assert path.read_text().startswith(f"# xti batch configs/batch/{path.name} --out ")
    plan = batch.load_manifest(path)
    assert plan.base == path.parent / "../demo.yaml"
    for row in plan.rows:
        cfg = batch.row_config(plan, row, tmp_path)
        assert cfg.name == row.name and Path(cfg.data.dir).name == row.name
        assert all(cfg.concept.placeholder in p for p in cfg.validation.prompts)


# ------------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The manifest run once by `xti batch` in this process: (manifest, out, exit code, stdout,
    model loads)."""
    import contextlib

    import xti.models

    folder = tmp_path_factory.mktemp("batch")
    manifest = write_manifest(folder)
    out = folder / "out"
    loads = []
    real = xti.models.load_model

    def counting(cfg):
        loads.append(cfg.path)
        return real(cfg)

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr(xti.models, "load_model", counting)
        code = main(["batch", str(manifest), "--out", str(out), "--no-progress"])
    return manifest, out, code, buf.getvalue(), loads


def test_batch_trains_the_good_rows_and_reports_the_broken_one(local_run):
    manifest, out, code, stdout, loads = local_run
    assert code == 1, "a failed row makes the exit status 1"
    assert len(loads) == 1, "the model is loaded once for both concepts"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["cross", "broken", "diamond"]
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    for r in (rows[0], rows[2]):
        name = r["name"]
        assert r["steps"] == "3" and float(r["final_loss"]) > 0 and float(r["seconds"]) > 0
        assert r["file"] == f"{name}/{name}.xti.safetensors" and (out / r["file"]).is_file()
        assert r["grid"].startswith(f"{name}/validation/") and (out / r["grid"]).is_file()
        assert r["error"] == ""
    assert "no/such/folder" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[1]["steps"] == "" and not (out / "broken" / "summary.json").exists()
    md = (out / "results.md").read_text()
    assert (
        md.splitlines()[0]
        == "| name | status | steps | final_loss | seconds | grid | file | error |"
    )
    assert "| broken | failed |" in md and md in stdout


def test_second_invocation_only_prints_the_table(local_run, capsys):
    manifest, out, _, _, _ = local_run
    before = files_and_mtimes(out)
    code = main(["batch", str(manifest), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1
    assert printed == (out / "results.md").read_text(), "nothing but the table"
    assert files_and_mtimes(out) == before, "no file written, none retrained"
    assert main(["batch", str(manifest), "--out", str(out), "--slurm"]) == 1
    assert capsys.readouterr().out.startswith("nothing to submit: every row is done or failed")
    assert files_and_mtimes(out) == before


def test_batch_vectors_equal_train_one_by_one(local_run, tmp_path):
    from xti.training import train

    manifest, out, _, _, _ = local_run
    plan = batch.load_manifest(manifest)
    for row in (plan.rows[0], plan.rows[2]):
        cfg = batch.row_config(plan, row, tmp_path)  # the same config, another folder
        result = train(cfg, progress=False)
        alone = vectors(result.output_file)
        batched = vectors(out / row.name / f"{row.name}.xti.safetensors")
        assert alone.keys() == batched.keys()
        assert all(torch.equal(alone[k], batched[k]) for k in alone), row.name


def test_an_interrupted_row_resumes_and_a_fixed_row_is_retried(local_run, tmp_path):
    from xti.training import train

    manifest, ref, _, _, _ = local_run
    plan = batch.load_manifest(manifest, sets=["train.checkpoint_every=1"])
    out = tmp_path / "out"
    cfg = batch.row_config(plan, plan.rows[0], out)
    train(cfg, progress=False, stop_at_step=2)  # as if preempted after step 2
    opts = batch.BatchOptions(manifest, out, sets=["train.checkpoint_every=1"])
    assert [r.status for r in batch.gather(plan, out)] == ["pending"] * 3
    results = batch.run_batch(plan, opts, indices=[0, 1], say=lambda *_: None)
    assert [r.status for r in results] == ["done", "failed"]
    summary = json.loads((out / "cross" / "summary.json").read_text())
    assert summary["steps"] == 3
    cross = "cross/cross.xti.safetensors"
    a, b = vectors(out / cross), vectors(ref / cross)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed = uninterrupted"
    # the broken row stays failed until its row changes or --retry-failed
    assert batch.pending_indices(plan, out) == [2]
    assert batch.pending_indices(plan, out, retry_failed=True) == [1, 2]


def test_workers_split_the_rows_and_give_the_same_files(local_run, tmp_path, capsys):
    """``--gpus 0,1``: one worker process per GPU (on this CPU machine CUDA_VISIBLE_DEVICES changes
    nothing else; ``--workers 2`` is the same split without it)."""
    _, ref, _, _, _ = local_run
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, rows=[ROWS[0], ROWS[2]])  # a good row for each worker
    assert main(["batch", str(manifest), "--out", str(out), "--gpus", "0,1", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "GPU 0: rows cross\n" in said and "GPU 1: rows diamond\n" in said
    assert [r["status"] for r in csv.DictReader((out / "results.csv").open())] == ["done"] * 2
    for name in ("cross", "diamond"):
        a = vectors(out / name / f"{name}.xti.safetensors")
        b = vectors(ref / name / f"{name}.xti.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_slurm_dry_run_writes_an_array_of_the_unfinished_rows(local_run, tmp_path, capsys):
    manifest, _, _, _, _ = local_run
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--out", str(out), "--slurm", "--dry-run"]
    assert main([*args, "--sbatch-option=--gres=gpu:1"]) == 0
    script = (out / "slurm" / "array.sbatch").read_text()
    assert "#SBATCH --array=0,1,2\n" in script and "#SBATCH --gres=gpu:1\n" in script
    assert '--only-index "$SLURM_ARRAY_TASK_ID"' in script and "--signal=B:TERM@" in script
    assert "--table" in (out / "slurm" / "table.sbatch").read_text()
    assert "submit with: sbatch" in capsys.readouterr().out


def _table_without_time(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(path.open())]


@pytest.mark.cluster
@pytest.mark.slow  # four processes (three array tasks and the table job) on a local cluster
def test_slurm_job_array_gives_the_same_files_as_the_local_run(
    local_run, slurm_cluster, tmp_path, monkeypatch, capsys
):
    import re

    manifest, ref, _, _, _ = local_run
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    assert main(["batch", str(manifest), "--out", str(out), "--slurm", "--no-progress"]) == 0
    found = re.search(r"job array (\d+) \(3 rows\) and table job (\d+)", capsys.readouterr().out)
    assert found, "xti batch --slurm names the jobs it submitted"
    array_id, table_id = found.groups()
    table_state = slurm_cluster.wait(table_id, timeout=600)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((out / "slurm").glob("*.out")))
    # the broken row's task and the table job (a row failed) exit 1; the others complete
    assert slurm_cluster.wait(array_id) == {
        f"{array_id}_0": "COMPLETED", f"{array_id}_1": "FAILED", f"{array_id}_2": "COMPLETED"
    }, logs  # fmt: skip
    assert table_state == {table_id: "FAILED"}, logs
    assert _table_without_time(out / "results.csv") == _table_without_time(ref / "results.csv")
    for name in ("cross", "diamond"):
        listed = sorted(str(p.relative_to(out / name)) for p in (out / name).rglob("*"))
        assert listed == sorted(str(p.relative_to(ref / name)) for p in (ref / name).rglob("*"))
        a = vectors(out / name / f"{name}.xti.safetensors")
        b = vectors(ref / name / f"{name}.xti.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "slurm" / f"table-{table_id}.out").read_text() == (out / "results.md").read_text()


def test_a_bad_value_is_its_rows_line_of_the_table(tmp_path, capsys):
    rows = [{"name": "ok"}, {"name": "bad", "train.lr": -1}]
    manifest = write_manifest(tmp_path, rows=rows)
    out = tmp_path / "out"
    assert main(["batch", str(manifest), "--out", str(out), "--table"]) == 1
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["name"], r["status"]) for r in table] == [("ok", "pending"), ("bad", "failed")]
    error = table[1]["error"]
    assert (
        f"{manifest} row 2 (bad): " in error and "train.lr: Input should be greater than 0" in error
    )
    assert "| bad | failed |" in capsys.readouterr().out


def test_worker_devices_and_row_indices():
    assert batch.worker_devices(None, "0, 1") == ["0", "1"]
    assert batch.worker_devices(3, None) == [None] * 3
    with pytest.raises(XTIError, match="--workers must be >= 1"):
        batch.worker_devices(0, None)
    with pytest.raises(XTIError, match="--gpus: expected GPU numbers"):
        batch.worker_devices(None, ",")
    assert batch.parse_index_list("2", 3) == [2] and batch.parse_index_list("0,2", 3) == [0, 2]
    with pytest.raises(XTIError, match="rows are numbered 0 to 2, got '3'"):
        batch.parse_index_list("3", 3)
    with pytest.raises(XTIError, match="expected row numbers"):
        batch.parse_index_list("a", 3)
