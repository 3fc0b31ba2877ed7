"""FedEx-LoRA as a method: its rules, the server's exact merge, the clients' base weights, a run.

The residual's math is tested against a slow reference in tests/aggregation/test_fedex.py;
here the method is checked where it plugs in: config, server hooks, worker and round loop.
"""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import fedsim
from actors.client import ClientWorker
from actors.server import ServerState
from aggregation import get_merger, is_lora_a, lora_pairs
from fedsim.config import ConfigError, FedSimConfig, load_config
from fedsim.config.registry import enabled_methods
from fedsim.messages import Broadcast, ClientMeta, ClientTask, Upload
from fedsim.methods.fedex import FedEx
from fedsim.simulation.run import server_args

pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["aggregation.method=flora"], "exact already"),
        (["sharing.policy=B", "aggregation.method=zeropad"], "sharing.policy=all"),
        (["sharing.policy=none"], "sharing.policy=all"),
        (["server.optimizer=fedadam"], "server.optimizer=fedavg"),
    ],
)
def test_combinations_without_meaning_are_rejected_with_the_reason(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["fedex.enabled=true", "editing.enabled=false", *overrides])
    assert info.value.key == "fedex.enabled" and words in str(info.value)


@pytest.mark.parametrize("method", ["zeropad", "fedilora", "hetlora", "flexlora", "raflora"])
def test_it_composes_with_every_fixed_rank_merge(method):
    cfg = load_config(None, ["fedex.enabled=true", f"aggregation.method={method}"])
    assert [m.name for m in enabled_methods(cfg) if isinstance(m, FedEx)] == ["fedex"]
    off = load_config(None, [f"aggregation.method={method}"])
    assert not any(isinstance(m, FedEx) for m in enabled_methods(off))


def _client_states(g: torch.Generator, ranks: list[int]) -> list[dict]:
    return [
        {
            "m.lora_A.weight": torch.randn(r, 5, generator=g, dtype=torch.float64),
            "m.lora_B.weight": torch.randn(6, r, generator=g, dtype=torch.float64),
            "head.weight": torch.randn(3, 6, generator=g, dtype=torch.float64),
        }
        for r in ranks
    ]


def _server(method: str, initial: dict) -> ServerState:
    cfg = load_config(None, ["fedex.enabled=true", f"aggregation.method={method}"])
    methods = [m for m in enabled_methods(cfg) if isinstance(m, FedEx)]
    return ServerState(get_merger(method), initial, get_optimizer(), methods, 10)


def get_optimizer():
    from aggregation import FedAvg

    return FedAvg()


@pytest.mark.parametrize("method", ["zeropad", "fedilora", "flexlora"])
def test_base_plus_global_product_is_the_exact_average_over_two_rounds(method):
    g = torch.Generator().manual_seed(3)
    initial = {k: torch.zeros_like(v) for k, v in _client_states(g, [4])[0].items()}
    server = _server(method, initial)
    folded = torch.zeros(6, 5, dtype=torch.float64)
    for t, (ranks, counts) in enumerate([([4, 2, 1], [10, 30, 5]), ([2, 4], [7, 3])], start=1):
        states = _client_states(g, ranks)
        metas = [ClientMeta(c, r, n, 1) for c, (r, n) in enumerate(zip(ranks, counts))]
        report = server.aggregate(t, metas, [Upload(s) for s in states])
        assert report.accepted == list(range(len(ranks)))
        # the slow way: each client's full product, weighted by its share of the samples
        p = torch.tensor(counts, dtype=torch.float64) / sum(counts)
        exact = sum(
            p[i] * s["m.lora_B.weight"] @ s["m.lora_A.weight"] for i, s in enumerate(states)
        )
        bc = server.broadcast()
        merged = bc.adapter["m.lora_B.weight"] @ bc.adapter["m.lora_A.weight"]
        round_residual = exact - merged
        folded = folded + round_residual
        assert bc.base is not None and bc.base.version == t
        torch.testing.assert_close(bc.base.delta["m."], folded, rtol=0, atol=1e-12)
        # clients download the dense residual of the round
        assert bc.base.round_bytes == 6 * 5 * 8
        if method == "zeropad":  # the paper's case: averaging factors leaves a residual
            assert float(round_residual.abs().max()) > 1e-3


def test_identical_clients_leave_no_residual():
    g = torch.Generator().manual_seed(4)
    initial = {k: torch.zeros_like(v) for k, v in _client_states(g, [3])[0].items()}
    server = _server("zeropad", initial)
    state = _client_states(g, [3])[0]
    metas = [ClientMeta(c, 3, n, 1) for c, n in enumerate([5, 9, 2])]
    server.aggregate(1, metas, [Upload(dict(state)) for _ in metas])
    torch.testing.assert_close(
        server.broadcast().base.delta["m."], torch.zeros(6, 5, dtype=torch.float64)
    )


@pytest.fixture(scope="module")
def worker(make_config) -> ClientWorker:
    return ClientWorker(
        make_config("fedex.enabled=true", "aggregation.method=zeropad", "editing.enabled=false")
    )


def test_a_worker_adds_the_residual_to_its_frozen_weights(worker):
    """After the merge, every module's effective weight is the clients' average weight."""
    cfg: FedSimConfig = worker.cfg
    initial = worker.initial_global()
    server = ServerState(*server_args(cfg, initial))
    metas, uploads = [], []
    for cid in (0, 2, 4):
        report, upload, _ = worker.train(ClientTask(cid, worker.ranks[cid], 1), Broadcast(initial))
        metas.append(ClientMeta(cid, report.rank, report.num_samples, report.steps))
        uploads.append(upload)
    base0 = _base_weights(worker)
    server.aggregate(1, metas, uploads)
    bc = server.broadcast()
    worker.evaluate_global(bc, 0, 1)  # loads the base update and the global adapter
    base1 = _base_weights(worker)
    total = sum(m.num_samples for m in metas)
    for prefix, (a_key, b_key) in lora_pairs(initial).items():
        if initial[a_key].dim() != 2:
            continue  # 1x1 convolutions: the same fold, another shape
        # uploads and the broadcast live in the s = 1 space: dW = B @ A
        average = sum(
            m.num_samples / total * (u.update[b_key] @ u.update[a_key])
            for m, u in zip(metas, uploads)
        )
        effective = base1[prefix] - base0[prefix] + bc.adapter[b_key] @ bc.adapter[a_key]
        torch.testing.assert_close(effective, average, rtol=1e-4, atol=1e-6)
    # the next round's clients download the residual besides the adapter
    report, _, _ = worker.train(ClientTask(1, worker.ranks[1], 2), bc)
    plain, _, _ = worker.train(ClientTask(1, worker.ranks[1], 2), Broadcast(bc.adapter))
    assert report.download_bytes == plain.download_bytes + bc.base.round_bytes > 0


def _base_weights(worker: ClientWorker) -> dict[str, torch.Tensor]:
    """The frozen weight of every LoRA module of the worker's model, by module prefix."""
    out = {}
    for name, module in worker.host.model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            out[f"{name}."] = module.base_layer.weight.detach().clone()
    return out


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_a_run_logs_the_residual_beside_the_adapter(warm_ray, experiment_config, tmp_path):
    from actors.executor import LocalExecutor

    build = experiment_config("fedsim-fedex")
    cfg = build("fedex.enabled=true", "aggregation.method=zeropad", "editing.enabled=false")
    # on Ray: every actor keeps the folded base weights it last synced (ClientWorker._sync_base)
    result = fedsim.run(cfg, executor=warm_ray)
    # the reference without FedEx-LoRA: in this process (the same numbers as on Ray)
    plain = fedsim.run(
        build("aggregation.method=zeropad", "editing.enabled=false"), executor=LocalExecutor()
    )
    # the same training and the same sampled clients; FedEx-LoRA adds the residual download
    assert result.history[1]["train/loss_mean"] == plain.history[1]["train/loss_mean"]
    assert result.history[2]["comm/download_bytes"] > plain.history[2]["comm/download_bytes"]
    assert result.history[2]["global/loss"] != plain.history[2]["global/loss"]
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    path = client.download_artifacts(result.run_id, "global_adapter", str(tmp_path))
    base = load_file(f"{path}/base_delta.safetensors")
    adapter = load_file(f"{path}/adapter_model.safetensors")
    assert base and all(torch.isfinite(v).all() for v in base.values())
    modules = {k.removesuffix("lora_A.weight") for k in adapter if is_lora_a(k)}
    assert len(base) == len(modules)


def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
@pytest.mark.parametrize(
    "overrides",
    [
        ("aggregation.method=fedilora", "editing.threshold=1.0"),  # editing edits in round 2
        ("objective.method=scaffold", "train.optimizer=sgd", "editing.enabled=false"),
        ("objective.method=fednova", "aggregation.method=hetlora", "editing.enabled=false"),
        ("objective.method=fedprox", "aggregation.method=flexlora", "editing.enabled=false"),
        ("pruning.gamma=0.1", "pruning.threshold=10", "aggregation.method=zeropad"),
        ("data.scenario=cross", "faults.fail_prob=0.3", "resources.max_retries=5"),
    ],
    ids=["editing", "scaffold", "fednova-hetlora", "fedprox-flexlora", "pruning", "cross-faults"],
)
def test_it_composes_with_the_other_methods_and_resumes_to_the_same_numbers(
    experiment_config, overrides
):
    """Three rounds straight equal two rounds, a resume and the third (the folded base is in
    the checkpoint), with FedEx-LoRA on top of each combination."""
    from actors.executor import LocalExecutor

    build = experiment_config("fedsim-fedex-composed")
    cfg = build("fedex.enabled=true", "rounds=3", *overrides)
    straight = fedsim.run(cfg, executor=LocalExecutor())
    assert all(h["clients/rejected"] == 0 for h in straight.history[1:])
    # round 2's clients download the dense residuals besides what they upload
    assert straight.history[2]["comm/download_bytes"] > straight.history[2]["comm/upload_bytes"]
    first = fedsim.run(
        build("fedex.enabled=true", "rounds=2", *overrides), executor=LocalExecutor()
    )
    resumed = fedsim.resume(first.run_dir, ["rounds=3"], executor=LocalExecutor())
    assert _numbers(resumed) == _numbers(straight)
