"""The client worker: one frozen backbone that trains and evaluates any client's adapter.

``ClientWorker`` is a plain class (testable without Ray); :mod:`actors.pool` wraps it with
``ray.remote``. A worker serves whichever clients it is handed: each client's data partition is
rebuilt from the seed, never shipped, and its adapter is loaded into the worker's rank-``r``
peft adapter in place.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import transformers

from aggregation import (
    edit_layerwise,
    fold_scaling,
    get_merger,
    hetlora_tail_norm,
    is_lora,
    merger_class,
    scaffold_client_variate,
    shared_keys,
    truncate,
    unfold_scaling,
)
from fedsim.config import FedSimConfig, resolve_ranks
from fedsim.data.federated import FederatedData, load_dataset
from fedsim.data.partition import rng_for
from fedsim.devices import InjectedFault, injected_failure, straggler_delay
from fedsim.models.backbone import build_backbone
from fedsim.models.lora import AdapterHost, client_scaling, fresh_lora_state
from fedsim.objectives import TailPenalty, build_objective, tower_depths
from fedsim.tasks import EvalPart, build_task
from fedsim.training import train_local

_SHUFFLE, _TORCH, _FRESH, _EVAL_CAP = 201, 202, 203, 204
# the global test set's key in the eval.max_samples subset stream (no client has this id)
_GLOBAL = 2**32 - 1
State = dict[str, torch.Tensor]


def nbytes(state: State) -> int:
    """Bytes of the tensors of a state dict (what crosses the network)."""
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass(frozen=True)
class ClientTask:
    """Train client ``client_id`` (of LoRA rank ``rank``) in round ``round_idx`` (1-based)."""

    client_id: int
    rank: int
    round_idx: int
    attempt: int = 0
    evaluate: bool = True  # personalised evaluation this round (eval.every)


@dataclass
class ClientReport:
    """Everything a client sends back besides its adapter update (plain Python values)."""

    client_id: int
    rank: int
    num_samples: int
    steps: int
    train_loss: float
    personalized: dict[str, float]
    edited: list[str] = field(default_factory=list)
    similarities: dict[str, float] = field(default_factory=dict)
    upload_bytes: int = 0
    download_bytes: int = 0
    time_s: float = 0.0
    next_rank: int = 0
    tail_norm: float | None = None
    node_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class ClientWorker:
    """Holds one backbone copy and runs client tasks on it.

    Args:
        cfg: the resolved experiment config.
    """

    def __init__(self, cfg: FedSimConfig):
        # one tokenizer per actor process: its thread pool would only fight the other actors
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(max(1, int(cfg.resources.client.num_cpus)))
        self.cfg = cfg
        self.device = torch.device(
            "cuda" if cfg.resources.client.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        )
        self.ranks = resolve_ranks(cfg.clients, cfg.seed)
        self.global_rank = max(self.ranks)
        self.data = FederatedData(cfg, load_dataset(cfg))
        self.backbone = build_backbone(
            cfg.model, self.data.num_classes, cfg.seed, cfg.data.image_fill, cfg.data.text_fill
        )
        self.backbone.model.to(self.device)
        self.host = AdapterHost(self.backbone, cfg.lora, self.global_rank)
        self.task = build_task(cfg, self.backbone, self.data.dataset, self.device)
        self.merger = get_merger(cfg.aggregation.method, **merger_options(cfg))
        self.depths = tower_depths(n for n, _ in self.backbone.model.named_modules())
        self._base_version = 0

    def ping(self) -> str:
        return "ok"

    def describe(self) -> dict:
        """Facts about the backbone and the split that the driver needs (plain values)."""
        return {
            "max_rank": self.backbone.max_rank,
            "target_modules": self.backbone.target_modules,
            "dense_modules": list(self.backbone.dense_modules),
            "task": self.task.kind,
            "classes": list(self.data.dataset.classes),
            "num_test": len(self.data.test),
            "client_train_sizes": [len(c.train) for c in self.data.clients],
        }

    def initial_global(self) -> State:
        """The seeded initial global adapter at the global rank, in the ``s = 1`` space."""
        self.host.activate(self.global_rank, seed=self.cfg.seed)
        return fold_scaling(self.host.state(self.global_rank), self._scaling(self.global_rank))

    def _scaling(self, rank: int) -> float:
        return client_scaling(self.cfg.lora, rank, self.global_rank)

    def _sync_base(self, broadcast: dict) -> None:
        """Apply FLoRA's merged base-weight updates if they changed since the last task."""
        version = broadcast.get("base_version", 0)
        if version != self._base_version:
            if self.host.model is None:  # a new actor (a replacement, or a resumed run)
                self.host.activate(self.global_rank, seed=self.cfg.seed)
            self.host.set_base_delta(broadcast.get("base_delta"))
            self._base_version = version

    def _received(self, task: ClientTask, broadcast: dict) -> State:
        """The client's rank-``r_i`` starting adapter (model space) from the broadcast."""
        view = self.merger.redistribute(broadcast["adapter"], task.rank)
        if self.merger.fresh_adapter_each_round:
            seq = np.random.SeedSequence([self.cfg.seed, _FRESH, task.round_idx, task.client_id])
            gen = torch.Generator().manual_seed(int(seq.generate_state(1)[0]))
            # The broadcast adapter's rank-r view gives the shapes; no copy off the model.
            template = truncate(broadcast["adapter"], task.rank)
            return {**fresh_lora_state(template, gen), **view}
        return unfold_scaling(view, self._scaling(task.rank))

    def train(
        self, task: ClientTask, broadcast: dict, state: dict | None = None
    ) -> tuple[dict, State, State | None, dict]:
        """Run one client's round: load, train, edit, evaluate, and package the upload.

        Args:
            task: which client, rank and round.
            broadcast: the server's round broadcast: ``adapter`` (global, ``s = 1`` space),
                ``scaffold_c`` (SCAFFOLD's server variate or None), ``base_delta`` /
                ``base_version`` (FLoRA's merged base updates).
            state: the client's persistent state from earlier rounds (None the first time):
                ``private`` tensors its sharing policy keeps, ``scaffold_c`` its variate.

        Returns:
            ``(report, update, scaffold_delta, new_state)``: the report as a plain dict, the
            shared tensors (CPU, ``s = 1`` space), SCAFFOLD's ``c_i+ - c_i`` (or None) and the
            client's new persistent state.
        """
        start = time.perf_counter()
        cfg = self.cfg
        client = self.data.clients[task.client_id]
        s = self._scaling(task.rank)
        self._sync_base(broadcast)
        received = self._received(task, broadcast)
        state = state or {}
        # A client whose rank was pruned since its last round keeps the leading dimensions.
        start_state = {**received, **truncate(state.get("private", {}), task.rank)}
        model = self.host.load(task.rank, start_state)
        shared = shared_keys(list(start_state), cfg.sharing.policy)
        params = self.host.parameters_by_key(task.rank)
        scaffold = broadcast.get("scaffold_c") is not None
        c_view, c_i = self._variates(broadcast, state, task.rank) if scaffold else (None, None)
        correction = {k: c_view[k] - c_i[k] for k in c_view} if scaffold else None
        objective = build_objective(
            cfg.objective, start_state, shared, self.depths, scaffold_correction=correction
        )
        prune = cfg.pruning.gamma > 0 and task.rank - cfg.pruning.delta >= cfg.pruning.min_rank
        if prune:
            objective = TailPenalty(objective, cfg.pruning.gamma, cfg.pruning.delta)
        stats = self._train(task, model, objective, params)
        local = self.host.state(task.rank)
        scaffold_delta = None
        new_state: dict = {}
        if scaffold:
            c_new = scaffold_client_variate(
                c_i,
                c_view,
                {k: start_state[k] for k in c_view},
                {k: local[k] for k in c_view},
                stats.steps,
                cfg.train.lr,
            )
            scaffold_delta = {k: c_new[k] - c_i[k] for k in c_new}
            new_state["scaffold_c"] = c_new
        edited: list[str] = []
        similarities: dict[str, float] = {}
        if cfg.editing.enabled and task.round_idx >= 2:
            local, edited, similarities = self._edit(task.rank, local, received, shared)
        next_rank, tail = self._next_rank(task.rank, local) if prune else (task.rank, None)
        personalized = self._metrics(client.holdout, task.client_id) if task.evaluate else {}
        update = fold_scaling({k: local[k] for k in shared}, s)
        if task.client_id in cfg.faults.nan_update_clients:
            update = {k: torch.full_like(v, float("nan")) for k, v in update.items()}
        self._inject_faults(task)
        new_state["private"] = {k: v for k, v in local.items() if k not in shared}
        report = ClientReport(
            client_id=task.client_id,
            rank=task.rank,
            num_samples=len(client.train),
            steps=stats.steps,
            train_loss=stats.loss_mean,
            personalized=personalized,
            edited=edited,
            similarities=similarities,
            upload_bytes=nbytes(update) + (nbytes(scaffold_delta) if scaffold_delta else 0),
            download_bytes=nbytes(received)
            + (nbytes(c_view) if c_view else 0)
            + broadcast.get("base_bytes", 0),
            time_s=time.perf_counter() - start,
            next_rank=next_rank,
            tail_norm=tail,
            node_id=_node_id(),
        )
        return report.to_dict(), update, scaffold_delta, new_state

    def _inject_faults(self, task: ClientTask) -> None:
        """``faults.*``: sleep like a straggler, then fail or crash if this attempt must."""
        f = self.cfg.faults
        if f.sleep_scale > 0:
            time.sleep(f.sleep_scale * straggler_delay(self.cfg, task.round_idx, task.client_id))
        if injected_failure(self.cfg, task.round_idx, task.client_id, task.attempt):
            if f.fail_mode == "crash":
                os._exit(17)  # the process dies mid-round, as if killed from outside
            raise InjectedFault(
                f"faults.fail_prob: injected failure of client {task.client_id} in round "
                f"{task.round_idx}, attempt {task.attempt}"
            )

    def _variates(self, broadcast: dict, state: dict, rank: int) -> tuple[State, State]:
        """SCAFFOLD: the server's variate and the client's own (zero at first), at ``rank``."""
        c_view = truncate(broadcast["scaffold_c"], rank)
        c_i = state.get("scaffold_c")
        if c_i:
            return c_view, truncate(c_i, rank)  # a pruned client keeps the leading dimensions
        return c_view, {k: torch.zeros_like(v) for k, v in c_view.items()}

    def _train(self, task: ClientTask, model, objective, params):
        """Local training of ``task``'s client, seeded by (seed, round, client)."""
        cfg = self.cfg
        seed_seq = np.random.SeedSequence([cfg.seed, _TORCH, task.round_idx, task.client_id])
        torch.manual_seed(int(seed_seq.generate_state(1)[0]))
        shuffle = rng_for(cfg.seed, _SHUFFLE, task.round_idx, task.client_id)
        split = self.data.clients[task.client_id].train
        return train_local(
            model,
            self.host.trainable_parameters(task.rank),
            lambda _epoch: self.task.train_batches(split, cfg.train.batch_size, shuffle),
            self.task.loss,
            num_epochs=cfg.train.local_epochs,
            max_steps=cfg.train.max_local_steps,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            device=self.device,
            optimizer=cfg.train.optimizer,
            objective=objective,
            named_params=params,
        )

    def _edit(self, rank: int, local: State, received: State, shared: list[str]):
        """FediLoRA layer-wise editing of the shared tensors; reloads the adapter if edited.

        Returns:
            ``(state, edited keys, similarities)``.
        """
        e = self.cfg.editing
        result = edit_layerwise(
            {k: local[k] for k in shared},
            {k: received[k] for k in shared},
            key=e.key,
            count=e.count,
            threshold=e.threshold,
            mode=e.mode,
        )
        if result.edited:
            local = {**local, **result.state}
            self.host.load(rank, local)
        return local, list(result.edited), dict(result.similarities)

    def _next_rank(self, rank: int, local: State) -> tuple[int, float]:
        """HetLoRA self-pruning: the rank for the next round, and the tail norm it is based on."""
        p = self.cfg.pruning
        tail = float(hetlora_tail_norm({k: v for k, v in local.items() if is_lora(k)}, p.delta))
        return (rank - p.delta if tail < p.threshold else rank), tail

    def _metrics(self, split, client_id: int) -> dict[str, float]:
        """The personalised model's metrics on (at most ``eval.max_samples`` of) ``split``."""
        split = split.capped(self.cfg.eval.max_samples, self.cfg.seed, _EVAL_CAP, client_id)
        return self.task.evaluate(self.host.model, split)

    def evaluate_global(self, broadcast: dict, shard: int, num_shards: int) -> EvalPart:
        """The global adapter's results on shard ``shard`` of ``num_shards`` of the test set.

        The test set (at most ``eval.max_samples`` of it) is cut into fixed batches first and
        the batches are dealt out in contiguous runs, so every batch, and hence every number,
        is the same whatever the number of shards.

        Returns:
            The task's evaluation part; :func:`fedsim.tasks.combine_parts` joins the parts in
            shard order.
        """
        self._sync_base(broadcast)
        state = unfold_scaling(broadcast["adapter"], self._scaling(self.global_rank))
        self.host.load(self.global_rank, state)
        size = self.cfg.train.eval_batch_size
        split = self.data.test.capped(self.cfg.eval.max_samples, self.cfg.seed, _EVAL_CAP, _GLOBAL)
        starts = np.array_split(np.arange(0, len(split), size), num_shards)[shard]
        return self.task.eval_part(self.host.model, split, starts, size)


def _node_id() -> str:
    """The Ray node this worker runs on (empty outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def merger_options(cfg: FedSimConfig) -> dict:
    """The ``aggregation.*`` values that the configured merger's constructor takes."""
    return {k: getattr(cfg.aggregation, k) for k in merger_class(cfg.aggregation.method).options}
