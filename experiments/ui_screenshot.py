"""Screenshots of a fedsim run in the MLflow UI (the README's pictures).

Starts ``mlflow server`` on the store on 127.0.0.1 (a free port, stopped at the end), opens
the pages in headless Chromium (Debian's ``/usr/bin/chromium``, through Playwright) in the UI's
"Model training" mode, and writes three PNGs to ``--out``:

- ``mlflow-experiment-runs.png``: the experiment's runs table;
- ``mlflow-run-model-metrics.png``: the run's Model metrics charts, searched for
  ``--metrics-search`` (``global/`` by default: the charts sort by name, and ``clients/``,
  ``comm/``, ``data/``, ``editing/`` come before ``global/``; ``''`` for the whole tab);
- ``mlflow-run-system-metrics.png``: its System metrics tab (skipped when the run has none).

    python experiments/ui_screenshot.py --store sqlite:///mlflow.db [--experiment fedsim] \\
        [--run-name NAME | --run-id ID] --out docs/img/ [--width 1400 --height 900]

Without ``--run-name``/``--run-id`` it takes the experiment's newest finished run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from experiments.ui_browser import chromium_page, mlflow_ui, open_experiment, open_run_tab
except ImportError:  # run as a script: experiments/ is on sys.path, the repository root is not
    from ui_browser import chromium_page, mlflow_ui, open_experiment, open_run_tab

CPU = "system/cpu_utilization_percentage"


def find_run(store: str, experiment: str, run_name: str | None, run_id: str | None):
    """The run to show: by id, by name (the newest of that name) or the newest finished run of
    ``experiment``.

    Raises:
        SystemExit: no such experiment or run (the message says what is there).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise SystemExit(f"no run {run_id} in {store}") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise SystemExit(f"no experiment {experiment!r} in {store}; there are {names}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    if run_name is not None:
        found = [r for r in runs if r.info.run_name == run_name]
        if not found:
            names = sorted({r.info.run_name for r in runs})
            raise SystemExit(f"no run named {run_name!r} in {experiment!r}; there are {names}")
        return found[0]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        raise SystemExit(f"experiment {experiment!r} of {store} has no finished run")
    return finished[0]


def take_screenshots(
    store: str, run, out: Path, width: int = 1400, height: int = 900, search: str = "global/"
) -> list[Path]:
    """Write the PNGs of ``run`` (an MLflow ``Run`` of ``store``) to ``out``; returns them."""
    exp_id, run_id = run.info.experiment_id, run.info.run_id
    metrics = sorted(run.data.metrics)
    system = [k for k in metrics if k.startswith("system/")]
    model = [k for k in metrics if not k.startswith("system/") and search in k]
    if not model:
        raise SystemExit(f"run {run_id} has no metric whose name holds {search!r}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with mlflow_ui(store) as base, chromium_page({"width": width, "height": height}) as page:

        def shot(name: str) -> None:
            path = out / name
            page.screenshot(path=str(path))
            written.append(path)
            print(path)

        open_experiment(page, base, exp_id, run_id)
        page.wait_for_timeout(1000)
        shot("mlflow-experiment-runs.png")
        open_run_tab(page, base, exp_id, run_id, "model-metrics", model[0], search)
        shot("mlflow-run-model-metrics.png")
        if system:
            key = CPU if CPU in system else system[0]
            open_run_tab(page, base, exp_id, run_id, "system-metrics", key)
            shot("mlflow-run-system-metrics.png")
        else:
            print(f"run {run_id} has no system/* metrics: no System metrics screenshot")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--experiment", default="fedsim")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-name", help="the newest run of this name")
    which.add_argument("--run-id")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument(
        "--metrics-search",
        default="global/",
        help="text typed into the Model metrics search box ('' for all charts)",
    )
    args = parser.parse_args(argv)
    run = find_run(args.store, args.experiment, args.run_name, args.run_id)
    print(f"run {run.info.run_id} ({run.info.run_name}) of experiment {run.info.experiment_id}")
    take_screenshots(args.store, run, args.out, args.width, args.height, args.metrics_search)
    return 0


if __name__ == "__main__":
    sys.exit(main())
