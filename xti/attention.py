"""Per-layer conditioning through diffusers attention processors (DESIGN §3, step 3).

Every attention module of the UNet gets an `XTIAttnProcessor` that wraps the processor it had (SDPA
`AttnProcessor2_0` by default). Cross-attention processors know the index of the layer they belong
to and, when ``cross_attention_kwargs={"xti_contexts": contexts}`` is passed to the UNet with
contexts of shape ``[L, B, T, D]``, attend to ``contexts[index]`` instead of the shared
``encoder_hidden_states``. Self-attention processors accept the key and ignore it, so diffusers logs
no warning. Every other keyword reaches the wrapped processor, and image tokens that the UNet passes
beside the text (IP-Adapter: ``encoder_hidden_states = (text, image tokens)``) keep reaching it: only
the text part is swapped (tests/test_ip_adapter.py). `XTIAdapter` wraps whatever processors it finds
when it runs, so add-ons may be loaded before or after it; diffusers helpers that find processors by
type (``set_ip_adapter_scale``) do not see them inside the wrappers: call those before xti loads.
Nothing is monkeypatched: `install` uses `set_attn_processor` and `remove` restores the
exact processor objects that were there before.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from xti.errors import XTIError
from xti.layers import LayerScheme

CONTEXTS_KWARG = "xti_contexts"


class XTIAttnProcessor:
    """Wraps an attention processor and swaps in the layer's own context.

    Everything else passes through: diffusers hands a processor only the ``cross_attention_kwargs``
    its ``__call__`` names (FACTS.md), so ``__call__`` is this object's `forward` with a signature
    naming ``xti_contexts`` plus every argument of the wrapped processor (IP-Adapter's ``scale``
    and ``ip_adapter_masks`` reach it). An ``encoder_hidden_states`` tuple (text, IP-Adapter image
    tokens, ...) keeps its other members: only the text part is swapped.

    Args:
        inner: the processor that does the attention maths (kept, and restored on removal);
            default diffusers' SDPA processor (its loaders rebuild self-attention processors as
            ``type(current)()``: IP-Adapter loaded after xti; the next xti call rewraps).
        layer_index: index of this module's layer in the scheme, or None for modules that are not
            per-layer conditioned (self-attention).
    """

    def __init__(self, inner: Any = None, layer_index: int | None = None) -> None:
        if inner is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            inner = AttnProcessor2_0()
        self.inner = inner
        self.layer_index = layer_index
        self._signature = _wrapper_signature(inner)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        *,
        xti_contexts: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Call the wrapped processor with this layer's context (when given) as the text part."""
        if xti_contexts is not None and self.layer_index is not None:
            encoder_hidden_states = with_text_context(
                encoder_hidden_states, xti_contexts[self.layer_index]
            )
        return self.inner(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs
        )

    @property
    def __call__(self) -> Callable[..., torch.Tensor]:
        """`forward`, declaring the wrapped processor's arguments and ``xti_contexts``."""
        call = functools.partial(self.forward)
        call.__signature__ = self._signature  # type: ignore[attr-defined]
        return call


def with_text_context(
    encoder_hidden_states: torch.Tensor | tuple[torch.Tensor, ...] | None, context: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`context` in place of the text states: the whole argument, or a tuple's first member (the
    UNet passes ``(text, image tokens)`` to IP-Adapter processors)."""
    if isinstance(encoder_hidden_states, tuple):
        return (context, *encoder_hidden_states[1:])
    return context


def _wrapper_signature(inner: Any) -> inspect.Signature:
    """The wrapped processor's call signature with a keyword-only ``xti_contexts`` added."""
    params = list(inspect.signature(inner.__call__).parameters.values())
    if CONTEXTS_KWARG not in {p.name for p in params}:
        extra = inspect.Parameter(CONTEXTS_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
        params.insert(var_kw[0] if var_kw else len(params), extra)
    return inspect.Signature(params)


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
