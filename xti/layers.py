"""The layer scheme: which cross-attention points of a UNet get their own text condition, and names.

A *layer* (DESIGN §1) is one `Transformer2DModel` with cross-attention ("block" granularity) or one
`BasicTransformerBlock` inside it ("transformer" granularity). The scheme is derived from the UNet
itself, in forward order (down, mid, up; `named_modules()` lists mid after up, so it is not used for
order), and named with the LDM input/output block indices used by kohya's sd-scripts (DESIGN §2).
This module also resolves layer selections: names, named groups and ranges such as ``IN04-MID``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from xti.errors import XTIError

Granularity = Literal["block", "transformer", "shared"]
GROUPS = ("all", "down", "mid", "up", "coarse", "fine")


@dataclass(frozen=True)
class Layer:
    """One conditioning point of the UNet.

    Attributes:
        name: DESIGN §2 name, e.g. ``IN01``, ``MID``, ``OUT11`` or ``IN07.3`` (transformer granularity).
        module_path: dotted path of the module in the UNet (``down_blocks.0.attentions.0``).
        part: ``down``, ``mid`` or ``up``.
        level: spatial level, 0 at full latent resolution, increasing as the UNet downsamples.
        cross_attention_paths: dotted paths of the cross-attention (``attn2``) modules it drives.
    """

    name: str
    module_path: str
    part: Literal["down", "mid", "up"]
    level: int
    cross_attention_paths: tuple[str, ...]


@dataclass(frozen=True)
class LayerScheme:
    """The ordered layers of a UNet at one granularity."""

    layers: tuple[Layer, ...]
    granularity: Literal["block", "transformer"]
    num_levels: int = field(default=1)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def index(self, name: str) -> int:
        """Position of a layer by name."""
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise XTIError(f"unknown layer '{name}'; this model's layers are {', '.join(self.names)}")

    def processor_layer_index(self) -> dict[str, int]:
        """Map each cross-attention module path to the index of the layer that drives it."""
        return {
            path: i for i, layer in enumerate(self.layers) for path in layer.cross_attention_paths
        }

    def group(self, group: str) -> list[int]:
        """Indices of a named group (DESIGN §2): all, down, mid, up, coarse, fine.

        ``coarse`` is the lower-resolution half of the spatial levels that carry layers, ``fine``
        the rest.
        """
        if group == "all":
            return list(range(len(self)))
        if group in ("down", "mid", "up"):
            return [i for i, layer in enumerate(self.layers) if layer.part == group]
        # The lower-resolution half of the levels that carry layers: SD1.x/SD2.x levels 0-3 give
        # levels 2-3 (IN07, IN08, MID, OUT03-OUT05, as in DESIGN §2); SDXL levels 1-2 give level 2.
        levels = sorted({layer.level for layer in self.layers})
        coarse_levels = set(levels[len(levels) - max(1, len(levels) // 2) :])
        coarse = [i for i, layer in enumerate(self.layers) if layer.level in coarse_levels]
        if group == "coarse":
            return coarse
        if group == "fine":
            return [i for i in range(len(self)) if i not in coarse]
        raise XTIError(f"unknown layer group '{group}'; groups are {', '.join(GROUPS)}")

    def select(self, spec: str | list[str]) -> list[int]:
        """Resolve a selection to sorted layer indices.

        `spec` is a list or a comma-separated string of items; each item is a layer name (``MID``), a
        group (``coarse``), a name range in forward order (``IN07-OUT05``) or an index range
        (``0-5``, inclusive).
        """
        items = spec if isinstance(spec, list) else [s for s in spec.split(",")]
        chosen: set[int] = set()
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            if item.lower() in GROUPS:
                chosen.update(self.group(item.lower()))
            elif item in self.names:
                chosen.add(self.index(item))
            elif item.isdigit():
                chosen.add(self._checked_index(int(item), item))
            elif "-" in item:
                lo, _, hi = item.partition("-")
                if lo.isdigit() and hi.isdigit():
                    a, b = self._checked_index(int(lo), item), self._checked_index(int(hi), item)
                else:
                    a, b = self.index(lo), self.index(hi)
                if a > b:
                    raise XTIError(f"layer range '{item}' is reversed; write it in forward order")
                chosen.update(range(a, b + 1))
            else:
                raise XTIError(
                    f"unknown layer '{item}'; use names ({', '.join(self.names)}), "
                    f"groups ({', '.join(GROUPS)}) or ranges like IN07-OUT05 or 0-5"
                )
        return sorted(chosen)

    def _checked_index(self, i: int, item: str) -> int:
        if not 0 <= i < len(self):
            raise XTIError(f"layer index in '{item}' is out of range 0-{len(self) - 1}")
        return i


def _transformer_blocks(t2d: nn.Module) -> list[nn.Module]:
    return list(getattr(t2d, "transformer_blocks", []))


def _has_cross_attention(block: nn.Module) -> bool:
    attn2 = getattr(block, "attn2", None)
    return attn2 is not None and getattr(attn2, "is_cross_attention", False)


def layer_scheme(unet: nn.Module, granularity: Granularity = "block") -> LayerScheme:
    """Derive the ordered, named layer scheme of a diffusers `UNet2DConditionModel`.

    Args:
        unet: the UNet (may live on the meta device).
        granularity: ``block`` (one layer per Transformer2DModel) or ``transformer`` (one per
            BasicTransformerBlock). ``shared`` is treated as ``block``: sharing happens elsewhere.

    Returns:
        The scheme in forward order (down blocks, mid block, up blocks).
    """
    if granularity not in ("block", "transformer", "shared"):
        raise XTIError(
            f"xti.granularity: unknown value '{granularity}' (block, transformer, shared)"
        )
    per_transformer = granularity == "transformer"
    num_levels = len(unet.down_blocks)
    entries: list[tuple[str, str, str, int, nn.Module]] = []

    # LDM numbering: input block 0 is conv_in; each down block adds one input block per resnet and
    # one for its downsampler. Output blocks count one per resnet of the up blocks.
    input_index = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for a, t2d in enumerate(attentions):
            entries.append(
                (f"IN{input_index + a:02d}", f"down_blocks.{b}.attentions.{a}", "down", b, t2d)
            )
        input_index += len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)

    for a, t2d in enumerate(getattr(unet.mid_block, "attentions", None) or []):
        name = "MID" if a == 0 else f"MID{a:02d}"
        entries.append((name, f"mid_block.attentions.{a}", "mid", num_levels - 1, t2d))

    output_index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        level = num_levels - 1 - b
        for a, t2d in enumerate(attentions):
            entries.append(
                (f"OUT{output_index + a:02d}", f"up_blocks.{b}.attentions.{a}", "up", level, t2d)
            )
        output_index += len(block.resnets)

    layers: list[Layer] = []
    for name, path, part, level, t2d in entries:
        blocks = [
            (k, blk) for k, blk in enumerate(_transformer_blocks(t2d)) if _has_cross_attention(blk)
        ]
        if not blocks:
            continue
        if per_transformer:
            for k, _ in blocks:
                attn = (f"{path}.transformer_blocks.{k}.attn2",)
                layers.append(
                    Layer(f"{name}.{k}", f"{path}.transformer_blocks.{k}", part, level, attn)
                )
        else:
            attn = tuple(f"{path}.transformer_blocks.{k}.attn2" for k, _ in blocks)
            layers.append(Layer(name, path, part, level, attn))
    if not layers:
        raise XTIError("this UNet has no cross-attention layers; XTI needs a text-conditioned UNet")
    return LayerScheme(tuple(layers), "transformer" if per_transformer else "block", num_levels)
