"""xti: Extended Textual Inversion (P+) for Stable Diffusion.

One learned embedding per cross-attention layer of the UNet, trained with an Accelerate loop and a KDE
regulariser, exported to safetensors. See README.md for usage and ../shared/DESIGN.md for contracts.
"""

from xti import quiet
from xti.errors import XTIError

quiet.install()

__version__ = "0.1.0"

__all__ = ["XTIError", "__version__"]
