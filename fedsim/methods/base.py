"""The hooks a federated method plugs into the client, the server and the round loop.

A method (SCAFFOLD, FedProx, FediLoRA's editing, FLoRA's base folding, ...) is one subclass of
:class:`Method` in one module of :mod:`fedsim.methods`. It declares when the config turns it on
(:meth:`Method.enabled`), the rules its settings must follow (:meth:`Method.check`), and
overrides only the hooks it needs; every hook of the base class does nothing. The hooks come in
three sets, named for the process that calls them: :class:`ClientHooks` (the client worker,
:mod:`actors.client`), :class:`ServerHooks` (the server, :mod:`actors.server`) and
:class:`RunHooks` (the run in the driver, :mod:`fedsim.simulation`). Each calls the hooks of
every enabled method in ascending :attr:`Method.order`, and
never asks which method is on.

Client hooks see and change a :class:`ClientStep`; server hooks a :class:`MergeBatch`. A
method's payloads travel in the messages' ``parts`` (see :mod:`fedsim.messages`) under its
name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from aggregation import fold_scaling
from fedsim.messages import (
    BaseUpdate,
    Broadcast,
    ClientMeta,
    ClientReport,
    ClientState,
    ExportedAdapter,
    Parts,
    State,
    Upload,
)

if TYPE_CHECKING:
    from aggregation import RankMerger
    from fedsim.config import FedSimConfig
    from fedsim.data.federated import Split
    from fedsim.messages import ClientTask

Params = Mapping[str, torch.nn.Parameter]


class Objective:
    """The local objective of one client task: cross-entropy plus the methods' terms.

    Methods add a ``penalty(params) -> Tensor | None`` (summed into the loss, in the order
    added) or a ``correct(params)`` (a change of the gradients after ``backward``). ``params``
    maps peft state keys to the trainable parameters.
    """

    def __init__(self) -> None:
        self.penalties: list = []
        self.corrections: list = []

    def penalty(self, params: Params) -> torch.Tensor | None:
        total = None
        for term in self.penalties:
            value = term(params)
            if value is not None:
                total = value if total is None else total + value
        return total

    def correct(self, params: Params) -> None:
        for correction in self.corrections:
            correction(params)


@dataclass
class ClientStep:
    """One client task as the client hooks see it.

    Attributes:
        task: which client, rank and round.
        broadcast: the round's broadcast.
        state: the client's persistent state from its earlier rounds (read only).
        received: the global adapter's view at the client's rank (model space).
        start: what local training starts from (``received`` plus the private tensors).
        shared: the keys the client uploads.
        objective: the local objective; ``before_training`` hooks add terms.
        depths: layers per tower of the backbone (FedMLLM's layer restriction).
        local: after training, the client's adapter; an ``after_training`` hook may replace
            it (FediLoRA's editing), and the worker then reloads the model.
        steps: local optimiser steps taken.
        next_rank: the client's rank from its next round on (HetLoRA's pruning lowers it).
        download_bytes: bytes of method payloads the client downloaded this round.
        upload: the methods' tensors for the server (``Upload.parts``).
        new_state: the methods' persistent client state (``ClientState.parts``).
        report: the methods' report values (``ClientReport.parts``).
        memo: a method's values from its ``before_training`` for its ``after_training``.
        train: the rows local training reads; a ``before_training`` hook may replace them
            (a label-flipping attacker's relabelled split).
        scaling: the client's LoRA scaling ``s_i`` (the upload is in the ``s = 1`` space).
        upload_rank: the rank the upload claims (an attacker may lie about it).
        num_classes: the dataset's number of classes.
    """

    task: ClientTask
    broadcast: Broadcast
    state: ClientState
    received: State
    start: State
    shared: list[str]
    objective: Objective
    depths: Mapping[str, int]
    local: State = field(default_factory=dict)
    steps: int = 0
    next_rank: int = 0
    download_bytes: int = 0
    upload: Parts = field(default_factory=Parts)
    new_state: Parts = field(default_factory=Parts)
    report: Parts = field(default_factory=Parts)
    memo: Parts = field(default_factory=Parts)
    train: Split | None = None
    scaling: float = 1.0
    upload_rank: int = 0
    num_classes: int = 0

    def origin(self) -> State:
        """The shared tensors the client started from, in the upload's ``s = 1`` space."""
        return fold_scaling({k: self.start[k] for k in self.shared}, self.scaling)


@dataclass
class MergeBatch:
    """The accepted uploads of a round, in client-id order, as the server hooks see them.

    Attributes:
        clients: each upload's client id, rank, sample count and local steps.
        updates: the shared tensors to merge; a ``before_merge`` hook may replace them
            (FedNova rescales them).
        uploads: the uploads as received (with the methods' parts).
        current: the global adapter's shared tensors before this merge.
        metrics: round metrics a server hook reports (``robust/rejected``).
        columns: per client id, columns a server hook adds to the round's client table.
    """

    clients: list[ClientMeta]
    updates: list[State]
    uploads: list[Upload]
    current: State
    metrics: dict[str, float] = field(default_factory=dict)
    columns: dict[int, dict[str, Any]] = field(default_factory=dict)

    def keep(self, positions: Sequence[int]) -> None:
        """Merge only the uploads at ``positions`` (in order); a robust rule's selection."""
        self.clients = [self.clients[i] for i in positions]
        self.updates = [self.updates[i] for i in positions]
        self.uploads = [self.uploads[i] for i in positions]

    def column(self, client_id: int, **values: Any) -> None:
        """Add ``values`` to ``client_id``'s row of the round's client table."""
        self.columns.setdefault(client_id, {}).update(values)

    @property
    def ranks(self) -> list[int]:
        return [c.rank for c in self.clients]

    @property
    def num_samples(self) -> list[int]:
        return [c.num_samples for c in self.clients]


@dataclass
class ServerContext:
    """What server hooks may use of the server (given to :meth:`Method.bind_server`).

    Attributes:
        merger: the heterogeneous-rank merge rule.
        template: the initial global adapter (every key, ``s = 1`` space).
        shared: the keys that clients upload.
        global_rank: the global rank ``R``.
        num_clients: the number of clients ``N`` of the federation.
        base: folds updates into the clients' frozen base weights (see :class:`BaseFolding`).
    """

    merger: RankMerger
    template: State
    shared: list[str]
    global_rank: int
    num_clients: int
    base: BaseFolding


class BaseFolding:
    """The server's running sum of updates folded into every client's frozen base weights."""

    def __init__(self) -> None:
        self.delta: State | None = None
        self.version = 0
        self.round_bytes = 0

    def add(self, delta: State, round_bytes: int) -> None:
        """Fold ``delta`` (module prefix to ``dW``) into the base; clients download
        ``round_bytes`` to follow."""
        if self.delta is None:
            self.delta = delta
        else:
            self.delta = {k: self.delta[k] + delta[k] for k in delta}
        self.version += 1
        self.round_bytes = round_bytes

    def message(self) -> BaseUpdate | None:
        """What the broadcast carries: None until a method folded something."""
        if self.delta is None:
            return None
        return BaseUpdate(self.delta, self.version, self.round_bytes)

    def state_dict(self) -> dict:
        return {"delta": self.delta, "version": self.version, "round_bytes": self.round_bytes}

    def load_state_dict(self, state: dict) -> None:
        self.delta = state.get("delta")
        self.version = int(state.get("version", 0))
        self.round_bytes = int(state.get("round_bytes", 0))


class ClientHooks:
    """The hooks the client worker calls (:class:`actors.client.ClientWorker`, in the client
    actor's process, or in the driver's process under ``LocalExecutor``).

    Per client task, in this order, each hook of every enabled method in ``order``:
    :meth:`filter_shared` (which keys leave the client), :meth:`receive` (the starting adapter),
    :meth:`fold_into_base` (this task's own change of the frozen weights),
    :meth:`before_training`, local training, :meth:`after_training`, :meth:`before_upload`.
    They see and change a :class:`ClientStep`; ``self.server`` is None in this process.
    """

    def filter_shared(self, keys: list[str]) -> list[str]:
        """The keys that go to the server, of ``keys`` (the server calls it too, to know which
        keys a client sends)."""
        return keys

    def receive(self, task: ClientTask, broadcast: Broadcast, view: State) -> State | None:
        """The client's starting adapter (model space), if this method decides it.

        Args:
            task: the client task.
            broadcast: the round's broadcast.
            view: the merge rule's rank-``r_i`` view of the global adapter (``s = 1`` space).

        Returns:
            The adapter, or None for the default (``view`` in the client's LoRA scaling).
        """
        return None

    def fold_into_base(self, task: ClientTask, broadcast: Broadcast) -> State | None:
        """A change of the frozen base weights for this client task only (Fed-PLoRA folds the
        global modules the client does not train), on top of the broadcast's folded base.

        Returns:
            Module prefix (a ``lora_A`` key minus ``lora_A.weight``) to the dense ``dW``
            (``s = 1`` space), or None for no change. The worker adds it to
            ``broadcast.base`` for this task and restores the shared base for the next one.
        """
        return None

    def before_training(self, step: ClientStep) -> None:
        """Before local training: add terms to ``step.objective``."""

    def after_training(self, step: ClientStep) -> None:
        """After local training: change ``step.local``, add to the upload, state, report."""

    def before_upload(self, step: ClientStep, update: State) -> State:
        """The shared tensors sent to the server (``s = 1`` space), from ``update``: a
        client-side privacy mechanism clips and noises them, an attacker forges them. The
        client's own adapter (``step.local``) is not changed."""
        return update


class ServerHooks:
    """The hooks the server calls (:class:`actors.server.Server`, in the server actor or the
    driver's process).

    Once at start: :meth:`bind_server` (sets ``self.server``; only the server's copy of a
    method has it). Per round, each hook of every enabled method in ``order``:
    :meth:`broadcast_part` (what the round's broadcast carries), then, when the updates are in,
    :meth:`before_merge`, the merge rule, :meth:`after_merge`, the server optimiser,
    :meth:`after_apply`. At the end: :meth:`export`. :meth:`state_dict` /
    :meth:`load_state_dict` go into every checkpoint. :meth:`upload_dimensions` is a question,
    not a step: the merge diagnostics ask it of each accepted upload.
    """

    server: ServerContext | None = None

    def bind_server(self, server: ServerContext) -> None:
        """Called once when the server starts: keep what the server hooks need."""
        self.server = server

    def broadcast_part(self) -> Any:
        """This method's payload in the round's broadcast (None: nothing)."""
        return None

    def before_merge(self, batch: MergeBatch) -> None:
        """Before the merge rule runs: may replace ``batch.updates`` (a method with this hook
        makes its rounds merge as one batch; see :meth:`Method.needs_all_updates`)."""

    def after_merge(self, batch: MergeBatch, merged: State) -> State:
        """After the merge rule, before the server optimiser: the merged shared tensors."""
        return merged

    def after_apply(self, batch: MergeBatch) -> None:
        """After the new global adapter is applied (only when it was finite)."""

    def upload_dimensions(self, upload: Upload) -> Sequence[int] | None:
        """The dimensions of the global adapter that an accepted upload's rank positions
        stand for, in order, when this method hands a client other dimensions than its
        leading ``r_i`` (Fed-PLoRA's modules ``K_i``); None: it does not. The merge
        diagnostics (docs/algorithms.md §1.9) count coverage, weights and changes on them."""
        return None

    def export(self, adapter: ExportedAdapter) -> ExportedAdapter:
        """The final global model for saving (FLoRA: the stacked rounds)."""
        return adapter

    def state_dict(self) -> dict:
        """The server-side state that evolves across rounds (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class RunHooks:
    """The hooks the run calls in the driver's process (:mod:`fedsim.simulation`), where the
    round's metrics, the client table and the run's plots are built
    (:mod:`fedsim.tracking.round_report`, :mod:`fedsim.tracking.outputs`).

    Per round, after the merge: :meth:`round_metrics`, then :meth:`client_columns` per merged
    client; at the end of the run: :meth:`figures`.
    """

    def round_metrics(self, reports: Sequence[ClientReport]) -> dict[str, float]:
        """Metrics of a round from the reports of the clients merged in it."""
        return {}

    def client_columns(self, report: ClientReport) -> dict[str, Any]:
        """Columns this method adds to a client's row of the round's client table."""
        return {}

    def figures(self, clients: Sequence[Sequence[dict]]) -> dict[str, Any]:
        """Plots of a finished run (artifact name to matplotlib figure), from every round's
        client table (``tracking.plots``)."""
        return {}


class Method(ClientHooks, ServerHooks, RunHooks):
    """Base class of federated methods: a name, a switch, rules, and the hooks it overrides.

    One class holds a method's client, server and run hooks so that the two halves of a
    protocol (what a client sends under the method's name, what the server does with it) read
    side by side in one module; the three base classes keep them apart and say which process
    calls each. A process builds its own instances from the config
    (:func:`fedsim.config.registry.enabled_methods`) and calls only its own hooks.

    Attributes:
        name: the registry name (also the key of the method's payloads in messages).
        order: where the method's hooks run among the enabled methods', ascending (a tie
            keeps the registry's order). The bands: 10 sharing (which keys leave the client,
            before anything reads them); 20-29 the client objectives; 30-39 the robust rules,
            then differential privacy, on the uploads; 40-49 server-side rescaling and
            folding (FedNova, FLoRA, FedEx-LoRA, Fed-PLoRA); 50 FediLoRA's editing of the
            client adapter; 60 HetLoRA's rank self-pruning; 90 the attacker, last, so that it
            forges what finally leaves the client.
        objective: whether ``objective.method`` names it (a client objective).
        after_merge_streams: True when ``after_merge`` reads only ``merged`` and
            ``batch.clients`` (FLoRA), so it also runs after a streaming merge, whose batch
            holds no updates.
        leading_dimensions: True when the method takes a rank-``r_i`` client's dimensions
            to be the leading ``r_i`` dimensions of the global adapter: it measures an upload
            against the merge's truncated view of the global adapter (robust rules,
            differential privacy, FedNova), keeps per-dimension state across rounds
            (SCAFFOLD's variates) or prunes the trailing ones (HetLoRA's pruning). A method
            that hands a client other dimensions (Fed-PLoRA's random modules) rejects it.
        folds_base: True when the method folds updates into every client's frozen base
            weights (:class:`ServerContext` ``.base``) on the premise that a client's model is
            that shared base plus its own adapter (FLoRA, FedEx-LoRA).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0
    objective: ClassVar[bool] = False
    after_merge_streams: ClassVar[bool] = False
    leading_dimensions: ClassVar[bool] = False
    folds_base: ClassVar[bool] = False

    def __init__(self, cfg: FedSimConfig):
        self.cfg = cfg

    @classmethod
    def needs_all_updates(cls) -> bool:
        """Whether the server hooks read the round's updates together (``before_merge``,
        ``after_apply``, or an ``after_merge`` that reads ``batch.updates``); then the round
        is merged as one batch instead of streamed as updates arrive."""

        def own(hook: str) -> bool:
            return getattr(cls, hook) is not getattr(Method, hook)

        return (
            own("before_merge")
            or own("after_apply")
            or (own("after_merge") and not cls.after_merge_streams)
        )

    # -- config (read in any process) -----------------------------------------------------
    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        """Whether ``cfg`` turns this method on."""
        return False

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        """Raise :class:`fedsim.errors.ConfigError` when ``cfg`` breaks one of this method's
        rules (its own settings' ranges always; its compatibility when it is enabled)."""

    @classmethod
    def dp_conflict(cls, cfg: FedSimConfig) -> str | None:
        """Why differential privacy's guarantee would not cover this method as ``cfg`` sets it
        (the config error says it); None when the two compose. Read only when the method is
        enabled."""
        return None


class ObjectiveMethod(Method):
    """A client objective: on when ``objective.method`` names it."""

    objective: ClassVar[bool] = True

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.objective.method == cls.name


def configured_merger(cfg: FedSimConfig) -> type[RankMerger] | None:
    """The class of the merge rule ``cfg`` names (its capability flags are what methods check),
    or None when the name is unknown (the config check reports that)."""
    from aggregation.registry import MERGERS, merger_class

    return merger_class(cfg.aggregation.method) if cfg.aggregation.method in MERGERS else None


def check_weighted_sum_merge(cfg: FedSimConfig, key: str, name: str) -> None:
    """A method that needs a merge that is a weighted sum of factors at a fixed rank."""
    from fedsim.errors import ConfigError

    merger = configured_merger(cfg)
    if merger is not None and not (merger.linear_in_factors and merger.fixed_rank):
        raise ConfigError(
            key,
            f"{key}={name} needs a merge that is a weighted sum of the clients' factors with a "
            "fixed rank (zeropad, fedilora, hetlora), not "
            f"aggregation.method={cfg.aggregation.method}",
        )
