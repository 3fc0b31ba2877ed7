"""Drive the MLflow UI of a store with headless Chromium: start ``mlflow server`` on loopback,
launch Debian's Chromium through Playwright, open fedsim's pages and wait until they show data.

Shared by ``experiments/ui_screenshot.py`` (the README's screenshots) and
``tests/ui/test_mlflow_ui.py`` (the browser test). Playwright drives the system's Chromium
(``/usr/bin/chromium``, Debian's ``chromium`` package); it never downloads a browser.

What MLflow 3.17's UI (a React app behind ``#/`` routes) does with a fedsim run:

- The sidebar has a "GenAI | Model training" switch, the *workflow type*. It decides which view
  an experiment opens in; the experiment's ``mlflow.experimentKind`` tag does not (3.17 reads
  the tag only when the switch is off, and it is always on). A browser that never flipped the
  switch is in GenAI mode: ``#/experiments/<id>`` opens the GenAI overview (Usage, Traces,
  Latency), and the run page's breadcrumb says "Evaluations". The query
  ``?workflowType=machine_learning`` selects "Model training" for that page (not remembered);
  flipping the switch is remembered in the browser's localStorage (``mlflow.workflowType_v1``).
- In "Model training" mode ``#/experiments/<id>`` redirects to ``#/experiments/<id>/runs``: the
  runs table under the heading "Runs", each run a link ``#/experiments/<id>/runs/<run id>``.
- ``#/experiments/<id>/runs/<run id>/model-metrics``: one chart per metric, in one section per
  name prefix (``global/accuracy`` is the chart "accuracy" in the section "global"); sections
  and charts are sorted by name (JavaScript's default sort, by UTF-16 code unit), metrics
  without a ``/`` come last under "Model metrics". A chart's title carries the full key in its
  ``title`` attribute and its legend reads ``<run name> (<key>)`` once the data is drawn.
- ``.../system-metrics``: the ``system/*`` metrics, the same kind of charts.
- An "MLflow Assistant" side panel opens itself on the first visit; the pages here keep it
  closed (its localStorage flags) so that it hides nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google's services, and on a
# machine without a network those connections fail noisily; QUIC and the GPU are not needed.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
SERVER_START_S = 60.0
PAGE_TIMEOUT_MS = 45_000  # a React app on two slow cores: the first page takes ~15 s

# The "Model training" side of the UI's workflow switch, for one page load.
TRAINING_VIEW = "workflowType=machine_learning"
# Before every page load: the assistant panel closed and its first-visit auto-open done.
_QUIET_UI = """
try {
  window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
} catch (e) {}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused id of someone else's group
        return False
    return True


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the server, its uvicorn worker and whatever they
    started), then SIGKILL what is left of it after 10 s."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def mlflow_ui(store: str, timeout: float = SERVER_START_S) -> Iterator[str]:
    """Serve the MLflow UI of ``store`` (a tracking URI) on 127.0.0.1; yields its base URL.

    ``python -m mlflow server`` (what ``mlflow ui`` runs too) with one worker, MLflow's job
    runner off (it starts a queue of worker processes the UI does not need), in a temp
    directory (so it never writes ``./mlartifacts`` into the caller's) and in its own process
    group, which is stopped on exit, also when the body raises.

    Raises:
        RuntimeError: the server exited, or did not answer ``/health`` within ``timeout``
            seconds; the message holds the end of its log.
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="fedsim-mlflow-ui-"))
    log_path = workdir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        str(workdir / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not _answers(f"{base}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with status {proc.returncode}"
                    if proc.poll() is not None
                    else f"did not answer {base}/health within {timeout:.0f} s"
                )
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"mlflow server {why}: {' '.join(cmd)}\n--- its log ---\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def api_get(base: str, path: str, **params: str) -> dict:
    """GET ``base/api/2.0/mlflow/<path>`` of the server: what the UI itself reads."""
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}?{query}", timeout=30) as r:
        return json.load(r)


@contextlib.contextmanager
def chromium_page(viewport: dict | None = None) -> Iterator:
    """A Playwright page (sync API) in headless Debian Chromium, the UI's assistant panel kept
    closed; closes the browser on exit.

    Raises:
        FileNotFoundError: ``/usr/bin/chromium`` is missing (Debian: ``apt-get install
            chromium``).
    """
    if not os.path.exists(CHROMIUM):
        raise FileNotFoundError(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=viewport or VIEWPORT)
            context.add_init_script(_QUIET_UI)
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


@contextlib.contextmanager
def screenshot_on_failure(page, path: str | Path) -> Iterator[None]:
    """Re-raise what the body raises after saving a screenshot of ``page`` to ``path`` and
    printing where it is (and the page's URL)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path))
            print(f"screenshot of {page.url}: {path}", file=sys.stderr)
        raise


def experiment_url(base: str, experiment_id: str, training: bool = True) -> str:
    """An experiment's landing page; ``training``: in the UI's "Model training" mode, where it
    redirects to the runs table (else the browser's remembered mode, GenAI at first)."""
    url = f"{base}/#/experiments/{experiment_id}"
    return f"{url}?{TRAINING_VIEW}" if training else url


def run_url(
    base: str, experiment_id: str, run_id: str, tab: str = "model-metrics", training: bool = True
) -> str:
    """A run's page; ``tab``: ``overview``, ``model-metrics``, ``system-metrics`` or
    ``artifacts``."""
    url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/{tab}"
    return f"{url}?{TRAINING_VIEW}" if training else url


def run_link(page, experiment_id: str, run_id: str):
    """The runs table's link to the run (its name)."""
    return page.locator(f'a[href="#/experiments/{experiment_id}/runs/{run_id}"]')


def open_experiment(page, base: str, experiment_id: str, run_id: str) -> None:
    """Open the experiment in "Model training" mode and wait for the run's row in the runs
    table (Playwright's TimeoutError if it never shows)."""
    page.goto(experiment_url(base, experiment_id))
    page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/runs(\?|$)"))
    run_link(page, experiment_id, run_id).first.wait_for()


CHART_CARD = '[data-testid="experiment-view-compare-runs-card"]'


def chart_card(page, metric: str):
    """The card of ``metric``'s chart (charts are drawn only near the viewport: search for the
    metric, or scroll to it)."""
    return page.locator(CHART_CARD).filter(has=chart_title(page, metric))


def chart_title(page, metric: str):
    """The title of ``metric``'s chart (its text is the part after the section prefix)."""
    return page.locator(f'h4[title="{metric}"]')


def chart_legend(page, metric: str):
    """The legend entry ``<run name> (<metric>)`` of ``metric``'s line chart (a bar chart, of a
    metric with one value, has none)."""
    return chart_card(page, metric).get_by_text(f"({metric})")


def chart_traces(page, metric: str):
    """The plotted data of ``metric``'s chart (Plotly's traces: lines, or bars for one value)."""
    return chart_card(page, metric).locator(".js-plotly-plot g.trace")


def open_run_tab(
    page, base: str, experiment_id: str, run_id: str, tab: str, metric: str, search: str = ""
) -> None:
    """Open a run's ``tab`` (``model-metrics`` or ``system-metrics``), type ``search`` into
    its "Search metric charts" box (the charts whose key holds it stay) and wait until
    ``metric``'s chart is drawn (Playwright's TimeoutError if it never is)."""
    page.goto(run_url(base, experiment_id, run_id, tab))
    if search:
        page.get_by_placeholder("Search metric charts").fill(search)
    chart_card(page, metric).first.wait_for()
    chart_traces(page, metric).first.wait_for(state="attached")
    page.wait_for_timeout(1000)  # the plot's last paint
