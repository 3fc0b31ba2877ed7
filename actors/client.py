"""The client worker: one frozen backbone that trains and evaluates any client's adapter.

``ClientWorker`` is a plain class (testable without Ray); :mod:`actors.pool` wraps it with
``ray.remote``. A worker serves whichever clients it is handed: each client's data partition is
rebuilt from the seed, never shipped, and its adapter is loaded into the worker's rank-``r``
peft adapter in place.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from aggregation import fold_scaling, truncate, unfold_scaling
from fedsim.config import FedSimConfig, resolve_ranks
from fedsim.config.registry import build_merger, enabled_methods
from fedsim.data.federated import FederatedData, load_dataset
from fedsim.data.partition import rng_for
from fedsim.devices import InjectedFault, injected_failure, straggler_delay
from fedsim.messages import (
    BaseUpdate,
    Broadcast,
    ClientReport,
    ClientState,
    ClientTask,
    State,
    Upload,
    WorkerInfo,
    nbytes,
)
from fedsim.methods.base import ClientStep, Objective
from fedsim.models.backbone import build_backbone
from fedsim.models.layers import tower_depths
from fedsim.models.lora import AdapterHost, client_scaling
from fedsim.tasks import EvalPart, build_task
from fedsim.tasks.context import fit_rows
from fedsim.tasks.training import train_local

# random streams of (seed, stream, round, client); 203 is FLoRA's fresh adapter
_SHUFFLE, _TORCH, _EVAL_CAP = 201, 202, 204
# the global test set's key in the eval.max_samples subset stream (no client has this id)
_GLOBAL = 2**32 - 1


class ClientWorker:
    """Holds one backbone copy and runs client tasks on it.

    Args:
        cfg: the resolved experiment config.
        frozen_dir: a node-local directory where the actors of the node share one mapped copy
            of the frozen backbone (:mod:`fedsim.models.frozen`); None builds a private one.
    """

    def __init__(self, cfg: FedSimConfig, frozen_dir: Path | None = None):
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
        dataset = load_dataset(cfg)
        args = (cfg.model, len(dataset.classes), cfg.seed, cfg.data.image_fill, cfg.data.text_fill)
        if frozen_dir is None:
            self.backbone = build_backbone(*args)
        else:
            from fedsim.config import flatten
            from fedsim.models.frozen import frozen_key, shared

            key = frozen_key(flatten(cfg.model, "model."), *args[1:])
            self.backbone = shared(frozen_dir, key, lambda: build_backbone(*args))
        # the rows the driver's pre-flight kept: the same check, with this worker's codec
        self.data = FederatedData(cfg, fit_rows(cfg, dataset, self.backbone.tokenizer))
        self.backbone.model.to(self.device)
        self.host = AdapterHost(self.backbone, cfg.lora, self.global_rank)
        self.task = build_task(cfg, self.backbone, self.data.dataset, self.device)
        self.merger = build_merger(cfg)
        self.depths = tower_depths(n for n, _ in self.backbone.model.named_modules())
        self.methods = enabled_methods(cfg)
        self._base_version = 0

    def ping(self) -> str:
        return "ok"

    def describe(self) -> WorkerInfo:
        """Facts about the backbone and the split that the driver needs."""
        return WorkerInfo(
            max_rank=self.backbone.max_rank,
            target_modules=self.backbone.target_modules,
            dense_modules=list(self.backbone.dense_modules),
            task=self.task.kind,
            classes=list(self.data.dataset.classes),
            num_test=len(self.data.test),
            client_train_sizes=[len(c.train) for c in self.data.clients],
        )

    def initial_global(self) -> State:
        """The seeded initial global adapter at the global rank, in the ``s = 1`` space."""
        self.host.activate(self.global_rank, seed=self.cfg.seed)
        return fold_scaling(self.host.state(self.global_rank), self._scaling(self.global_rank))

    def _scaling(self, rank: int) -> float:
        return client_scaling(self.cfg.lora, rank, self.global_rank)

    def _sync_base(self, base: BaseUpdate | None) -> None:
        """Apply the server's folded base-weight updates if they changed since the last task."""
        version = base.version if base is not None else 0
        if version != self._base_version:
            if self.host.model is None:  # a new actor (a replacement, or a resumed run)
                self.host.activate(self.global_rank, seed=self.cfg.seed)
            self.host.set_base_delta(base.delta if base is not None else None)
            self._base_version = version

    def _fold_task(self, task: ClientTask, broadcast: Broadcast) -> None:
        """Add the methods' folds for this task alone (Fed-PLoRA's untrained modules) to the
        frozen weights; the next task's :meth:`_sync_base` puts the shared base back."""
        folds = [f for m in self.methods if (f := m.fold_into_base(task, broadcast))]
        if not folds:
            return
        total = dict(broadcast.base.delta) if broadcast.base is not None else {}
        for fold in folds:
            for prefix, d in fold.items():
                total[prefix] = total[prefix] + d if prefix in total else d
        if self.host.model is None:  # a new actor: the model is built on first use
            self.host.activate(self.global_rank, seed=self.cfg.seed)
        self.host.set_base_delta(total)
        self._base_version = -1  # no broadcast's version: the next sync restores the base

    def shared_keys(self, keys: list[str]) -> list[str]:
        """The keys of ``keys`` that go to the server (every method's filter, in order)."""
        for m in self.methods:
            keys = m.filter_shared(keys)
        return keys

    def _received(self, task: ClientTask, broadcast: Broadcast) -> State:
        """The client's rank-``r_i`` starting adapter (model space) from the broadcast."""
        view = self.merger.redistribute(broadcast.adapter, task.rank)
        for m in self.methods:  # a method may decide the start (FLoRA: a fresh adapter)
            start = m.receive(task, broadcast, view)
            if start is not None:
                return start
        return unfold_scaling(view, self._scaling(task.rank))

    def train(
        self, task: ClientTask, broadcast: Broadcast, state: ClientState | None = None
    ) -> tuple[ClientReport, Upload, ClientState]:
        """Run one client's round: load, train, run the methods' hooks, evaluate, upload.

        Args:
            task: which client, rank and round.
            broadcast: the server's round broadcast.
            state: the client's persistent state from earlier rounds (None the first time).

        Returns:
            ``(report, upload, new_state)``.
        """
        start = time.perf_counter()
        client = self.data.clients[task.client_id]
        self._sync_base(broadcast.base)
        received = self._received(task, broadcast)
        self._fold_task(task, broadcast)
        state = state or ClientState()
        # A client whose rank was pruned since its last round keeps the leading dimensions.
        start_state = {**received, **truncate(state.private, task.rank)}
        model = self.host.load(task.rank, start_state)
        step = ClientStep(
            task=task,
            broadcast=broadcast,
            state=state,
            received=received,
            start=start_state,
            shared=self.shared_keys(list(start_state)),
            objective=Objective(),
            depths=self.depths,
            next_rank=task.rank,
            train=client.train,
            scaling=self._scaling(task.rank),
            upload_rank=task.rank,
            num_classes=self.data.num_classes,
        )
        params = self.host.parameters_by_key(task.rank)
        for m in self.methods:
            m.before_training(step)
        stats = self._train(task, model, step.objective, params, step.train)
        step.local = trained = self.host.state(task.rank)
        step.steps = stats.steps
        for m in self.methods:
            m.after_training(step)
        if step.local is not trained:  # a method changed the adapter (FediLoRA's editing)
            self.host.load(task.rank, step.local)
        personalized = self._metrics(client.holdout, task.client_id) if task.evaluate else {}
        update = fold_scaling({k: step.local[k] for k in step.shared}, step.scaling)
        for m in self.methods:  # client-side privacy, attacks: what leaves the client
            update = m.before_upload(step, update)
        upload = Upload(update, step.upload)
        if task.client_id in self.cfg.faults.nan_update_clients:
            upload.update = {k: torch.full_like(v, float("nan")) for k, v in upload.update.items()}
        self._inject_faults(task)
        shared = set(step.shared)
        private = {k: v for k, v in step.local.items() if k not in shared}
        report = ClientReport(
            client_id=task.client_id,
            rank=step.upload_rank,
            num_samples=len(client.train),
            steps=stats.steps,
            train_loss=stats.loss_mean,
            personalized=personalized,
            upload_bytes=upload.nbytes(),
            download_bytes=nbytes(received)
            + step.download_bytes
            + (broadcast.base.round_bytes if broadcast.base is not None else 0),
            time_s=time.perf_counter() - start,
            next_rank=step.next_rank,
            node_id=_node_id(),
            parts=step.report,
        )
        return report, upload, ClientState(private, step.new_state)

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

    def _train(self, task: ClientTask, model, objective, params, split):
        """Local training of ``task``'s client on ``split``, seeded by (seed, round, client)."""
        cfg = self.cfg
        seed_seq = np.random.SeedSequence([cfg.seed, _TORCH, task.round_idx, task.client_id])
        torch.manual_seed(int(seed_seq.generate_state(1)[0]))
        shuffle = rng_for(cfg.seed, _SHUFFLE, task.round_idx, task.client_id)
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

    def _metrics(self, split, client_id: int) -> dict[str, float]:
        """The personalised model's metrics on (at most ``eval.max_samples`` of) ``split``."""
        split = split.capped(self.cfg.eval.max_samples, self.cfg.seed, _EVAL_CAP, client_id)
        return self.task.evaluate(self.host.model, split)

    def peft_files(
        self, state: State, target_modules: str, rank: int, global_rank: int, dense
    ) -> dict[str, bytes]:
        """``state`` as a peft adapter's files (name to bytes), for the driver to log."""
        from fedsim.models.adapter_io import peft_adapter_files

        return peft_adapter_files(state, self.cfg, target_modules, rank, global_rank, dense)

    def evaluate_global(self, broadcast: Broadcast, shard: int, num_shards: int) -> EvalPart:
        """The global adapter's results on shard ``shard`` of ``num_shards`` of the test set.

        The test set (at most ``eval.max_samples`` of it) is cut into fixed batches first and
        the batches are dealt out in contiguous runs, so every batch, and hence every number,
        is the same whatever the number of shards.

        Returns:
            The task's evaluation part; :func:`fedsim.tasks.combine_parts` joins the parts in
            shard order.
        """
        self._sync_base(broadcast.base)
        state = unfold_scaling(broadcast.adapter, self._scaling(self.global_rank))
        self.host.load(self.global_rank, state)
        size = self.cfg.train.eval_batch_size
        split = self.data.test.capped(self.cfg.eval.max_samples, self.cfg.seed, _EVAL_CAP, _GLOBAL)
        starts = np.array_split(np.arange(0, len(split), size), num_shards)[shard]
        return self.task.eval_part(self.host.model, split, starts, size)


def _node_id() -> str:
    """The Ray node this worker runs on (empty outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
