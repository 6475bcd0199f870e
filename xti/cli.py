"""Command line interface: ``xti train``, ``xti layers``, ``xti config``.

The CLI only parses arguments and prints; the library does the work. Every `XTIError` becomes one
line on stderr (``error: …``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from xti.errors import XTIError


def _cmd_train(args: argparse.Namespace) -> int:
    from xti.config import load_config
    from xti.training import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, progress=not args.no_progress)
    if result.output_file is not None:
        last = f", final loss {result.losses[-1][1]:.4f}" if result.losses else ""
        print(f"wrote {result.output_file} ({result.steps} steps in {result.seconds:.1f} s{last})")
    if result.world_size > 1:
        # Several ranks with diffusers and transformers loaded sometimes abort at interpreter exit
        # after training finished (FACTS.md); leave without running those finalisers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from xti.layers import layer_scheme
    from xti.models import load_unet_structure

    unet = load_unet_structure(args.model)
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
    p.add_argument("model", help="diffusers model folder (or builtin:tiny-sd1)")
    p.add_argument("--modules", action="store_true", help="also print the diffusers module path")
    p.add_argument("--granularity", choices=["block", "transformer"], default="block")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("config", help="list config keys with defaults, or print a resolved config")
    p.add_argument("--config", help="YAML config to resolve")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_config)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
