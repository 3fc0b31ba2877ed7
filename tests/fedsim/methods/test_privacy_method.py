"""DP-FedAvg as a method: its rules, the server's clipping and noise, the clients' share, runs.

The math (clipping, noise std, accounting) is tested against slow references and the
dp_accounting library in tests/aggregation/test_privacy_math.py; here the method is checked
where it plugs in: config, server hooks on hand-built rounds, the client hook, and real runs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import fedsim
from actors.executor import LocalExecutor
from actors.server import ServerState
from aggregation import FedAvg, pad, truncate
from aggregation.privacy import epsilon_after
from fedsim.checkpoint.format import join_tensors, split_tensors
from fedsim.config import ConfigError, FedSimConfig, load_config
from fedsim.config.registry import build_merger, enabled_methods
from fedsim.messages import Broadcast, ClientMeta, ClientState, ClientTask, Parts, Upload
from fedsim.methods.base import ClientStep, Objective
from fedsim.methods.privacy import Privacy, noise_multiplier, sampling_rate

A, B, DENSE = "m.lora_A.weight", "m.lora_B.weight", "head.weight"


def _config(*overrides: str) -> FedSimConfig:
    return load_config(
        None,
        ["privacy.enabled=true", "editing.enabled=false", "aggregation.method=zeropad", *overrides],
    )


# -- config -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["aggregation.method=hetlora"], "norm of its update"),
        (["aggregation.method=flexlora"], "SVD"),
        (["aggregation.method=flora"], "stacks the clients' factors"),
        (["fedex.enabled=true"], "residual"),
        (["objective.method=scaffold", "train.optimizer=sgd"], "control variates"),
        (["objective.method=fednova"], "local step count"),
        (["sharing.policy=none"], "nothing is released"),
        (["pruning.gamma=0.1"], "rank is public"),
        (["robust.rule=median"], "robust.rule=none"),
    ],
)
def test_combinations_the_guarantee_does_not_cover_are_rejected_with_the_reason(overrides, words):
    with pytest.raises(ConfigError) as info:
        _config(*overrides)
    assert info.value.key == "privacy.enabled" and words in str(info.value)


@pytest.mark.parametrize(
    "setting",
    [
        "privacy.clip_norm=0",
        "privacy.noise_multiplier=-1",
        "privacy.delta=1",
        "privacy.delta=0",
        "privacy.target_epsilon=-1",
        "privacy.target_quantile=1",
        "privacy.clip_lr=0",
        "privacy.count_noise=-0.5",
    ],
)
def test_ranges_are_checked_even_when_privacy_is_off(setting):
    with pytest.raises(ConfigError) as info:
        load_config(None, [setting])
    assert info.value.key == setting.split("=")[0]


def test_adaptive_clipping_needs_count_noise_above_half_the_multiplier():
    # 4 of 10 clients per round: sigma_b = 4 / 20 = 0.2 cannot leave budget for z = 1
    with pytest.raises(ConfigError) as info:
        _config("privacy.clipping=adaptive", "privacy.noise_multiplier=1")
    assert info.value.key == "privacy.count_noise" and "2 sigma_b > z" in str(info.value)
    cfg = _config("privacy.clipping=adaptive", "privacy.count_noise=1")
    assert [m.name for m in enabled_methods(cfg) if isinstance(m, Privacy)] == ["privacy"]


@pytest.mark.parametrize("method", ["zeropad", "fedilora"])
def test_it_composes_with_the_count_weighted_merges(method):
    cfg = _config(f"aggregation.method={method}", "privacy.noise=client")
    assert any(isinstance(m, Privacy) for m in enabled_methods(cfg))
    off = load_config(None, [f"aggregation.method={method}"])
    assert not any(isinstance(m, Privacy) for m in enabled_methods(off))


def test_a_target_epsilon_derives_the_noise_for_the_run():
    cfg = _config("privacy.target_epsilon=4", "rounds=5")
    z = noise_multiplier(cfg)
    assert z != cfg.privacy.noise_multiplier
    assert sampling_rate(cfg) == 0.4  # 4 of 10 clients
    assert epsilon_after(5, 0.4, z, 1e-5) <= 4 < epsilon_after(5, 0.4, z - 0.01, 1e-5)


# -- server hooks on hand-built rounds ------------------------------------------------------
def _server(cfg: FedSimConfig, initial: dict) -> ServerState:
    methods = [m for m in enabled_methods(cfg) if isinstance(m, Privacy)]
    return ServerState(build_merger(cfg), initial, FedAvg(), methods, cfg.clients.num)


def _state(g: torch.Generator, rank: int, scale: float = 1.0, width: int = 5) -> dict:
    return {
        A: scale * torch.randn(rank, width, generator=g, dtype=torch.float64),
        B: scale * torch.randn(6, rank, generator=g, dtype=torch.float64),
        DENSE: scale * torch.randn(3, 6, generator=g, dtype=torch.float64),
    }


def _uploads(current: dict, ranks: list[int], deltas: list[dict]) -> list[Upload]:
    """Each client's upload: its view of ``current`` (truncation) plus its update."""
    return [
        Upload({k: v + d[k] for k, v in truncate(current, r).items()})
        for r, d in zip(ranks, deltas)
    ]


def _unweighted_mean(states: list[dict], ranks: list[int], current: dict, dimensionwise: bool):
    """The slow reference: pad, then per dimension the plain mean (over the coverers for a
    dimension-wise merge; a dimension nobody covers keeps its value there)."""
    rank = max(t.shape[0] for t in [current[A]])
    padded = [pad(s, rank) for s in states]
    out = {DENSE: sum(p[DENSE] for p in padded) / len(states)}
    for key, axis in ((A, 0), (B, 1)):
        merged = torch.zeros_like(current[key])
        for j in range(rank):
            covering = [p for p, r in zip(padded, ranks) if r > j]
            divisor = len(covering) if dimensionwise else len(states)
            if not covering:
                value = current[key].select(axis, j) if dimensionwise else 0
            else:
                value = sum(p[key].select(axis, j) for p in covering) / divisor
            merged.select(axis, j).copy_(value)
        out[key] = merged
    return out


@pytest.mark.parametrize("method", ["zeropad", "fedilora"])
def test_without_noise_and_clipping_it_is_fedavg_with_equal_weights(method):
    g = torch.Generator().manual_seed(0)
    cfg = _config(
        f"aggregation.method={method}", "privacy.noise_multiplier=0", "privacy.clip_norm=1e9"
    )
    initial = _state(g, 6)
    server = _server(cfg, initial)
    ranks, counts = [4, 2, 1, 2], [10, 300, 5, 1]  # sample counts must not matter
    uploads = _uploads(initial, ranks, [_state(g, r) for r in ranks])
    metas = [ClientMeta(c, r, n, 1) for c, (r, n) in enumerate(zip(ranks, counts))]
    report = server.aggregate(1, metas, uploads)
    expected = _unweighted_mean([u.update for u in uploads], ranks, initial, method == "fedilora")
    for k in expected:
        torch.testing.assert_close(server.global_state[k], expected[k], rtol=0, atol=1e-12)
    assert "privacy/epsilon" not in report.metrics  # z = 0: no guarantee to report
    assert report.metrics["privacy/clipped"] == 0


def test_a_clipped_client_contributes_at_most_the_clip_norm():
    g = torch.Generator().manual_seed(1)
    cfg = _config("privacy.noise_multiplier=0", "privacy.clip_norm=1")
    initial = _state(g, 4)
    server = _server(cfg, initial)
    ranks = [4, 2, 4]
    deltas = [_state(g, 4, scale=50.0), _state(g, 2, scale=0.01), _state(g, 4, scale=0.02)]
    uploads = _uploads(initial, ranks, deltas)
    report = server.aggregate(
        1, [ClientMeta(c, r, 7 * c + 1, 1) for c, r in enumerate(ranks)], uploads
    )
    norms = [math.sqrt(sum(float(v.pow(2).sum()) for v in d.values())) for d in deltas]
    clipped = [
        {k: truncate(initial, r)[k] + d[k] * min(1.0, 1.0 / n) for k in d}
        for r, d, n in zip(ranks, deltas, norms)
    ]
    expected = _unweighted_mean(clipped, ranks, initial, dimensionwise=False)
    for k in expected:
        torch.testing.assert_close(server.global_state[k], expected[k], rtol=1e-10, atol=1e-12)
    assert report.metrics["privacy/clipped"] == 1
    assert [report.columns[c]["privacy_norm"] for c in range(3)] == pytest.approx(norms)
    assert [report.columns[c]["privacy_clipped"] for c in range(3)] == [True, False, False]
    # without client 0's update the global model would differ by at most C / n
    quiet = _server(cfg, initial)
    quiet.aggregate(
        1,
        [ClientMeta(c, r, 1, 1) for c, r in enumerate(ranks)],
        [Upload(truncate(initial, 4)), *uploads[1:]],
    )
    moved = math.sqrt(
        sum(float((server.global_state[k] - quiet.global_state[k]).pow(2).sum()) for k in initial)
    )
    assert moved == pytest.approx(1 / 3, rel=1e-9)


@pytest.mark.parametrize("method", ["zeropad", "fedilora"])
def test_server_noise_on_the_merge_has_std_z_c_over_the_count(method):
    cfg = _config(
        f"aggregation.method={method}", "privacy.noise_multiplier=1.5", "privacy.clip_norm=2"
    )
    width = 50_000  # 100k coordinates per rank dimension
    initial = {A: torch.zeros(8, width), B: torch.zeros(width, 8), DENSE: torch.zeros(100_000)}
    server = _server(cfg, initial)
    ranks = [8, 4, 4, 2]
    uploads = [Upload(truncate(initial, r)) for r in ranks]  # no update: the merge is noise
    server.aggregate(1, [ClientMeta(c, r, 1, 1) for c, r in enumerate(ranks)], uploads)
    noise = server.global_state
    for j in range(8):
        divisor = sum(r > j for r in ranks) if method == "fedilora" else len(ranks)
        values = torch.cat([noise[A][j], noise[B][:, j]]).double()
        assert float(values.std()) == pytest.approx(1.5 * 2 / divisor, rel=0.015), j
        assert abs(float(values.mean())) < 5 * 1.5 * 2 / divisor / math.sqrt(values.numel())
    assert float(noise[DENSE].double().std()) == pytest.approx(1.5 * 2 / 4, rel=0.015)


def _round(server: ServerState, t: int, order: list[int], deltas: dict, ranks: dict):
    current = server.global_state
    metas = [ClientMeta(c, ranks[c], 1 + c, 2) for c in order]
    uploads = _uploads(current, [ranks[c] for c in order], [deltas[c] for c in order])
    return server.aggregate(t, metas, uploads)


def test_the_noise_is_the_same_whatever_the_order_of_the_uploads():
    g = torch.Generator().manual_seed(2)
    initial = _state(g, 4)
    ranks = {0: 4, 1: 2, 2: 1, 3: 4}
    deltas = {c: _state(g, r, scale=0.3) for c, r in ranks.items()}
    cfg = _config("aggregation.method=fedilora", "privacy.clip_norm=0.5")
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        server = _server(cfg, initial)
        _round(server, 1, order, deltas, ranks)
        results.append(server.global_state)
    assert all(torch.equal(results[0][k], r[k]) for r in results[1:] for k in initial)
    other = _server(
        _config("aggregation.method=fedilora", "privacy.clip_norm=0.5", "seed=1"), initial
    )
    _round(other, 1, [0, 1, 2, 3], deltas, ranks)
    assert not torch.equal(other.global_state[A], results[0][A])


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_adaptive_clipping_tracks_the_quantile_of_the_norms(quantile):
    """Norms log-uniform on [0.1, 10]: C should settle where a share ``quantile`` of them is
    below it, from far above."""
    cfg = _config(
        "clients.num=40",
        "clients.fraction=1",
        "clients.ranks=equal:2",
        "privacy.clipping=adaptive",
        "privacy.clip_norm=30",
        "privacy.noise_multiplier=0.5",
        f"privacy.target_quantile={quantile}",
    )
    g = torch.Generator().manual_seed(3)
    initial = _state(g, 2)
    server = _server(cfg, initial)
    privacy = server.methods[0]
    clips = []
    for t in range(1, 61):
        norms = torch.exp(
            torch.empty(40, dtype=torch.float64).uniform_(math.log(0.1), math.log(10), generator=g)
        )
        deltas = {}
        for c in range(40):
            d = _state(g, 2)
            size = math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))
            deltas[c] = {k: v * float(norms[c]) / size for k, v in d.items()}
        report = _round(server, t, list(range(40)), deltas, dict.fromkeys(range(40), 2))
        assert report.metrics["privacy/clip_norm"] == pytest.approx(clips[-1] if clips else 30)
        clips.append(privacy.clip)
    share_below = (math.log(clips[-1]) - math.log(0.1)) / math.log(100)
    assert abs(share_below - quantile) < 0.12
    assert clips[-1] < clips[0] < 30  # it came down from the start


def test_a_checkpointed_server_continues_to_the_same_numbers():
    g = torch.Generator().manual_seed(4)
    cfg = _config(
        "aggregation.method=fedilora",
        "privacy.clipping=adaptive",
        "privacy.count_noise=1",
        "privacy.clip_norm=0.2",
    )
    initial = _state(g, 4)
    ranks = {0: 4, 1: 2, 2: 1, 3: 4}
    rounds = [{c: _state(g, r, scale=0.3) for c, r in ranks.items()} for _ in range(3)]
    straight = _server(cfg, initial)
    straight_reports = [
        _round(straight, t, [0, 1, 2, 3], d, ranks) for t, d in enumerate(rounds, 1)
    ]
    first = _server(cfg, initial)
    _round(first, 1, [0, 1, 2, 3], rounds[0], ranks)
    skeleton, tensors = split_tensors(first.state_dict())
    state = join_tensors(json.loads(json.dumps(skeleton)), tensors)  # as a checkpoint holds it
    resumed = _server(cfg, initial)
    resumed.load_state_dict(state)
    later = [_round(resumed, t, [0, 1, 2, 3], rounds[t - 1], ranks) for t in (2, 3)]
    assert all(torch.equal(straight.global_state[k], resumed.global_state[k]) for k in initial)
    assert [r.metrics for r in later] == [r.metrics for r in straight_reports[1:]]
    eps = [r.metrics["privacy/epsilon"] for r in straight_reports]
    assert eps == [epsilon_after(t, 0.4, 1.0, 1e-5) for t in (1, 2, 3)]
    assert len({r.metrics["privacy/clip_norm"] for r in straight_reports}) == 3  # C moves


# -- the client hook ----------------------------------------------------------------------
def _client_step(cfg: FedSimConfig, cid: int, rank: int, cohort: tuple, start: dict) -> ClientStep:
    part = {"clip_norm": 1.0, "update_noise_multiplier": 2.0, "count_std": 0.5}
    return ClientStep(
        task=ClientTask(cid, rank, 3, cohort=cohort),
        broadcast=Broadcast(start, parts=Parts({"privacy": part})),
        state=ClientState(),
        received=start,
        start=start,
        shared=list(start),
        objective=Objective(),
        depths={},
    )


def test_a_client_clips_and_adds_its_share_of_the_noise():
    cfg = _config(
        "aggregation.method=fedilora",
        "privacy.noise=client",
        "privacy.clipping=adaptive",
        "privacy.count_noise=1",
    )
    privacy = next(m for m in enabled_methods(cfg) if isinstance(m, Privacy))
    width, cohort = 50_000, (8, 4, 4, 2)
    g = torch.Generator().manual_seed(5)
    start = {
        A: torch.randn(4, width, generator=g),
        B: torch.randn(width, 4, generator=g),
        DENSE: torch.randn(60_000, generator=g),
    }
    delta = {k: torch.randn(v.shape, generator=g) for k, v in start.items()}
    size = math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))
    update = {k: start[k] + 5 * delta[k] / size for k in start}  # norm 5 > C = 1
    step = _client_step(cfg, 1, 4, cohort, start)
    sent = privacy.before_upload(step, update)
    again = privacy.before_upload(_client_step(cfg, 1, 4, cohort, start), update)
    other = privacy.before_upload(_client_step(cfg, 2, 4, cohort, start), update)
    assert all(torch.equal(sent[k], again[k]) for k in sent)
    assert not torch.equal(sent[A], other[A])
    assert step.report["privacy"]["norm"] == pytest.approx(5.0, rel=1e-5)
    assert step.report["privacy"]["clipped"] is True
    bit = step.upload["privacy"]["unclipped"]  # 0 (clipped) plus a share N(0, 0.5^2 / 4)
    assert bit.shape == () and abs(float(bit)) < 5 * 0.25
    clipped = {k: start[k] + delta[k] / size for k in start}
    noise = {k: (sent[k] - clipped[k]).double() for k in sent}
    for j in range(4):
        coverers = sum(r > j for r in cohort)
        values = torch.cat([noise[A][j], noise[B][:, j]])
        assert float(values.std()) == pytest.approx(2.0 / math.sqrt(coverers), rel=0.015)
    assert float(noise[DENSE].std()) == pytest.approx(2.0 / 2, rel=0.015)


def test_a_client_without_the_servers_part_or_cohort_fails_loudly():
    cfg = _config("privacy.noise=client")
    privacy = next(m for m in enabled_methods(cfg) if isinstance(m, Privacy))
    start = {A: torch.zeros(2, 3), B: torch.zeros(4, 2)}
    step = _client_step(cfg, 0, 2, (), start)
    with pytest.raises(ValueError, match="cohort"):
        privacy.before_upload(step, start)
    step.broadcast = Broadcast(start)
    with pytest.raises(ValueError, match="broadcast"):
        privacy.before_upload(step, start)


# -- real runs ------------------------------------------------------------------------------
def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_a_private_run_logs_its_budget_and_repeats_itself(experiment_config):
    build = experiment_config("fedsim-privacy")
    cfg = build("privacy.enabled=true", "privacy.clip_norm=0.3")
    first = fedsim.run(cfg, executor=LocalExecutor())
    second = fedsim.run(cfg, executor=LocalExecutor())
    assert _numbers(first) == _numbers(second)
    eps = [h["privacy/epsilon"] for h in first.history[1:]]
    assert eps == [epsilon_after(t, 0.5, 1.0, 1e-5) for t in (1, 2)] and eps[0] < eps[1]
    rows = first.clients[1]
    assert all("privacy_norm" in r for r in rows)
    clipped = sum(r["privacy_norm"] > 0.3 for r in rows)
    assert first.history[1]["privacy/clipped"] == clipped


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_a_run_with_client_noise_and_adaptive_clipping(experiment_config):
    build = experiment_config("fedsim-privacy-client")
    private = (
        "privacy.enabled=true",
        "privacy.noise=client",
        "privacy.clipping=adaptive",
        "privacy.count_noise=1",
    )
    straight = fedsim.run(build(*private, "rounds=3"), executor=LocalExecutor())
    h = straight.history
    assert h[1]["privacy/epsilon"] < h[2]["privacy/epsilon"] < h[3]["privacy/epsilon"]
    assert h[1]["privacy/clip_norm"] == 1.0 != h[2]["privacy/clip_norm"]
    assert h[1]["privacy/update_noise_multiplier"] == pytest.approx((1 - 1 / 4) ** -0.5)
    assert all("privacy_norm" in r for r in straight.clients[1])
    assert h[1]["privacy/clipped"] == sum(r["privacy_clipped"] for r in straight.clients[1])
    # the clip norm and the merge count are in the checkpoint: a resume continues the same
    first = fedsim.run(build(*private, "rounds=2"), executor=LocalExecutor())
    resumed = fedsim.resume(first.run_dir, ["rounds=3"], executor=LocalExecutor())
    assert _numbers(resumed) == _numbers(straight)
