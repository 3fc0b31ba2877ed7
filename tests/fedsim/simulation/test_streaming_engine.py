"""The streaming merge in the engine: the server adds updates as clients finish, in id order.

Against the batch merge the numbers may differ by float rounding only (the stream sums in
float64, the batch in the inputs' float32); between arrival orders, pool sizes and server
placements they are the same bits.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch

import fedsim
from actors.client import ClientWorker
from actors.executor import LocalExecutor, RayExecutor
from actors.server import ServerState
from aggregation import InOrder
from fedsim.config import ConfigError
from fedsim.messages import Broadcast, ClientMeta, ClientTask, Upload
from fedsim.simulation.run import server_args


@pytest.fixture(scope="module")
def cfg(make_config):
    return make_config("editing.enabled=false")


@pytest.fixture(scope="module")
def worker(cfg, restore_threads) -> ClientWorker:
    return ClientWorker(cfg)


@pytest.fixture(scope="module")
def initial(worker):
    return {k: v.clone() for k, v in worker.initial_global().items()}


@pytest.fixture(scope="module")
def uploads(worker, initial):
    """Round-1 metadata and uploads of clients 0, 2 and 5 (ranks 8, 4, 2)."""
    out = {}
    for cid in (0, 2, 5):
        report, upload, _ = worker.train(ClientTask(cid, worker.ranks[cid], 1), Broadcast(initial))
        out[cid] = (ClientMeta(cid, report.rank, report.num_samples, report.steps), upload)
    return out


def _server(cfg, initial, streaming=True) -> ServerState:
    args = server_args(cfg, {k: v.clone() for k, v in initial.items()})
    return ServerState(*args[:5], streaming, args[6])


def _stream(server, uploads, arrivals, dropped=()):
    """Feed ``arrivals`` (client ids, in that order) through the driver's id-order buffer."""
    expected = sorted([*arrivals, *dropped])
    order = InOrder(expected)
    server.stream_open(1)
    events = [(c, False) for c in arrivals] + [(c, True) for c in dropped]
    for cid, drop in events:
        ready = order.drop(cid) if drop else order.offer(cid, uploads[cid])
        for _, (meta, upload) in ready:
            server.stream_add(meta, upload)
    assert order.pending == 0
    return server.stream_close()


def test_a_streamed_round_equals_the_batch_merge_up_to_float_rounding(cfg, initial, uploads):
    streamed = _server(cfg, initial)
    assert streamed.streaming
    report = _stream(streamed, uploads, [0, 2, 5])
    batch = _server(cfg, initial, streaming=False)
    assert not batch.streaming
    metas, ups = zip(*(uploads[c] for c in (0, 2, 5)))
    expected = batch.aggregate(1, list(metas), list(ups))
    assert report.accepted == expected.accepted == [0, 2, 5]
    a, b = streamed.get_global(), batch.get_global()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        # float32 sums of three weighted terms: a few ulps of the largest term
        bound = 4 * torch.finfo(torch.float32).eps * b[k].abs().max().clamp(min=1e-30) * 3
        assert float((a[k] - b[k]).abs().max()) <= float(bound), k
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # the round did merge something
    assert report.global_delta_norm == pytest.approx(expected.global_delta_norm, rel=1e-5)


def test_every_arrival_order_gives_the_same_bits(cfg, initial, uploads):
    results = []
    for arrivals in itertools.permutations([0, 2, 5]):
        server = _server(cfg, initial)
        _stream(server, uploads, list(arrivals))
        results.append(server.get_global())
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_a_failed_client_releases_the_updates_waiting_behind_it(cfg, initial, uploads):
    server = _server(cfg, initial)
    report = _stream(server, uploads, [5, 2], dropped=[0])
    assert report.accepted == [2, 5]
    direct = _server(cfg, initial)
    _stream(direct, uploads, [2, 5])
    assert all(torch.equal(server.get_global()[k], direct.get_global()[k]) for k in initial)


def test_a_bad_update_in_a_stream_is_rejected_and_the_rest_merged(cfg, initial, uploads):
    meta, upload = uploads[2]
    poisoned = Upload({k: torch.full_like(v, float("nan")) for k, v in upload.update.items()})
    server = _server(cfg, initial)
    report = _stream(server, {**uploads, 2: (meta, poisoned)}, [2, 5, 0])
    assert set(report.rejected) == {2} and "NaN" in report.rejected[2]
    assert report.accepted == [0, 5]
    clean = _server(cfg, initial)
    _stream(clean, uploads, [0, 5])
    assert all(torch.equal(server.get_global()[k], clean.get_global()[k]) for k in initial)


def test_a_stream_closed_without_applying_leaves_the_global_adapter(cfg, initial, uploads):
    server = _server(cfg, initial)
    server.stream_open(1)
    for c in (0, 2):
        server.stream_add(*uploads[c])
    report = server.stream_close(apply=False)
    assert report.accepted == [] and report.rejected == {}
    assert all(torch.equal(server.get_global()[k], initial[k]) for k in initial)


@pytest.mark.parametrize(
    ("overrides", "streams"),
    [
        ((), True),
        (("aggregation.method=zeropad",), True),
        (("aggregation.method=hetlora",), True),
        (("aggregation.method=flora", "editing.enabled=false"), True),
        (("aggregation.streaming=false",), False),
        (("aggregation.method=flexlora",), False),
        (("objective.method=fednova",), False),
        (("objective.method=scaffold", "train.optimizer=sgd"), False),
        (("fedex.enabled=true", "aggregation.method=zeropad", "editing.enabled=false"), False),
        (("robust.rule=median",), False),
        (("privacy.enabled=true", "privacy.noise_multiplier=0.5"), False),
    ],
    ids=[
        "fedilora",
        "zeropad",
        "hetlora",
        "flora",
        "off",
        "flexlora-svd",
        "fednova",
        "scaffold",
        "fedex",
        "robust",
        "dp",
    ],
)
def test_which_rounds_stream(make_config, initial, overrides, streams):
    cfg = make_config(*overrides)
    server = ServerState(*server_args(cfg, initial))
    assert server.streams() is streams


def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


@pytest.mark.slow  # a run on Ray and two in-process
def test_the_server_in_the_driver_or_in_an_actor_gives_the_same_run(
    warm_ray, experiment_config, restore_threads
):
    build = experiment_config("fedsim-streaming")
    # the server in this process (with every client task: LocalExecutor gives Ray's numbers,
    # tests/actors/test_executor.py) and the server in a Ray actor of its own
    in_driver = fedsim.run(build("rounds=2"), executor=LocalExecutor())
    in_actor = fedsim.run(build("rounds=2", "resources.server=actor"), executor=warm_ray)
    assert _numbers(in_driver) == _numbers(in_actor)
    # the batch merge is the server's business, not Ray's: in this process
    batch = fedsim.run(build("rounds=2", "aggregation.streaming=false"), executor=LocalExecutor())
    for s, b in zip(_numbers(in_driver), _numbers(batch)):
        assert s.keys() == b.keys()
        for k in s:  # rounding of the merge only: no metric moves beyond float noise
            assert s[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    # the phases of the start-up and tear-down of the run on Ray, in order
    phases = list(in_actor.phases.values())
    assert list(in_actor.phases) == [
        "checks",
        "ray",
        "store",
        "actors",
        "ready",
        "first_round",
        "rounds",
        "done",
    ]
    assert phases == sorted(phases)
    assert in_actor.history[0]["time/startup_s"] == pytest.approx(in_actor.phases["ready"])


def _client_actor_processes() -> list:
    """This session's Ray processes that hold a client actor (title ``ray::ClientActor...``)."""
    import psutil

    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::ClientActor"):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def test_a_failed_check_after_the_launch_stops_the_actors(ray_cluster, make_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = make_config(f"checkpoint.dir={blocker}/runs", "checkpoint.every=1")
    executor = RayExecutor()
    with pytest.raises(ConfigError, match="checkpoint.dir"):
        fedsim.run(cfg, executor=executor)
    for _ in range(100):  # ray.kill is asynchronous
        alive = _client_actor_processes()
        if not alive:
            break
        time.sleep(0.1)
    assert alive == []


@pytest.mark.slow  # a Python process that starts and stops a Ray of its own
def test_the_cli_starts_ray_first_and_stops_it_after_a_config_error(tmp_path):
    """``fedsim run`` begins Ray before the config loads; a bad value still ends in one line,
    exit 2, and the process exits (Ray's thread and processes stopped)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", "clients.fraction=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedsim:")]
    assert len(lines) == 1 and "clients.fraction" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started in the working dir
