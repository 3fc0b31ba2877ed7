"""Runs that cannot train stop with an error: never a FINISHED run that trained nothing.

Every client task failing, every update rejected, and a global adapter that overflows in the
server optimiser each end the run non-zero, with the reason, the MLflow run FAILED and the
command that continues from the last good checkpoint. The runs are in-process
(``LocalExecutor``: the driver decides that a run failed); ``fedsim run`` runs on Ray.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from fedsim.checkpoint.disk import load_checkpoint
from fedsim.cli import main
from fedsim.config import limits
from fedsim.errors import RunFailed

EXPERIMENT = "fedsim-fail-loudly"
ALL_FAIL = ["faults.fail_prob=1", "resources.max_retries=0"]
pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def config(experiment_config):
    return experiment_config(EXPERIMENT)


def _last_run(cfg):
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_every_client_failing_stops_after_max_empty_rounds(config, capsys):
    cfg = config(*ALL_FAIL, "rounds=5", "round.max_empty_rounds=2")
    with pytest.raises(RunFailed) as info:
        fedsim.run(cfg, executor=LocalExecutor())
    message = str(info.value)
    assert "rounds 1-2 merged no client update" in message
    assert "3 failed" in message and "round.max_empty_rounds=2" in message
    assert "fedsim run --resume" in message  # round 0 and the empty rounds were checkpointed
    err = capsys.readouterr().err
    assert "round 1: nothing merged (3 sampled: 3 failed)" in err
    run = _last_run(cfg)
    assert run.info.status == "FAILED"
    assert run.data.metrics["clients/failed"] == 3


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_a_short_run_that_merged_nothing_fails_through_the_cli(warm_cli, config, capsys):
    cfg = config(*ALL_FAIL, "rounds=1")
    code = main(["run", *_as_overrides(cfg)])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("fedsim:")]
    errors = [line for line in lines if not line.startswith("fedsim: warning: ")]
    assert len(errors) == 1 and errors[0].startswith("fedsim: run failed: no round of this run")
    assert any("fewer than round.min_clients=1" in line for line in lines)  # the round's warning
    assert "Traceback" not in err
    assert _last_run(cfg).info.status == "FAILED"


def test_all_updates_rejected_are_reported_and_stop_the_run(config, capsys):
    cfg = config("faults.nan_update_clients=[0,1,2,3,4,5]", "rounds=3")
    with pytest.raises(RunFailed, match=r"rounds 1-3 merged no client update"):
        fedsim.run(cfg, executor=LocalExecutor())
    err = capsys.readouterr().err
    assert "round 1: nothing merged (3 sampled: 3 rejected)" in err
    run = _last_run(cfg)
    assert run.data.metrics["clients/rejected"] == 3 and run.info.status == "FAILED"


def test_a_non_finite_global_adapter_is_never_applied_or_checkpointed(config, monkeypatch):
    # float32 overflows at 3.4e38: FedAvgM's step lr * momentum turns the global into Inf.
    # The config refuses such a step (server.lr <= limits.MAX_LR); lifted here, to reach the
    # last line of defence, the run's check of the merged global adapter.
    monkeypatch.setattr(limits, "MAX_LR", math.inf)
    cfg = config("server.optimizer=fedavgm", "server.lr=1e39", "rounds=2")
    with pytest.raises(RunFailed, match=r"round 1: the merged global adapter is not finite"):
        fedsim.run(cfg, executor=LocalExecutor())
    run = _last_run(cfg)
    assert run.info.status == "FAILED"
    run_dir = next(p for p in cfg_runs(cfg) if p.name == run.info.run_id)
    ckpt = load_checkpoint(run_dir)
    assert ckpt.round == 0  # the last good checkpoint: the broken round was never written
    assert all(bool(torch.isfinite(t).all()) for t in ckpt.server["global"].values())


def cfg_runs(cfg):
    from pathlib import Path

    return [p for p in Path(cfg.checkpoint.dir).iterdir() if (p / "latest.json").is_file()]


def _as_overrides(cfg) -> list[str]:
    """The tiny config as CLI overrides (the CLI takes key=value strings)."""
    from fedsim.config import flatten

    out = []
    for key, value in flatten(cfg).items():
        if key.startswith("devices.profiles"):
            continue
        out.append(f"{key}={json.dumps(value) if value is not None else 'null'}")
    return out
