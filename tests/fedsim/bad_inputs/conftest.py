"""Fixtures of the bad-input suite: an empty working directory, the tiny config writing into
it, and ``fails``, which runs the command line and checks its one-line error."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedsim.cli import main


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory: relative outputs (runs/, mlflow.db) would land here."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def base(tiny_overrides, workdir) -> list[str]:
    """The tiny test config, writing its checkpoints and MLflow store into ``workdir``."""
    return [*tiny_overrides, "checkpoint.dir=runs", "tracking.uri=sqlite:///mlflow.db"]


def _mlflow_runs(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("select count(*) from runs").fetchone()[0]
        except sqlite3.OperationalError:  # the store was never initialised
            return 0


def _no_partial_state(workdir: Path) -> None:
    runs = workdir / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"left behind: {list(runs.iterdir())}"
    assert _mlflow_runs(workdir / "mlflow.db") == 0, "an MLflow run was created"


@pytest.fixture
def no_partial_state():
    """``no_partial_state(workdir)``: no checkpoint and no MLflow run were left behind."""
    return _no_partial_state


@pytest.fixture
def fails(capsys, workdir, ray_address):
    """``fails(argv, culprit)``: run the CLI, check the one-line error names ``culprit``.

    ``fedsim run`` joins the session's Ray (rather than starting and stopping one per case).
    """

    def check(argv: list[str], culprit: str, code: int = 2) -> str:
        status = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == code, f"exit {status}, stderr: {err}"
        assert "Traceback" not in err, err
        assert len(lines) == 1 and lines[0].startswith("fedsim: "), err
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
        _no_partial_state(workdir)
        return lines[0]

    return check
