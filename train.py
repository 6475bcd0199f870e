"""Train an XTI concept: ``python train.py [--config FILE] [key=value ...]``.

Without ``--config`` it runs ``configs/demo.yaml``: XTI on the embedded demo model and concept.
Also runs under ``accelerate launch train.py --config ...``. Thin entry: the work is in `xti.cli`
and `xti.training`.
"""

import sys
from pathlib import Path

from xti.cli import main

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if (
        not any(a == "--config" or a.startswith("--config=") for a in args)
        and "-h" not in args
        and "--help" not in args
    ):
        args = ["--config", str(DEFAULT_CONFIG), *args]
    sys.exit(main(["train", *args]))
