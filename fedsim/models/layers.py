"""Where FedMLLM's layer-restricted term applies: the layers of each tower of a backbone.

The client objectives themselves are methods (:mod:`fedsim.methods.fedprox`,
:mod:`fedsim.methods.scaffold`, ...) that add terms to :class:`fedsim.methods.Objective`.

The term's formula: docs/algorithms.md §3.5.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_LAYER = re.compile(r"\.(?:layer|layers|_blocks|blocks|h)\.(\d+)\.")


def layer_index(key: str) -> tuple[str, int] | None:
    """``(tower, layer)`` of a parameter key such as ``...text.encoder.layer.3.attention...``.

    The tower is the path of the layer stack (``text.encoder``, ``model.vision_tower.encoder``,
    ``model.language_model``), without peft's ``base_model.model.`` prefix, so a VLM's vision
    tower and language model count their layers separately.
    """
    m = _LAYER.search(key)
    if m is None:
        return None
    tower = key[: m.start()].lstrip(".").removeprefix("base_model.model.")
    return tower, int(m.group(1))


def tower_depths(module_names) -> dict[str, int]:
    """Number of layers ``L`` of each tower, from the model's module names."""
    depth: dict[str, int] = {}
    for name in module_names:
        found = layer_index("." + name + ".")
        if found:
            tower, i = found
            depth[tower] = max(depth.get(tower, 0), i + 1)
    return depth


def middle_layer_weights(keys, depths: Mapping[str, int], skip: int, weight: float) -> dict:
    """FedMLLM's restriction: ``weight`` on keys in layers ``skip .. L-1-skip``, else 0."""
    out = {}
    for k in keys:
        found = layer_index(k)
        if found and skip <= found[1] <= depths.get(found[0], 0) - 1 - skip:
            out[k] = weight
    return out
