"""A generative model checked in the driver, before any worker loads it.

What a worker would find only after seconds of loading, with a traceback from its process,
is found here in about a second, as a one-line :class:`~fedsim.config.ConfigError`:

- ``model.name_or_path`` (``hf-vlm``): a directory, not a single file; a config that
  transformers reads and whose model is an image-text-to-text model (a classifier or a
  text-only model is not); a processor with its tokenizer, image processor and chat template;
  weight files whose headers are complete (:mod:`fedsim.models.weight_files`).
- ``model.backbone`` (``smolvlm-effnet``): the package that ships SmolLM2.
- ``model.targets`` / ``model.target_regex``: matched against the architecture built with its
  parameters on the meta device (module names and shapes, no weights): at least one module,
  and only Linear or Conv2d layers (:func:`fedsim.models.vlm.match_targets`), with the
  largest rank they admit.

It also reports the model's context length, which the rows of the data must fit
(:mod:`fedsim.tasks.context`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedsim.config import ConfigError, ModelConfig
from fedsim.errors import one_line
from fedsim.models.vlm import (
    DEMO_STRIDE,
    ChatCodec,
    DemoChatCodec,
    ProjectedVLM,
    hf_codec,
    match_targets,
    target_pattern,
    targets_key,
)

KEY = "model.name_or_path"
# Files a saved tokenizer leaves; a directory with none of them cannot have one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelFacts:
    """What the pre-flight learnt of a generative model without loading its weights.

    Attributes:
        context: the language model's context in tokens (``max_position_embeddings``), or
            None where the config does not say.
        max_rank: the largest LoRA rank the target modules admit.
        targets: how many modules get LoRA.
        codec: ``hf-vlm``: the processor's chat codec; ``smolvlm-effnet``: None (its
            tokenizer is a conversion away, and built only when a row needs counting).
    """

    context: int | None
    max_rank: int
    targets: int
    codec: ChatCodec | None


def inspect_generative(cfg: ModelConfig) -> ModelFacts:
    """Check the configured generative model's source, processor and LoRA targets.

    Args:
        cfg: ``model.*`` of a generative backbone (``hf-vlm`` or ``smolvlm-effnet``).

    Returns:
        The model's context, its targets' rank cap and count, and (``hf-vlm``) its codec.

    Raises:
        ConfigError: naming ``model.name_or_path``, ``model.backbone``, ``model.targets`` or
            ``model.target_regex`` (see the module docstring).
    """
    if cfg.backbone == "smolvlm-effnet":
        from fedsim.models.smollm import smollm2_gguf

        smollm2_gguf()
        model, codec = _demo_on_meta(), None
    else:
        config = _hf_config(cfg.name_or_path)
        codec = _hf_processor(cfg.name_or_path)
        if Path(cfg.name_or_path).is_dir():
            from fedsim.models.weight_files import check_weight_files

            check_weight_files(Path(cfg.name_or_path), KEY)
        model = _hf_on_meta(config, cfg.name_or_path)
    max_rank, count = match_targets(model, target_pattern(cfg, model), targets_key(cfg))
    return ModelFacts(model_context(cfg), max_rank, count, codec)


def model_context(cfg: ModelConfig) -> int | None:
    """The context in tokens of the configured generative model's language model, read from
    its config alone (the same number in the driver and in every worker)."""
    if cfg.backbone == "smolvlm-effnet":
        from fedsim.models.smollm import ARCHITECTURE

        return ARCHITECTURE["max_position_embeddings"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.name_or_path)
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def prompt_overhead(cfg: ModelConfig, image: torch.Tensor, codec: ChatCodec | None) -> int:
    """Tokens a prompt adds around its text (chat template, image tokens) for ``image``:
    exact with a codec, else (``smolvlm-effnet``) a bound that needs no tokenizer."""
    if codec is not None:
        return codec.prompt_overhead(image)
    return DemoChatCodec.overhead_bound(int(image.shape[-1]), DEMO_STRIDE)


def _hf_config(name_or_path: str):
    """The model's config; the model must be an image-text-to-text model in a directory (or
    a hub id), not a single file."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    from fedsim.models.hub import check_hf_config

    if Path(name_or_path).is_file():
        raise ConfigError(
            KEY,
            f"{name_or_path} is a file; name the directory that holds the model's "
            "config.json, processor files and weights",
        )
    config = check_hf_config(name_or_path, KEY)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        kind = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        raise ConfigError(
            KEY,
            f"{name_or_path} is a {kind} model (model_type {config.model_type!r}), not an "
            "image-text-to-text model; hf-vlm needs a vision-language model that "
            "AutoModelForImageTextToText loads (LLaVA, Idefics3, PaliGemma, Qwen2-VL, ...)",
        )
    return config


def _hf_processor(name_or_path: str) -> ChatCodec:
    from transformers import ProcessorMixin

    try:
        codec = hf_codec(name_or_path)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        hint = ""
        if Path(name_or_path).is_dir() and not any(
            (Path(name_or_path) / f).is_file() for f in _TOKENIZER_FILES
        ):
            hint = f" ({name_or_path} holds no tokenizer files: {', '.join(_TOKENIZER_FILES)})"
        raise ConfigError(
            KEY,
            f"cannot load the processor (tokenizer, image processor, chat template) of "
            f"{name_or_path}{hint}: {one_line(exc, 200)}",
        ) from None
    if not isinstance(codec.processor, ProcessorMixin) or codec.processor is codec.tokenizer:
        raise ConfigError(
            KEY,
            f"{name_or_path} has a {type(codec.processor).__name__} but no multimodal "
            "processor (processor_config.json / preprocessor_config.json with an image "
            "processor); fedsim renders images with it",
        )
    return codec


def _hf_on_meta(config, name_or_path: str) -> torch.nn.Module:
    """The model's architecture with its parameters on the meta device: module names and
    shapes, no weight memory. accelerate's ``init_empty_weights`` (what ``from_pretrained``
    itself builds under) leaves buffers real, for models whose ``__init__`` computes some."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    try:
        with init_empty_weights():
            return AutoModelForImageTextToText.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            KEY, f"cannot build the architecture of {name_or_path}: {one_line(exc)}"
        ) from None


def _demo_on_meta() -> torch.nn.Module:
    """The built-in VLM's module tree, parameters on the meta device (SmolLM2 from its known
    shape)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsim.models.efficientnet_lite import EfficientNetLite
    from fedsim.models.smollm import ARCHITECTURE

    with init_empty_weights():
        vision = EfficientNetLite()
        lm = LlamaForCausalLM(LlamaConfig(**ARCHITECTURE))
        return ProjectedVLM(vision, vision.out_dim, lm, image_token_id=0)
