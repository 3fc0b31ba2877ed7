"""Comparison studies: several variants of one experiment over several seeds, one table.

A study YAML names a base experiment, overrides for all runs, the seeds, and the variants
(each a list of overrides); :func:`run_study` runs every (variant, seed) as its own MLflow run
on one Ray cluster and writes a Markdown table of mean +- std over seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim.config import ConfigError, load_config


@dataclass
class StudyConfig:
    """What a study runs.

    Attributes:
        base: the experiment YAML every run starts from (relative to the study file).
        overrides: ``key=value`` applied to every run.
        seeds: one run per seed and variant.
        variants: variant name -> its own overrides.
        last_rounds: table values are the mean over this many final rounds (rounds swing
            under client sampling; one round alone is a noisy summary).
        output: where the Markdown table is written (relative to the working directory).
    """

    base: str = "default.yaml"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, list[str]] = field(default_factory=dict)
    last_rounds: int = 3
    output: str = "compare.md"


def load_study(path: str | Path) -> tuple[StudyConfig, Path]:
    """Read and check a study YAML; returns it and the directory it lives in.

    Raises:
        ConfigError: unreadable file, unknown key, no variants or no seeds.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("study", f"file not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), OmegaConf.load(path))
        study = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError("study", f"{path}: {str(exc).splitlines()[0]}") from None
    if not study.variants:
        raise ConfigError("variants", f"{path} lists no variants")
    if not study.seeds:
        raise ConfigError("seeds", f"{path} lists no seeds")
    if study.last_rounds < 1:
        raise ConfigError("last_rounds", "must be >= 1")
    return study, path.parent


def _summary(history: list[dict], last: int, key: str) -> float:
    values = [h[key] for h in history[1:] if key in h][-last:]
    return float(np.mean(values)) if values else float("nan")


COLUMNS = [
    ("global/accuracy", "global acc"),
    ("global/macro_f1", "global macro-F1"),
    ("personalized/accuracy_mean", "pers. acc"),
    ("personalized/macro_f1_mean", "pers. macro-F1"),
]


def run_study(path: str | Path, extra: list[str] = ()) -> str:
    """Run every variant over every seed and return (and write) the Markdown table.

    Args:
        path: the study YAML.
        extra: overrides applied to every run after the study's own (e.g. ``rounds=2``).

    Raises:
        ConfigError: a bad study file or a variant whose config is not allowed (checked for
            every run before the first one starts).
    """
    from fedsim.simulation import init_ray, run

    study, here = load_study(path)
    plan = []
    for name, overrides in study.variants.items():
        for seed in study.seeds:
            all_overrides = [*study.overrides, *overrides, f"seed={seed}", *extra]
            all_overrides.append(f"tracking.run_name={name} seed={seed}")
            plan.append((name, seed, load_config(here / study.base, all_overrides)))
    import ray

    started = init_ray()
    results: dict[str, list] = {}
    try:
        for i, (name, seed, cfg) in enumerate(plan, 1):
            start = time.perf_counter()
            res = run(cfg)
            results.setdefault(name, []).append(res)
            print(
                f"[{i}/{len(plan)}] {name} seed={seed}: {time.perf_counter() - start:.0f} s, "
                f"MLflow run {res.run_id}",
                flush=True,
            )
    finally:
        if started:
            ray.shutdown()
    table = format_table(results, study, plan[0][2].rounds, extra)
    out = Path(study.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"written to {out}")
    return table


def format_table(results: dict[str, list], study: StudyConfig, rounds: int, extra) -> str:
    """Markdown: one row per variant, mean +- std over seeds of the last rounds' means."""
    head = "| method | " + " | ".join(t for _, t in COLUMNS) + " | upload MB / round |"
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for name, runs in results.items():
        cells = []
        for key, _ in COLUMNS:
            vals = [_summary(r.history, study.last_rounds, key) for r in runs]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        up = [np.mean([h["comm/upload_bytes"] for h in r.history[1:]]) / 1e6 for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(up):.2f} |")
    note = (
        f"\nMean ± std over seeds {study.seeds} of each run's mean over its last "
        f"{study.last_rounds} of {rounds} rounds"
        + (f"; extra overrides: {' '.join(extra)}" if extra else "")
        + ".\n"
    )
    return "\n".join(lines) + "\n" + note
