"""Studies: variants of one experiment over grid cells and seeds, summarised in one table.

A study YAML names a base experiment, overrides for all runs, the seeds, the variants (each a
list of overrides) and optionally grids (each a mapping of keys to value lists; a grid's cells
are the product of its lists, and the study's cells are the union of its grids).
:func:`run_study` runs every (cell, variant, seed) as its own MLflow run, nested under one
parent run, on one Ray cluster, and writes a Markdown table of mean +- std over seeds.

A study is a file, or the name of a shipped study (``fedsim compare compare``: see
:mod:`fedsim.experiments`); its ``base`` is found next to the study file, else among the
shipped experiments by name.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim import experiments
from fedsim.config import ConfigError, load_config
from fedsim.config.arguments import check_flag, check_overrides, check_path
from fedsim.config.yaml_file import read_yaml_text
from fedsim.errors import one_line


@dataclass
class StudyConfig:
    """What a study runs.

    Attributes:
        base: the experiment YAML every run starts from (relative to the study file), or the
            name of a shipped experiment.
        overrides: ``key=value`` applied to every run.
        seeds: one run per seed and variant.
        variants: variant name -> its own overrides.
        grids: each maps config keys to lists of values; the cells of a grid are the
            product of its lists, the study's cells the union over grids (none: one cell).
        metric: the metric a grid table reports (one column per variant).
        more_metrics: further metrics, one more grid table each (e.g. personalised accuracy,
            the number that matters for local-only training).
        last_rounds: table values are the mean over this many final rounds (rounds swing
            under client sampling; one round alone is a noisy summary).
        output: where the Markdown table is written (relative to the working directory).
    """

    base: str = "default.yaml"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, list[str]] = field(default_factory=dict)
    grids: list[dict[str, list[Any]]] = field(default_factory=list)
    metric: str = "global/accuracy"
    more_metrics: list[str] = field(default_factory=list)
    last_rounds: int = 3
    output: str = "compare.md"


# The most runs (cells x variants x seeds) one study may plan. Each run's config is built and
# checked before the first starts (a second or so per 100); a grid of 100,000 cells would spend
# that long in silence. The largest shipped study, robust, plans 231.
MAX_RUNS = 1_000


def load_study(path: str | Path) -> tuple[StudyConfig, Path]:
    """Read and check a study YAML (a path, or a shipped study's name); returns it and the
    file of its base experiment.

    Raises:
        ConfigError: unreadable file, one over the limits of :mod:`fedsim.config.yaml_file`
            (size, aliases, nesting), unknown name or key, no variants or no seeds, more than
            :data:`MAX_RUNS` runs, or a base experiment that is neither next to the study nor
            shipped, or is no experiment (named ``base``).
    """
    check_path(path, "path")
    path = experiments.find(path, "study")
    text = read_yaml_text(path, "study", "study keys (base, variants, seeds, ...)")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # e.g. an alias to no anchor
        raise ConfigError("study", f"cannot parse {path}: {one_line(exc, 500)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            "study",
            f"{path} must be a mapping of study keys (base, variants, seeds, ...), "
            f"got {type(loaded).__name__}",
        )
    for i, grid in enumerate(loaded.get("grids") or []):
        if not isinstance(grid, dict):
            raise ConfigError(f"grids[{i}]", f"{path}: a grid maps config keys to value lists")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"grids[{i}].{key}", f"{path}: must be a non-empty list of values"
                )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), OmegaConf.create(loaded))
        study = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "study"
        raise ConfigError(str(key), f"{path}: {str(exc).splitlines()[0]}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError("study", f"{path} does not fit a study's shape: {exc}") from None
    if not study.variants:
        raise ConfigError("variants", f"{path} lists no variants")
    if not study.seeds:
        raise ConfigError("seeds", f"{path} lists no seeds")
    if study.last_rounds < 1:
        raise ConfigError("last_rounds", "must be >= 1")
    check_size(study, str(path))
    return study, _base_file(study, path)


def _base_file(study: StudyConfig, path: Path) -> Path:
    """The experiment file ``base:`` names, checked to be a readable experiment (its errors
    name ``base``, never the file's content)."""
    base = path.parent / study.base
    if not study.base or not base.is_file():
        base = experiments.shipped(study.base)
        if base is None:
            raise ConfigError(
                "base",
                f"{path}: the base experiment {path.parent / study.base} does not exist, and "
                f"no shipped experiment is called {study.base!r} "
                f"(known: {', '.join(experiments.names('run'))})",
            )
    read_yaml_text(base, "base", "config keys (key: value lines)")
    if experiments.is_study(base):
        raise ConfigError("base", f"{path}: the base {base} is a study, not an experiment")
    return base


def study_size(study: StudyConfig) -> tuple[int, int]:
    """The study's number of grid cells and of runs (cells x variants x seeds), counted
    without listing them."""
    cells = sum(math.prod(len(values) for values in grid.values()) for grid in study.grids)
    cells = cells if study.grids else 1
    return cells, cells * len(study.variants) * len(study.seeds)


def check_size(study: StudyConfig, source: str = "the study") -> None:
    """Refuse a study of more than :data:`MAX_RUNS` runs before any run's config is built.

    Raises:
        ConfigError: naming the largest factor (``grids``, ``variants`` or ``seeds``) and the
            count.
    """
    cells, runs = study_size(study)
    if runs <= MAX_RUNS:
        return
    factors = {"grids": cells, "variants": len(study.variants), "seeds": len(study.seeds)}
    key = max(factors, key=factors.__getitem__)
    raise ConfigError(
        key,
        f"{source}: {runs:,} runs ({cells:,} grid cells x {len(study.variants):,} variants x "
        f"{len(study.seeds):,} seeds), more than the {MAX_RUNS:,} one study may hold; "
        "split it into several studies",
    )


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


def grid_cells(study: StudyConfig) -> list[tuple[str, list[str]]]:
    """The study's cells: a label and its overrides (one unnamed cell without grids).

    Raises:
        ConfigError: the study holds more than :data:`MAX_RUNS` runs (see :func:`check_size`).
    """
    check_size(study)
    cells: list[tuple[str, list[str]]] = []
    for grid in study.grids or [{}]:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            overrides = [f"{k}={v}" for k, v in zip(keys, values)]
            label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
            cells.append((label, overrides))
    return cells


def run_study(path: str | Path, extra: list[str] = (), quiet: bool = False) -> str:
    """Run every cell x variant x seed and return (and write) the Markdown table.

    Prints (to stdout) one line per finished run, then the table, where it was written and
    the MLflow parent run; the runs themselves print no summary.

    Args:
        path: the study YAML, or a shipped study's name.
        extra: overrides applied to every run after the study's own (e.g. ``["rounds=2"]``).
        quiet: print nothing on stdout (warnings and errors still go to stderr).

    Raises:
        ConfigError: a bad study file, a run whose config is not allowed, or an ``output``
            that cannot be written (all checked before the first run starts), or an argument
            of the wrong type (named). Should the table still not be written after the runs,
            the error names ``output`` and the table is in the MLflow parent run.
    """
    from actors.executor import init_ray
    from fedsim.simulation.run import run
    from fedsim.tracking.tracker import Tracker

    check_path(path, "path")
    extra = check_overrides(extra, "extra")
    check_flag(quiet, "quiet")
    study, base = load_study(path)
    plan = _plan(study, base, extra)
    import ray

    _preflight(study, plan)

    parent = Tracker(plan[0][3], run_name=f"study {Path(path).stem}", log_config=False)
    try:  # whatever fails from here on, the parent run ends FAILED, never stays RUNNING
        started = init_ray(all(cfg.resources.log_to_driver for *_, cfg in plan))
        results: dict[tuple[str, str], list] = {}
        try:
            for i, (cell, name, _seed, cfg) in enumerate(plan, 1):
                cfg.tracking.parent_run_id = parent.run_id
                start = time.perf_counter()
                res = run(cfg, quiet=True)
                results.setdefault((cell, name), []).append(res)
                if not quiet:
                    print(
                        f"[{i}/{len(plan)}] {cfg.tracking.run_name}: "
                        f"{time.perf_counter() - start:.0f} s, MLflow run {res.run_id}",
                        flush=True,
                    )
        finally:
            if started:
                ray.shutdown()
        table = _table(study, plan, results, extra)
        parent.log_text(table, "summary.md")
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()  # every run finished and the table is in MLflow, written or not
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
    return table


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


def _table(study: StudyConfig, plan: list[tuple], results: dict, extra: list[str]) -> str:
    """The study's Markdown table: a grid table per metric, or one row per variant."""
    rounds = plan[0][3].rounds
    if study.grids:
        shares = {n for _, n, _, cfg in plan if cfg.sharing.policy != "none"}
        untrained = [n for n in study.variants if n not in shares]
        return format_grid(results, study, rounds, extra, untrained)
    return format_table({n: r for (_, n), r in results.items()}, study, rounds, extra)


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
    first = next(iter(results.values()))[0].history
    columns = GENERATION_COLUMNS if any("global/bleu" in h for h in first) else COLUMNS
    columns = [*columns, *((m, m) for m in study.more_metrics if m not in dict(columns))]
    head = "| method | " + " | ".join(t for _, t in columns) + " | upload MB / round |"
    lines = [head, "|---" * (len(columns) + 2) + "|"]
    for name, runs in results.items():
        cells = [_cell(runs, key, study.last_rounds) for key, _ in columns]
        up = [np.mean([h["comm/upload_bytes"] for h in r.history[1:]]) / 1e6 for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(up):.2f} |")
    note = (
        f"\nMean ± std over seeds {study.seeds} of each run's mean over its last "
        f"{study.last_rounds} of {rounds} rounds"
        + (f"; extra overrides: {' '.join(extra)}" if extra else "")
        + ".\n"
    )
    return "\n".join(lines) + "\n" + note
