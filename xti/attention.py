"""Per-layer conditioning through diffusers attention processors (DESIGN §3, step 3).

Every attention module of the UNet gets an `XTIAttnProcessor` that wraps the processor it had (SDPA
`AttnProcessor2_0` by default). Cross-attention processors know the index of the layer they belong
to and, when ``cross_attention_kwargs={"xti_contexts": contexts}`` is passed to the UNet with
contexts of shape ``[L, B, T, D]``, attend to ``contexts[index]`` instead of the shared
``encoder_hidden_states``. Self-attention processors accept the key and ignore it, so diffusers logs
no warning. Nothing is monkeypatched: `install` uses `set_attn_processor` and `remove` restores the
exact processor objects that were there before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from xti.errors import XTIError
from xti.layers import LayerScheme

CONTEXTS_KWARG = "xti_contexts"


class XTIAttnProcessor:
    """Wraps an attention processor and swaps in the layer's own context.

    Args:
        inner: the processor that does the attention maths (kept, and restored on removal).
        layer_index: index of this module's layer in the scheme, or None for modules that are not
            per-layer conditioned (self-attention).
    """

    def __init__(self, inner: Any, layer_index: int | None) -> None:
        self.inner = inner
        self.layer_index = layer_index

    # diffusers filters cross_attention_kwargs by this signature, so the key must be named here.
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        xti_contexts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if xti_contexts is not None and self.layer_index is not None:
            encoder_hidden_states = xti_contexts[self.layer_index]
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            temb=temb,
        )


class ProcessorHandle:
    """Installed per-layer processors; `remove()` restores the previous ones exactly."""

    def __init__(self, unet: nn.Module, previous: dict[str, Any], scheme: LayerScheme) -> None:
        self.unet = unet
        self.previous = previous
        self.scheme = scheme
        self.active = True

    def remove(self) -> None:
        if self.active:
            self.unet.set_attn_processor(dict(self.previous))
            self.active = False


def install_processors(unet: nn.Module, scheme: LayerScheme) -> ProcessorHandle:
    """Install an `XTIAttnProcessor` on every attention module of `unet`.

    Raises:
        XTIError: the UNet already carries xti processors, or the scheme names a module that does
            not exist in this UNet.
    """
    previous = dict(unet.attn_processors)
    if any(isinstance(p, XTIAttnProcessor) for p in previous.values()):
        raise XTIError("xti processors are already installed on this UNet; remove them first")
    index_of = scheme.processor_layer_index()
    missing = [path for path in index_of if f"{path}.processor" not in previous]
    if missing:
        raise XTIError(f"layer scheme does not fit this UNet: no attention module at {missing[0]}")
    new = {
        key: XTIAttnProcessor(proc, index_of.get(key.removesuffix(".processor")))
        for key, proc in previous.items()
    }
    unet.set_attn_processor(new)
    return ProcessorHandle(unet, previous, scheme)


@contextmanager
def per_layer_processors(unet: nn.Module, scheme: LayerScheme) -> Iterator[ProcessorHandle]:
    """Context manager form of `install_processors`."""
    handle = install_processors(unet, scheme)
    try:
        yield handle
    finally:
        handle.remove()
