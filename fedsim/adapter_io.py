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
) -> Path:
    """Save ``state`` (peft key names, peft's scaling already applied) as a peft adapter.

    The directory loads with ``PeftModel.from_pretrained(base_model, directory)`` where
    ``base_model`` is ``build_backbone(cfg.model, num_classes, cfg.seed, cfg.data.image_fill,
    cfg.data.text_fill).model``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dense = tuple(m for m in DENSE_MODULES if any(f".{m}." in k for k in state))
    config = peft_config(cfg.lora, target_modules, rank, global_rank, dense)
    config.base_model_name_or_path = cfg.model.backbone
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
