"""fedsim: a Ray-distributed simulation engine for federated LoRA fine-tuning of
vision-language models under heterogeneous ranks, data and modalities.

``fedsim.run(config)`` runs one simulation and returns its per-round metrics and MLflow run id.
"""

from fedsim.config import ConfigError, FedSimConfig, load_config

__all__ = ["ConfigError", "FedSimConfig", "load_config", "resume", "run"]
__version__ = "0.1.0"


def run(config=None, **options):
    """Run one simulation; see :func:`fedsim.simulation.run` (``dataset``, ``executor``)."""
    from fedsim.simulation import run as _run

    return _run(config, **options)


def resume(run_dir, overrides=(), **options):
    """Continue a stopped run from its latest checkpoint; see :func:`fedsim.simulation.resume`."""
    from fedsim.simulation import resume as _resume

    return _resume(run_dir, overrides, **options)
