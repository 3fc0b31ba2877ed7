"""Writing a global adapter in peft's own format (``adapter_config.json`` + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fedsim.config import FedSimConfig
from fedsim.models.lora import DENSE_MODULES, peft_config


def save_peft_adapter(
    state: dict[str, torch.Tensor],
    directory: str | Path,
    cfg: FedSimConfig,
    target_modules: str,
    rank: int,
    global_rank: int,
    dense_modules: tuple[str, ...] | list[str] = DENSE_MODULES,
) -> Path:
    """Save ``state`` (peft key names, peft's scaling already applied) as a peft adapter.

    The directory loads with ``PeftModel.from_pretrained(base_model, directory)`` where
    ``base_model`` is ``build_backbone(cfg.model, num_classes, cfg.seed, cfg.data.image_fill,
    cfg.data.text_fill).model`` (for ``hf-vlm``: the same Hugging Face model, loaded with
    ``AutoModelForImageTextToText.from_pretrained(cfg.model.name_or_path)``).

    Args:
        dense_modules: the backbone's fully trained modules; those present in ``state`` are
            declared as peft ``modules_to_save``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dense = tuple(m for m in dense_modules if any(f".{m}." in k for k in state))
    config = peft_config(cfg.lora, target_modules, rank, global_rank, dense)
    config.base_model_name_or_path = cfg.model.name_or_path or cfg.model.backbone
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
