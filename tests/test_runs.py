"""A run can be trusted: owned output folder, run identity on resume, no pickle, no silent failure.

One test per behaviour of issue 11, on the tiny model (few steps, 32-pixel images).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_training import make_cfg
from xti import runs
from xti.cli import main
from xti.errors import XTIError
from xti.export import build_metadata, load_embedding_file, save_embedding_file
from xti.models import load_model
from xti.training import train

REPO = Path(__file__).parents[1]
DATA = REPO / "data" / "tiny-concept"


def cli(model: Path, out: Path, *overrides: str, data: Path = DATA) -> int:
    return main(
        ["train", "--no-progress", f"model.path={model}", f"data.dir={data}", f"output_dir={out}",
         "concept.placeholder=<box>", "concept.initializer=box", "train.resolution=32",
         "train.max_steps=1", "tracking.report_to=none", "kde.bandwidth=0.5", *overrides]
    )  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def ckpt_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- (1) stale checkpoints


def test_stale_folder_ends_with_this_runs_own_result(tiny_model, tmp_path):
    out = tmp_path / "x"
    a = train(make_cfg(tiny_model, out, "train.checkpoint_every=2"), progress=False)
    a_file = out / "box.xti.safetensors"
    a_vectors = load_file(str(a_file))
    b_opts = ("train.seed=4", "train.checkpoint_every=1", "train.checkpoints_total_limit=2")
    with pytest.raises(XTIError, match="train.overwrite=true"):
        train(make_cfg(tiny_model, out, *b_opts), progress=False)

    b_straight = train(make_cfg(tiny_model, tmp_path / "b", *b_opts), progress=False)
    train(
        make_cfg(tiny_model, out, *b_opts, "train.overwrite=true"), progress=False, stop_at_step=3
    )
    # B's own checkpoints survive pruning (by step, B's only); A's step 4 is not B's and stays
    assert ckpt_names(out) == ["step-000002", "step-000003", "step-000004"]
    owner = runs.read_owner(out)["run_id"]
    kept = {c.step for c in runs.run_checkpoints(out / "checkpoints", owner)}
    assert kept == {2, 3}
    assert runs.latest_checkpoint(out / "checkpoints", owner).name == "step-000003"

    b = train(make_cfg(tiny_model, out, *b_opts, "train.resume=latest"), progress=False)
    assert [s for s, _ in b.losses] == [4], "resumed B's step 3, not A's step 4"
    assert torch.equal(b.vectors, b_straight.vectors)
    assert not torch.equal(b.vectors, a.vectors)
    final = load_file(str(a_file))
    assert torch.equal(final["IN01"], b_straight.vectors[0])
    assert not torch.equal(final["IN01"], a_vectors["IN01"])
    assert json.loads((out / "summary.json").read_text())["run_id"] == owner


# ----------------------------------------------------------------------------- (2) run identity


@pytest.fixture(scope="module")
def checkpointed(tiny_model, tmp_path_factory) -> Path:
    """An output folder whose run stopped after a checkpoint at step 1."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(make_cfg(tiny_model, out, "train.checkpoint_every=1"), progress=False, stop_at_step=1)
    return out


def other_weights(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model with the same shapes and slightly different UNet weights."""
    copy = tmp_path / "other-model"
    shutil.copytree(tiny_model, copy)
    file = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(file))
    weights["conv_in.weight"] = weights["conv_in.weight"] + 1e-3
    save_file(weights, str(file))
    return copy


def v_prediction(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model, same weights, with a v-prediction scheduler config (as builtin:tiny-sd1-v)."""
    copy = tmp_path / "v-model"
    shutil.copytree(tiny_model, copy)
    file = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    return copy


MISMATCHES = {
    "seed": (["train.seed=4"], "train.seed: 3 → 4"),
    "lr": (["train.lr=0.02"], "train.lr: 0.01 → 0.02"),
    "placeholder": (["concept.placeholder=<crate>"], "concept.placeholder: <box> → <crate>"),
    "batch": (["train.batch_size=1"], "effective batch"),
    "model of the same shape": (other_weights, "model.weights"),
    "scheduler of the same weights": (
        v_prediction,
        "scheduler.prediction_type: epsilon → v_prediction",
    ),
    "kde weight": (["kde.weight=0.5"], "kde.weight: 0.01 → 0.5"),
    "kde bandwidth": (["kde.bandwidth=0.3"], "kde.bandwidth: None → 0.3"),
    "snr gamma": (["train.snr_gamma=5"], "train.snr_gamma: None → 5.0"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatched_resume_is_refused_and_names_the_field(case, checkpointed, tiny_model, tmp_path):
    change, expected = MISMATCHES[case]
    overrides = (
        change if isinstance(change, list) else [f"model.path={change(tiny_model, tmp_path)}"]
    )
    before = {p: p.stat().st_mtime_ns for p in checkpointed.rglob("*")}
    with pytest.raises(XTIError) as err:
        train(make_cfg(tiny_model, checkpointed, "train.resume=latest", *overrides), progress=False)
    msg = str(err.value)
    assert expected in msg and "train.resume_force=true" in msg and "\n" not in msg, msg
    assert {p: p.stat().st_mtime_ns for p in checkpointed.rglob("*")} == before, "nothing written"


def test_forced_resume_continues_and_logs_the_difference(
    checkpointed, tiny_model, tmp_path, caplog
):
    out = tmp_path / "forced"
    shutil.copytree(checkpointed, out)
    with caplog.at_level(logging.WARNING, logger="xti"):
        result = train(
            make_cfg(tiny_model, out, "train.resume=latest", "train.lr=0.02", "kde.weight=0.5", "train.resume_force=true"),
            progress=False,
        )  # fmt: skip
    assert [s for s, _ in result.losses] == [2, 3, 4]
    logged = [r.getMessage() for r in caplog.records if "train.resume_force" in r.getMessage()]
    assert len(logged) == 1
    assert "train.lr: 0.01 → 0.02" in logged[0] and "kde.weight: 0.01 → 0.5" in logged[0]


def test_model_identity_tells_same_shaped_models_apart(tiny_model, tmp_path):
    a = runs.model_identity(load_model(make_cfg(tiny_model, tmp_path).model))
    again = runs.model_identity(load_model(make_cfg(tiny_model, tmp_path).model))
    other = runs.model_identity(
        load_model(make_cfg(other_weights(tiny_model, tmp_path), tmp_path).model)
    )
    assert a == again
    assert a["model.weights"] != other["model.weights"]
    assert a["model.vocab_size"] == other["model.vocab_size"] == {"text": 49408}


# ----------------------------------------------------------------------------- (3) no pickle


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_payload_in_a_checkpoint_is_not_executed(checkpointed, tiny_model, tmp_path):
    out = tmp_path / "planted"
    shutil.copytree(checkpointed, out)
    ckpt = out / "checkpoints" / "step-000001"
    # the payload works: unpickling it creates its marker file
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                 "scaler.pt", "pytorch_model.bin"):  # fmt: skip
        (ckpt / name).write_bytes(payload)
    torch.save({"x": _Payload(marker)}, ckpt / "model.pt")

    result = train(make_cfg(tiny_model, out, "train.resume=latest"), progress=False)
    assert [s for s, _ in result.losses] == [2, 3, 4]
    assert not marker.exists(), "a pickle in the checkpoint folder was unpickled"
    # and a checkpoint folder holding nothing but pickles (an accelerate checkpoint) is refused
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "custom_checkpoint_0.pkl").write_bytes(payload)
    (legacy / "xti_state.json").write_text(json.dumps({"step": 1, "shape": {}}))
    with pytest.raises(XTIError, match="never loads"):
        train(make_cfg(tiny_model, tmp_path / "o", f"train.resume={legacy}"), progress=False)
    assert not marker.exists()


def test_checkpoint_holds_only_safetensors_and_json(checkpointed):
    ckpt = checkpointed / "checkpoints" / "step-000001"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer.safetensors", "vectors.safetensors", "xti_state.json"]  # fmt: skip
    state = json.loads((ckpt / "xti_state.json").read_text())
    assert state["step"] == 1 and state["fingerprint"]["train.seed"] == 3
    assert state["run_id"] == runs.read_owner(checkpointed)["run_id"]
    assert set(load_file(str(ckpt / "optimizer.safetensors"))) == {
        "0.exp_avg", "0.exp_avg_sq", "0.step"}  # fmt: skip


@pytest.mark.parametrize("damage", ["no vectors", "corrupt state"])
def test_damaged_latest_checkpoint_is_one_line(damage, checkpointed, tiny_model, tmp_path, capsys):
    # (7) these ended in a traceback from accelerate's loader
    out = tmp_path / "damaged"
    shutil.copytree(checkpointed, out)
    ckpt = out / "checkpoints" / "step-000001"
    if damage == "no vectors":
        (ckpt / "vectors.safetensors").unlink()
        expected = "lacks vectors.safetensors"
    else:
        (ckpt / "xti_state.json").write_text('{"step": 1, "run')
        expected = "xti_state.json: checkpoint state is unreadable"
    assert cli(tiny_model, out, "train.resume=latest") == 2
    assert expected in one_error_line(capsys)


# ----------------------------------------------------------------------------- (4) ownership


def test_second_run_into_a_finished_folder_is_refused_and_changes_nothing(
    tiny_model, tmp_path, capsys
):
    out = tmp_path / "out"
    assert cli(tiny_model, out) == 0
    capsys.readouterr()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli(tiny_model, out, "train.seed=7") == 2
    line = one_error_line(capsys)
    assert str(out) in line and "train.overwrite=true" in line and "box.xti.safetensors" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert cli(tiny_model, out, "train.seed=7", "train.overwrite=true") == 0


def test_model_card_never_replaces_a_readme_it_did_not_write(tiny_model, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    train(make_cfg(tiny_model, out, "train.max_steps=1"), progress=False)
    assert (out / "README.md").read_text() == "# my project\n"
    assert "box.xti.safetensors" in (out / "MODEL_CARD.md").read_text()
    # its own card is replaced by the next run's
    own = tmp_path / "own"
    train(make_cfg(tiny_model, own, "train.max_steps=1"), progress=False)
    train(make_cfg(tiny_model, own, "train.max_steps=2", "train.overwrite=true"), progress=False)
    assert "| steps | 2 |" in (own / "README.md").read_text()
    assert not (own / "MODEL_CARD.md").exists()


def test_a_folder_in_use_is_refused_at_once_naming_the_other_process(tiny_model, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    lock = runs.OutputLock(out)
    lock.acquire({"run_id": "f" * 32, "pid": 4242, "host": "node7", "started": "earlier"})
    try:
        with pytest.raises(XTIError, match="in use by xti run ffffffff \\(pid 4242 on node7"):
            train(make_cfg(tiny_model, out), bundle=None, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".xti.lock"]
    finally:
        lock.release()
    assert not (out / ".xti.lock").exists()
    train(make_cfg(tiny_model, out, "train.max_steps=1"), progress=False)
    assert not (out / ".xti.lock").exists(), "the lock is released when the run ends"


def test_stale_tmp_files_of_killed_writes_are_removed_at_the_next_run(tiny_model, tmp_path):
    out = tmp_path / "killed"
    (out / "checkpoints" / "step-000009.tmp").mkdir(parents=True)
    (out / "checkpoints" / "step-000009.tmp" / "vectors.safetensors").write_bytes(b"half")
    (out / ".box.xti.safetensors.0123456789ab.tmp").write_bytes(b"half")
    (out / "snapshots").mkdir()
    (out / "snapshots" / ".box-step000002.xti.safetensors.a1b2c3d4e5f6.tmp").write_bytes(b"half")
    (out / "notes.tmp").write_text("the user's own file")
    # `auto` with no checkpoint of a run yet starts a new one
    result = train(
        make_cfg(tiny_model, out, "train.max_steps=1", "train.resume=auto"), progress=False
    )
    assert [s for s, _ in result.losses] == [1]
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert not [name for name in left if name.endswith(".tmp") and name != "notes.tmp"], left
    assert (out / "notes.tmp").read_text() == "the user's own file"


# ----------------------------------------------------------------------------- (5) token room


def captioned(tmp_path: Path, caption: str) -> Path:
    folder = tmp_path / "captioned"
    folder.mkdir()
    for name in ("0.png", "1.png"):
        shutil.copy(next(DATA.glob("*.png")), folder / name)
    lines = [{"file_name": "0.png", "text": caption}, {"file_name": "1.png", "text": "a <box>"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return folder


def test_placeholder_past_the_token_limit_is_an_error_naming_the_image(
    tiny_model, tmp_path, capsys
):
    data = captioned(tmp_path, "a photo " * 40 + "of a <box>")
    out = tmp_path / "out"
    assert cli(tiny_model, out, data=data) == 2
    line = one_error_line(capsys)
    assert "0.png" in line and "<box>" in line and "cut off" in line
    assert not out.exists()


def test_words_cut_after_the_placeholder_only_warn(tiny_model, tmp_path, caplog):
    data = captioned(tmp_path, "a <box> " + "on a table " * 30)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert cli(tiny_model, out, data=data) == 0
    assert any("0.png" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_n_vectors_is_checked_against_the_room_left_in_77_tokens(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(tiny_model, out, "concept.n_vectors=100") == 2
    assert "concept.n_vectors" in one_error_line(capsys)
    # 75 vectors plus the words of a template do not fit: the message says how many would
    assert cli(tiny_model, out, "concept.n_vectors=75") == 2
    line = one_error_line(capsys)
    assert "data.template=object" in line and "concept.n_vectors<=" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- (6) non-finite


def test_non_finite_loss_stops_the_run_and_keeps_the_finished_embedding(tiny_model, tmp_path):
    out = tmp_path / "out"
    train(make_cfg(tiny_model, out, "train.max_steps=1"), progress=False)
    before = (out / "box.xti.safetensors").read_bytes()

    cfg = make_cfg(tiny_model, out, "train.overwrite=true", "train.checkpoint_every=1")
    bundle = load_model(cfg.model)
    calls = []

    def poison(module, args, output):  # the UNet goes NaN from step 3 on
        calls.append(1)
        return type(output)(sample=output.sample * float("nan")) if len(calls) >= 3 else output

    bundle.unet.register_forward_hook(poison)
    with pytest.raises(XTIError) as err:
        train(cfg, bundle=bundle, progress=False)
    msg = str(err.value)
    assert msg.startswith("step 3: non-finite values (loss nan")
    assert "last finite loss" in msg and "at step 2" in msg and "step-000002" in msg
    assert (out / "box.xti.safetensors").read_bytes() == before
    assert not (out / "box.interrupted.xti.safetensors").exists()
    assert not (out / ".xti.lock").exists()


def test_non_finite_inputs_are_refused(tiny_model, tmp_path, capsys):
    assert cli(tiny_model, tmp_path / "out", "train.lr=.inf") == 2
    assert "train.lr" in one_error_line(capsys)
    meta = build_metadata(layers=["A", "B"], granularity="block", placeholder="<n>", initializer="x",
                          n_vectors=1, family="sd1", base_model="m", text_dims={"text": 4}, steps=1,
                          kde_weight=0.0)  # fmt: skip
    bad = save_embedding_file(
        tmp_path / "nan.xti.safetensors",
        {"A": torch.zeros(1, 4), "B": torch.tensor([[0.0, float("nan"), 0.0, 0.0]])},
        meta,
    )
    with pytest.raises(XTIError, match="B holds non-finite values"):
        load_embedding_file(bad)
    args = ["generate", "--model", str(tiny_model), "--prompt", "a <n>", "--no-progress"]
    assert main([*args, "--guidance", "nan", "--out-dir", str(tmp_path / "g")]) == 2
    assert "--guidance" in one_error_line(capsys)
    assert main([*args, "-e", str(bad), "--out-dir", str(tmp_path / "g")]) == 2
    assert "non-finite" in one_error_line(capsys)


# ----------------------------------------------------------------------------- (7) early, one line


def sdxl_file(tmp_path: Path) -> Path:
    layers = ["IN04", "MID"]
    meta = build_metadata(layers=layers, granularity="block", placeholder="<x>", initializer="x",
                          n_vectors=1, family="sdxl", base_model="m",
                          text_dims={"clip_l": 32, "clip_g": 48}, steps=1, kde_weight=0.0)  # fmt: skip
    vectors = {f"{e}.{n}": torch.zeros(1, d) for n in layers for e, d in (("clip_l", 32), ("clip_g", 48))}  # fmt: skip
    return save_embedding_file(tmp_path / "sdxl.xti.safetensors", vectors, meta)


def bad_json(tiny_model: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    (copy / name).write_text("{not json")
    return copy


EARLY = {
    "mix_with of another family": (
        lambda m, t: [f"validation.mix_with={sdxl_file(t)}", "validation.every=1"],
        "sdxl.xti.safetensors is an SDXL file",
    ),
    "empty validation.seeds": (lambda m, t: ["validation.seeds=[]"], "validation.seeds"),
    "model_index.json not JSON": (
        lambda m, t: [f"model.path={bad_json(m, t, 'model_index.json')}"],
        "model_index.json: not valid JSON",
    ),
    "unet/config.json not JSON": (
        lambda m, t: [f"model.path={bad_json(m, t, 'unet/config.json')}"],
        "unet/",
    ),
    "resolution too large": (lambda m, t: ["train.resolution=100000"], "train.resolution"),
    "name with ..": (lambda m, t: ["name=../../evil"], "name"),
    "absolute name": (lambda m, t: [f"name={t / 'evil'}"], "name"),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_bad_settings_fail_before_training_with_one_line(case, tiny_model, tmp_path, capsys):
    overrides, expected = EARLY[case]
    out = tmp_path / "out"
    assert cli(tiny_model, out, *overrides(tiny_model, tmp_path)) == 2
    line = one_error_line(capsys)
    assert expected in line and "<memory>" not in line, line
    assert not out.exists()
    assert not (tmp_path / "evil.xti.safetensors").exists()


def test_unet_config_that_is_not_json_is_one_line_in_xti_layers(tiny_model, tmp_path, capsys):
    assert main(["layers", str(bad_json(tiny_model, tmp_path, "unet/config.json"))]) == 2
    assert "config.json: not valid JSON" in one_error_line(capsys)


def test_mix_layers_is_checked_before_training(tiny_model, tmp_path, capsys):
    mix = train(make_cfg(tiny_model, tmp_path / "mix", "train.max_steps=1"), progress=False)
    out = tmp_path / "out"
    code = cli(tiny_model, out, f"validation.mix_with={mix.output_file}", "validation.every=1",
               "validation.mix_layers=IN99")  # fmt: skip
    assert code == 2
    assert "validation.mix_layers: unknown layer 'IN99'" in one_error_line(capsys)
    assert not out.exists()


def test_output_paths_that_cannot_be_written_fail_at_once(tiny_model, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli(tiny_model, a_file) == 2
    line = one_error_line(capsys)
    assert "output_dir" in line and "is a file" in line
    assert cli(tiny_model, a_file / "sub") == 2
    assert "cannot be created" in one_error_line(capsys)
    # generate: --out-dir a file, --size not a multiple of 8, --name with a path: before the model
    gen = ["generate", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--no-progress"]
    assert main([*gen, "--out-dir", str(a_file)]) == 2
    assert "--out-dir" in one_error_line(capsys)
    assert main([*gen, "--out-dir", str(tmp_path / "g"), "--size", "33"]) == 2
    assert "multiples of 8" in one_error_line(capsys)
    assert main([*gen, "--out-dir", str(tmp_path / "g"), "--name", "../evil"]) == 2
    assert "--name" in one_error_line(capsys)
    # export -o a folder
    mix = train(make_cfg(tiny_model, tmp_path / "e", "train.max_steps=1"), progress=False)
    assert main(["export", str(mix.output_file), "--format", "kohya", "-o", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys)


# ----------------------------------------------------------------------------- (9) signals


def test_sigterm_saves_a_checkpoint_from_which_resume_is_bit_exact(tiny_model, tmp_path):
    common = (
        "train.lr_scheduler=cosine",
        "train.gradient_accumulation_steps=2",
        "kde.weight=0.001",
    )
    straight = train(make_cfg(tiny_model, tmp_path / "straight", *common), progress=False)

    cfg = make_cfg(tiny_model, tmp_path / "term", *common)
    bundle = load_model(cfg.model)
    calls = []

    def terminate(module, args, output):  # SIGTERM in the middle of step 3 (2 micro-steps a step)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    bundle.unet.register_forward_hook(terminate)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as err:
        train(cfg, bundle=bundle, progress=False)
    assert isinstance(err.value, runs.RunInterrupted) and err.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == handler, "the previous handler is restored"
    out = tmp_path / "term"
    assert ckpt_names(out) == ["step-000003"], "step 3 completed, then a checkpoint"
    assert (out / "box.interrupted.xti.safetensors").is_file()
    assert not (out / ".xti.lock").exists()

    # the requeued job's command: `auto` resumes this run's latest checkpoint
    resumed = train(make_cfg(tiny_model, out, *common, "train.resume=auto"), progress=False)
    assert resumed.losses == straight.losses[3:]
    assert torch.equal(resumed.vectors, straight.vectors)


def test_cli_exits_with_the_conventional_code_on_sigterm(monkeypatch, capsys):
    import xti.training

    def stopped(*args, **kwargs):
        raise runs.RunInterrupted(signal.SIGTERM)

    monkeypatch.setattr(xti.training, "train", stopped)
    assert main(["train", "--no-progress"]) == 143
    assert "SIGTERM" in capsys.readouterr().err
