"""The messages between the driver, the server and the client actors, as typed dataclasses.

Everything that crosses the Ray boundary is one of these, read by field name. A federated method
(:mod:`fedsim.methods`) adds its own payload to a message as a *part*: ``Parts`` maps a method
to one value, and only that method reads it (``parts.of(method)``).

One round, in order:

1. the server's :class:`Broadcast` (one object in the store for every task of the round);
2. a :class:`ClientTask` per sampled client, with the client's :class:`ClientState` from its
   last round;
3. each client returns a :class:`ClientReport` (plain values for the driver), an
   :class:`Upload` (the tensors for the server) and its new :class:`ClientState`;
4. the driver hands the server the uploads with their :class:`ClientMeta`; the server answers
   with an :class:`AggregateReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

State = dict[str, torch.Tensor]


def nbytes(state: State | None) -> int:
    """Bytes of the tensors of a state dict (what crosses the network)."""
    return sum(t.numel() * t.element_size() for t in (state or {}).values())


class Parts(dict):
    """Method name to that method's payload in a message (a method reads only its own)."""

    def of(self, method: Any, default: Any = None) -> Any:
        """The payload of ``method`` (an object with a ``name``), or ``default``."""
        return self.get(method.name, default)


@dataclass
class BaseUpdate:
    """Updates of the frozen base weights that the server folded in (FLoRA, FedEx-LoRA).

    Attributes:
        delta: module prefix (a ``lora_A`` key minus ``lora_A.weight``) to the dense ``dW``
            added to that module's pretrained weight, the sum over every round so far.
        version: how many rounds changed ``delta`` (a client reloads its base when it differs).
        round_bytes: what a client downloads to follow the last change (FLoRA: the stacked
            factors; FedEx-LoRA: the dense residual).
    """

    delta: State
    version: int
    round_bytes: int = 0


@dataclass
class Broadcast:
    """What every client task of a round receives.

    Attributes:
        adapter: the global adapter (``s = 1`` space), at the global rank.
        base: the folded base-weight updates, if a method folds any.
        parts: the methods' payloads (SCAFFOLD: the server variate).
    """

    adapter: State
    base: BaseUpdate | None = None
    parts: Parts = field(default_factory=Parts)


@dataclass(frozen=True)
class WorkerInfo:
    """Facts about a worker's backbone and data that the driver needs (``describe``)."""

    max_rank: int  # the largest rank the LoRA target modules admit
    target_modules: str  # regex of the module names that get LoRA
    dense_modules: list[str]  # non-LoRA modules trained and federated in full
    task: str  # "classification" or "generation"
    classes: list[str]
    num_test: int
    client_train_sizes: list[int]


@dataclass(frozen=True)
class ClientTask:
    """Train client ``client_id`` (of LoRA rank ``rank``) in round ``round_idx`` (1-based)."""

    client_id: int
    rank: int
    round_idx: int
    attempt: int = 0
    evaluate: bool = True  # personalised evaluation this round (eval.every)
    cohort: tuple[int, ...] = ()  # the ranks of every client sampled this round (public)


@dataclass
class ClientState:
    """What a client keeps between its rounds.

    Attributes:
        private: the tensors its sharing policy keeps on the client.
        parts: the methods' persistent client state (SCAFFOLD: the client variate).
    """

    private: State = field(default_factory=dict)
    parts: Parts = field(default_factory=Parts)

    def to_dict(self) -> dict:
        """Nested dicts of tensors, for a checkpoint file."""
        return {"private": self.private, "methods": dict(self.parts)}

    @classmethod
    def from_dict(cls, data: dict | None) -> ClientState:
        """Inverse of :meth:`to_dict` (an empty state for None)."""
        data = data or {}
        return cls(dict(data.get("private", {})), Parts(data.get("methods", {})))


@dataclass
class ClientReport:
    """Everything a client sends back besides its tensors (plain Python values).

    ``parts`` holds the methods' own report values (FediLoRA's editing: edited tensors and
    similarities; HetLoRA's pruning: the tail norm).
    """

    client_id: int
    rank: int
    num_samples: int
    steps: int
    train_loss: float
    personalized: dict[str, float]
    upload_bytes: int = 0
    download_bytes: int = 0
    time_s: float = 0.0
    next_rank: int = 0  # the client's rank from its next round on (a method may lower it)
    node_id: str = ""
    parts: Parts = field(default_factory=Parts)


@dataclass
class Upload:
    """The tensors a client sends to the server.

    Attributes:
        update: its shared tensors after local training (CPU, ``s = 1`` space).
        parts: the methods' tensors (SCAFFOLD: ``c_i+ - c_i``).
    """

    update: State
    parts: Parts = field(default_factory=Parts)

    def nbytes(self) -> int:
        return nbytes(self.update) + sum(nbytes(p) for p in self.parts.values())


@dataclass(frozen=True)
class ClientMeta:
    """What the server needs to know of an upload besides its tensors."""

    client_id: int
    rank: int
    num_samples: int
    steps: int


@dataclass
class AggregateReport:
    """What one merge did: accepted and rejected clients, timing, the global update's size."""

    round_idx: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    aggregate_s: float = 0.0
    global_delta_norm: float = 0.0
    nonfinite: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the server hooks' metrics
    columns: dict[int, dict[str, Any]] = field(default_factory=dict)  # their client columns
    # the merge diagnostics per rank dimension (MergeDiagnostics.dimensions()), if computed,
    # with the global adapter's energy per rank band under "energy" (rank_energy())
    diagnostics: dict[str, Any] | None = None


@dataclass
class ExportedAdapter:
    """The final global model as a peft adapter, plus base-weight updates peft cannot hold.

    Attributes:
        adapter: the LoRA (and dense) tensors in the ``s = 1`` space.
        rank: its rank.
        base: dense updates of the pretrained weights, to add before loading the adapter
            (FedEx-LoRA's residuals), or None.
    """

    adapter: State
    rank: int
    base: State | None = None
