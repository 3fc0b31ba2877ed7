"""Fed-PLoRA as a method (docs/algorithms.md §6.3): its rules, a client's model before
training, the server's per-module average in the round loop, the download, a run and a resume.

The draw, the fold and the average are tested against slow references in
tests/aggregation/test_fedplora.py; here the method is checked where it plugs in.
"""

from __future__ import annotations

import pytest
import torch

import fedsim
from actors.client import ClientWorker
from actors.server import ServerState
from aggregation import FedAvg, get_merger, is_lora, lora_pairs
from aggregation.diagnostics import rank_energy
from aggregation.fedplora import module_indices
from fedsim.config import ConfigError, load_config
from fedsim.config.registry import enabled_methods
from fedsim.messages import Broadcast, ClientMeta, ClientTask, Parts, Upload, nbytes
from fedsim.methods.fedplora import FedPLoRA
from fedsim.tracking.round_report import merge_metrics

pytestmark = pytest.mark.usefixtures("restore_threads")

ON = ("fedplora.enabled=true",)  # with the defaults: fedplora.rule=random, merge diagnostics on


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["aggregation.method=zeropad"], "fedplora.enabled", "aggregation.method=fedilora"),
        (["aggregation.method=flexlora"], "fedplora.enabled", "aggregation.method=fedilora"),
        (["aggregation.method=flora"], "fedplora.enabled", "aggregation.method=fedilora"),
        (["sharing.policy=B"], "fedplora.enabled", "sharing.policy=all"),
        (["sharing.policy=none"], "fedplora.enabled", "sharing.policy=all"),
        (["fedex.enabled=true"], "fedplora.enabled", "turn fedex off"),
        (["objective.method=fednova"], "fedplora.rule", "fedplora.rule=first"),
        (
            ["objective.method=scaffold", "train.optimizer=sgd"],
            "fedplora.rule",
            "fedplora.rule=first",
        ),
        (["robust.rule=median"], "fedplora.rule", "turn robust off"),
        (["robust.clip_norm=1.0"], "fedplora.rule", "turn robust off"),
        (["pruning.gamma=0.1"], "fedplora.rule", "turn pruning off"),
        (
            ["faults.attack=lie_about_rank", "faults.malicious=1"],
            "fedplora.rule",
            "lie_about_rank",
        ),
    ],
)
def test_combinations_without_meaning_are_rejected_with_the_reason(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*ON, *overrides])
    assert info.value.key == key and words in str(info.value)


def test_the_defaults_turn_it_on_with_the_merge_diagnostics():
    """``fedplora.enabled=true`` alone loads: the random rule, the diagnostics on."""
    cfg = load_config(None, ["fedplora.enabled=true"])
    assert cfg.fedplora.rule == "random" and cfg.tracking.merge_diagnostics
    assert "fedplora" in [m.name for m in enabled_methods(cfg)]


def test_privacy_rejects_the_random_rule():
    with pytest.raises(ConfigError) as info:
        load_config(None, [*ON, "privacy.enabled=true"])
    assert info.value.key == "privacy.enabled" and "fedplora.rule=first" in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["fedplora.rule=first", "objective.method=fednova"],
        ["fedplora.rule=first", "objective.method=scaffold", "train.optimizer=sgd"],
        ["fedplora.rule=first", "robust.rule=median", "robust.clip_norm=1.0"],
        ["fedplora.rule=first", "privacy.enabled=true"],
        ["fedplora.rule=first", "pruning.gamma=0.1", "tracking.merge_diagnostics=true"],
        ["objective.method=fedprox"],
        ["server.optimizer=fedadam"],
        ["data.scenario=cross"],
        ["faults.attack=sign_flip", "faults.malicious=1"],
        ["aggregation.empty_dim=zero", "lora.scaling=rank"],
    ],
)
def test_it_composes_where_the_modules_line_up(overrides):
    cfg = load_config(None, [*ON, *overrides])
    assert "fedplora" in [m.name for m in enabled_methods(cfg)]


@pytest.fixture(scope="module")
def worker(make_config) -> ClientWorker:
    return ClientWorker(make_config(*ON))


def _trained_global(worker: ClientWorker, seed: int) -> dict[str, torch.Tensor]:
    """The initial global adapter with every factor moved (B starts at zero: the fold would be
    zero), in the s = 1 space."""
    g = torch.Generator().manual_seed(seed)
    initial = worker.initial_global()
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in initial.items()}


def _effective(worker: ClientWorker, rank: int) -> dict[str, torch.Tensor]:
    """Each 2-D LoRA module's ``W + s B A`` as the model now computes it (float64)."""
    name = f"r{rank}"
    out = {}
    for module_name, module in worker.host.model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A") and name in module.lora_A:
            w = module.base_layer.weight.detach().double()
            if w.dim() != 2:
                continue  # a 1x1 convolution: the same fold, another shape
            b = module.lora_B[name].weight.detach().double()
            a = module.lora_A[name].weight.detach().double()
            out[f"{module_name}."] = w + module.scaling[name] * (b @ a)
    return out


def _base(worker: ClientWorker) -> dict[str, torch.Tensor]:
    return {
        f"{n}.": m.base_layer.weight.detach().clone()
        for n, m in worker.host.model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A")
    }


def test_a_client_starts_from_the_global_model_exactly(worker, monkeypatch):
    """A rank-2 client of an R = 8 federation whose modules are not the leading ones: its
    frozen weights plus its adapter, as training starts, are ``W_0 + B_g A_g``; it uploads its
    two modules with their indices and counts all R modules as downloaded."""
    cfg = worker.cfg
    cid, rank, big = 4, worker.ranks[4], worker.global_rank
    assert rank < big
    round_idx = next(
        t for t in range(1, 50) if module_indices("random", rank, big, cfg.seed, t, cid)[0] > 0
    )
    chosen = module_indices("random", rank, big, cfg.seed, round_idx, cid)
    worker.evaluate_global(Broadcast(worker.initial_global()), 0, 50)  # builds, no fold
    w0 = _base(worker)
    state = _trained_global(worker, seed=5)
    seen = {}
    train = worker._train

    def recording(task, model, objective, params, split):
        seen.update(_effective(worker, task.rank))
        return train(task, model, objective, params, split)

    monkeypatch.setattr(worker, "_train", recording)
    report, upload, _ = worker.train(ClientTask(cid, rank, round_idx), Broadcast(state))
    assert seen
    for prefix, (a_key, b_key) in lora_pairs(state).items():
        if prefix not in seen:
            continue
        want = w0[prefix].double() + state[b_key].double() @ state[a_key].double()
        torch.testing.assert_close(seen[prefix], want, rtol=1e-5, atol=1e-6)
    assert upload.parts["fedplora"]["indices"].tolist() == chosen
    assert all(
        v.shape[0 if "lora_A" in k else 1] == rank for k, v in upload.update.items() if is_lora(k)
    )
    assert report.download_bytes == nbytes(state)  # all R modules and the dense keys
    assert report.upload_bytes == nbytes(upload.update) + 8 * rank
    # the next task (here: the global evaluation) gets the pretrained weights back
    worker.evaluate_global(Broadcast(state), 0, 50)
    for prefix, w in _base(worker).items():
        assert torch.equal(w, w0[prefix]), prefix


def test_the_server_averages_each_module_over_its_trainers():
    """Two rounds on a 4-module adapter; module by module, by hand. The merge diagnostics
    (docs/algorithms.md §1.9) count each module for the clients that trained it, and the
    global adapter's energy per rank band (§6.1) is measured."""
    g = torch.Generator().manual_seed(1)
    initial = {
        "m.lora_A.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "m.lora_B.weight": torch.randn(5, 4, generator=g, dtype=torch.float64),
        "head.weight": torch.randn(2, 5, generator=g, dtype=torch.float64),
    }
    cfg = load_config(None, list(ON))
    levels = [1, 2, 3]
    server = ServerState(
        get_merger("fedilora"),
        initial,
        FedAvg(),
        [FedPLoRA(cfg)],
        10,
        diagnostics=True,
        rank_levels=levels,
    )
    current = {k: v.clone() for k, v in initial.items()}
    for t, (indices, counts) in enumerate([([[0, 2], [2], [0, 1, 2]], [3, 1, 6]), ([[3]], [2])], 1):
        states = [
            {
                "m.lora_A.weight": torch.randn(len(k), 3, generator=g, dtype=torch.float64),
                "m.lora_B.weight": torch.randn(5, len(k), generator=g, dtype=torch.float64),
                "head.weight": torch.randn(2, 5, generator=g, dtype=torch.float64),
            }
            for k in indices
        ]
        metas = [ClientMeta(c, len(k), n, 1) for c, (k, n) in enumerate(zip(indices, counts))]
        uploads = [
            Upload(s, Parts(fedplora={"indices": torch.tensor(k)})) for s, k in zip(states, indices)
        ]
        report = server.aggregate(t, metas, uploads)
        assert report.accepted == list(range(len(indices)))
        new = server.get_global()
        for j in range(4):
            holders = [i for i, k in enumerate(indices) if j in k]
            if not holders:  # nobody trained it: it keeps its value
                assert torch.equal(new["m.lora_A.weight"][j], current["m.lora_A.weight"][j])
                assert torch.equal(new["m.lora_B.weight"][:, j], current["m.lora_B.weight"][:, j])
                continue
            total = sum(counts[i] for i in holders)
            a = sum(
                counts[i] / total * states[i]["m.lora_A.weight"][indices[i].index(j)]
                for i in holders
            )
            b = sum(
                counts[i] / total * states[i]["m.lora_B.weight"][:, indices[i].index(j)]
                for i in holders
            )
            torch.testing.assert_close(new["m.lora_A.weight"][j], a, rtol=0, atol=1e-12)
            torch.testing.assert_close(new["m.lora_B.weight"][:, j], b, rtol=0, atol=1e-12)
        head = sum(n / sum(counts) * s["head.weight"] for n, s in zip(counts, states))
        torch.testing.assert_close(new["head.weight"], head, rtol=0, atol=1e-12)
        _check_diagnostics(report, indices, counts, states, current, new, levels)
        current = {k: v.clone() for k, v in new.items()}


def _check_diagnostics(report, indices, counts, states, current, new, levels):
    """The round's diagnostics against loops over the index sets ``K_i``."""
    dims = report.diagnostics
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    contribution = [0.0] * len(indices)
    for j in range(4):
        holders = [i for i, k in enumerate(indices) if j in k]
        assert dims["coverage"][j] == len(holders)
        assert dims["weight"][j] == sum(counts[i] for i in holders)
        assert dims["merge_weight"][j] == pytest.approx(1.0 if holders else 0.0)
        change = (new[a][j] - current[a][j]).square().sum() + (
            (new[b][:, j] - current[b][:, j]).square().sum()
        )
        assert dims["update_norm"][j] == pytest.approx(float(change.sqrt()), rel=1e-12)
        for i in holders:  # w_ij (X_i[p_i(j)] - X_prev[j]), X_prev at the module j
            p, w = indices[i].index(j), counts[i] / sum(counts[h] for h in holders)
            contribution[i] += w**2 * float(
                (states[i][a][p] - current[a][j]).square().sum()
                + (states[i][b][:, p] - current[b][:, j]).square().sum()
            )
    for i, total in enumerate(contribution):
        columns = report.columns[i]
        assert columns["contribution"] == pytest.approx(total**0.5, rel=1e-12)
        assert "top_band" not in columns and "contribution_top" not in columns
    energy = rank_energy(new, levels, 4)
    assert dims["energy"] == energy and energy["bands"] == ["1-1", "2-2", "3-3", "4-4"]
    metrics = merge_metrics(report, levels)
    assert metrics["merge/rank_collapse"] == energy["share"][0]
    for band, share in zip(energy["bands"], energy["share"]):
        assert metrics[f"merge/energy_share_band_{band}"] == share


def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


@pytest.mark.slow  # whole runs: CI runs it, the quick loop does not
def test_a_run_counts_the_folded_download_resumes_and_retries_to_the_same_numbers(
    experiment_config,
):
    """Two rounds with the defaults (the random rule, the merge diagnostics on): the folded
    download, the rank-collapse share every round, a resume and retries to the same numbers."""
    from actors.executor import LocalExecutor
    from fedsim.checkpoint.disk import load_checkpoint
    from fedsim.data.partition import sample_clients
    from fedsim.devices import injected_failure

    build = experiment_config("fedsim-fedplora")
    straight = fedsim.run(build(*ON, "rounds=2"), executor=LocalExecutor())
    adapter = nbytes(load_checkpoint(straight.run_dir).server["global"])
    bands = straight.merge[-1]["energy"]["bands"]
    for h in straight.history[1:]:
        assert h["clients/rejected"] == 0 and h["clients/sampled"] == 3
        # every client downloads all R modules, those it folds included
        assert h["comm/download_bytes"] == 3 * adapter
        # the merge diagnostics run by default: the rank-collapse share of every round
        shares = [h[f"merge/energy_share_band_{band}"] for band in bands]
        assert h["merge/rank_collapse"] == shares[0]
        assert sum(shares) == pytest.approx(1.0)
    assert [m["round"] for m in straight.merge] == [1, 2]
    rows_of = {h["round"]: rows for h, rows in zip(straight.history, straight.clients)}
    for m in straight.merge:
        merged = [r for r in rows_of[m["round"]] if r.get("status", "ok") == "ok"]
        assert len(merged) == 3
        # a module's coverage counts the clients that trained it: r_i modules each
        assert sum(m["coverage"]) == sum(r["rank"] for r in merged)
        assert all("contribution" in r and "top_band" not in r for r in merged)
    first = fedsim.run(build(*ON, "rounds=1"), executor=LocalExecutor())
    resumed = fedsim.resume(first.run_dir, ["rounds=2"], executor=LocalExecutor())
    assert _numbers(resumed) == _numbers(straight)
    cfg = build(*ON, "rounds=2", "faults.fail_prob=0.5", "resources.max_retries=20")
    faulty = fedsim.run(cfg, executor=LocalExecutor())
    n, share = cfg.clients.num, cfg.clients.fraction
    sampled = [(t, int(c)) for t in (1, 2) for c in sample_clients(n, share, cfg.seed, t)]
    assert any(injected_failure(cfg, t, c, 0) for t, c in sampled)  # a task was retried
    quality = ("global/", "personalized/", "train/", "comm/")
    assert [{k: v for k, v in h.items() if k.startswith(quality)} for h in faulty.history] == [
        {k: v for k, v in h.items() if k.startswith(quality)} for h in straight.history
    ]
