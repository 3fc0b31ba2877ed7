"""Malicious clients (faults.malicious, faults.attack): who attacks, what each attack sends,
and a run that logs the attackers, defends with a robust rule and repeats its numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import fedsim
from actors.client import ClientWorker
from actors.executor import LocalExecutor
from aggregation import truncate
from fedsim.config import ConfigError, load_config
from fedsim.messages import Broadcast, ClientTask
from fedsim.methods.attack import malicious_clients

pytestmark = pytest.mark.usefixtures("restore_threads")


def test_malicious_clients_by_id_list_or_share():
    ids = load_config(None, ["faults.attack=scale", "faults.malicious=[7,2]"])
    assert malicious_clients(ids) == [2, 7]
    assert malicious_clients(load_config(None, ["faults.attack=scale", "faults.malicious=3"])) == [
        3
    ]
    share = load_config(None, ["faults.attack=scale", "faults.malicious=0.3", "seed=4"])
    picked = malicious_clients(share)
    assert len(picked) == 3 and picked == sorted(set(picked))
    assert picked == malicious_clients(share)  # fixed by the seed
    others = {
        tuple(
            malicious_clients(
                load_config(None, ["faults.attack=scale", "faults.malicious=0.3", f"seed={s}"])
            )
        )
        for s in range(6)
    }
    assert len(others) > 1  # and the seed chooses


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["faults.malicious=[1]"], "faults.attack", "faults.attack is none"),
        (["faults.attack=scale"], "faults.malicious", "needs malicious clients"),
        (["faults.attack=scale", "faults.malicious=[10]"], "faults.malicious", "not in [0, 10)"),
        (["faults.attack=scale", "faults.malicious=0.01"], "faults.malicious", "picks no client"),
        (["faults.attack=scale", "faults.malicious=1.5"], "faults.malicious", "(0, 1]"),
        (["faults.attack=scale", "faults.malicious='1,1'"], "faults.malicious", "repeat"),
        (["faults.attack=scale", "faults.malicious=two"], "faults.malicious", "client ids"),
        (
            ["faults.attack=scale", "faults.malicious=[1]", "faults.attack_scale=0"],
            "faults.attack_scale",
            "non-zero",
        ),
        (
            ["faults.attack=gaussian", "faults.malicious=[1]", "faults.attack_norm=0"],
            "faults.attack_norm",
            "positive",
        ),
        (
            ["faults.attack=lie_about_rank", "faults.malicious=[1]", "faults.claimed_rank=64"],
            "faults.claimed_rank",
            "above the global rank 32",
        ),
        (["faults.attack=shout", "faults.malicious=[1]"], "faults.attack", ""),
        (
            ["faults.attack=label_flip", "faults.malicious=[1]", "model.backbone=smolvlm-effnet"],
            "faults.attack",
            "free text (captions)",
        ),
    ],
)
def test_attack_settings_without_meaning_are_rejected(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key and words in str(info.value)


@pytest.fixture(scope="module")
def honest(make_config) -> ClientWorker:
    return ClientWorker(make_config("editing.enabled=false", "aggregation.method=zeropad"))


def _attacker(make_config, attack: str, *extra: str) -> ClientWorker:
    return ClientWorker(
        make_config(
            "editing.enabled=false",
            "aggregation.method=zeropad",
            f"faults.attack={attack}",
            "faults.malicious=[1,2]",
            *extra,
        )
    )


_INITIAL: dict[int, dict] = {}


def _train(worker: ClientWorker, client: int, round_idx: int = 1):
    # the initial adapter once per worker: a worker's later calls return its trained head
    initial = _INITIAL.setdefault(id(worker), worker.initial_global())
    task = ClientTask(client, worker.ranks[client], round_idx)
    report, upload, _ = worker.train(task, Broadcast(initial))
    origin = truncate(initial, task.rank)  # zeropad's view, already in the s = 1 space
    return report, upload.update, {k: origin[k] for k in upload.update}


@pytest.mark.parametrize(("attack", "k"), [("scale", 100.0), ("scale", -3.0), ("sign_flip", -1.0)])
def test_forged_updates_are_k_times_the_honest_update(honest, make_config, attack, k):
    worker = _attacker(make_config, attack, f"faults.attack_scale={k}")
    _, plain, origin = _train(honest, 1)
    report, forged, _ = _train(worker, 1)
    for key in plain:
        expect = origin[key] + k * (plain[key] - origin[key])
        torch.testing.assert_close(forged[key], expect, rtol=1e-5, atol=1e-6)
    assert report.parts.get("attack") == attack
    assert _train(worker, 0)[0].parts.get("attack") is None  # client 0 is honest


def test_an_honest_client_of_an_attacked_run_uploads_what_it_would_anyway(honest, make_config):
    worker = _attacker(make_config, "scale")
    _, clean, _ = _train(worker, 0)
    _, reference, _ = _train(honest, 0)
    assert all(torch.equal(clean[k], reference[k]) for k in clean)


def test_the_gaussian_attack_sends_seeded_noise_of_the_given_norm(make_config):
    worker = _attacker(make_config, "gaussian", "faults.attack_norm=2.5")
    _, forged, origin = _train(worker, 2)
    norm = sum(float((forged[k].double() - origin[k].double()).pow(2).sum()) for k in forged)
    assert norm**0.5 == pytest.approx(2.5, rel=1e-5)
    again = _train(worker, 2)[1]
    later = _train(worker, 2, round_idx=2)[1]
    assert all(torch.equal(forged[k], again[k]) for k in forged)
    assert not all(torch.equal(forged[k], later[k]) for k in forged)


@pytest.mark.parametrize(("claim", "client"), [(8, 2), (2, 1), (0, 2)])
def test_a_rank_liar_pads_or_truncates_and_claims_the_rank(honest, make_config, claim, client):
    worker = _attacker(make_config, "lie_about_rank", f"faults.claimed_rank={claim}")
    rank = worker.ranks[client]
    claimed = claim or (8 if rank < 8 else rank // 2)  # ranks are 8,8,4,4,2,2
    report, lied, _ = _train(worker, client)
    _, plain, _ = _train(honest, client)
    assert report.rank == claimed
    key_a = next(k for k in lied if k.endswith("lora_A.weight"))
    assert lied[key_a].shape[0] == claimed
    keep = min(rank, claimed)
    assert torch.equal(lied[key_a][:keep], plain[key_a][:keep])
    assert not lied[key_a][keep:].any()


def test_label_flippers_train_on_flipped_labels(honest, make_config):
    worker = _attacker(make_config, "label_flip")
    split = worker.data.clients[1].train
    flip = np.arange(worker.data.num_classes - 1, -1, -1)
    truth = next(iter(worker.task.train_batches(split, 64, None)))["labels"]
    flipped = next(iter(worker.task.train_batches(split.relabelled(flip), 64, None)))["labels"]
    assert torch.equal(flipped, worker.data.num_classes - 1 - truth)
    poisoned, forged, _ = _train(worker, 1)
    plain, clean, _ = _train(honest, 1)
    assert poisoned.train_loss != plain.train_loss
    assert not all(torch.equal(forged[k], clean[k]) for k in forged)
    assert poisoned.personalized.keys() == plain.personalized.keys()


def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


@pytest.mark.slow  # two runs each, one on Ray: CI runs them, the quick loop does not
def test_attacks_with_seeded_noise_repeat_on_any_number_of_actors(warm_ray, experiment_config):
    """A Gaussian attacker and DP noise on the clients (adaptive clipping): two actors on Ray
    and one in-process give the same numbers."""
    build = experiment_config("fedsim-attack-dp")
    cfg = build(
        "rounds=2",
        "faults.attack=gaussian",
        "faults.malicious=0.34",
        "privacy.enabled=true",
        "privacy.noise=client",
        "privacy.clipping=adaptive",
        "privacy.count_noise=1",
        "privacy.noise_multiplier=0.5",
        "aggregation.method=fedilora",
        "editing.enabled=false",
        "resources.actors=2",
    )
    on_ray = fedsim.run(cfg, executor=warm_ray)
    local = fedsim.run(cfg, executor=LocalExecutor())
    assert _numbers(on_ray) == _numbers(local)
    assert on_ray.history[-1]["privacy/epsilon"] > on_ray.history[1]["privacy/epsilon"] > 0


@pytest.mark.slow  # two runs each, one on Ray: CI runs them, the quick loop does not
def test_a_run_logs_its_attackers_and_defends_the_same_on_any_number_of_actors(
    warm_ray, experiment_config, tmp_path
):
    build = experiment_config("fedsim-attack")
    cfg = build(
        "rounds=2",
        "clients.fraction=1.0",
        "faults.attack=sign_flip",
        "faults.malicious=[1]",
        "robust.rule=product",
        "robust.clip_norm=5",
        "resources.actors=2",
    )
    on_ray = fedsim.run(cfg, executor=warm_ray)
    local = fedsim.run(cfg, executor=LocalExecutor())
    assert _numbers(on_ray) == _numbers(local)
    last = on_ray.history[-1]
    assert last["faults/attackers"] == 1 and "robust/rejected" in last
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    metrics = client.get_run(on_ray.run_id).data.metrics
    assert metrics["faults/attackers"] == 1 and "robust/clipped" in metrics
    path = client.download_artifacts(on_ray.run_id, "clients/round_0002.json", str(tmp_path))
    table = json.load(open(path))
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert rows[1]["attacker"] == "sign_flip" and rows[0]["attacker"] == ""
    assert {"robust_norm", "robust_score", "robust_kept", "robust_clipped"} <= set(rows[0])
