"""Writing a global adapter in peft's own format (``adapter_config.json`` + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fedsim.config import FedSimConfig


def save_peft_adapter(
    state: dict[str, torch.Tensor],
    directory: str | Path,
    cfg: FedSimConfig,
    target_modules: str,
    rank: int,
    global_rank: int,
    dense_modules: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Save ``state`` (peft key names, peft's scaling already applied) as a peft adapter.

    The directory loads with ``PeftModel.from_pretrained(base_model, directory)`` where
    ``base_model`` is ``build_backbone(cfg.model, num_classes, cfg.seed, cfg.data.image_fill,
    cfg.data.text_fill).model`` (for ``hf-vlm``: the same Hugging Face model, loaded with
    ``AutoModelForImageTextToText.from_pretrained(cfg.model.name_or_path)``).

    Args:
        dense_modules: the backbone's fully trained modules; those present in ``state`` are
            declared as peft ``modules_to_save`` (None: the built-in classifier's).
    """
    from fedsim.models.lora import DENSE_MODULES, peft_config  # the model stack, only here

    if dense_modules is None:
        dense_modules = DENSE_MODULES
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dense = tuple(m for m in dense_modules if any(f".{m}." in k for k in state))
    config = peft_config(cfg.lora, target_modules, rank, global_rank, dense)
    config.base_model_name_or_path = cfg.model.name_or_path or cfg.model.backbone
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def peft_adapter_files(
    state: dict[str, torch.Tensor],
    cfg: FedSimConfig,
    target_modules: str,
    rank: int,
    global_rank: int,
    dense_modules: tuple[str, ...] | list[str] | None = None,
) -> dict[str, bytes]:
    """:func:`save_peft_adapter`'s files as bytes (file name to content), for a process that
    holds the model stack to write for one that does not (a client actor for the driver)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedsim-") as tmp:
        save_peft_adapter(state, tmp, cfg, target_modules, rank, global_rank, dense_modules)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
