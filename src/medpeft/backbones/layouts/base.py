"""The Layout record, its registry, and the key-mapping helpers the layout files share."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

Converter = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], list[str]]]


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    """How the authors publish it: library, class, file names."""
    signature: tuple[str, ...]
    """Keys (after one of `prefixes`) that a checkpoint in this layout has."""
    prefixes: tuple[str, ...] = ("",)
    """What may stand before the signature keys (a vision tower inside a vision-language model)."""
    files: tuple[str, ...] = ()
    """File names looked for, in order, when the weights are given as the published folder."""
    convert: Converter | None = None
    """Published keys (prefix removed) -> (timm keys, keys deliberately left out); None: timm's filter does it."""
    read: Callable[[Path], dict[str, torch.Tensor]] | None = None
    """A reader for files that hold more than tensors (None: safetensors or a weights-only torch.load)."""

    def prefix_in(self, state_dict: dict) -> str | None:
        """The prefix under which `state_dict` holds this layout's signature, or None."""
        return next((p for p in self.prefixes if all(p + key in state_dict for key in self.signature)), None)


LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    if layout.name in LAYOUTS:
        raise ValueError(f"layout {layout.name!r} is registered twice")
    LAYOUTS[layout.name] = layout
    return layout


def renamed(state_dict: dict, rules: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Keys rewritten by the first matching ``(regex, replacement)`` rule; a rule whose replacement is
    '' drops its keys (returned as the second item); a key no rule matches is kept as it is."""
    out, dropped = {}, []
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    for key, value in state_dict.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                if replacement:
                    out[pattern.sub(replacement, key)] = value
                else:
                    dropped.append(key)
                break
        else:
            out[key] = value
    return out, dropped


def fused_qkv(state_dict: dict, source: str, names: tuple[str, ...], target: str) -> dict:
    """Separate projections (query, key and value; or a SwiGLU's gate and up) concatenated into the rows of
    timm's fused one (``qkv``, ``fc1``), block by block. `source` is a format with ``{block}``, ``{name}``
    (each of `names`, in row order) and ``{param}`` (weight, bias); `target` one with ``{block}`` and
    ``{param}``."""
    out, block = dict(state_dict), 0
    while True:
        found = False
        for param in ("weight", "bias"):
            keys = [source.format(block=block, name=name, param=param) for name in names]
            if all(key in out for key in keys):
                out[target.format(block=block, param=param)] = torch.cat([out.pop(key) for key in keys])
                found = True
        if not found:
            return out
        block += 1
