"""A study's runs several at once (``study.parallel``): each run gives the numbers it gives
alone, bit for bit, whatever the number of lanes; a run that fails stops none of the others and
is reported at the end; the lane count follows the cluster's client slots."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml

from fedsim.config import ConfigError
from fedsim.simulation import lanes
from fedsim.simulation.study import StudyIncomplete, run_study
from fedsim.simulation.study_file import load_study


def _metrics(db: Path, experiment: str) -> dict[str, dict]:
    """Every child run's metrics in ``experiment``, by run name: {key: [(step, value)]},
    without the wall-clock ones (time/, system/)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select r.name, m.key, m.step, m.value from metrics m "
            "join runs r on r.run_uuid = m.run_uuid "
            "join experiments e on e.experiment_id = r.experiment_id "
            "where e.name = ? and r.name not like 'study %'",
            (experiment,),
        ).fetchall()
    out: dict[str, dict] = {}
    for name, key, step, value in rows:
        if not key.startswith(("time/", "system/")):
            out.setdefault(name, {}).setdefault(key, []).append((step, value))
    return {n: {k: sorted(v) for k, v in keys.items()} for n, keys in out.items()}


def _statuses(db: Path, experiment: str) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select r.name, r.status from runs r join experiments e "
            "on e.experiment_id = r.experiment_id where e.name = ?",
            (experiment,),
        ).fetchall()
    return dict(rows)


@pytest.mark.slow  # 12 tiny runs on Ray, two lanes of actors: about a minute
def test_two_runs_at_once_give_the_numbers_of_one_at_a_time_and_a_failure_stops_nothing(
    ray_cluster, tmp_path, tiny_overrides, new_mlflow_db, capsys
):
    uri = new_mlflow_db(tmp_path)
    db = tmp_path / "mlflow.db"
    (tmp_path / "base.yaml").write_text("rounds: 1\n")
    tables = {}
    for parallel in (1, 2):
        experiment = f"parallel-{parallel}"
        study = {
            "base": "base.yaml",
            "overrides": [
                *tiny_overrides,
                "rounds=1",
                f"tracking.uri={uri}",
                f"tracking.experiment={experiment}",
                f"checkpoint.dir={tmp_path / experiment}",
            ],
            "seeds": [0, 1],
            "variants": {
                "fedilora": [],
                "zeropad": ["aggregation.method=zeropad"],
                # every client's task fails: the run ends with no merged round (RunFailed)
                "broken": ["faults.fail_prob=1.0", "faults.fail_mode=raise"],
            },
            "output": str(tmp_path / f"table-{parallel}.md"),
            "parallel": parallel,
        }
        path = tmp_path / f"study-{parallel}.yaml"
        path.write_text(yaml.safe_dump(study))
        with pytest.raises(StudyIncomplete) as failed:
            run_study(path)
        out = capsys.readouterr().out
        assert [f.label for f in failed.value.failures] == ["broken seed=0", "broken seed=1"]
        assert all("no round of this run merged" in f.error for f in failed.value.failures)
        assert "2 of 6 runs failed" in str(failed.value)
        # the others finished, each reported on its line, and their table was written
        assert sum(line.startswith("[") for line in out.splitlines()) == 6
        assert (", 2 at once" in out) == (parallel == 2)
        tables[parallel] = (tmp_path / f"table-{parallel}.md").read_text()
        assert "| broken | failed |" in tables[parallel]
        assert "Left out: 2 failed run(s) (broken seed=0, broken seed=1)" in tables[parallel]
        statuses = _statuses(db, experiment)
        assert statuses.pop(f"study study-{parallel}") == "FAILED"  # the parent: some failed
        assert statuses == {
            **{f"{v} seed={s}": "FINISHED" for v in ("fedilora", "zeropad") for s in (0, 1)},
            **{f"broken seed={s}": "FAILED" for s in (0, 1)},
        }
    one, two = _metrics(db, "parallel-1"), _metrics(db, "parallel-2")
    assert set(one) == {f"{v} seed={s}" for v in ("fedilora", "zeropad") for s in (0, 1)} | {
        "broken seed=0",
        "broken seed=1",
    }
    for name in one:
        assert two[name] == one[name], name  # bit for bit, every metric of every round
    assert tables[1] == tables[2]


def test_lane_count_follows_the_clusters_slots():
    # (slots, the pool a run would start alone, requested, runs) -> (lanes, actors per run)
    assert lanes.plan_lanes(2, 2, 0, 6) == (1, 0)  # a run alone fills the machine
    assert lanes.plan_lanes(16, 4, 0, 6) == (4, 4)  # 16 slots, 4 a run
    assert lanes.plan_lanes(16, 4, 0, 3) == (3, 5)  # no more lanes than runs
    assert lanes.plan_lanes(2, 2, 2, 6) == (2, 1)  # asked for: the pools share the slots
    assert lanes.plan_lanes(2, 2, 8, 6) == (6, 1)  # more lanes than slots: one actor each
    assert lanes.plan_lanes(0, 4, 0, 6) == (1, 0)  # nothing fits: the run's own error says so


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_parallel_argument_is_named(value, tmp_path):
    with pytest.raises(ConfigError, match="parallel: expected a whole number"):
        run_study(tmp_path / "study.yaml", parallel=value)


def test_a_negative_parallel_in_the_study_file_is_named(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"variants": {"a": []}, "parallel": -2}))
    with pytest.raises(ConfigError, match="parallel: .* must be >= 0"):
        load_study(path)
