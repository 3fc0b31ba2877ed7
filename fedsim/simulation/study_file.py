"""A study file: what it holds (:class:`StudyConfig`), how it is read and checked
(:func:`load_study`), how many runs it plans (:func:`check_size`) and its grid cells.

A study YAML names a base experiment, overrides for all runs, the seeds, the variants (each a
list of overrides) and optionally grids (each a mapping of keys to value lists; a grid's cells
are the product of its lists, and the study's cells are the union of its grids). It is read
within the limits of :mod:`fedsim.config.yaml_file`, and so is its base; a study of more than
:data:`MAX_RUNS` runs is refused before any run's config is built. Running it is
:func:`fedsim.simulation.study.run_study`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim import experiments
from fedsim.config import ConfigError
from fedsim.config.arguments import check_path
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
        parallel: how many runs at once on the Ray cluster (0: as many as its resources hold
            with each run's own actor pool; see :mod:`fedsim.simulation.lanes`).
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
    parallel: int = 0


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
    if study.parallel < 0:
        raise ConfigError(
            "parallel", f"{path}: must be >= 0 (0: as many runs at once as the cluster holds)"
        )
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
