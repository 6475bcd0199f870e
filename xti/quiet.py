"""Which third-party console messages xti silences, and why: exactly these, nothing broader.

transformers 5 warns once per image-processor class that torchvision is missing and that it falls
back to the PIL implementation (`CLIPImageProcessor`, `SiglipImageProcessor`: pipeline folders name
a feature extractor). xti never uses those processors and deliberately ships without torchvision,
so the message tells our users nothing. `install()` adds a filter for exactly that message to the
one logger that emits it; every other warning of transformers (and of that logger) still shows.
"""

from __future__ import annotations

import logging
import re

# transformers.utils.import_utils: "`XImageProcessor` requires torchvision (not installed); falling
# back to `XImageProcessorPil` for backward compatibility. ..."
TORCHVISION_FALLBACK = re.compile(
    r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"
)
_LOGGER = "transformers.utils.import_utils"


class TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "requires torchvision … falling back to …Pil" records, keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.match(record.getMessage())


def install() -> None:
    """Attach the filter once to the emitting logger (importing transformers is not needed)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(TorchvisionFallbackFilter())
