"""Studies: variants of one experiment over grid cells and seeds, summarised in one table.

A study YAML names a base experiment, overrides for all runs, the seeds, the variants (each a
list of overrides) and optionally grids (each a mapping of keys to value lists; a grid's cells
are the product of its lists, and the study's cells are the union of its grids).
:func:`run_study` runs every (cell, variant, seed) as its own MLflow run, nested under one
parent run, on one Ray cluster, and writes a Markdown table of mean +- std over seeds.

A study is a file, or the name of a shipped study (``fedsim compare compare``: see
:mod:`fedsim.experiments`); its ``base`` is found next to the study file, else among the
shipped experiments by name. Reading and checking the file is :mod:`fedsim.simulation.study_file`
(its names are importable from here too); before the first run starts, every run's config,
outputs and inputs and the table's ``output`` are checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.config import ConfigError, load_config
from fedsim.config.arguments import check_flag, check_overrides, check_path
from fedsim.errors import RunFailed
from fedsim.simulation.study_file import (
    MAX_RUNS,
    StudyConfig,
    check_size,
    grid_cells,
    load_study,
    study_size,
)

__all__ = [
    "MAX_RUNS",
    "StudyConfig",
    "check_size",
    "format_grid",
    "format_table",
    "grid_cells",
    "load_study",
    "StudyIncomplete",
    "run_study",
    "study_size",
]


_log = logging.getLogger(__name__)


def _summary(history: list[dict], last: int, key: str) -> float:
    values = [h[key] for h in history[1:] if key in h][-last:]
    return float(np.mean(values)) if values else float("nan")


COLUMNS = [
    ("global/accuracy", "global acc"),
    ("global/macro_f1", "global macro-F1"),
    ("personalized/accuracy_mean", "pers. acc"),
    ("personalized/macro_f1_mean", "pers. macro-F1"),
]
# A generative model's comparison table (chosen when the runs logged global/bleu).
GENERATION_COLUMNS = [
    ("global/bleu", "global BLEU-4"),
    ("global/rouge_l", "global ROUGE-L"),
    ("personalized/bleu_mean", "pers. BLEU-4"),
    ("personalized/rouge_l_mean", "pers. ROUGE-L"),
]


def run_study(
    path: str | Path,
    extra: list[str] = (),
    quiet: bool = False,
    pool=None,
    parallel: int | None = None,
    resume: bool = False,
) -> str:
    """Run every cell x variant x seed and return (and write) the Markdown table.

    Prints (to stdout) one line per finished run, then the table, where it was written and
    the MLflow parent run; the runs themselves print no summary. A run that fails does not
    stop the others: the table is made of the runs that finished, and the failed ones are
    listed on stderr and raised at the end (:class:`StudyIncomplete`).

    Args:
        path: the study YAML, or a shipped study's name.
        extra: overrides applied to every run after the study's own (e.g. ``["rounds=2"]``).
        quiet: print nothing on stdout (warnings and errors still go to stderr).
        pool: a warm pool (:func:`fedsim.warm_pool`) for the runs, left running afterwards
            (several studies in one process reuse its actors); None: the study's own, stopped
            at its end. With more than one run at once, each lane has a pool of its own.
        parallel: how many runs at once (None: the study's ``parallel``; 0: as many as the
            cluster holds; see :mod:`fedsim.simulation.lanes`).
        resume: continue the latest parent run of this study in its MLflow experiment: a
            planned run whose child run there FINISHED with the same name and the same
            ``fedsim.config_digest`` is not run again (its metrics are read back for the
            table); the others run under that parent. Without such a parent: a new study.

    Raises:
        ConfigError: a bad study file, a run whose config is not allowed, or an ``output``
            that cannot be written (all checked before the first run starts), or an argument
            of the wrong type (named). Should the table still not be written after the runs,
            the error names ``output`` and the table is in the MLflow parent run.
        StudyIncomplete: some runs failed (after the others finished and the table of those
            was written).
    """
    from actors.executor import RayExecutor, init_ray
    from fedsim.simulation import lanes as lanes_mod
    from fedsim.tracking.tracker import Tracker

    check_path(path, "path")
    extra = check_overrides(extra, "extra")
    check_flag(quiet, "quiet")
    check_flag(resume, "resume")
    if pool is not None and not (isinstance(pool, RayExecutor) and pool.keep_actors):
        raise ConfigError("pool", f"expected fedsim.warm_pool(), got {type(pool).__name__}")
    if parallel is not None:
        lanes_mod.check_parallel(parallel)
    study, base = load_study(path)
    plan = _plan(study, base, extra)
    import ray

    _preflight(study, plan)

    name = f"study {Path(path).stem}"
    earlier, finished = finished_runs(plan, name) if resume else (None, {})
    if earlier is not None:
        parent = Tracker.continue_parent(plan[0][3], earlier)
    else:
        parent = Tracker(plan[0][3], run_name=name, log_config=False)
    try:  # whatever fails from here on, the parent run ends FAILED, never stays RUNNING
        todo = [i for i in range(len(plan)) if i not in finished]
        if resume and not quiet:
            print(
                f"resuming: {len(finished)} of {len(plan)} runs finished in MLflow parent run "
                f"{parent.run_id}; {len(todo)} to run",
                flush=True,
            )
        started = bool(todo) and init_ray(all(cfg.resources.log_to_driver for *_, cfg in plan))
        try:
            cfgs = [cfg for *_, cfg in plan]
            for cfg in cfgs:
                cfg.tracking.parent_run_id = parent.run_id
            cfgs = [cfgs[i] for i in todo]
            want = study.parallel if parallel is None else parallel
            lanes, actors = lanes_mod.lane_count(want, cfgs) if cfgs else (1, None)
            if lanes > 1 and not quiet:
                cap = f", at most {actors} client actors each" if actors else ""
                print(f"{len(cfgs)} runs, {lanes} at once{cap}", flush=True)
            done = [0]

            def report(i, outcome, seconds):
                done[0] += 1
                if quiet:
                    return
                what = (
                    f"FAILED: {outcome.error}"
                    if isinstance(outcome, lanes_mod.Failure)
                    else f"MLflow run {outcome.run_id}"
                )
                label = cfgs[i].tracking.run_name
                print(f"[{done[0]}/{len(cfgs)}] {label}: {seconds:.0f} s, {what}", flush=True)

            ran, failures = (
                lanes_mod.run_all(cfgs, lanes, actors, pool if lanes == 1 else None, report)
                if cfgs
                else ([], [])
            )
            outcomes = [finished.get(i) for i in range(len(plan))]
            for i, outcome in zip(todo, ran, strict=True):
                outcomes[i] = outcome
        finally:
            if started:
                ray.shutdown()
        results: dict[tuple[str, str], list] = {}
        for (cell, name, _seed, _cfg), res in zip(plan, outcomes):
            runs = results.setdefault((cell, name), [])
            if res is not None:
                runs.append(res)
        for failure in failures:  # each on its line, whatever ``quiet``: the errors
            _log.warning("run '%s' failed: %s", failure.label, failure.error)
        if len(failures) == len(plan):
            raise StudyIncomplete(failures, len(plan), None)
        table = _table(study, plan, results, extra, failures)
        parent.log_text(table, "summary.md")
    except BaseException:
        parent.finish("FAILED")
        raise
    # every run finished and the table is in MLflow, written or not
    parent.finish("FAILED" if failures else "FINISHED")
    if not quiet:
        print(table)
    out = Path(study.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    except OSError as exc:  # checked before the first run: something changed since
        shown = "printed above and " if not quiet else ""
        raise ConfigError(
            "output",
            f"cannot write {out}: {exc.strerror or exc}; the table is {shown}in the MLflow "
            f"parent run {parent.run_id} (summary.md)",
        ) from None
    if not quiet:
        print(
            f"written to {out}; MLflow parent run {parent.run_id}; browse the runs with: "
            f"{parent.ui_command(whole_experiment=True)}"
        )
    if failures:
        raise StudyIncomplete(failures, len(plan), out)
    return table


@dataclass
class FinishedRun:
    """A run of an earlier try of the study, read back from MLflow (``resume``): what the
    table needs of a :class:`fedsim.simulation.run.RunResult`."""

    run_id: str
    history: list[dict]


def finished_runs(plan: list[tuple], name: str) -> tuple[str | None, dict[int, FinishedRun]]:
    """The latest parent run called ``name`` in the plan's MLflow experiment, and the plan's
    runs that finished under it: plan index -> the run read back. A child counts when it
    FINISHED and has the planned run's name and ``fedsim.config_digest`` (the settings that
    decide its numbers); anything else runs again."""
    from mlflow import MlflowClient

    from fedsim.config import config_digest, tracking_uri

    cfg = plan[0][3]
    client = MlflowClient(tracking_uri(cfg.tracking.uri))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None, {}
    runs = client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50_000
    )
    parents = [
        r for r in runs if r.info.run_name == name and "mlflow.parentRunId" not in r.data.tags
    ]
    parent = parents[0].info.run_id
    children = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent and r.info.status == "FINISHED"
    ]
    by_name = {}
    for child in sorted(children, key=lambda r: r.info.start_time):
        by_name[child.info.run_name] = child  # the latest of a name
    found = {}
    for i, (*_, run_cfg) in enumerate(plan):
        child = by_name.get(run_cfg.tracking.run_name)
        if child is None or child.data.tags.get("fedsim.config_digest") != config_digest(run_cfg):
            continue
        found[i] = FinishedRun(child.info.run_id, _history(client, child))
    return parent, found


def _history(client, run) -> list[dict]:
    """A run's metrics as :attr:`RunResult.history`: one dict per logged round."""
    rounds: dict[int, dict] = {}
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue
        for m in client.get_metric_history(run.info.run_id, key):
            rounds.setdefault(m.step, {"round": m.step})[key] = m.value
    return [rounds[t] for t in sorted(rounds)]


class StudyIncomplete(RunFailed):
    """Some of a study's runs failed; the others finished and their table was written.

    Attributes:
        failures: the failed runs (:class:`fedsim.simulation.lanes.Failure`), in plan order.
        output: where the table of the finished runs is (None: every run failed).
    """

    def __init__(self, failures: list, total: int, output: Path | None):
        self.failures, self.output = failures, output
        names = ", ".join(repr(f.label) for f in failures)
        where = f"; the table of the others is in {output}" if output else ""
        super().__init__(f"{len(failures)} of {total} runs failed ({names}; above){where}")


def _plan(study: StudyConfig, base: Path, extra: list[str]) -> list[tuple]:
    """Every run's (cell, variant, seed, config), each config built and checked.

    Raises:
        ConfigError: naming the run a bad config belongs to; a problem of the base file as a
            whole names ``base``.
    """
    plan = []
    for cell, cell_overrides in grid_cells(study):
        for name, overrides in study.variants.items():
            for seed in study.seeds:
                all_overrides = [*study.overrides, *cell_overrides, *overrides, f"seed={seed}"]
                label = " ".join(x for x in (cell, name, f"seed={seed}") if x)
                all_overrides += [*extra, f"tracking.run_name={label}"]
                try:
                    cfg = load_config(base, all_overrides)
                except ConfigError as exc:  # name the run of the study it belongs to
                    message = str(exc).removeprefix(f"config error: {exc.key}: ")
                    key = "base" if exc.key == "config" else exc.key
                    raise ConfigError(key, f"{message} (in run '{label}')") from None
                plan.append((cell, name, seed, cfg))
    return plan


def _table(
    study: StudyConfig, plan: list[tuple], results: dict, extra: list[str], failures=()
) -> str:
    """The study's Markdown table: a grid table per metric, or one row per variant; a line
    below it names the runs that failed (left out of the means)."""
    rounds = plan[0][3].rounds
    if study.grids:
        shares = {n for _, n, _, cfg in plan if cfg.sharing.policy != "none"}
        untrained = [n for n in study.variants if n not in shares]
        table = format_grid(results, study, rounds, extra, untrained)
    else:
        table = format_table({n: r for (_, n), r in results.items()}, study, rounds, extra)
    if failures:
        names = ", ".join(f.label for f in failures)
        table += f"\nLeft out: {len(failures)} failed run(s) ({names}).\n"
    return table


def _preflight(study: StudyConfig, plan: list) -> None:
    """Check every run's outputs and inputs before the first run starts.

    Runs that share their output locations, or their data, model and clients settings, are
    checked once; a mistake in the last variant is found before the first one trains.

    Raises:
        ConfigError: naming the key and the run it belongs to.
    """
    from fedsim.config import flatten
    from fedsim.simulation.preflight import check_inputs, check_outputs
    from fedsim.tracking.store import check_writable_file

    check_writable_file(study.output, "output")
    seen: set[tuple] = set()
    for _cell, _name, _seed, cfg in plan:
        flat = flatten(cfg)
        outputs = tuple(flat[k] for k in ("tracking.uri", "tracking.experiment", "checkpoint.dir"))
        inputs = tuple(
            str(v) for k, v in sorted(flat.items()) if k.startswith(("data.", "model.", "clients."))
        )
        for kind, key in (("outputs", outputs), ("inputs", inputs)):
            if (kind, key) in seen:
                continue
            seen.add((kind, key))
            try:
                check_outputs(cfg) if kind == "outputs" else check_inputs(cfg)
            except ConfigError as exc:
                message = str(exc).removeprefix(f"config error: {exc.key}: ")
                label = cfg.tracking.run_name
                raise ConfigError(exc.key, f"{message} (in run '{label}')") from None


def _cell(runs, key: str, last: int) -> str:
    if not runs:  # every seed of it failed
        return "failed"
    vals = [_summary(r.history, last, key) for r in runs]
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"


def format_grid(
    results: dict, study: StudyConfig, rounds: int, extra, untrained: list[str] = ()
) -> str:
    """Markdown: per metric (``metric``, then ``more_metrics``), one row per grid cell and one
    column per variant; ``untrained`` names the variants that share nothing with the server."""
    variants = list(study.variants)
    metrics = [study.metric, *study.more_metrics]
    tables = []
    for metric in metrics:
        lines = [
            f"`{metric}`:",
            "",
            "| cell | " + " | ".join(variants) + " |",
            "|---" * (len(variants) + 1) + "|",
        ]
        for cell, _ in grid_cells(study):
            cells = [_cell(results[(cell, v)], metric, study.last_rounds) for v in variants]
            lines.append(f"| {cell} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    note = (
        f"\nMean ± std over seeds {study.seeds} of each run's mean over its "
        f"last {study.last_rounds} of {rounds} rounds"
        + (f"; extra overrides: {' '.join(extra)}" if extra else "")
        + "."
    )
    if untrained and any(m.startswith("global/") for m in metrics):
        note += (
            f" {', '.join(untrained)} share{'s' if len(untrained) == 1 else ''} nothing with "
            "the server, so the global model never changes: its `global/*` values are the "
            "zero-shot model's; its clients' own models are measured by `personalized/*`."
        )
    return "\n\n".join(tables) + "\n" + note + "\n"


def format_table(results: dict[str, list], study: StudyConfig, rounds: int, extra) -> str:
    """Markdown: one row per variant, mean +- std over seeds of the last rounds' means."""
    first = next(runs for runs in results.values() if runs)[0].history
    columns = GENERATION_COLUMNS if any("global/bleu" in h for h in first) else COLUMNS
    columns = [*columns, *((m, m) for m in study.more_metrics if m not in dict(columns))]
    head = "| method | " + " | ".join(t for _, t in columns) + " | upload MB / round |"
    lines = [head, "|---" * (len(columns) + 2) + "|"]
    for name, runs in results.items():
        cells = [_cell(runs, key, study.last_rounds) for key, _ in columns]
        up = [np.mean([h["comm/upload_bytes"] for h in r.history[1:]]) / 1e6 for r in runs]
        up_cell = f"{np.mean(up):.2f}" if runs else "failed"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {up_cell} |")
    note = (
        f"\nMean ± std over seeds {study.seeds} of each run's mean over its last "
        f"{study.last_rounds} of {rounds} rounds"
        + (f"; extra overrides: {' '.join(extra)}" if extra else "")
        + ".\n"
    )
    return "\n".join(lines) + "\n" + note
