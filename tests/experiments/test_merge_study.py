"""experiments/merge_study.py on a tiny run: it finds the drops and explains them from the
run's merge diagnostics (real in-process run, real SQLite store)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import fedsim
from actors.executor import LocalExecutor

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "merge_study.py"
pytestmark = pytest.mark.usefixtures("restore_threads")


def load_script():
    spec = importlib.util.spec_from_file_location("merge_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_drops_are_found_and_explained(make_config, tmp_path, new_mlflow_db):
    store = new_mlflow_db(tmp_path)
    cfg = make_config(f"tracking.uri={store}", "tracking.experiment=ms", "rounds=3")
    run = fedsim.run(cfg, executor=LocalExecutor())
    study = load_script()
    runs = study.collect(store, "ms")
    assert [r["run_id"] for r in runs] == [run.run_id]
    # threshold -1: every merged round counts as a drop, so every round is explained
    out = tmp_path / "drops.md"
    text = study.main(
        ["--store", store, "--experiment", "ms", "--threshold", "-1", "--output", str(out)]
    )
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith(f"| {runs[0]['method']} | 0 |")]
    assert len(rows) == 3
    for t, line in enumerate(rows, 1):
        merged = [r for r in run.clients[t] if r["status"] == "ok"]
        top = max(merged, key=lambda r: r["share"])
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == str(t)
        assert cells[4] == ", ".join(f"{r['client_id']}(r{r['rank']})" for r in merged)
        assert cells[5].startswith(f"{top['client_id']}, r{top['rank']}, {top['share']:.0%}")
        assert "classes" in cells[5]  # the labels it holds
    tables = text.split("\n\n")
    summary = [t for t in tables if t.startswith("| method | runs | drops |")][0].splitlines()[2]
    assert summary.split("|")[2].strip() == "1" and summary.split("|")[3].strip() == "3"
    lone = [t for t in tables if t.startswith("| method | rounds with a lone coverer")][0]
    cells = [c.strip() for c in lone.splitlines()[2].strip("|").split("|")]
    # rounds 2 and 3, split by whether a dimension had one coverer
    assert int(cells[1]) + int(cells[4]) == 2
    # a real threshold: only the rounds whose accuracy fell by more than it
    accs = [h["global/accuracy"] for h in run.history]
    found = study.drops(runs[0], 0.0)
    assert [t for t, _, _ in found] == [t for t in range(1, 4) if accs[t - 1] > accs[t]]


def test_an_unknown_experiment_is_named(tmp_path):
    study = load_script()
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        study.collect(f"sqlite:///{tmp_path / 'mlflow.db'}", "nope")


def test_a_round_without_top_bands_is_explained():
    """Fed-PLoRA's random modules log no top band: the part on it is unknown (None), the rest
    is read as for every merge."""
    study = load_script()
    rows = [
        {"client_id": 3, "rank": 2, "status": "ok", "contribution": 2.0, "share": 0.8},
        {"client_id": 5, "rank": 1, "status": "ok", "contribution": 1.0, "share": 0.2},
    ]
    dims = {"coverage": [1, 2, 0], "update_norm": [3.0, 4.0, 0.0]}
    run = {"rounds": {1: {"dims": dims, "rows": rows}}, "clients": {}, "classes": []}
    e = study.explain(run, 1)
    assert e["own"] is None and e["top"]["client_id"] == 3
    assert e["lone"] == "0-0" and e["lone_share"] == pytest.approx(9 / 25)
