"""A finished fedsim run in the MLflow UI: ``mlflow server`` on loopback, driven by headless
Chromium (Debian's ``/usr/bin/chromium``, through Playwright).

The experiment opens on its runs table with the run in it, not on MLflow 3's GenAI overview;
the run page charts ``global/accuracy`` under Model metrics and a ``system/*`` metric under
System metrics. Without Chromium the tests skip, except under CI (``CI`` set), where they fail:
``.ci/run`` installs it. A failing page is saved as a PNG under the test's tmp_path (the path
is printed). The routes and texts they rely on are described in ``experiments/ui_browser.py``.
"""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from experiments.ui_browser import (
    CHROMIUM,
    api_get,
    chart_legend,
    chart_title,
    chart_traces,
    chromium_page,
    mlflow_ui,
    open_experiment,
    open_run_tab,
    run_link,
    screenshot_on_failure,
)
from fedsim.tracking.tracker import EXPERIMENT_KIND_TAG, TRAINING_KIND

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EXPERIMENT = "fedsim-ui"
METRIC = "global/accuracy"
SYSTEM_METRIC = "system/cpu_utilization_percentage"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        why = f"{CHROMIUM} is missing (Debian: apt-get install chromium; .ci/run installs it)"
        if _in_ci():
            pytest.fail(f"CI is set but {why}")
        pytest.skip(why)
    return CHROMIUM


@pytest.fixture(scope="module")
def finished_run(chromium, experiment_config, restore_threads):
    """A tiny in-process run, sampling system metrics every 0.5 s: (store, experiment id,
    run id, run name)."""
    cfg = experiment_config(EXPERIMENT)("rounds=3", "tracking.system_metrics_interval_s=0.5")
    result = fedsim.run(cfg, executor=LocalExecutor())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # what the pages below must show is in the store in the first place
    assert METRIC in run.data.metrics
    assert SYSTEM_METRIC in run.data.metrics, sorted(run.data.metrics)
    return cfg.tracking.uri, run.info.experiment_id, run.info.run_id, run.info.run_name


@pytest.fixture(scope="module")
def ui(finished_run):
    with mlflow_ui(finished_run[0]) as base:
        yield base


@pytest.fixture(scope="module")
def page(ui):
    with chromium_page() as page:
        yield page


def test_the_experiment_opens_on_its_training_runs(finished_run, ui, page, tmp_path):
    _, exp_id, run_id, run_name = finished_run
    # the kind fedsim gives its experiments, as the UI reads it; MLflow 3.17's UI itself opens
    # an experiment by its "GenAI | Model training" switch (experiment_url selects "Model
    # training") and reads this tag only where that switch is turned off
    tags = {
        t["key"]: t["value"]
        for t in api_get(ui, "experiments/get", experiment_id=exp_id)["experiment"].get("tags", [])
    }
    assert tags.get(EXPERIMENT_KIND_TAG) == TRAINING_KIND, tags
    with screenshot_on_failure(page, tmp_path / "experiment.png"):
        open_experiment(page, ui, exp_id, run_id)
        # the runs table, under the training view's heading, with the run by its name
        assert page.get_by_role("heading", name="Runs", exact=True).is_visible()
        assert run_link(page, exp_id, run_id).first.inner_text().strip() == run_name
        # not the GenAI views: no overview (Usage / Detect Issues), no "Evaluation runs"
        for genai in ("Evaluation runs", "Detect Issues", "Usage"):
            assert page.get_by_text(genai, exact=True).count() == 0, genai


def test_the_run_page_charts_global_accuracy(finished_run, ui, page, tmp_path):
    _, exp_id, run_id, run_name = finished_run
    with screenshot_on_failure(page, tmp_path / "model-metrics.png"):
        # the search box keeps the charts whose key holds the text: the sections above
        # "global" (clients, comm, data, editing) would push it out of the drawn area
        open_run_tab(page, ui, exp_id, run_id, "model-metrics", METRIC, search=METRIC)
        assert page.get_by_role("heading", name=run_name, exact=True).is_visible()
        assert chart_title(page, METRIC).first.inner_text().strip() == "accuracy"
        assert chart_legend(page, METRIC).first.inner_text().strip() == f"{run_name} ({METRIC})"
        assert chart_traces(page, METRIC).count() >= 1


def test_the_system_metrics_tab_charts_the_cpu(finished_run, ui, page, tmp_path):
    _, exp_id, run_id, run_name = finished_run
    with screenshot_on_failure(page, tmp_path / "system-metrics.png"):
        open_run_tab(page, ui, exp_id, run_id, "system-metrics", SYSTEM_METRIC, SYSTEM_METRIC)
        title = chart_title(page, SYSTEM_METRIC).first.inner_text().strip()
        assert title == "cpu_utilization_percentage"
        legend = chart_legend(page, SYSTEM_METRIC).first.inner_text().strip()
        assert legend == f"{run_name} ({SYSTEM_METRIC})"
        assert chart_traces(page, SYSTEM_METRIC).count() >= 1
