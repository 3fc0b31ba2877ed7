"""Issue 3's axes composed on real workers: sharing policies, client state, objectives, FLoRA."""

from __future__ import annotations

import pytest
import ray
import torch

from actors.client import ClientWorker
from actors.server import ServerState
from aggregation import is_lora_a, is_lora_b
from fedsim.config import ConfigError
from fedsim.messages import Broadcast, ClientMeta, ClientTask, Parts
from fedsim.models.layers import middle_layer_weights, tower_depths
from fedsim.simulation.run import server_args

pytestmark = pytest.mark.usefixtures("restore_threads")


def _worker(make_config, *overrides) -> ClientWorker:
    return ClientWorker(make_config("editing.enabled=false", *overrides))


def _server(worker: ClientWorker, initial) -> ServerState:
    return ServerState(*server_args(worker.cfg, initial))


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["aggregation.method=hetlora", "sharing.policy=B"], "sharing.policy"),
        (["aggregation.method=flexlora", "server.optimizer=fedadam"], "server.optimizer"),
        (["aggregation.method=flora", "server.optimizer=fedyogi"], "server.optimizer"),
        (
            ["aggregation.method=flexlora", "objective.method=scaffold", "train.optimizer=sgd"],
            "objective.method",
        ),
        (["objective.method=scaffold"], "train.optimizer"),
        (
            ["objective.method=scaffold", "train.optimizer=sgd", "lora.scaling=rank"],
            "lora.scaling",
        ),
        (["aggregation.method=flora", "objective.method=fednova"], "objective.method"),
        (["aggregation.method=flora", "editing.enabled=true"], "editing.enabled"),
        (["sharing.policy=none", "editing.enabled=true"], "editing.enabled"),
        (["sharing.policy=B", "editing.enabled=true", "editing.key=lora_A"], "editing.key"),
        (["data.partition=centralized"], "clients.num"),
    ],
)
def test_combinations_that_make_no_sense_are_rejected(make_config, overrides, key):
    with pytest.raises(ConfigError) as info:
        make_config("editing.enabled=false", *overrides)
    assert info.value.key == key


@pytest.mark.parametrize(
    "overrides",
    [
        ["aggregation.method=fedilora", "server.optimizer=fedadam", "objective.method=fedprox"],
        ["sharing.policy=B", "server.optimizer=fedyogi", "objective.method=fedmllm"],
        ["aggregation.method=hetlora", "objective.method=fednova", "server.optimizer=fedavgm"],
        ["objective.method=scaffold", "train.optimizer=sgd", "aggregation.method=zeropad"],
        ["data.partition=centralized", "clients.num=1", "clients.ranks=[8]"],
    ],
)
def test_meaningful_combinations_load(make_config, overrides):
    import yaml

    from fedsim.config import flatten, rank_spec

    values = flatten(make_config("editing.enabled=false", *overrides))
    for item in overrides:
        key, _, value = item.partition("=")
        # clients.ranks is a string spec: a list override is stored comma-joined
        want = rank_spec(yaml.safe_load(value)) if key == "clients.ranks" else yaml.safe_load(value)
        assert values[key] == want, key


@pytest.mark.parametrize(("policy", "private_kind"), [("B", is_lora_a), ("A", is_lora_b)])
def test_private_parts_stay_with_the_client_and_come_back(make_config, policy, private_kind):
    # Several steps: with B = 0 at the start, A gets no gradient in the first step.
    worker = _worker(
        make_config, f"sharing.policy={policy}", "train.local_epochs=3", "train.max_local_steps=6"
    )
    initial = worker.initial_global()
    task1, task2 = ClientTask(0, 8, 1), ClientTask(0, 8, 2)
    _, upload, state = worker.train(task1, Broadcast(initial))
    update, private = upload.update, state.private
    assert private and all(private_kind(k) for k in private)
    assert not set(update) & set(private)  # the private part is never uploaded
    # Round 2 starts from the client's own private part: with and without it differ.
    _, with_state, _ = worker.train(task2, Broadcast(initial), state)
    _, without, _ = worker.train(task2, Broadcast(initial))
    assert not _equal(with_state.update, without.update)


def test_local_only_uploads_nothing_and_keeps_everything(make_config):
    worker = _worker(make_config, "sharing.policy=none")
    initial = worker.initial_global()
    report, upload, state = worker.train(ClientTask(1, 8, 1), Broadcast(initial))
    assert upload.update == {} and upload.parts == {} and report.upload_bytes == 0
    assert set(state.private) == set(initial)
    server = _server(worker, initial)
    agg = server.aggregate(1, [ClientMeta(1, 8, report.num_samples, report.steps)], [upload])
    assert agg.accepted == [1] and _equal(server.get_global(), initial)


@pytest.mark.slow  # two Ray actors (the session's warm pool)
def test_state_travels_to_another_actor(warm_ray, make_config):
    """pLoRA's private A and SCAFFOLD's c_i, trained on actor 0, continue on actor 1."""
    cfg = make_config(
        "editing.enabled=false",
        "sharing.policy=B",
        "objective.method=scaffold",
        "train.optimizer=sgd",
        "train.lr=0.05",
    )
    plain = ClientWorker(cfg)
    initial = plain.initial_global()
    server = _server(plain, initial)
    bc = server.broadcast()
    t1, t2 = ClientTask(0, 8, 1), ClientTask(0, 8, 2)
    _, _, state = plain.train(t1, bc)
    _, expected, _ = plain.train(t2, bc, state)

    pool = warm_ray.make_pool(cfg, 2)
    assert len(pool) == 2
    try:
        bc_ref = ray.put(bc)
        first = pool.train([t1], bc_ref, {})  # client 0 on actor 0
        state_ref = first.refs[0].state
        # client 1 takes actor 0, so client 0's round 2 runs on actor 1
        second = pool.train([ClientTask(1, 8, 2), t2], bc_ref, {0: state_ref})
        upload = ray.get(second.refs[0].upload)
    finally:
        warm_ray.close(pool, None)  # the pool keeps the actors for the next test
    assert _equal(upload.update, expected.update)
    assert _equal(upload.parts["scaffold"], expected.parts["scaffold"])


def test_scaffold_with_zero_variates_trains_like_plain_sgd(make_config):
    sgd = ("train.optimizer=sgd", "train.lr=0.05")
    plain = _worker(make_config, *sgd)
    scaffold = _worker(make_config, *sgd, "objective.method=scaffold")
    initial = plain.initial_global()
    zeros = {k: torch.zeros_like(v) for k, v in initial.items()}
    _, a, plain_state = plain.train(ClientTask(2, 4, 1), Broadcast(initial))
    _, b, state = scaffold.train(
        ClientTask(2, 4, 1), Broadcast(initial, parts=Parts(scaffold=zeros))
    )
    assert a.parts == {} and plain_state.parts == {}
    assert set(b.parts) == {"scaffold"} and set(state.parts) == {"scaffold"}
    assert _equal(a.update, b.update)
    # with a non-zero server variate the local gradients are corrected
    c = {k: torch.full_like(v, 0.01) for k, v in initial.items()}
    _, corrected, _ = scaffold.train(
        ClientTask(2, 4, 1), Broadcast(initial, parts=Parts(scaffold=c))
    )
    assert not _equal(a.update, corrected.update)


def _distance(update: dict, reference: dict) -> float:
    return sum(float((update[k] - reference[k]).pow(2).sum()) for k in update)


def test_fedprox_keeps_the_update_closer_to_the_global(make_config):
    steps = ("train.local_epochs=4", "train.max_local_steps=8")  # the term is 0 at step 1
    plain = _worker(make_config, *steps)
    prox = _worker(make_config, *steps, "objective.method=fedprox", "objective.mu=50")
    initial = plain.initial_global()
    _, a, _ = plain.train(ClientTask(0, 8, 1), Broadcast(initial))
    _, b, _ = prox.train(ClientTask(0, 8, 1), Broadcast(initial))
    assert _distance(b.update, initial) < _distance(a.update, initial)


def test_fedmllm_weights_only_the_middle_layers():
    keys = [
        f"base_model.model.text.encoder.layer.{i}.attention.self.query.lora_A.weight"
        for i in range(6)
    ] + ["base_model.model.classifier.0.weight"]
    weights = middle_layer_weights(keys, {"text.encoder": 6}, skip=2, weight=0.1)
    assert sorted(weights) == [keys[2], keys[3]]
    assert set(weights.values()) == {0.1}


def test_fedmllm_counts_the_layers_of_each_tower_of_a_vlm_apart():
    """A VLM's vision tower (2 layers) and language model (6 layers) are separate towers."""
    vision = [f"model.vision_tower.encoder.layers.{i}.self_attn.q_proj" for i in range(2)]
    lm = [f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(6)]
    depths = tower_depths(vision + lm)
    assert depths == {"model.vision_tower.encoder": 2, "model.language_model": 6}
    keys = [f"base_model.model.{n}.lora_A.weight" for n in vision + lm]
    weights = middle_layer_weights(keys, depths, skip=2, weight=0.1)
    # the vision tower has no middle layer at skip 2; the language model keeps layers 2 and 3
    assert sorted(weights) == sorted(keys[2 + 2 : 2 + 4])


def test_flora_folds_the_stacked_product_into_the_base(make_config):
    worker = _worker(make_config, "aggregation.method=flora")
    initial = worker.initial_global()
    server = _server(worker, initial)
    metas, uploads = [], []
    for cid in (0, 2):
        report, upload, _ = worker.train(ClientTask(cid, worker.ranks[cid], 1), server.broadcast())
        metas.append(ClientMeta(cid, report.rank, report.num_samples, report.steps))
        uploads.append(upload)
    before = worker.evaluate_global(server.broadcast(), 0, 1)
    server.aggregate(1, metas, uploads)
    bc = server.broadcast()
    assert bc.base is not None and bc.base.version == 1 and bc.base.delta
    stacked = server.state_dict()["methods"]["flora"]["stacked"][0]
    assert {v.shape[0] for k, v in stacked.items() if is_lora_a(k)} == {8 + 4}
    # the adapter restarts (B = 0); the global model is the base plus the merged product
    assert all(torch.equal(bc.adapter[k], initial[k]) for k in initial if is_lora_b(k))
    after = worker.evaluate_global(bc, 0, 1)
    assert not (before.batch_losses == after.batch_losses).all()
    # next round's clients download the stacked factors they fold into their base weights
    assert bc.base.round_bytes == sum(v.numel() * 4 for v in stacked.values())
    report, _, _ = worker.train(ClientTask(1, worker.ranks[1], 2), bc)
    first, _, _ = worker.train(ClientTask(1, worker.ranks[1], 1), Broadcast(bc.adapter))
    assert report.download_bytes == first.download_bytes + bc.base.round_bytes
    # the export is every round's stack, whose product is the folded base update
    exported = server.export()
    assert exported.rank == 8 + 4 and exported.base is None


def test_rank_self_pruning_drops_the_tail_and_the_next_round_uses_it(make_config):
    # A huge threshold forces the drop; the tail penalty is part of the loss.
    worker = _worker(
        make_config,
        "aggregation.method=hetlora",
        "pruning.gamma=0.1",
        "pruning.delta=2",
        "pruning.threshold=1e9",
        "pruning.min_rank=2",
    )
    initial = worker.initial_global()
    report, upload, state = worker.train(ClientTask(0, 8, 1), Broadcast(initial))
    assert report.next_rank == 6 and report.parts["pruning"] is not None
    # uploaded at rank 8
    assert {v.shape[0] for k, v in upload.update.items() if is_lora_a(k)} == {8}
    _, upload2, _ = worker.train(ClientTask(0, 6, 2), Broadcast(initial), state)
    assert {v.shape[0] for k, v in upload2.update.items() if is_lora_a(k)} == {6}
    # at the floor nothing more is dropped
    floor, _, _ = worker.train(ClientTask(0, 2, 3), Broadcast(initial))
    assert floor.next_rank == 2 and floor.parts["pruning"] is None


def test_rank_self_pruning_needs_a_merge_that_truncates(make_config):
    with pytest.raises(ConfigError) as info:
        make_config("editing.enabled=false", "aggregation.method=flexlora", "pruning.gamma=0.1")
    assert info.value.key == "pruning.gamma"
