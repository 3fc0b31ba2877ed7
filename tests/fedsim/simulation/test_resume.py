"""Checkpoint and resume with a real MLflow store, in this process and on a real local Ray.

A run stopped after round 1 and resumed to round 3 must give the numbers and the global
adapter of a run that never stopped, for the state that persists across rounds: private
tensors and server-optimiser moments (sharing B + FedAdam), SCAFFOLD's variates with HetLoRA's
pruned ranks and FedYogi, FLoRA's base updates. The runs are in-process (``LocalExecutor``:
the same numbers as Ray's) but for the first variant's resume, which hands the private state
back to Ray actors. A driver killed with SIGKILL mid-run (on Ray) is resumed with
``fedsim run --resume`` and lands in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from fedsim.checkpoint.disk import load_checkpoint
from fedsim.cli import main
from fedsim.simulation.run import resume

EXPERIMENT = "fedsim-resume"
pytestmark = pytest.mark.usefixtures("restore_threads")
VARIANTS = {
    "private-A+fedadam": [
        "sharing.policy=B",
        "server.optimizer=fedadam",
        "editing.enabled=false",
        "aggregation.method=zeropad",
    ],
    "scaffold+hetlora-pruning+fedyogi": [
        "objective.method=scaffold",
        "train.optimizer=sgd",
        "aggregation.method=hetlora",
        "pruning.gamma=0.01",
        "pruning.threshold=100",
        "editing.enabled=false",
        "server.optimizer=fedyogi",
    ],
    "flora": ["aggregation.method=flora", "editing.enabled=false"],
}


def _numbers(history: list[dict]) -> list[dict]:
    """Everything but wall-clock timings (the simulated clock must match too)."""
    return [
        {k: v for k, v in h.items() if not k.startswith("time/") or "simulated" in k}
        for h in history
    ]


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same_tensors(a[k], b[k])
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                _same_tensors(x, y)
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def config(experiment_config):
    return experiment_config(EXPERIMENT)


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(warm_ray, config, variant):
    over = VARIANTS[variant]
    straight = fedsim.run(config(*over, "rounds=3"), executor=LocalExecutor())
    first = fedsim.run(config(*over, "rounds=1"), executor=LocalExecutor())
    # the first variant resumes on Ray: the checkpointed private A goes back to the actors
    on_ray = variant == next(iter(VARIANTS))
    resumed = resume(first.run_dir, ["rounds=3"], executor=warm_ray if on_ray else LocalExecutor())
    assert resumed.run_id == first.run_id
    assert _numbers(resumed.history) == _numbers(straight.history)
    # the merge diagnostics of the rounds before the stop came back from the checkpoint
    assert [m["round"] for m in resumed.merge] == [1, 2, 3]
    assert resumed.merge == straight.merge
    a, b = load_checkpoint(straight.run_dir), load_checkpoint(resumed.run_dir)
    assert a.round == b.round == 3
    _same_tensors(a.server, b.server)
    assert a.clients.keys() == b.clients.keys()
    for cid in a.clients:
        _same_tensors(a.clients[cid], b.clients[cid])
    assert a.meta["ranks"] == b.meta["ranks"]
    if "pruning" in variant:
        # pruning happened, and the pruned ranks survived the resume
        assert a.meta["ranks"] != [8, 8, 4, 4, 2, 2]
    # clients with persistent state: private A (sharing B) or SCAFFOLD variates
    assert bool(a.clients) == (variant != "flora")


@pytest.mark.slow  # a driver subprocess and three runs
def test_sigkilled_driver_resumes_into_the_same_mlflow_run(
    ray_cluster, config, tiny_overrides, tmp_path
):
    # one actor (one start-up for the driver, one for the resume) runs a round's three tasks one
    # after another, each sleeping 0.7 s: rounds 2 and 3, the time the kill has to land in,
    # take over 4 s, as with two actors sleeping 1 s
    slow = [
        "faults.delay_dist=constant",
        "faults.delay_s=0.7",
        "faults.sleep_scale=1",
        "resources.actors=1",
        "rounds=3",
    ]
    cfg = config(*slow, f"checkpoint.dir={tmp_path / 'runs'}")
    overrides = [
        *tiny_overrides,
        *slow,
        f"checkpoint.dir={tmp_path / 'runs'}",
        f"tracking.uri={cfg.tracking.uri}",
        f"tracking.experiment={EXPERIMENT}",
        "tracking.run_name=killed",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim", "run", *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        # the latest pointer names round 1 (it moves after the round's folder is in place)
        while not any(
            json.loads(p.read_text() or "{}").get("round", 0) >= 1
            for p in (tmp_path / "runs").glob("*/latest.json")
        ):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no round-1 checkpoint within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = (tmp_path / "runs").iterdir()
    done = load_checkpoint(run_dir).round
    assert 1 <= done < 3, f"the kill came too late (checkpoint at round {done})"
    assert main(["run", "--resume", str(run_dir)]) == 0

    # the same numbers as on Ray; the delays stay on the simulated clock only (the tasks' real
    # sleeps above made the kill land mid-run, and change no number)
    straight = fedsim.run(
        config(*slow, "faults.sleep_scale=0", f"checkpoint.dir={tmp_path / 'runs'}"),
        executor=LocalExecutor(),
    )
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(run_dir.name)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedsim.resumed_from_round"] == str(done)
    for key in ("global/loss", "train/loss_mean", "comm/upload_bytes_total"):
        logged = client.get_metric_history(run_dir.name, key)
        steps = sorted(m.step for m in logged)
        assert steps == (list(range(4)) if key == "global/loss" else [1, 2, 3]), key
        want = {h["round"]: h[key] for h in straight.history if key in h}
        assert {m.step: m.value for m in logged} == pytest.approx(want, rel=0, abs=0), key
    # system metrics go on after the resume at the next step (one series, no step twice);
    # the datasets were logged once, when the run began
    cpu = [
        m.step for m in client.get_metric_history(run_dir.name, "system/cpu_utilization_percentage")
    ]
    assert sorted(cpu) == list(range(len(cpu))) and len(cpu) >= 2
    assert len(run.inputs.dataset_inputs) == 2
    _same_tensors(load_checkpoint(run_dir).server, load_checkpoint(straight.run_dir).server)


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_resume_refuses_what_would_change_the_numbers(ray_address, config, capsys):
    # ray_address: `fedsim run` joins the session's Ray (rather than starting one per call)
    first = fedsim.run(config("rounds=1"), executor=LocalExecutor())
    assert main(["run", "--resume", str(first.run_dir), "seed=3"]) == 2
    assert "seed" in capsys.readouterr().err
    assert main(["run", "--resume", str(first.run_dir), "rounds=0"]) == 2
    assert "round 1" in capsys.readouterr().err
    assert main(["run", "--resume", str(Path(first.run_dir) / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_checkpoints_can_be_turned_off(config, tmp_path):
    result = fedsim.run(
        config("rounds=1", "checkpoint.every=0", f"checkpoint.dir={tmp_path}"),
        executor=LocalExecutor(),
    )
    assert result.history[-1]["round"] == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_progress_bar_counts_trained_rounds_from_zero_and_from_the_checkpoint(config, capsys):
    first = fedsim.run(config("rounds=1", "progress=true"), executor=LocalExecutor())
    out = capsys.readouterr()
    assert " 0/1 " in out.err and " 1/1 " in out.err and "-1/" not in out.err
    assert "fedsim run summary" in out.out
    resume(first.run_dir, ["rounds=2", "progress=true"], executor=LocalExecutor())
    err = capsys.readouterr().err
    assert " 1/2 " in err and " 2/2 " in err and " 0/2 " not in err


def test_progress_refuses_a_start_outside_the_rounds():
    from fedsim.tracking.progress import RoundProgress

    for initial in (-1, 4):
        with pytest.raises(ValueError, match=f"initial={initial}"):
            RoundProgress(3, enabled=False, initial=initial)
