"""The one registry of backbones: config name to builder, task and required settings.

Light on purpose (no torch, no transformers): the config checks read it at load time, and a
builder is imported only when a backbone is built. Adding a model family is one module with a
builder ``(ModelConfig, num_classes, image_fill, text_fill) -> Backbone`` plus one line here
(see the README's developer section).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone family.

    Attributes:
        name: the ``model.backbone`` value.
        builder: ``"module:function"`` that builds it (imported when used).
        generative: True when it answers in text (the generation task), False for a
            classifier (the classification task).
        required: ``model.*`` keys that must be set for it (named in the config error).
        hub_configs: ``model.*`` keys naming Hugging Face models whose configs the pre-flight
            check reads before any actor starts.
        summary: one line for the README and the errors.
    """

    name: str
    builder: str
    generative: bool
    required: tuple[str, ...] = ()
    hub_configs: tuple[str, ...] = ()
    summary: str = ""

    def load_builder(self) -> Callable:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "minilm-effnet",
            "fedsim.models.backbone:build_minilm_effnet",
            False,
            summary="pretrained MiniLM + EfficientNet-Lite0 + a fusion head (default)",
        ),
        BackboneSpec(
            "tiny",
            "fedsim.models.backbone:build_tiny",
            False,
            summary="random-initialised tiny towers, for tests",
        ),
        BackboneSpec(
            "hf",
            "fedsim.models.backbone:build_hf",
            False,
            required=("text_encoder", "vision_encoder"),
            hub_configs=("text_encoder", "vision_encoder"),
            summary="any Hugging Face text and vision encoders (hub ids or local paths)",
        ),
        BackboneSpec(
            "smolvlm-effnet",
            "fedsim.models.vlm:build_generative",
            True,
            summary="the offline demo VLM: EfficientNet-Lite0 + SmolLM2-135M",
        ),
        BackboneSpec(
            "hf-vlm",
            "fedsim.models.vlm:build_generative",
            True,
            required=("name_or_path",),
            summary="any Hugging Face image-text-to-text model (LLaVA, Qwen2-VL, SmolVLM, ...)",
        ),
    )
}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; ValueError listing the registered names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}") from None
