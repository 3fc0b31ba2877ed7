"""The same program from a wheel: built, installed in a fresh virtual environment and run from an
empty directory, ``fedsim run`` runs the shipped default experiment (its name and every
setting), names the shipped experiments without a path, and records no git commit.

The wheel is built from a copy of the working tree's package files (nothing is written into
the repository) without build isolation, and installed with ``--no-deps`` into a new venv that
sees this environment's site-packages for the dependencies (a ``.pth`` file: the dependencies
are the ones the suite runs on, and nothing is downloaded). Whether the wheel's own fedsim is
the one that runs is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedsim.version import __version__

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "fedsim", "actors", "aggregation")
COMMAND = ["run", "rounds=1", "model.backbone=tiny", "clients.ranks=8"]


def _copy_sources(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


def _env(**extra: str) -> dict[str, str]:
    drop = ("PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    (work / "src").mkdir()
    _copy_sources(work / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(work / "dist"), str(work / "src")],
        check=True,
        capture_output=True,
        env=_env(),
        timeout=300,
    )
    (built,) = (work / "dist").glob("fedsim-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel; its bin/ directory."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    # no pip of its own (ensurepip takes seconds): this environment's pip installs into it
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
        + ["--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        env=_env(),
        timeout=300,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=_env(),
    ).stdout.strip()
    # the dependencies of this environment, after the venv's own site-packages (its fedsim);
    # the .pth files over there (an editable fedsim's finder) are not run from here
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_fedsim_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return root / "bin"


@pytest.mark.slow  # builds the wheel (seconds)
def test_the_wheel_holds_the_experiments_the_type_markers_and_the_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"fedsim/experiments/{p.name}" for p in (REPO / "fedsim" / "experiments").glob("*")}
    assert {n for n in shipped if n.endswith((".yaml", ".py"))} <= names
    assert {"fedsim/py.typed", "actors/py.typed", "aggregation/py.typed"} <= names
    assert any(n.endswith("/LICENSE") and ".dist-info/" in n for n in names)
    assert not any(n.startswith(("tests/", "experiments/", "cluster/")) for n in names)


@pytest.mark.slow  # builds a venv and runs fedsim on its own Ray (about a minute on 2 cores)
def test_fedsim_run_from_a_wheel_in_an_empty_directory_runs_the_default(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _env(FEDSIM_CACHE=str(tmp_path / "cache"))
    where = subprocess.run(
        [str(installed / "python"), "-c", "import fedsim; print(fedsim.__file__)"],
        cwd=empty,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.parent), where  # the wheel's, not the checkout's
    # a shipped experiment by name, without a path
    shown = subprocess.run(
        [str(installed / "fedsim"), "config", "vlm_emoji"],
        cwd=empty,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr
    assert "experiment: vlm-emoji" in shown.stdout
    done = subprocess.run(
        [str(installed / "fedsim"), *COMMAND],
        cwd=empty,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fedsim run summary" in done.stdout, done.stdout
    client = MlflowClient(f"sqlite:///{empty / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedsim-default")  # the default experiment's name
    assert exp is not None, [e.name for e in client.search_experiments()]
    (run,) = client.search_runs([exp.experiment_id])
    assert f"MLflow run {run.info.run_id}" in done.stdout
    # every setting is the shipped default experiment's, under the command's overrides
    from fedsim.config import flatten, load_config

    expected = load_config(REPO / "fedsim" / "experiments" / "default.yaml", COMMAND[1:])
    want = {k: str(v)[:6000] for k, v in flatten(expected).items()}
    assert run.data.params == want, json.dumps(
        {k: (run.data.params.get(k), v) for k, v in want.items() if run.data.params.get(k) != v}
    )
    assert run.data.params["data.alpha"] == "0.5" and run.data.params["clients.num"] == "10"
    tags = run.data.tags
    assert tags["fedsim.version"] == __version__ and "fedsim.config_digest" in tags
    assert "mlflow.source.git.commit" not in tags  # no checkout behind a wheel
