"""Faults during a run, as a hostile but realistic user causes them: one clear line each.

The tracking store deleted or overwritten mid-run (training and checkpoints go on; the history
goes into a new MLflow run with ``--resume --new-run``), a full or broken checkpoint directory
(one line naming it and the last good round, which resumes), SIGTERM (handled like Ctrl-C),
two runs opening a new store at once, a Ray that does not start in time and a GCS that goes
away. Faults are real: files deleted, a path that writes to ``/dev/full``, real signals, real
processes; only our own functions are wrapped, to strike at a chosen round. The faults of the
driver's own (its store, its checkpoint directory, a SIGTERM to it) run their clients in this
process (``LocalExecutor``, a Ray run's numbers); those about Ray start a ``fedsim run`` with a
Ray of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from actors.gcs_watch import GcsWatch
from fedsim import termination
from fedsim.checkpoint.disk import CheckpointWriter, load_checkpoint
from fedsim.cli import main
from fedsim.config import ConfigError, load_config
from fedsim.errors import RunFailed, Terminated
from fedsim.termination import EXIT_STATUS, handle_sigterm

REPO = Path(__file__).resolve().parents[3]


def _after_checkpoint(monkeypatch, round_idx: int, fault):
    """Call ``fault(run_dir)`` right after round ``round_idx``'s checkpoint is written (before
    the round is logged to MLflow: the engine checkpoints first). Returns what undoes it."""
    save = CheckpointWriter.save

    def save_then_strike(self, t, *args, **kwargs):
        out = save(self, t, *args, **kwargs)
        if t == round_idx:
            fault(self.run_dir)
        return out

    monkeypatch.setattr(CheckpointWriter, "save", save_then_strike)
    return lambda: monkeypatch.setattr(CheckpointWriter, "save", save)


@pytest.fixture
def store(workdir, new_mlflow_db) -> str:
    """The run's MLflow store, ``workdir/mlflow.db``, new and empty, by an absolute URI: MLflow
    caches a database engine per URI string for the whole process, so a relative
    ``sqlite:///mlflow.db`` would still open the file of the test that first used it.

    It is a copy of the session's new store (``new_mlflow_db``), not built by MLflow's
    migrations here (seconds each): the runs here are about faults, and the test of two runs
    creating a store at once still lets fedsim create it. A command run in ``workdir`` with
    the relative URI of ``base`` opens the same file.
    """
    return new_mlflow_db(workdir)


@pytest.fixture
def local_cli(ray_address, monkeypatch, restore_threads) -> None:
    """``fedsim run`` through :func:`fedsim.cli.main` runs its clients in this process
    (``LocalExecutor``, which gives a Ray run's numbers), for faults of the driver's own (its
    checkpoint directory, a SIGTERM to it): no actor to start, none to keep warm.

    The command still begins its Ray start, which joins the session's Ray (``ray_address``);
    the executor it would build ends that start and hands over an in-process one.
    """
    import actors.executor
    import fedsim.simulation.run  # noqa: F401 - binds the real executor classes before the patch

    def in_process(start=None, **_options) -> LocalExecutor:
        if start is not None:
            start.result()
            start.close()
        return LocalExecutor()

    monkeypatch.setattr(actors.executor, "RayExecutor", in_process)


@pytest.fixture
def args(base, store) -> list[str]:
    """The tiny config, checkpointing to ``runs/`` and logging to :func:`store`."""
    return [*base, f"tracking.uri={store}"]


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _statuses(uri: str, ids: bool = False) -> list[str]:
    """The status (or id) of every MLflow run in the store."""
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id if ids else r.info.status for r in client.search_runs(exps)]


# --- the tracking store lost mid-run ----------------------------------------------------------


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not a database " * 64)


STORE_LOSSES = {"deleted": lambda db: db.unlink(), "overwritten": _garbage}


@pytest.mark.slow  # three tiny runs in this process: about 5 s
@pytest.mark.parametrize("loss", list(STORE_LOSSES))
def test_store_lost_mid_run_keeps_training_then_resumes_into_a_new_mlflow_run(
    workdir, args, store, monkeypatch, capsys, restore_threads, loss
):
    db, uri = workdir / "mlflow.db", store
    undo = _after_checkpoint(monkeypatch, 1, lambda _run_dir: STORE_LOSSES[loss](db))
    # two rounds: the store is lost after round 1's checkpoint, and round 2 trains without it
    cfg = load_config(None, [*args, "rounds=2"])
    result = fedsim.run(cfg, executor=LocalExecutor(), quiet=True)
    undo()

    # trained and checkpointed to the end; MLflow lacks round 1 on (logged after its checkpoint)
    assert [h["round"] for h in result.history] == [0, 1, 2]
    assert result.untracked_since == 1
    run_dir = result.run_dir
    assert load_checkpoint(run_dir).round == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 2, lines  # said once when it failed, once at the end
    assert lines[0].startswith(f"fedsim: warning: the MLflow store {uri} failed")
    assert "round 1" in lines[0] and "training and checkpoints continue" in lines[0]
    assert f"fedsim run --resume runs/{run_dir.name} --new-run" in lines[1]

    # the old MLflow run is gone with its store: a plain resume says what to do
    new_store = uri if loss == "deleted" else f"sqlite:///{workdir / 'fresh.db'}"
    if loss == "overwritten":  # the garbage stays; the resume logs to a store elsewhere
        with pytest.raises(ConfigError, match="tracking.uri"):
            fedsim.resume(run_dir, executor=LocalExecutor(), quiet=True)
    with pytest.raises(ConfigError, match="--new-run"):
        fedsim.resume(run_dir, [f"tracking.uri={new_store}"], executor=LocalExecutor())

    again = fedsim.resume(
        run_dir, [f"tracking.uri={new_store}"], new_run=True, executor=LocalExecutor(), quiet=True
    )
    assert capsys.readouterr().err == ""
    assert again.run_id != result.run_id and again.untracked_since is None
    assert again.history == result.history  # nothing retrained: the checkpoint's history
    client = MlflowClient(tracking_uri=new_store)
    run = client.get_run(again.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedsim.resumed_from_run"] == result.run_id
    steps = [m.step for m in client.get_metric_history(again.run_id, "time/round_s")]
    assert sorted(steps) == [0, 1, 2]  # the whole history, re-logged from the checkpoint
    tables = {a.path for a in client.list_artifacts(again.run_id, "clients")}
    assert {f"clients/round_{t:04d}.json" for t in (1, 2)} <= tables
    assert "global_adapter" in {a.path for a in client.list_artifacts(again.run_id)}
    # the checkpoint names the new run now: a later resume continues it, not the lost one
    assert load_checkpoint(run_dir).meta["mlflow_run_id"] == again.run_id
    more = fedsim.resume(
        run_dir, [f"tracking.uri={new_store}", "rounds=3"], executor=LocalExecutor(), quiet=True
    )
    assert more.run_id == again.run_id
    steps = [m.step for m in client.get_metric_history(again.run_id, "time/round_s")]
    assert sorted(steps) == [0, 1, 2, 3]


def test_new_run_goes_with_resume(capsys):
    assert main(["run", "--new-run", "rounds=1"]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("fedsim: config error: --new-run: goes with --resume")


# --- the checkpoint directory full or broken mid-run --------------------------------------------


def _disk_full(run_dir: Path) -> None:
    # the next pointer update writes through this name: the kernel answers ENOSPC
    (run_dir / ".latest.json.tmp").symlink_to("/dev/full")


def _run_dir_removed(run_dir: Path) -> None:
    shutil.rmtree(run_dir)  # a clean-up script, or a user tidying runs/ mid-run


def _read_only(run_dir: Path) -> None:
    for path in (run_dir, run_dir / "clients"):
        path.chmod(0o555)


KEPT = "round 1 is the last checkpoint written"
CHECKPOINT_FAULTS = {  # what strikes after round 1, what the line says, which round it keeps
    "disk-full": (_disk_full, "No space left on device", KEPT),
    "read-only": (_read_only, "Permission denied", KEPT),
    "run-dir-removed": (_run_dir_removed, "No such file or directory", "no checkpoint of this"),
}


@pytest.mark.slow  # a run and its resume in this process: about 4 s
@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_checkpoint_directory_fails_mid_run(
    local_cli, workdir, args, store, monkeypatch, capsys, fault
):
    strike, reason, kept = CHECKPOINT_FAULTS[fault]
    if fault == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes to read-only directories; the other faults run as root too")
    undo = _after_checkpoint(monkeypatch, 1, strike)
    status = main(["run", *args, "rounds=2"])
    undo()
    err = capsys.readouterr().err
    (run_id,) = _statuses(store, ids=True)
    run_dir = workdir / "runs" / run_id
    shown = Path("runs") / run_id  # checkpoint.dir=runs: as the user gave it
    if fault == "read-only":
        for path in (run_dir, run_dir / "clients"):
            path.chmod(0o755)
    lines = _lines(err)
    assert status == 1 and "Traceback" not in err, err
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"fedsim: run failed: cannot write the checkpoint of round 2 in {shown}: "
    ), lines[0]
    assert reason in lines[0] and kept in lines[0]
    assert _statuses(store) == ["FAILED"]
    if kept != KEPT:
        return
    assert lines[0].endswith(f"continues with: fedsim run --resume {shown}")
    assert not list(run_dir.glob(".round_*.tmp"))  # the half-written round is cleared away
    # space freed: the last good checkpoint resumes and finishes the run
    (run_dir / ".latest.json.tmp").unlink(missing_ok=True)
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir).round == 2
    assert _statuses(store) == ["FINISHED"]


# --- SIGTERM --------------------------------------------------------------------------------------


def test_sigterm_handler_raises_once_and_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with handle_sigterm():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs before this returns
            except Terminated:
                os.kill(os.getpid(), signal.SIGTERM)  # a second one, during the stop: ignored
                time.sleep(0.1)
                raise
    assert signal.getsignal(signal.SIGTERM) is before
    # outside a main thread nothing is installed (Python delivers signals to the main thread)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_install_in_thread()))
    thread.start()
    thread.join()
    assert seen == [before]


def test_an_interrupt_waits_for_the_end_of_a_deferred_block():
    """A SIGTERM (or the run's own interrupt) during a store call is raised when the call ends,
    not inside it: cut inside SQLAlchemy, it left a half-closed connection behind."""
    done = []
    with pytest.raises(Terminated):
        with handle_sigterm():
            with termination.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler has run: it held the interrupt back
                with termination.deferred():  # nested: held until the outer block ends
                    pass
                done.append("the call's end")
            done.append("after the block")  # never reached
    assert done == ["the call's end"]


def test_the_runs_own_interrupt_is_deferred_too(monkeypatch):
    """``_interrupt_run`` (a lost GCS) and Ctrl-C take the same path under Python's own SIGINT
    handler, and a handler of someone else's is left alone."""
    from fedsim.simulation import run as run_module

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        restore = run_module._sigint_for_interrupts()
        assert restore is not None
        done = []
        with pytest.raises(KeyboardInterrupt):
            with termination.deferred():
                run_module._interrupt_run("the GCS is gone")
                time.sleep(0.2)
                done.append("the call's end")
        assert done == ["the call's end"]
        restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, mine := lambda *_: None)
        assert run_module._sigint_for_interrupts() is None
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


_HANGING_STOP = """
import os, signal, time
from fedsim import termination
from fedsim.errors import Terminated
termination.GRACE_S = 0.5
with termination.handle_sigterm():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except Terminated:
        time.sleep(30)  # a stop that hangs (a tracking server that does not answer)
"""


def test_a_stop_that_outlasts_the_grace_period_exits_143_anyway():
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", _HANGING_STOP], env=_env(), capture_output=True, text=True
    )
    assert time.monotonic() - start < 20
    assert out.returncode == 143
    assert _lines(out.stderr) == ["fedsim: the stop after SIGTERM took over 0.5 s; exiting"]


def test_a_stop_that_outlasts_the_grace_period_can_print_where_it_hung():
    env = _env(**{termination.STACKS_VAR: "1"})
    out = subprocess.run(
        [sys.executable, "-c", _HANGING_STOP], env=env, capture_output=True, text=True
    )
    assert out.returncode == 143
    lines = _lines(out.stderr)
    assert lines[0] == "fedsim: the stop after SIGTERM took over 0.5 s; exiting"
    # the main thread's stack: in the handler of the stop, on the line that hangs
    assert any(line.strip().startswith('File "<string>", line 11') for line in lines[1:]), lines


def _install_in_thread():
    with handle_sigterm():
        return signal.getsignal(signal.SIGTERM)


@pytest.mark.slow  # a run and its resume in this process: about 4 s
def test_sigterm_stops_a_run_like_ctrl_c(local_cli, workdir, args, store, monkeypatch, capsys):
    undo = _after_checkpoint(monkeypatch, 1, lambda _d: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    status = main(["run", *args, "rounds=2"])
    undo()
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    (run_dir,) = (workdir / "runs").iterdir()
    shown = Path("runs") / run_dir.name
    assert status == EXIT_STATUS == 143 and "Traceback" not in err, err
    assert _lines(err) == [
        f"fedsim: warning: the run stopped; continue it with: fedsim run --resume {shown}",
        "fedsim: terminated (SIGTERM); the MLflow run is marked KILLED",
    ]
    assert _statuses(store) == ["KILLED"]
    assert load_checkpoint(run_dir).round == 1
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir).round == 2
    assert _statuses(store) == ["FINISHED"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {what}\n{out}\n{err}")
        value = check()
        if value:
            return value
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _latest_round(runs: Path) -> int:
    pointers = list(runs.glob("*/latest.json")) if runs.is_dir() else []
    try:
        return json.loads(pointers[0].read_text())["round"] if pointers else -1
    except (OSError, ValueError):
        return -1  # being replaced


# the `fedsim run` processes with a Ray of their own start one client actor: each actor's start
# is seconds of imports on the machine's few cores, and what these tests check is the driver's
# stop, which one actor shows as well as two
ONE_ACTOR = "resources.actors=1"


@pytest.mark.slow  # a `python -m fedsim run` with a Ray of its own: about 20 s
@pytest.mark.usefixtures("store")  # workdir/mlflow.db, which the command opens
def test_sigterm_to_a_fedsim_process_with_its_own_ray(workdir, base):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim", "run", *base, "rounds=50", ONE_ACTOR],
        cwd=workdir,
        env=_env(**{termination.STACKS_VAR: "1"}),  # a stop over the grace period: where
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for("round 1's checkpoint", lambda: _latest_round(workdir / "runs") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    (run_dir,) = (workdir / "runs").iterdir()
    lines = _lines(err)
    assert proc.returncode == 143, err
    # no crash report of Ray's signal handler, no traceback: the stop is fedsim's own
    assert "SIGTERM received" not in err and "Traceback" not in err, err
    hint = f"fedsim run --resume runs/{run_dir.name}"
    assert lines[-2:] == [
        f"fedsim: warning: the run stopped; continue it with: {hint}",
        "fedsim: terminated (SIGTERM); the MLflow run is marked KILLED",
    ], err
    assert _statuses(f"sqlite:///{workdir / 'mlflow.db'}") == ["KILLED"]
    assert load_checkpoint(run_dir).round >= 1


# --- two runs opening a new store at once -----------------------------------------------------

_OPEN_STORE = """
import sys, time
from pathlib import Path
from fedsim.config import load_config
from fedsim.tracking.store import check_tracking
import mlflow.tracking  # imported before the start signal: both open the store together
Path(sys.argv[3]).touch()  # at the start line
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
check_tracking(load_config(None, [f"tracking.uri=sqlite:///{sys.argv[1]}"]))
print("opened")
"""


@pytest.mark.slow  # two processes import MLflow, then one builds the store's schema: ~8 s
def test_two_runs_creating_a_new_store_at_once_both_succeed(tmp_path):
    db, go = tmp_path / "mlflow.db", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_STORE, str(db), str(go), str(at_start)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for at_start in ready
    ]
    for proc, at_start in zip(procs, ready):  # both wait at the start line (MLflow imported)
        _wait_for("the start line", at_start.exists, proc)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and out.strip() == "opened", err
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()].count("fedsim") == 1


# --- Ray that does not start, a GCS that goes away --------------------------------------------

_START_RAY = """
from actors.ray_init import init_ray
from fedsim.errors import RunFailed
try:
    init_ray()
except RunFailed as exc:
    print(exc)
"""


def test_ray_start_timeout_is_one_line_with_advice(tmp_path):
    # Ray's own setting: wait 0 s for the GCS to write its port, as a start under load times out
    out = subprocess.run(
        [sys.executable, "-c", _START_RAY],
        env=_env(RAY_gcs_server_port_wait_time_s="0"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    (line,) = _lines(out.stdout)
    assert line.startswith("the local Ray did not start: Timed out"), out
    assert "ray start --head" in line and "RAY_ADDRESS=auto" in line


@pytest.mark.slow  # `python -m fedsim run` up to Ray's start: about 10 s
@pytest.mark.usefixtures("store")  # workdir/mlflow.db, which the command opens
def test_ray_start_timeout_through_the_command_line(workdir, base, no_partial_state):
    out = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", *base],
        cwd=workdir,
        env=_env(RAY_gcs_server_port_wait_time_s="0"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    (line,) = _lines(out.stderr)
    assert out.returncode == 1, out.stderr
    assert line.startswith("fedsim: run failed: the local Ray did not start: Timed out")
    assert "ray start --head" in line
    no_partial_state(workdir)


def test_gcs_watch_reports_a_gcs_that_stops_answering():
    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    heard: list[str] = []
    watch = GcsWatch(address, interval_s=0.05, lost_after_s=0.3)
    watch.on_lost(heard.append)
    try:
        time.sleep(0.3)
        assert watch.lost is None and watch.check()  # it answers
        server.close()
        deadline = time.monotonic() + 10
        while watch.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard == [watch.lost]  # once
        assert watch.lost.startswith(f"the Ray cluster's GCS at {address} stopped answering")
        late: list[str] = []
        watch.on_lost(late.append)  # a caller that comes later hears of it at once
        assert late == heard
    finally:
        watch.stop()
        server.close()


def test_a_gcs_gone_when_a_run_closes_is_one_warning(capsys):
    from actors.executor import RayExecutor

    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        ex = RayExecutor()  # it never started Ray: closing stops nothing of the session's
        ex._gcs = GcsWatch(address, interval_s=60)  # what start() watches, a GCS that answers
    ex.close(None, None)  # the run finished meanwhile; its GCS no longer answers
    ex.close(None, None)  # (fedsim run closes twice)
    (line,) = _lines(capsys.readouterr().err)
    assert line == (
        f"fedsim: warning: the Ray cluster's GCS at {address} stopped answering: Ray cannot "
        "stop cleanly; restart the cluster before the next run"
    )
    assert ex._gcs is None  # the watch stopped with the executor


def _gcs_of(pid: int):
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "gcs_server" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


# Ray's own setting, read by Ray's core worker and by fedsim's GCS watch alike: Ray ends a
# process this long after its GCS went away (60 s by default), and the watch reports the loss
# after a third of it. 40 s here, so the report comes 7 s sooner; the stop after it (8 to 12 s
# on a loaded machine, 5 s of it Ray's shutdown waiting for the dead GCS) keeps the margin the
# test asks for before Ray's end.
RAY_GCS_TIMEOUT_S = 40


@pytest.mark.slow  # a `python -m fedsim run` with a Ray of its own, then its GCS killed: ~45 s
@pytest.mark.usefixtures("store")  # workdir/mlflow.db, which the command opens
def test_gcs_killed_mid_run_is_one_line_before_ray_ends_the_process(workdir, base):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim", "run", *base, "rounds=200", ONE_ACTOR],
        cwd=workdir,
        env=_env(RAY_gcs_rpc_server_reconnect_timeout_s=str(RAY_GCS_TIMEOUT_S)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for("round 1's checkpoint", lambda: _latest_round(workdir / "runs") >= 1, proc)
    gcs = _gcs_of(proc.pid)
    assert gcs is not None, "the run's own Ray has no GCS process"
    gcs.kill()  # only the GCS of the Ray this fedsim process started
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - killed
    (run_dir,) = (workdir / "runs").iterdir()
    lines = _lines(err)
    assert proc.returncode == 1, err
    assert took < RAY_GCS_TIMEOUT_S - 5, f"took {took:.0f} s: Ray ends it at {RAY_GCS_TIMEOUT_S} s"
    assert "Failed to connect to GCS" not in err and "Traceback" not in err, err
    assert lines[-1].startswith("fedsim: run failed: the Ray cluster's GCS at "), err
    assert lines[-1].endswith(f"continues with: fedsim run --resume runs/{run_dir.name}"), err
    assert _statuses(f"sqlite:///{workdir / 'mlflow.db'}") == ["FAILED"]


class _LosesItsGcs(LocalExecutor):
    """The in-process executor, told by :meth:`strike` that its GCS is gone, from another
    thread, as :class:`actors.gcs_watch.GcsWatch` tells a Ray executor."""

    def __init__(self):
        super().__init__()
        self.callback = None
        self.lost = None

    def on_gcs_lost(self, callback) -> None:
        self.callback = callback

    def take_gcs_loss(self):
        return self.lost

    def strike(self) -> None:
        self.lost = "the Ray cluster's GCS at 127.0.0.1:6379 stopped answering 20 s ago"
        thread = threading.Thread(target=self.callback, args=(self.lost,))
        thread.start()
        thread.join()
        time.sleep(0.5)  # the interrupt lands in the main thread meanwhile


@pytest.mark.slow  # a tiny run in this process: about 5 s
def test_a_lost_gcs_stops_the_run_failed_with_the_resume_line(
    workdir, args, store, monkeypatch, restore_threads
):
    ex = _LosesItsGcs()
    _after_checkpoint(monkeypatch, 1, lambda _d: ex.strike())
    with pytest.raises(RunFailed) as failed:
        fedsim.run(load_config(None, [*args, "rounds=3"]), executor=ex, quiet=True)
    (run_dir,) = (workdir / "runs").iterdir()
    assert str(failed.value) == (
        "the Ray cluster's GCS at 127.0.0.1:6379 stopped answering 20 s ago; the run cannot go "
        "on without it; the last good checkpoint continues with: fedsim run --resume "
        f"runs/{run_dir.name}"
    )
    assert _statuses(store) == ["FAILED"]  # not KILLED: no one interrupted it
    assert load_checkpoint(run_dir).round == 1
