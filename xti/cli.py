"""Command line interface: ``xti train``, ``xti layers``, ``xti config``, ``xti generate``,
``xti mix``, ``xti sweep``, ``xti inspect``, ``xti export``, ``xti cache``, ``xti ui``, ``xti batch``.

The CLI only parses arguments and prints; the library does the work. Every `XTIError` becomes one
line on stderr (``error: …``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from xti.errors import XTIError
from xti.parsing import embedding_args, parse_assignments, parse_size
from xti.paths import check_file_name, check_output_dir


def _train_concepts(cfg: Any, *, progress: bool) -> int:
    """`xti train` of a `concepts:` config (`xti.concepts`): one line per concept."""
    from xti.concepts import train_concepts

    out = train_concepts(cfg, progress=progress)
    for name, result in out.results.items():
        if result.output_file is not None:
            last = f", final loss {result.losses[-1][1]:.4f}" if result.losses else ""
            print(f"wrote {result.output_file} ({name}: {result.steps} steps{last})")
    for name, error in out.failed.items():
        print(f"error: concept {name}: {error}")
    print(f"{len(out.results)} concept(s) in {out.seconds:.1f} s; index {out.index_file}")
    return 1 if out.failed else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from xti.config import load_config
    from xti.training import train

    cfg = load_config(args.config, args.overrides)
    if cfg.concepts is not None:
        return _train_concepts(cfg, progress=not args.no_progress)
    result = train(cfg, progress=not args.no_progress)
    if result.output_file is not None:
        last = f", final loss {result.losses[-1][1]:.4f}" if result.losses else ""
        print(f"wrote {result.output_file} ({result.steps} steps in {result.seconds:.1f} s{last})")
    if result.samples_file is not None:
        print(f"wrote {result.samples_file} (samples of the last validation)")
    if result.world_size > 1:
        # Several ranks with diffusers and transformers loaded sometimes abort at interpreter exit
        # after training finished (FACTS.md); leave without running those finalisers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    """``xti batch MANIFEST --out DIR``: every concept of a manifest (xti.batch); exit 1 when a row
    is not done."""
    from pathlib import Path

    from xti import batch

    plan = batch.load_manifest(args.manifest, base=args.base, sets=args.set or [])
    opts = batch.BatchOptions(
        Path(args.manifest), Path(args.out), args.base, list(args.set or []),
        retry_failed=args.retry_failed, progress=not args.no_progress,
    )  # fmt: skip
    modes = [m for m in ("workers", "gpus", "only_index", "table") if getattr(args, m) is not None]
    modes += ["slurm"] if args.slurm else []
    if len(modes) > 1:
        raise XTIError("choose one of --workers, --gpus, --slurm, --only-index, --table")
    if args.dry_run and not args.slurm:
        raise XTIError("--dry-run goes with --slurm (it writes the sbatch scripts only)")
    if args.slurm:
        return _batch_slurm(plan, opts, args)
    with _progress_bars(not args.no_progress):
        if args.only_index is not None:
            indices = batch.parse_index_list(args.only_index, len(plan.rows))
            results = batch.run_batch(plan, opts, indices=indices)
        elif args.workers is not None or args.gpus is not None:
            results = batch.run_workers(plan, opts, batch.worker_devices(args.workers, args.gpus))
        elif args.table:
            results = batch.write_table(plan, opts.out)
        else:
            results = batch.run_batch(plan, opts)
    table = batch.gather(plan, opts.out)
    print(batch.table_markdown(table), end="")
    return batch.exit_status(results)


def _batch_slurm(plan: Any, opts: Any, args: argparse.Namespace) -> int:
    from xti import batch

    if not batch.pending_indices(plan, opts.out, retry_failed=opts.retry_failed):
        print("nothing to submit: every row is done or failed (--retry-failed retries those)")
        table = batch.write_table(plan, opts.out)
        print(batch.table_markdown(table), end="")
        return batch.exit_status(table)
    scripts = batch.write_slurm(plan, opts, sbatch_options=args.sbatch_option or [])
    if args.dry_run:
        print(f"wrote {scripts.array} (rows {','.join(map(str, scripts.indices))})")
        print(f"wrote {scripts.table}")
        print(
            f"submit with: sbatch {scripts.array}, then sbatch --dependency=afterany:JOBID {scripts.table}"
        )
        return 0
    array_id, table_id = batch.submit_slurm(scripts)
    print(f"submitted job array {array_id} ({len(scripts.indices)} rows) and table job {table_id}")
    print(f"the table: {opts.out / 'results.md'} once they end")
    return 0


def _add_batch(sub: Any) -> None:
    p = sub.add_parser(
        "batch", help="train every concept of a manifest (YAML or CSV): locally, on GPUs, on Slurm"
    )
    p.add_argument("manifest", help="YAML (base, overrides, concepts) or CSV manifest")
    p.add_argument("--out", required=True, help="output folder: OUT/<name> per concept, results.*")
    p.add_argument("--base", help="base config (replaces the manifest's base)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="override for every concept (repeatable), after the manifest's overrides",
    )  # fmt: skip
    p.add_argument("--workers", type=int, help="split the rows over N processes")
    p.add_argument("--gpus", help="one process per GPU, e.g. 0,1 (CUDA_VISIBLE_DEVICES each)")
    p.add_argument("--slurm", action="store_true", help="write and submit a Slurm job array")
    p.add_argument("--dry-run", action="store_true", help="--slurm: write the scripts only")
    p.add_argument(
        "--sbatch-option", action="append", metavar="OPT",
        help="--slurm: an #SBATCH line (repeatable), e.g. --sbatch-option=--gres=gpu:1",
    )  # fmt: skip
    p.add_argument("--only-index", metavar="I[,J...]", help="run these rows only (0-based)")
    p.add_argument("--table", action="store_true", default=None, help="only write the table")
    p.add_argument("--retry-failed", action="store_true", help="run failed rows again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_batch)


def _cmd_layers(args: argparse.Namespace) -> int:
    from xti.layers import layer_scheme
    from xti.models import load_unet_structure

    unet = load_unet_structure(args.model, args.model_config)
    scheme = layer_scheme(unet, args.granularity)
    for layer in scheme.layers:
        print(f"{layer.name}\t{layer.module_path}" if args.modules else layer.name)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from xti.config import describe_fields, load_config

    if args.config:
        cfg = load_config(args.config, args.overrides)
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    else:
        print("\n".join(describe_fields()))
    return 0


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Switch the diffusers/transformers loading progress bars off inside the block if asked."""
    if enabled:
        yield
        return
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    before = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if before[0]:
            dlog.enable_progress_bar()
        if before[1]:
            tlog.enable_progress_bar()


def _cmd_generate(args: argparse.Namespace) -> int:
    import math

    import torch

    from xti.export import load_embedding_file
    from xti.inference import XTIAdapter
    from xti.pipelines import save_images, set_scheduler

    if args.count < 1 or args.steps < 1:
        raise XTIError("--count and --steps must be >= 1")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise XTIError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    check_file_name(args.name, "--name")
    check_output_dir(args.out_dir, "--out-dir")  # before generating, not after
    mix = parse_assignments(args.mix or [], "--mix", split_last=True)
    layer_prompts = parse_assignments(args.layer_prompt or [], "--layer-prompt", split_last=False)
    width, height = parse_size(args.size)
    freeu = None
    if args.freeu:
        try:
            freeu = tuple(float(x) for x in args.freeu.split(","))
        except ValueError:
            raise XTIError("--freeu: expected four numbers s1,s2,b1,b2") from None
        if len(freeu) != 4 or not all(math.isfinite(x) for x in freeu):
            raise XTIError("--freeu: expected four finite numbers s1,s2,b1,b2")
    files = [  # read once, and a bad file fails before the model loads
        (placeholder, load_embedding_file(path, allow_pickle=args.allow_pickle))
        for placeholder, path in embedding_args(args.embedding or [])
    ]
    with _progress_bars(not args.no_progress):
        pipe = load_pipeline_for(args)
    pipe.set_progress_bar_config(disable=args.no_progress)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    if args.lora:
        try:
            pipe.load_lora_weights(args.lora)
        except Exception as err:  # missing peft, bad file...: one line
            raise XTIError(f"--lora {args.lora}: {type(err).__name__}: {err}") from None
    if freeu is not None:
        s1, s2, b1, b2 = freeu
        pipe.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    adapter = XTIAdapter(pipe)
    try:
        for placeholder, ef in files:
            adapter.load(ef, placeholder)
        device = pipe._execution_device
        generator = torch.Generator(device=device).manual_seed(args.seed)
        result = adapter(
            args.prompt,
            negative_prompt=args.negative_prompt,
            layer_prompts=layer_prompts or None,
            mix=mix or None,
            num_images_per_prompt=args.count,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            height=height,
            width=width,
            generator=generator,
            clip_skip=args.clip_skip,
        )
    finally:
        adapter.unload()
    params = {
        "model": args.model,
        "embeddings": args.embedding or [],
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "layer_prompts": layer_prompts,
        "mix": mix,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "scheduler": args.scheduler or type(pipe.scheduler).__name__,
    }
    prefix = f"{args.name}-{args.seed}"
    for path in save_images(result.images, args.out_dir, prefix, params=params, grid=args.grid):
        print(f"wrote {path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """``xti sweep FILE --model M``: a layer-sweep grid of one concept, written as one PNG."""
    import math

    from xti.export import load_embedding_file
    from xti.inference import XTIAdapter
    from xti.sweep import run_sweep, save_sweep

    if args.steps < 1 or not math.isfinite(args.guidance) or args.guidance < 0:
        raise XTIError("--steps must be >= 1 and --guidance a finite number >= 0")
    width, height = parse_size(args.size)
    ef = load_embedding_file(args.file)  # a bad file fails before the model loads
    placeholder = args.placeholder or ef.metadata.get("xti.placeholder")
    if not placeholder:
        raise XTIError(f"{args.file} names no placeholder (a kohya file?): give --placeholder")
    prompt = args.prompt or f"a photo of {placeholder}"
    from xti.config import placeholder_stem

    stem = placeholder_stem(placeholder)
    out = args.out or os.path.join("outputs", "sweep", f"{stem}-{args.kind}.png")
    from xti.paths import check_output_file

    check_output_file(out, "--out")
    with _progress_bars(not args.no_progress):
        pipe = load_pipeline_for(args)
    pipe.set_progress_bar_config(disable=True)
    with XTIAdapter(pipe) as adapter:
        adapter.load(args.file, args.placeholder)
        result = run_sweep(
            adapter,
            placeholder,
            prompt,
            kind=args.kind,
            seeds=args.seeds,
            window=args.window,
            neutral=args.neutral,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=height,
            width=width,
            progress=None if args.no_progress else _print_progress,
        )
    params = {"model": args.model, "file": args.file, "steps": args.steps}
    params["guidance"] = args.guidance
    path = save_sweep(result, out, params)
    print(f"wrote {path} ({len(result.rows)} rows x {len(result.seeds)} seeds)")
    return 0


def _cmd_mix(args: argparse.Namespace) -> int:
    """``xti mix --model M -e A -e B --mix "<b>=coarse" --placeholder <m> -o FILE``."""
    from xti.export import load_embedding_file
    from xti.inference import XTIAdapter
    from xti.mix_file import base_concept, layer_owners, save_mix
    from xti.paths import check_output_file

    target = check_output_file(args.output, "-o")
    if not args.placeholder.strip() or any(c.isspace() for c in args.placeholder.strip()):
        raise XTIError("--placeholder: one word without spaces, e.g. <my-mix>")
    mix = parse_assignments(args.mix or [], "--mix", split_last=True)
    embeddings = embedding_args(args.embedding)
    for _, path in embeddings:  # fail on a bad file before the model loads
        load_embedding_file(path, allow_pickle=args.allow_pickle)
    with _progress_bars(not args.no_progress):
        pipe = load_pipeline_for(args)
    adapter = XTIAdapter(pipe)
    try:
        for placeholder, path in embeddings:
            adapter.load(path, placeholder, allow_pickle=args.allow_pickle)
        concepts = list(adapter.concepts)
        owners = layer_owners(adapter.scheme, mix, concepts)
        base = base_concept(concepts, args.prompt) if args.prompt else concepts[0]
        written = save_mix(
            adapter, owners, base, target, placeholder=args.placeholder, model=args.model
        )
    finally:
        adapter.unload()
    print(f"wrote {written}")
    return 0


def load_pipeline_for(args: argparse.Namespace) -> Any:
    """The pipeline ``--model`` (and ``--model-config``, ``--device``, ``--dtype``) name."""
    from xti.pipelines import load_pipeline

    return load_pipeline(
        args.model,
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
        config=args.model_config,
    )


def _add_mix(sub: Any) -> None:
    p = sub.add_parser("mix", help="save a mix of concepts (a concept per layer) as one xti file")
    p.add_argument("--model", required=True, help="the model the files are mixed for")
    add_model_config(p)
    p.add_argument(
        "--embedding", "-e", action="append", required=True, metavar="[TOKEN=]FILE",
        help="xti or kohya file (repeatable); TOKEN= sets its placeholder",
    )  # fmt: skip
    p.add_argument(
        "--mix", nargs="+", metavar="TOKEN=LAYERS",
        help="which layers each concept fills (as xti generate --mix; later entries win)",
    )  # fmt: skip
    p.add_argument(
        "--prompt",
        help="layers no --mix names hold this prompt's first concept (default: the first file's)",
    )
    p.add_argument("--placeholder", required=True, help="the new file's placeholder, e.g. <my-mix>")
    p.add_argument("-o", "--output", required=True, help="the xti file to write")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .pt/.bin files")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no loading progress bars")
    p.set_defaults(func=_cmd_mix)


def _print_progress(done: int, total: int) -> None:
    """``3/18 images`` on stderr, rewritten in place; a newline after the last."""
    print(f"\r{done}/{total} images", end="\n" if done == total else "", file=sys.stderr)


def _cmd_ui(args: argparse.Namespace) -> int:
    """``xti ui``: the web UI (Gradio; the ``ui`` extra), on 127.0.0.1 unless --host says."""
    from xti.ui import launch

    launch(host=args.host, port=args.port, model=args.model)
    return 0


def _add_sweep_and_ui(sub: Any) -> None:
    """The ``sweep`` and ``ui`` subcommands."""
    from xti.sweep import SWEEP_KINDS

    p = sub.add_parser(
        "sweep", help="a grid of a concept injected into growing/single/level layers"
    )
    p.add_argument("file", help="xti embedding file")
    p.add_argument("--model", required=True, help="SD 1.x/2.x or SDXL folder, builtin:tiny-sd1")
    add_model_config(p)
    p.add_argument("--prompt", "-p", help="prompt with the placeholder (default 'a photo of <x>')")
    p.add_argument("--negative-prompt", "-n", help="negative prompt (all layers)")
    p.add_argument("--kind", choices=SWEEP_KINDS, default="growing", help="rows (default growing)")
    p.add_argument("--window", type=int, default=1, help="layers per row of --kind sliding")
    p.add_argument(
        "--neutral", help="word for the placeholder outside a row's layers (default: initializer)"
    )
    p.add_argument("--placeholder", help="the concept's placeholder (kohya files)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one column per seed")
    p.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--size", help="N or WxH in pixels (default: the model's)")
    p.add_argument("--out", "-o", help="PNG to write (default outputs/sweep/<name>-<kind>.png)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 on cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("ui", help="web UI: train, mix layers, inspect (needs the ui extra)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=7860,
        help="port (default 7860; 0: the first free one from 7860)",
    )
    p.add_argument("--model", help="model the tabs start with (default: the demo model)")
    p.set_defaults(func=_cmd_ui)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from xti.export import inspect_embedding

    info = inspect_embedding(
        args.file,
        model=args.model,
        allow_pickle=args.allow_pickle,
        top_k=args.top_k,
        model_config=args.model_config,
    )
    print(json.dumps(info, indent=1, ensure_ascii=False))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from xti.export import export_kohya, export_ti

    if args.format == "kohya":
        if args.layer or args.mean:
            raise XTIError("--layer/--mean apply to --format ti only")
        out = export_kohya(args.file, args.output, allow_pickle=args.allow_pickle)
        print(f"wrote {out}")
        return 0
    if bool(args.layer) == bool(args.mean):
        raise XTIError("--format ti needs exactly one of --layer NAME or --mean")
    out = export_ti(
        args.file, args.output, layer=args.layer, mean=args.mean, allow_pickle=args.allow_pickle
    )
    which = f"layer {args.layer}" if args.layer else "the mean over layers"
    print(f"wrote {out} (plain textual inversion from {which}: per-layer detail is lost)")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    import math

    from xti.latent_cache import DEFAULT_MAX_GB, LatentDiskCache

    if args.max_gb is not None and not (math.isfinite(args.max_gb) and args.max_gb >= 0):
        raise XTIError(f"--max-gb must be a finite number >= 0, got {args.max_gb}")
    cache = LatentDiskCache(args.folder)
    if cache.folder.exists() and not cache.folder.is_dir():
        raise XTIError(f"latent cache {cache.folder} is a file, not a folder")
    action = args.action or "info"
    if action == "clear":
        gone = cache.clear()
        print(f"removed {gone.entries} entries ({gone.bytes / 2**20:.1f} MiB) from {cache.folder}")
    elif action == "prune":
        cap = DEFAULT_MAX_GB if args.max_gb is None else args.max_gb
        gone = cache.prune(int(cap * 2**30))
        print(
            f"removed {gone.entries} least recently used entries ({gone.bytes / 2**20:.1f} MiB); "
            f"{cache.folder} now holds at most {cap:g} GiB"
        )
    held = cache.stats()
    print(f"latent cache {cache.folder}: {held.entries} entries, {held.bytes / 2**20:.1f} MiB")
    return 0


def add_model_config(p: argparse.ArgumentParser) -> None:
    """``--model-config``: what ``model.single_file_config`` is for training."""
    p.add_argument(
        "--model-config",
        metavar="FOLDER",
        help="for a single-file --model: a diffusers folder (or hub id) of the same model type, "
        "needed offline",
    )


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="generate images with per-layer embeddings, mixing, per-layer prompts"
    )
    p.add_argument(
        "--model",
        required=True,
        help="SD 1.x/2.x or SDXL diffusers folder, single .safetensors file, hub id, builtin:tiny-sd1",
    )
    add_model_config(p)
    p.add_argument(
        "--embedding",
        "-e",
        action="append",
        metavar="[TOKEN=]FILE",
        help="xti or kohya file (repeatable); TOKEN= sets its placeholder (needed for kohya files)",
    )
    p.add_argument("--prompt", "-p", help="the prompt (may contain placeholders)")
    p.add_argument("--negative-prompt", "-n", help="negative prompt (all layers)")
    p.add_argument(
        "--mix",
        nargs="+",
        metavar="TOKEN=LAYERS",
        help="style mixing, e.g. --mix '<a>=coarse' '<b>=fine' (names, groups, ranges)",
    )
    p.add_argument(
        "--layer-prompt",
        action="append",
        metavar="LAYERS=PROMPT",
        help="per-layer prompt (repeatable), e.g. --layer-prompt 'mid=a green lizard'",
    )
    p.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", help="N or WxH in pixels (default: the model's)")
    p.add_argument("--count", type=int, default=1, help="images per prompt")
    p.add_argument("--scheduler", help="ddim, euler, euler-a, dpm++, unipc, ... or a class name")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--freeu", metavar="S1,S2,B1,B2", help="enable FreeU with these factors")
    p.add_argument("--lora", help="LoRA weights to load into the pipeline (needs peft)")
    p.add_argument("--out-dir", default="outputs/generate", help="where images are written")
    p.add_argument("--name", default="xti", help="file name prefix (default xti)")
    p.add_argument("--grid", action="store_true", help="also write a grid of all images")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 on cuda")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .pt/.bin files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xti", description="Extended Textual Inversion (P+) for Stable Diffusion."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a concept (also: python train.py / accelerate launch train.py)"
    )
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 output_dir=out"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("layers", help="print a model's layer names in UNet forward order")
    p.add_argument("model", help="diffusers folder, single .safetensors file, hub id, builtin:…")
    add_model_config(p)
    p.add_argument("--modules", action="store_true", help="also print the diffusers module path")
    p.add_argument("--granularity", choices=["block", "transformer"], default="block")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("config", help="list config keys with defaults, or print a resolved config")
    p.add_argument("--config", help="YAML config to resolve")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_config)

    _add_generate(sub)
    _add_mix(sub)
    _add_batch(sub)
    _add_sweep_and_ui(sub)

    p = sub.add_parser("inspect", help="describe an embedding file as JSON")
    p.add_argument("file")
    p.add_argument("--model", help="also list the nearest vocabulary tokens of this model")
    add_model_config(p)
    p.add_argument("--top-k", type=int, default=1, help="nearest tokens per vector (default 1)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .pt/.bin files")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "cache", help="show, prune or clear the latent disk cache ($XTI_CACHE/latents)"
    )
    p.add_argument("action", nargs="?", choices=["info", "prune", "clear"], help="default: info")
    p.add_argument("--max-gb", type=float, help="prune: keep at most this many GiB (default 10)")
    p.add_argument(
        "--folder", help="the cache folder (default $XTI_LATENT_CACHE or $XTI_CACHE/latents)"
    )
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("export", help="convert to kohya's 16-key file or a plain TI embedding")
    p.add_argument("file")
    p.add_argument("--format", choices=["kohya", "ti"], required=True)
    p.add_argument("--layer", help="ti: take this layer's vectors")
    p.add_argument("--mean", action="store_true", help="ti: average over all layers")
    p.add_argument("--output", "-o", help="output file (default: beside the input)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .pt/.bin files")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except XTIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM during training (xti.runs.StopSignals)
        signum = getattr(err, "signum", 2)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
