"""Checks that run before Ray starts: everything a run will write to or read from must work.

A user mistake in a location (an unwritable checkpoint directory, a tracking URI with an unknown
scheme, a dataset split that cannot be made), in a model (a file that is no model directory, a
truncated weight file, LoRA targets that match the whole model) or in the data (a row longer
than the model's context, a test split that is the training data) is found here in seconds,
as a one-line :class:`~fedsim.config.ConfigError` naming the key, instead of after the actors
have started.
Nothing here leaves state behind except what the run would create anyway: the MLflow store and
its experiment (tagged once, to prove the store takes writes).
"""

from __future__ import annotations

from pathlib import Path

from fedsim.config import ConfigError, FedSimConfig, is_generative, resolve_ranks
from fedsim.errors import one_line
from fedsim.models.hub import check_hf_config
from fedsim.tracking.store import check_tracking, check_writable_dir


def check_directories(cfg: FedSimConfig, run_dir: Path | None = None) -> None:
    """Check the directories the run writes to: checkpoints and the dataset cache.

    Args:
        cfg: the resolved config.
        run_dir: a resumed run's directory (its checkpoints are written there).

    Raises:
        ConfigError: naming the key of the first directory that cannot be written.
    """
    if cfg.checkpoint.every > 0:
        if run_dir is not None:
            check_writable_dir(run_dir, "--resume")
        else:
            check_writable_dir(cfg.checkpoint.dir, "checkpoint.dir")
    if cfg.data.cache_dir:
        check_writable_dir(cfg.data.cache_dir, "data.cache_dir")


def check_outputs(cfg: FedSimConfig, run_dir: Path | None = None) -> None:
    """Check every place the run writes to: the directories, then the MLflow store."""
    check_directories(cfg, run_dir)
    check_tracking(cfg)


def check_inputs(cfg: FedSimConfig):
    """Load the dataset, check the model and the rows against it, and make every client's
    split: the run's inputs, checked before any worker loads them.

    A generative model is checked without its weights (:mod:`fedsim.models.vlm_check`: its
    files, processor, LoRA targets and their rank cap against ``clients.ranks``), and every
    row must fit its context (:mod:`fedsim.tasks.context`).

    Returns:
        The loaded dataset, without the rows ``data.on_error=skip`` left out (its ``skipped``
        rows are logged once the MLflow run exists).

    Raises:
        ConfigError: a file that cannot be read, a split that cannot be made, a model that
            cannot be found or used, a row that does not fit it (each names its key).
    """
    from fedsim.data.federated import FederatedData, load_dataset

    try:
        dataset = load_dataset(cfg)
    except OSError as exc:  # the dataset cache (data.cache_dir or $FEDSIM_CACHE)
        raise ConfigError(
            "data.cache_dir", f"cannot build the dataset cache: {one_line(exc)}"
        ) from None
    if is_generative(cfg):
        from fedsim.models.vlm_check import inspect_generative
        from fedsim.tasks.context import fit_rows

        facts = inspect_generative(cfg.model)
        check_ranks(resolve_ranks(cfg.clients, cfg.seed), facts.max_rank)
        dataset = fit_rows(cfg, dataset, facts.codec)
    else:
        from fedsim.config.registry import backbone_spec

        for key in backbone_spec(cfg.model.backbone).hub_configs:
            check_hf_config(getattr(cfg.model, key), f"model.{key}")
    FederatedData(cfg, dataset)
    return dataset


def check_ranks(ranks: list[int], max_rank: int) -> None:
    """Every client's rank must fit the backbone's LoRA target modules.

    Raises:
        ConfigError: (``clients.ranks``) naming the first client whose rank is too large.
    """
    for cid, r in enumerate(ranks):
        if r > max_rank:
            raise ConfigError(
                "clients.ranks",
                f"client {cid} has rank {r} but the backbone's LoRA target modules admit at "
                f"most rank {max_rank}",
            )


def preflight(cfg: FedSimConfig, run_dir: Path | None = None, run_id: str | None = None):
    """Every check of this module: directories (instant), inputs, then the MLflow store
    (which imports MLflow and may wait for a server).

    Args:
        cfg: the resolved config.
        run_dir: a resumed run's directory (checked instead of ``checkpoint.dir``).
        run_id: a resumed run's MLflow run id (it must be in the store).

    Returns:
        The loaded dataset (see :func:`check_inputs`).
    """
    check_directories(cfg, run_dir)
    dataset = check_inputs(cfg)
    check_tracking(cfg, run_id)
    return dataset
