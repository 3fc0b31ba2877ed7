"""Robust rules as a layer in front of every merge: the server's results, logs and rules.

The rules' math is tested against slow references in tests/aggregation/test_robust*.py; here
they are checked where they plug in: one scaled attacker among honest clients, on the server.
"""

from __future__ import annotations

import pytest
import torch

from actors.server import ServerState
from aggregation import FedAvg, get_merger, truncate
from fedsim.config import ConfigError, load_config
from fedsim.config.registry import enabled_methods
from fedsim.messages import ClientMeta, Upload
from fedsim.methods.robust import Robust


def _state(rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": torch.randn(rank, 6, generator=g, dtype=torch.float64),
        "m.lora_B.weight": torch.randn(5, rank, generator=g, dtype=torch.float64),
        "head.weight": torch.randn(3, 5, generator=g, dtype=torch.float64),
    }


def _server(method: str, *overrides: str, global_rank: int = 4) -> tuple[ServerState, dict]:
    cfg = load_config(None, [f"aggregation.method={method}", "editing.enabled=false", *overrides])
    methods = enabled_methods(cfg)  # the robust layer, and FLoRA's folding for flora
    initial = _state(global_rank, seed=0)
    return ServerState(get_merger(method), initial, FedAvg(), methods, 10), initial


def _round(server: ServerState, ranks: list[int], honest: dict, attacker: int, k: float = 100.0):
    """Honest clients upload ``honest`` at their rank; ``attacker`` sends its update times k."""
    g = server.global_state
    metas, uploads = [], []
    for cid, r in enumerate(ranks):
        x = truncate(honest, r)
        if cid == attacker:
            x0 = truncate(g, r)
            x = {key: x0[key] + k * (x[key] - x0[key]) for key in x}
        metas.append(ClientMeta(cid, r, 10 + cid, 1))
        uploads.append(Upload(x))
    return server.aggregate(1, metas, uploads)


def _products(state: dict) -> dict:
    return {"m": state["m.lora_B.weight"] @ state["m.lora_A.weight"], "head": state["head.weight"]}


RULES = [
    ("robust.rule=median",),
    # 0.25: the config samples 4 clients per round, and trimming must drop at least one
    ("robust.rule=trimmed_mean", "robust.trim=0.25"),
    ("robust.rule=krum",),
    ("robust.rule=multi_krum",),
    ("robust.rule=product",),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r[0].split("=")[1])
@pytest.mark.parametrize("method", ["zeropad", "fedilora", "hetlora", "flexlora"])
def test_one_scaled_attacker_among_identical_honest_clients_changes_nothing(method, rule):
    server, _ = _server(method, *rule)
    honest = _state(4, seed=1)
    report = _round(server, [4] * 5, honest, attacker=2)
    got, want = server.global_state, honest
    if method == "flexlora":  # its SVD re-factorises: the same product, other factors
        got, want = _products(got), _products(want)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-9, atol=1e-9)
    expected = {"krum": 4, "multi_krum": 1, "product": 1}.get(rule[0].split("=")[1], 0)
    assert report.metrics["robust/rejected"] == expected
    assert report.columns[2]["robust_kept"] is (
        rule[0] in ("robust.rule=median",) or rule[0] == "robust.rule=trimmed_mean"
    )
    assert report.columns[2]["robust_norm"] > 50 * report.columns[0]["robust_norm"]


def test_without_a_rule_the_attacker_moves_the_global_adapter():
    server, _ = _server("zeropad", "robust.clip_norm=0")
    assert not any(isinstance(m, Robust) for m in server.methods)
    honest = _state(4, seed=1)
    _round(server, [4] * 5, honest, attacker=2)
    gap = (server.global_state["m.lora_A.weight"] - honest["m.lora_A.weight"]).norm()
    assert gap > 1.0


def test_median_on_heterogeneous_ranks_votes_only_where_clients_trained():
    """Dimensions 2-3 are covered by clients 0, 1 (honest) and the attacker 4: the median of
    three is the honest value; the rank-1 and rank-2 clients' padding never votes."""
    server, _ = _server("fedilora", "robust.rule=median")
    honest = _state(4, seed=1)
    _round(server, [4, 4, 2, 1, 4], honest, attacker=4)
    for key, value in server.global_state.items():
        torch.testing.assert_close(value, honest[key], rtol=1e-9, atol=1e-9)


def test_product_rule_leaves_out_the_attacker_not_the_low_rank_clients():
    server, _ = _server("fedilora", "robust.rule=product")
    honest = _state(4, seed=1)
    report = _round(server, [4, 4, 2, 1, 4, 2], honest, attacker=4)
    assert [c for c, col in sorted(report.columns.items()) if not col["robust_kept"]] == [4]
    assert report.columns[4]["robust_score"] > 3 * report.columns[3]["robust_score"]
    reference, _ = _server("fedilora")
    metas = [ClientMeta(c, r, 10 + c, 1) for c, r in enumerate([4, 4, 2, 1, 2])]
    ups = [Upload(truncate(honest, r)) for r in [4, 4, 2, 1, 2]]
    metas[4] = ClientMeta(5, 2, 15, 1)
    reference.aggregate(1, metas, ups)
    for key, value in server.global_state.items():
        torch.testing.assert_close(value, reference.global_state[key], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["zeropad", "fedilora"])
def test_norm_bounding_bounds_every_update(method):
    server, initial = _server(method, "robust.clip_norm=0.5")
    honest = _state(4, seed=1)
    report = _round(server, [4], honest, attacker=-1)
    delta = sum(float((server.global_state[k] - initial[k]).pow(2).sum()) for k in initial)
    assert delta**0.5 == pytest.approx(0.5, rel=1e-9)  # one client: its clipped update
    assert report.metrics["robust/clipped"] == 1 and report.columns[0]["robust_clipped"]
    # below the bound nothing changes
    server, initial = _server(method, "robust.clip_norm=1e6")
    _round(server, [4], honest, attacker=-1)
    for k, v in server.global_state.items():
        torch.testing.assert_close(v, honest[k], rtol=0, atol=1e-12)


def test_the_result_does_not_depend_on_the_order_uploads_arrive():
    one, _ = _server("fedilora", "robust.rule=multi_krum", "robust.clip_norm=2")
    two, _ = _server("fedilora", "robust.rule=multi_krum", "robust.clip_norm=2")
    ranks = [4, 2, 4, 1, 2]
    states = [_state(r, seed=10 + i) for i, r in enumerate(ranks)]
    metas = [ClientMeta(c, r, 5 + c, 1) for c, r in enumerate(ranks)]
    one.aggregate(1, metas, [Upload(s) for s in states])
    order = [3, 0, 4, 2, 1]
    two.aggregate(1, [metas[i] for i in order], [Upload(states[i]) for i in order])
    for k in one.global_state:
        assert torch.equal(one.global_state[k], two.global_state[k])


def test_krum_with_too_few_clients_merges_them_all_and_says_so():
    server, _ = _server("zeropad", "robust.rule=krum", "robust.num_faulty=1")
    report = _round(server, [4, 4], _state(4, seed=1), attacker=-1)
    assert report.metrics["robust/skipped"] == 1 and report.metrics["robust/rejected"] == 0


def test_flora_takes_the_product_rule():
    server, _ = _server("flora", "robust.rule=product", "sharing.policy=all")
    ranks = [2, 2, 2, 2]
    g = torch.Generator().manual_seed(4)
    b = torch.randn(5, 2, generator=g, dtype=torch.float64)
    a = torch.randn(2, 6, generator=g, dtype=torch.float64)
    head = torch.randn(3, 5, generator=g, dtype=torch.float64)
    metas = [ClientMeta(c, r, 10, 1) for c, r in enumerate(ranks)]
    ups = [
        Upload(
            {
                "m.lora_A.weight": a,
                "m.lora_B.weight": b * (100 if c == 3 else 1),
                "head.weight": head,
            }
        )
        for c in range(4)
    ]
    report = server.aggregate(1, metas, ups)
    assert report.metrics["robust/rejected"] == 1 and not report.columns[3]["robust_kept"]


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (
            ["robust.rule=median", "aggregation.method=flora", "sharing.policy=all"],
            "robust.rule",
            "robust.rule=product",
        ),
        (
            [
                "robust.rule=product",
                "robust.clip_norm=1",
                "aggregation.method=flora",
                "sharing.policy=all",
            ],
            "robust.clip_norm",
            "without robust.clip_norm",
        ),
        (
            ["robust.rule=product", "sharing.policy=B", "aggregation.method=zeropad"],
            "robust.rule",
            "sharing.policy=all",
        ),
        (["robust.clip_norm=-1"], "robust.clip_norm", ">= 0"),
        (["robust.trim=0.5"], "robust.trim", "[0, 0.5)"),
        (["robust.num_faulty=-1"], "robust.num_faulty", ">= 0"),
        (["robust.threshold=1"], "robust.threshold", "above 1"),
        (["robust.rule=bulyan"], "robust.rule", ""),
    ],
)
def test_settings_without_meaning_are_rejected_with_the_reason(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["editing.enabled=false", *overrides])
    assert info.value.key == key and words in str(info.value)
