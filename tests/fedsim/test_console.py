"""The habits a user brings: what prints where, the fedsim logger, quiet runs that still report,
Ray's forwarded logs, typed lazy names, and the provenance every MLflow run records.

The rule (fedsim/logs.py): results to stdout (a run's summary, run id and MLflow link; config,
partition and inspect output; a study's table), diagnostics to stderr (the bar, warnings,
errors, hints). ``progress=false`` hides the bar only; ``--quiet`` leaves warnings and errors.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import fedsim
from fedsim import logs
from fedsim.cli import _log_to_driver, main
from fedsim.config import config_digest, load_config
from fedsim.version import __version__, source_commit

REPO = Path(__file__).resolve().parents[2]


# -- the fedsim logger ---------------------------------------------------------------------


def test_fedsim_warnings_go_to_stderr_through_the_fedsim_logger(capsys):
    logging.getLogger("fedsim.simulation.rounds").warning("round %d: something", 3)
    logging.getLogger("fedsim.anything").info("a note")
    logging.getLogger("fedsim").debug("not shown")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "fedsim: warning: round 3: something\nfedsim: a note\n"


def test_the_logger_can_hand_its_messages_to_the_root_logger(caplog, capsys):
    try:
        logs.propagate()
        with caplog.at_level(logging.WARNING):
            logging.getLogger("fedsim.tracking").warning("to the root")
        assert "to the root" in caplog.messages
        assert "fedsim: warning" not in capsys.readouterr().err
    finally:
        logs.install()
    assert sum(isinstance(h, logs._Handler) for h in logging.getLogger("fedsim").handlers) == 1
    logs.install()  # once only
    assert sum(isinstance(h, logs._Handler) for h in logging.getLogger("fedsim").handlers) == 1


def _prints_to_stderr(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            if any(k.arg == "file" and "stderr" in ast.unparse(k.value) for k in node.keywords):
                lines.append(node.lineno)
    return lines


def test_no_module_prints_diagnostics_itself():
    """Warnings go through the fedsim logger; only the command lines (``fedsim`` and the
    docs generator, ``python -m fedsim.docs --check``) print their final errors."""
    commands = {Path("fedsim/cli.py"), Path("fedsim/docs.py")}
    found = {
        str(path.relative_to(REPO)): lines
        for package in ("fedsim", "actors", "aggregation")
        for path in (REPO / package).rglob("*.py")
        if path.relative_to(REPO) not in commands and (lines := _prints_to_stderr(path))
    }
    assert not found, f"print(..., file=sys.stderr) outside the command lines: {found}"
    assert _prints_to_stderr(REPO / "fedsim" / "cli.py")  # the scan does see one


# -- typed lazy names ------------------------------------------------------------------------


def test_the_lazy_names_are_the_real_typed_functions_and_are_listed():
    from fedsim.config import loading
    from fedsim.simulation import run as run_module

    assert fedsim.run is run_module.run and fedsim.resume is run_module.resume
    assert fedsim.load_config is loading.load_config
    params = inspect.signature(fedsim.run).parameters
    assert list(params) == ["config", "dataset", "executor", "quiet"]
    assert "FedSimConfig" in str(params["config"].annotation)
    assert inspect.signature(fedsim.run).return_annotation in ("RunResult", fedsim.RunResult)
    assert list(inspect.signature(fedsim.load_config).parameters) == ["path", "overrides"]
    names = dir(fedsim)
    for name in ("run", "resume", "load_config", "FedSimConfig", "RunResult", "ConfigError"):
        assert name in names and name in fedsim.__all__
    assert "TYPE_CHECKING" not in names
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fedsim.nothing  # noqa: B018


def test_importing_fedsim_loads_neither_torch_nor_ray():
    code = (
        "import sys, fedsim\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'mlflow')))\n"
        "print('run' in dir(fedsim))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


# -- Ray's forwarded logs --------------------------------------------------------------------


def _ns(args, resume=None):
    return argparse.Namespace(command="run", args=args, resume=resume, quiet=False)


def test_log_to_driver_is_read_before_ray_starts(tmp_path):
    exp = tmp_path / "quiet.yaml"
    exp.write_text("resources:\n  log_to_driver: false\n")
    assert _log_to_driver(_ns([])) is True  # the shipped default
    assert _log_to_driver(_ns(["rounds=1", "resources.log_to_driver=false"])) is False
    assert _log_to_driver(_ns([str(exp)])) is False
    assert _log_to_driver(_ns([str(exp), "resources.log_to_driver=true"])) is True
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("resources:\n  log_to_driver: false\n")
    assert _log_to_driver(_ns([], resume=str(run_dir))) is False
    # what it cannot read is left to the full load, which names the problem
    assert _log_to_driver(_ns(["nosuchexperiment"])) is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: [\n")
    assert _log_to_driver(_ns([str(bad)])) is True
    assert load_config(None, ["resources.log_to_driver=false"]).resources.log_to_driver is False


ACTOR_PRINTS = textwrap.dedent(
    """
    import sys, time
    import ray
    from actors.ray_init import init_ray

    init_ray(log_to_driver=sys.argv[1] == "on")

    @ray.remote(num_cpus=0)
    def speak():
        print("LINE-FROM-AN-ACTOR", flush=True)
        return 1

    ray.get(speak.remote())
    time.sleep(3)  # the driver prints forwarded lines as they arrive
    ray.shutdown()
    """
)


@pytest.mark.slow  # two fresh Python processes, each joining the session's Ray
def test_ray_forwards_actor_output_unless_log_to_driver_is_off(ray_address, tmp_path):
    script = tmp_path / "speak.py"
    script.write_text(ACTOR_PRINTS)
    outputs = {}
    for mode in ("on", "off"):
        done = subprocess.run(
            [sys.executable, str(script), mode],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**_env(), "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_address},
        )
        assert done.returncode == 0, done.stderr
        outputs[mode] = done.stdout
    assert "LINE-FROM-AN-ACTOR" in outputs["on"]
    assert "\x1b[" not in outputs["on"]  # no colour codes into a pipe
    assert "LINE-FROM-AN-ACTOR" not in outputs["off"]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}


# -- provenance ------------------------------------------------------------------------------


def test_the_source_commit_is_the_checkouts_and_none_elsewhere(tmp_path, monkeypatch):
    import fedsim.version as version

    if (REPO / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert source_commit()[0] == head
    monkeypatch.setattr(version, "_ROOT", tmp_path)  # site-packages: no .git beside fedsim
    version.source_commit.cache_clear()
    try:
        assert version.source_commit() is None
        (tmp_path / ".git").write_text("gitdir: /nonexistent\n")  # a broken checkout
        version.source_commit.cache_clear()
        assert version.source_commit() is None
    finally:
        version.source_commit.cache_clear()


def test_the_config_digest_covers_the_numbers_only(make_config):
    base = make_config()
    same = make_config(
        "progress=true",
        "resources.actors=1",
        "resources.log_to_driver=false",
        "checkpoint.every=0",
        "tracking.experiment=other",
        "tracking.run_name=mine",
        "tracking.uri=sqlite:///elsewhere.db",
    )
    assert config_digest(base) == config_digest(same)
    assert len(config_digest(base)) == 64
    for change in ("seed=1", "rounds=3", "train.lr=0.01", "clients.ranks=[8,8,4,4,2,1]"):
        assert config_digest(make_config(change)) != config_digest(base), change


# -- a whole run through the command line ----------------------------------------------------


@pytest.mark.slow  # two runs of the tiny config on the session's warm pool
def test_a_run_reports_its_id_unless_quiet_and_records_its_provenance(
    warm_cli, tiny_overrides, tmp_path, monkeypatch, capsys
):
    store = f"sqlite:///{tmp_path / 'env-store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # no tracking.uri anywhere: the env's
    monkeypatch.chdir(tmp_path)
    args = ["run", *tiny_overrides, "rounds=1", "progress=false", "tracking.experiment=habits"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("habits")
    (run,) = client.search_runs([exp.experiment_id])
    # progress=false hid the bar, not the summary, the run id and the link (all on stdout)
    assert "fedsim run summary" in out and f"MLflow run {run.info.run_id}" in out
    assert f"mlflow ui --backend-store-uri {store}" in out
    assert "rounds:" not in err and "round" not in out.split("fedsim run summary")[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing in the default store
    tags = run.data.tags
    assert tags["fedsim.version"] == __version__
    cfg = load_config(None, [*tiny_overrides, "rounds=1", "tracking.experiment=habits"])
    assert tags["fedsim.config_digest"] == config_digest(cfg)
    if (REPO / ".git").exists():
        assert tags["mlflow.source.git.commit"] == source_commit()[0]
        assert tags["fedsim.source.dirty"] in ("true", "false")
    assert main([*args, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert len(client.search_runs([exp.experiment_id])) == 2
