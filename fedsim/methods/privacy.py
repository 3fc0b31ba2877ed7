"""Client-level differential privacy: DP-FedAvg (ALGORITHMS 4b). Not wired yet: config only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from fedsim.methods.base import Method

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


@dataclass
class PrivacyConfig:
    enabled: bool = False
    noise: Literal["server", "client"] = "server"
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float = 0.0
    accountant: Literal["rdp", "pld"] = "rdp"


class Privacy(Method):
    name: ClassVar[str] = "privacy"

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        if cfg.privacy.enabled:
            from fedsim.errors import ConfigError

            raise ConfigError("privacy.enabled", "differential privacy is not implemented yet")
