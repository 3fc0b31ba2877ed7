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
from fedsim.models.scaling import client_scaling

__all__ = ["DENSE_MODULES", "HEAD_MODULE", "AdapterHost", "client_scaling", "peft_config"]

HEAD_MODULE = "classifier"
# Trained, federated non-LoRA modules of a FusionClassifier (those that exist are saved).
DENSE_MODULES = (HEAD_MODULE, "missing_image")


def peft_config(
    cfg: LoraConfig,
    target_modules: str,
    rank: int,
    global_rank: int,
    dense_modules: tuple[str, ...] = (HEAD_MODULE,),
) -> PeftLoraConfig:
    """The peft config of a rank-``rank`` adapter; its peft scaling is :func:`client_scaling`."""
    return PeftLoraConfig(
        r=rank,
        lora_alpha=client_scaling(cfg, rank, global_rank) * rank,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        modules_to_save=list(dense_modules),
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
            config = peft_config(
                self.lora,
                self.backbone.target_modules,
                rank,
                self.global_rank,
                self.backbone.dense_modules,
            )
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
        dense = self.backbone.dense_modules
        bad = [k for k in result.unexpected_keys if "lora_" in k or any(m in k for m in dense)]
        if bad:
            raise KeyError(f"adapter state has keys the model lacks: {bad[:3]}")
        return model

    def state(self, rank: int) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the rank-``rank`` adapter's tensors (peft key names)."""
        self.activate(rank)
        state = get_peft_model_state_dict(self.model, adapter_name=adapter_name(rank))
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def parameters_by_key(self, rank: int) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters of the rank-``rank`` adapter, keyed like its state dict."""
        self.activate(rank)
        name = adapter_name(rank)
        out = {}
        for pname, p in self.model.named_parameters():
            if p.requires_grad:
                key = pname.replace(f"modules_to_save.{name}.", "").replace(f".{name}.", ".")
                out[key] = p
        return out

    def set_base_delta(self, delta: dict[str, torch.Tensor] | None) -> None:
        """Set every targeted base weight to ``W0 + delta[module]`` (FLoRA's merged updates).

        Args:
            delta: dense updates keyed by module prefix (a state key minus ``lora_A.weight``);
                a module changed before and absent from ``delta`` gets its ``W0`` back; None
                restores the pretrained weights.
        """
        if self.model is None:
            raise RuntimeError("activate an adapter before setting base weights")
        if not hasattr(self, "_base0"):
            self._base0 = {}
        modules = dict(self.model.named_modules())
        for prefix, d in (delta or {}).items():
            name = prefix.removesuffix(".").removeprefix("base_model.model.")
            layer = modules[f"base_model.model.{name}"].base_layer
            if prefix not in self._base0:
                self._base0[prefix] = layer.weight.detach().clone()
            with torch.no_grad():
                layer.weight.copy_(self._base0[prefix] + d.to(layer.weight))
        for prefix, w0 in self._base0.items():
            if delta is None or prefix not in delta:
                name = prefix.removesuffix(".").removeprefix("base_model.model.")
                with torch.no_grad():
                    modules[f"base_model.model.{name}"].base_layer.weight.copy_(w0)

    def trainable_parameters(self, rank: int) -> list[torch.nn.Parameter]:
        """The parameters a client of ``rank`` trains: its LoRA tensors and the head."""
        self.activate(rank)
        return [p for p in self.model.parameters() if p.requires_grad]


def fresh_lora_state(template: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
    """A newly initialised adapter shaped like ``template``, drawn from ``generator``.

    peft's default init: ``A`` uniform in ``+-1/sqrt(fan_in)`` (Kaiming-uniform with
    ``a = sqrt(5)``), ``B`` zero. Non-LoRA tensors are copied.
    """
    out = {}
    for k, v in template.items():
        if k.endswith("lora_A.weight"):
            fan_in = v[0].numel()
            bound = 1.0 / fan_in**0.5
            out[k] = (torch.rand(v.shape, generator=generator, dtype=v.dtype) * 2 - 1) * bound
        elif k.endswith("lora_B.weight"):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = v.clone()
    return out
