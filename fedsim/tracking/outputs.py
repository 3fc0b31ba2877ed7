"""What a finished run leaves in MLflow besides its metrics: the final global adapter (peft
format, plus base-weight updates a LoRA cannot hold), the clients' personalised adapters, plots.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from aggregation import unfold_scaling
from fedsim.config import resolve_ranks
from fedsim.config.registry import enabled_methods
from fedsim.messages import ExportedAdapter
from fedsim.models.scaling import client_scaling
from fedsim.tracking.merge_report import merge_figure
from fedsim.tracking.model_registry import register_global_adapter, registered_path
from fedsim.tracking.tracker import plot_history


def _write_adapter(pool, directory: str, state, cfg, info, rank: int, global_rank: int) -> None:
    """Write ``state`` as a peft adapter into ``directory``; a client actor, which holds the
    model stack, makes the files (the driver never imports peft)."""
    files = pool.call_first(
        "peft_files", state, info.target_modules, rank, global_rank, info.dense_modules
    )
    for name, content in files.items():
        (Path(directory) / name).write_bytes(content)


def log_final_outputs(cfg, info, ex, pool, server, tracker, result) -> None:
    """Log the final global adapter (peft format) and the plots (``result``: the run's
    :class:`fedsim.simulation.run.RunResult`).

    Base-weight updates that a method folded in and a LoRA adapter cannot hold (FedEx-LoRA's
    residuals) go beside it as ``base_delta.safetensors`` (module prefix to ``dW``, to add to
    the pretrained weights before loading the adapter). With ``tracking.register_model`` the
    logged adapter becomes a new version of that registered model
    (:mod:`fedsim.tracking.model_registry`), named in ``result.registered_model``.
    """
    if cfg.tracking.save_adapter:
        exported: ExportedAdapter = ex.get(ex.call(server, "export"))
        rank = exported.rank
        state = unfold_scaling(exported.adapter, client_scaling(cfg.lora, rank, rank))
        with tempfile.TemporaryDirectory(prefix="fedsim-") as tmp:
            _write_adapter(pool, tmp, state, cfg, info, rank, rank)
            if exported.base is not None:
                from safetensors.torch import save_file

                base = {k: v.contiguous() for k, v in exported.base.items()}
                save_file(base, str(Path(tmp) / "base_delta.safetensors"))
            tracker.log_dir(tmp, "global_adapter")
            if cfg.tracking.register_model is not None:  # the files the version points at
                tracker.log_dir(tmp, registered_path(cfg.rounds))
        if cfg.tracking.register_model is not None and tracker.lost is None:
            # (a store lost while the adapter was logged has no version to register)
            version = register_global_adapter(cfg, tracker, rank, exported.base is not None)
            if version is not None:
                result.registered_model = f"{cfg.tracking.register_model}/{version.version}"
    if cfg.tracking.plots:
        import matplotlib.pyplot as plt

        figures = {"plots/curves.png": plot_history(result.history)}
        if result.merge:
            figures["plots/merge.png"] = merge_figure(result.history, result.merge)
        for method in enabled_methods(cfg):
            figures.update(method.figures(result.clients))
        for name, fig in figures.items():
            tracker.log_figure(fig, name)
            plt.close(fig)


def log_client_adapters(cfg, info, driver, tracker) -> None:
    """Log each client's last personalised adapter as ``clients/cNNNNNN`` (peft format).

    A client's personalised adapter is its last upload (after editing) with the private
    tensors its sharing policy keeps; clients that never trained since this process started
    (or since a resume) have none.
    """
    global_rank = max(resolve_ranks(cfg.clients, cfg.seed))
    for cid, (ref, rank) in sorted(driver.last_upload.items()):
        upload = driver.ex.get(ref)
        shared = unfold_scaling(upload.update, client_scaling(cfg.lora, rank, global_rank))
        private = driver.ex.get(driver.states[cid]).private
        state = {**shared, **private}
        with tempfile.TemporaryDirectory(prefix="fedsim-") as tmp:
            _write_adapter(driver.pool, tmp, state, cfg, info, rank, global_rank)
            tracker.log_dir(tmp, f"clients/c{cid:06d}")
