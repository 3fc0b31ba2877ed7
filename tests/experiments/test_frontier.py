"""experiments/frontier.py on a study written into a real SQLite MLflow store: the table's
numbers against hand computations, the collapse verdict, the best score and the variants
inside its seed spread."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from aggregation.diagnostics import energy_metrics

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "frontier.py"


def load_script():
    spec = importlib.util.spec_from_file_location("frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _energy(shares: list[float]) -> dict[str, float]:
    """The metrics a run logs for these band shares (bands 1-4, 5-8, 9-16)."""
    return energy_metrics({"bands": ["1-4", "5-8", "9-16"], "share": shares})


def _log(client, run_id: str, rounds: list[dict]) -> None:
    metrics = [
        Metric(key, float(value), 0, step)
        for step, row in enumerate(rounds)
        for key, value in row.items()
    ]
    client.log_batch(run_id, metrics=metrics)


def _rounds(acc: list[float], shares: list[list[float]] | None, up: float, down: float, secs):
    """Round 0 (no training, no merge) and one row per later round."""
    rows = [{"global/accuracy": acc[0], "global/macro_f1": acc[0] / 2}]
    for t in range(1, len(acc)):
        row = {
            "global/accuracy": acc[t],
            "global/macro_f1": acc[t] / 2,
            "personalized/accuracy_mean": acc[t] + 0.1,
            "comm/upload_bytes": up * t,
            "comm/download_bytes": down,
            "time/round_s": secs[t - 1],
        }
        if shares is not None:
            row.update(_energy(shares[t - 1]))
        rows.append(row)
    return rows


@pytest.fixture
def study(tmp_path, new_mlflow_db):
    store = new_mlflow_db(tmp_path)
    client = MlflowClient(store)
    exp = client.create_experiment("frontier-test")
    # an older study in the same experiment: not read
    old = client.create_run(exp, run_name="study frontier").info.run_id
    stale = client.create_run(exp, run_name="stale seed=0", tags={"mlflow.parentRunId": old})
    _log(client, stale.info.run_id, _rounds([0.1, 0.2], None, 1e6, 1e6, [1.0]))
    client.set_terminated(stale.info.run_id)
    client.set_terminated(old)

    parent = client.create_run(exp, run_name="study frontier").info.run_id
    runs = {
        # zero-padding: its top band empties in seed 0
        ("zeropad", 0): _rounds(
            [0.1, 0.5, 0.6, 0.7],
            [[0.5, 0.3, 0.2], [0.7, 0.3, 0.0], [0.8, 0.2, 0.0]],
            2e6,
            4e6,
            [2, 4, 6],
        ),
        ("zeropad", 1): _rounds(
            [0.1, 0.4, 0.5, 0.5],
            [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]],
            2e6,
            4e6,
            [2, 2, 2],
        ),
        # FediLoRA: best on accuracy
        ("fedilora", 0): _rounds([0.1, 0.6, 0.8, 0.9], [[0.4, 0.3, 0.3]] * 3, 2e6, 4e6, [3, 3, 3]),
        ("fedilora", 1): _rounds([0.1, 0.6, 0.7, 0.8], [[0.4, 0.3, 0.3]] * 3, 2e6, 4e6, [3, 3, 3]),
        # FLoRA: no product, no energy metrics
        ("flora", 0): _rounds([0.1, 0.3, 0.3, 0.3], None, 8e6, 9e6, [1, 1, 1]),
    }
    for (name, seed), rounds in runs.items():
        tags = {"mlflow.parentRunId": parent}
        run_id = client.create_run(exp, run_name=f"{name} seed={seed}", tags=tags).info.run_id
        _log(client, run_id, rounds)
        client.set_terminated(run_id)
    # a failed run is left out
    failed = client.create_run(exp, run_name="flora seed=1", tags={"mlflow.parentRunId": parent})
    _log(client, failed.info.run_id, _rounds([0.1, 0.9], None, 1.0, 1.0, [1.0]))
    client.set_terminated(failed.info.run_id, "FAILED")
    client.set_terminated(parent)
    return store


def _row(text: str, name: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_report_holds_the_hand_computed_numbers(study, tmp_path):
    frontier = load_script()
    out = tmp_path / "frontier.md"
    text = frontier.main(
        [
            "--store",
            study,
            "--experiment",
            "frontier-test",
            "--last-rounds",
            "2",
            "--output",
            str(out),
        ]
    )
    assert out.read_text() == text
    assert "stale" not in text and "| method | seeds | global acc |" in text

    zeropad = _row(text, "zeropad")
    assert zeropad[1] == "2"
    acc = [np.mean([0.6, 0.7]), np.mean([0.5, 0.5])]  # each seed's last two rounds
    assert zeropad[2] == f"{np.mean(acc):.3f} ± {np.std(acc):.3f}"
    assert zeropad[3] == f"{np.mean(acc) / 2:.3f} ± {np.std(acc) / 2:.3f}"
    pers = [a + 0.1 for a in acc]
    assert zeropad[4] == f"{np.mean(pers):.3f} ± {np.std(pers):.3f}"
    final = [0.8, 0.7]  # merge/rank_collapse of the last round
    assert zeropad[5] == f"{np.mean(final):.3f} ± {np.std(final):.3f}"
    assert zeropad[6] == f"{np.mean([0.0, 0.1]):.3f} ± {np.std([0.0, 0.1]):.3f} (9-16)"
    assert zeropad[7] == f"{np.mean([2, 4, 6]):.2f} ± 0.00"  # 2, 4, 6 MB in rounds 1-3
    assert zeropad[8] == "4.00 ± 0.00"
    secs = [np.mean([2, 4, 6]), 2.0]
    assert zeropad[9] == f"{np.mean(secs):.1f} ± {np.std(secs):.1f}"

    flora = _row(text, "flora")
    assert flora[1] == "1" and flora[5] == "-" and flora[6] == "-"  # the failed seed left out
    assert flora[7] == "16.00 ± 0.00" and flora[8] == "9.00 ± 0.00"

    assert "zeropad (top band exactly empty in 1 of 2 seeds)" in text
    assert "fedilora (top band" not in text
    assert "Not measured (no global product to measure, docs/algorithms.md §6.1): flora." in text
    # global acc: fedilora 0.8 ± 0.05; zeropad 0.575 ± 0.075 (0.65 < 0.75: outside); flora,
    # with one of two seeds finished, is not ranked (its 0.3 ± 0 says nothing of a spread)
    assert "**global acc.** Best: fedilora (0.800 ± 0.050); no other variant is inside" in text
    assert "**Not ranked** (not every seed finished): flora (1 of 2 seeds)." in text


def test_variants_inside_the_best_ones_spread_are_named():
    frontier = load_script()
    rows = {
        "a": {"scores": {"s": (0.80, 0.05)}},
        "b": {"scores": {"s": (0.70, 0.05)}},  # 0.75 reaches the best's 0.75: inside
        "c": {"scores": {"s": (0.69, 0.05)}},  # 0.74: outside
        "d": {"scores": {"s": None}},  # never measured
    }
    assert frontier.best_and_ties(rows, "s") == ("a", ["b"])
    assert frontier.best_and_ties({"d": rows["d"]}, "s") is None


def test_an_experiment_without_a_study_is_named(tmp_path, new_mlflow_db):
    frontier = load_script()
    store = new_mlflow_db(tmp_path)
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        frontier.main(["--store", store, "--experiment", "nope"])
    MlflowClient(store).create_experiment("lonely")
    with pytest.raises(SystemExit, match="holds no study"):
        frontier.main(["--store", store, "--experiment", "lonely"])
