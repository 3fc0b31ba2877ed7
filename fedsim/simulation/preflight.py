"""Checks that run before Ray starts: everything a run will write to or read from must work.

A user mistake in a location (an unwritable checkpoint directory, a tracking URI with an unknown
scheme, a dataset split that cannot be made) is found here in seconds, as a one-line
:class:`~fedsim.config.ConfigError` naming the key, instead of after the actors have started.
Nothing here leaves state behind except what the run would create anyway: the MLflow store and
its experiment (tagged once, to prove the store takes writes).
"""

from __future__ import annotations

from pathlib import Path

from fedsim.config import ConfigError, FedSimConfig, is_generative
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
    """Load the dataset, make every client's split and find the model: the run's inputs.

    Returns:
        The loaded dataset (its ``skipped`` rows are logged once the MLflow run exists).

    Raises:
        ConfigError: a file that cannot be read, a split that cannot be made, a model that
            cannot be found (each names its key).
    """
    from fedsim.data.federated import FederatedData, load_dataset

    try:
        dataset = load_dataset(cfg)
    except OSError as exc:  # the dataset cache (data.cache_dir or $FEDSIM_CACHE)
        raise ConfigError(
            "data.cache_dir", f"cannot build the dataset cache: {one_line(exc)}"
        ) from None
    FederatedData(cfg, dataset)
    if is_generative(cfg):
        from fedsim.models.vlm import check_model_source

        check_model_source(cfg.model)
    else:
        from fedsim.config.registry import backbone_spec

        for key in backbone_spec(cfg.model.backbone).hub_configs:
            check_hf_config(getattr(cfg.model, key), f"model.{key}")
    return dataset


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
