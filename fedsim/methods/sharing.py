"""Sharing policies (docs/algorithms.md §2): which of a client's tensors go to the server.

``all`` shares everything; ``B`` (pLoRA) keeps each client's ``lora_A`` private; ``A``
(FedSA-LoRA) keeps ``lora_B`` private; ``none`` is the local-only baseline. The rule itself is
:func:`aggregation.shared_keys`; this method applies it on the client and the server alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from aggregation import SHARING_POLICIES, shared_keys
from fedsim.errors import ConfigError
from fedsim.methods.base import Method, configured_merger

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


class Sharing(Method):
    """The configured ``sharing.policy`` (always on; ``all`` filters nothing)."""

    name: ClassVar[str] = "sharing"
    order: ClassVar[int] = 10

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return True

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        policy = cfg.sharing.policy
        if policy not in SHARING_POLICIES:
            raise ConfigError(
                "sharing.policy",
                f"unknown policy {policy!r}; allowed: {', '.join(SHARING_POLICIES)}",
            )
        merger = configured_merger(cfg)
        if merger is not None and merger.needs_pairs and policy in ("A", "B"):
            raise ConfigError(
                "sharing.policy",
                f"aggregation.method={cfg.aggregation.method} needs both A and B of every module "
                f"on the server, but sharing.policy={policy} keeps one of them on the clients; "
                "use sharing.policy=all or a merge of factors (zeropad, fedilora)",
            )

    def filter_shared(self, keys: list[str]) -> list[str]:
        return shared_keys(keys, self.cfg.sharing.policy)
