"""LoRA adapters of several ranks on one frozen backbone, switched in place.

An actor serves many clients: it keeps one peft adapter per distinct rank and loads a client's
tensors into it, so the backbone is built once and switching clients costs a copy of the
adapter tensors only.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedsim.config import LoraConfig
from fedsim.models.backbone import Backbone

HEAD_MODULE = "classifier"


def client_scaling(cfg: LoraConfig, rank: int, global_rank: int) -> float:
    """The factor ``s`` in ``dW = s * B @ A`` for a client of ``rank``.

    ``constant``: ``alpha / R`` for every client, so ``B @ A`` means the same everywhere;
    ``rank``: peft's ``alpha / r``.
    """
    return cfg.alpha / global_rank if cfg.scaling == "constant" else cfg.alpha / rank


def peft_config(
    cfg: LoraConfig, target_modules: str, rank: int, global_rank: int
) -> PeftLoraConfig:
    """The peft config of a rank-``rank`` adapter; its peft scaling is :func:`client_scaling`."""
    return PeftLoraConfig(
        r=rank,
        lora_alpha=client_scaling(cfg, rank, global_rank) * rank,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        modules_to_save=[HEAD_MODULE],
    )


def adapter_name(rank: int) -> str:
    return f"r{rank}"


class AdapterHost:
    """A peft model over one backbone, holding one adapter per rank.

    Args:
        backbone: the frozen backbone (its model is wrapped in place).
        lora: LoRA settings.
        global_rank: the largest rank ``R`` (sets the constant scaling).
    """

    def __init__(self, backbone: Backbone, lora: LoraConfig, global_rank: int):
        self.backbone = backbone
        self.lora = lora
        self.global_rank = global_rank
        self.model: PeftModel | None = None
        self._ranks: set[int] = set()

    def activate(self, rank: int, seed: int | None = None) -> PeftModel:
        """Make the rank-``rank`` adapter the active one, creating it on first use.

        Args:
            rank: LoRA rank.
            seed: if given, a new adapter's random init is drawn under this seed.
        """
        name = adapter_name(rank)
        if rank not in self._ranks:
            config = peft_config(self.lora, self.backbone.target_modules, rank, self.global_rank)
            with torch.random.fork_rng():
                if seed is not None:
                    torch.manual_seed(seed)
                if self.model is None:
                    self.model = get_peft_model(self.backbone.model, config, adapter_name=name)
                else:
                    self.model.add_adapter(name, config)
            self._ranks.add(rank)
        self.model.set_adapter(name)
        return self.model

    def load(self, rank: int, state: dict[str, torch.Tensor]) -> PeftModel:
        """Activate the rank-``rank`` adapter and copy ``state`` (peft key names) into it."""
        model = self.activate(rank)
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name(rank))
        bad = [k for k in result.unexpected_keys if "lora_" in k or HEAD_MODULE in k]
        if bad:
            raise KeyError(f"adapter state has keys the model lacks: {bad[:3]}")
        return model

    def state(self, rank: int) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the rank-``rank`` adapter's tensors (peft key names)."""
        self.activate(rank)
        state = get_peft_model_state_dict(self.model, adapter_name=adapter_name(rank))
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def trainable_parameters(self, rank: int) -> list[torch.nn.Parameter]:
        """The parameters a client of ``rank`` trains: its LoRA tensors and the head."""
        self.activate(rank)
        return [p for p in self.model.parameters() if p.requires_grad]
