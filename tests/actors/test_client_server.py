"""The plain client worker and server state, without Ray: training, determinism, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actors.client import ClientWorker
from actors.pool import Outcome
from actors.server import ServerState
from aggregation import check_update, is_lora_a, is_lora_b
from fedsim.config import resolve_ranks
from fedsim.messages import Broadcast, ClientMeta, ClientTask, Upload, nbytes
from fedsim.simulation.run import server_args
from fedsim.tracking.round_report import global_metrics


def _bc(adapter):
    """A broadcast holding just the global adapter (no SCAFFOLD, no FLoRA base updates)."""
    return Broadcast(adapter)


def _train(worker, task, adapter, state=None):
    """``(report, update)`` of one task."""
    report, upload, _ = worker.train(task, _bc(adapter), state)
    return report, upload.update


@pytest.fixture(scope="module")
def cfg(make_config):
    # threshold 1.0: every round-2 client edits its least similar tensor, so editing shows.
    return make_config("editing.threshold=1.0")


@pytest.fixture(scope="module")
def worker(cfg, restore_threads) -> ClientWorker:
    return ClientWorker(cfg)


@pytest.fixture(scope="module")
def initial(worker):
    return worker.initial_global()


@pytest.fixture(scope="module")
def round1(worker, initial):
    """Round-1 reports and updates of clients 0, 2 and 5 (ranks 8, 4, 2)."""
    out = {}
    for cid in (0, 2, 5):
        out[cid] = _train(worker, ClientTask(cid, worker.ranks[cid], 1), initial)
    return out


def _server(worker, initial) -> ServerState:
    return ServerState(*server_args(worker.cfg, initial))


def _rank_of(state) -> set[int]:
    ranks = {v.shape[0] for k, v in state.items() if is_lora_a(k)}
    ranks |= {v.shape[1] for k, v in state.items() if is_lora_b(k)}
    return ranks


def test_initial_global_has_the_largest_rank(worker, initial, cfg):
    assert worker.global_rank == max(resolve_ranks(cfg.clients, cfg.seed)) == 8
    assert _rank_of(initial) == {8}
    assert any(is_lora_a(k) for k in initial) and any("classifier" in k for k in initial)
    assert all(torch.isfinite(v).all() for v in initial.values())


def test_train_reports_the_client_split_and_uploads_its_rank(worker, initial, round1, cfg):
    for cid, (report, update) in round1.items():
        client = worker.data.clients[cid]
        rank = worker.ranks[cid]
        assert report.client_id == cid and report.rank == rank
        assert report.num_samples == len(client.train)
        expected_steps = min(
            cfg.train.max_local_steps, math.ceil(len(client.train) / cfg.train.batch_size)
        )
        assert report.steps == expected_steps
        assert math.isfinite(report.train_loss) and report.train_loss > 0
        assert 0.0 <= report.personalized["accuracy"] <= 1.0
        assert 0.0 <= report.personalized["macro_f1"] <= 1.0
        assert set(update) == set(initial)
        assert _rank_of(update) == {rank}
        assert all(torch.isfinite(v).all() for v in update.values())
        assert all(v.device.type == "cpu" for v in update.values())
        check_update(update, initial, rank)  # what the server will check
        assert report.upload_bytes == nbytes(update)
        assert report.download_bytes == nbytes(update)  # same rank down and up
        assert update is not initial


def test_training_changes_the_adapter(initial, round1):
    _, update = round1[0]
    assert any(not torch.equal(update[k], initial[k]) for k in initial)


def test_same_task_twice_gives_bit_identical_updates(worker, initial, round1):
    report, update = round1[2]
    _train(worker, ClientTask(5, worker.ranks[5], 1), initial)  # serve someone else between
    again_report, again = _train(worker, ClientTask(2, worker.ranks[2], 1), initial)
    assert all(torch.equal(update[k], again[k]) for k in update)
    assert again_report.train_loss == report.train_loss
    assert again_report.personalized == report.personalized


def test_another_worker_gives_the_same_initial_global_and_updates(cfg, initial, round1):
    other = ClientWorker(cfg)
    other_initial = other.initial_global()
    assert all(torch.equal(initial[k], other_initial[k]) for k in initial)
    _, update = _train(other, ClientTask(0, other.ranks[0], 1), other_initial)
    _, expected = round1[0]
    assert all(torch.equal(update[k], expected[k]) for k in update)


def test_editing_happens_only_from_round_2(worker, initial, round1):
    for report, _ in round1.values():
        assert report.parts["editing"].edited == [] and report.parts["editing"].similarities == {}
    server = _server(worker, initial)
    clients = [ClientMeta(cid, r.rank, r.num_samples, r.steps) for cid, (r, _) in round1.items()]
    server.aggregate(1, clients, [Upload(u) for _, u in round1.values()])
    report, update = _train(worker, ClientTask(2, worker.ranks[2], 2), server.get_global())
    assert len(report.parts["editing"].edited) == worker.cfg.editing.count == 1
    assert all(is_lora_a(k) for k in report.parts["editing"].edited)
    assert report.parts["editing"].similarities
    assert all(-1.0 <= s <= 1.0 for s in report.parts["editing"].similarities.values())
    assert _rank_of(update) == {worker.ranks[2]}


def _aggregate(worker, initial, round1, order, poison=()):
    server = _server(worker, initial)
    clients, updates = [], []
    for cid in order:
        report, update = round1[cid]
        if cid in poison:
            update = {k: torch.full_like(v, float("nan")) for k, v in update.items()}
        clients.append(ClientMeta(cid, report.rank, report.num_samples, report.steps))
        updates.append(Upload(update))
    return server, server.aggregate(1, clients, updates)


def test_nan_update_is_rejected_and_the_rest_merged(worker, initial, round1):
    server, report = _aggregate(worker, initial, round1, [0, 2, 5], poison={2})
    assert set(report.rejected) == {2}
    assert "NaN" in report.rejected[2]
    assert report.accepted == [0, 5]
    merged = server.get_global()
    assert set(merged) == set(initial) and _rank_of(merged) == {8}
    assert all(torch.isfinite(v).all() for v in merged.values())
    assert any(not torch.equal(merged[k], initial[k]) for k in initial)
    assert report.global_delta_norm > 0
    # the same as merging the two good updates alone
    clean, _ = _aggregate(worker, initial, round1, [0, 5])
    assert all(torch.equal(merged[k], clean.get_global()[k]) for k in merged)


def test_all_rejected_keeps_the_global_unchanged(worker, initial, round1):
    server, report = _aggregate(worker, initial, round1, [0, 2, 5], poison={0, 2, 5})
    assert set(report.rejected) == {0, 2, 5}
    assert report.accepted == []
    assert all(torch.equal(server.get_global()[k], initial[k]) for k in initial)


def test_wrong_rank_and_empty_client_are_rejected(worker, initial, round1):
    server = _server(worker, initial)
    (r0, u0), (_, u2), (r5, u5) = round1[0], round1[2], round1[5]
    report = server.aggregate(
        1,
        [
            ClientMeta(0, 4, r0.num_samples, 1),
            ClientMeta(2, 4, 0, 1),
            ClientMeta(5, 2, r5.num_samples, 1),
        ],
        [Upload(u0), Upload(u2), Upload(u5)],
    )
    assert set(report.rejected) == {0, 2}
    assert "shape" in report.rejected[0]
    assert "sample count" in report.rejected[2]
    assert report.accepted == [5]


def test_update_order_does_not_change_the_merge(worker, initial, round1):
    forward, _ = _aggregate(worker, initial, round1, [0, 2, 5])
    backward, _ = _aggregate(worker, initial, round1, [5, 0, 2])
    a, b = forward.get_global(), backward.get_global()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_global_evaluation_does_not_depend_on_the_shard_count(worker, initial):
    whole = worker.evaluate_global(_bc(initial), 0, 1)
    assert len(whole) == len(worker.data.test)
    parts = [worker.evaluate_global(_bc(initial), s, 3) for s in range(3)]
    assert np.array_equal(whole.labels, np.concatenate([part.labels for part in parts]))
    assert np.array_equal(whole.predictions, np.concatenate([p.predictions for p in parts]))
    assert np.array_equal(whole.batch_losses, np.concatenate([p.batch_losses for p in parts]))


def test_global_metrics_skip_the_empty_shards_of_a_pool_larger_than_the_test_set(worker, initial):
    batches = math.ceil(len(worker.data.test) / worker.cfg.train.eval_batch_size)
    one = global_metrics(Outcome(values={0: worker.evaluate_global(_bc(initial), 0, 1)}))
    shards = batches + 2  # more actors than batches: the last shards get nothing to evaluate
    parts = {s: worker.evaluate_global(_bc(initial), s, shards) for s in range(shards)}
    assert sum(len(part) == 0 for part in parts.values()) == 2
    assert global_metrics(Outcome(values=parts)) == one
