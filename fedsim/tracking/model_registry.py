"""The MLflow Model Registry: a run's final global adapter as a registered model version, and
a registered version back as a local peft adapter directory.

``tracking.register_model=NAME`` registers the run's final global adapter (peft's
``adapter_config.json`` + ``adapter_model.safetensors``, and ``base_delta.safetensors`` when a
method folded updates into the base weights) as a new version of the registered model NAME in
the run's store (``tracking.uri``), linked to the run and tagged with the run's method, ranks
and backbone. The version's source is the run's artifact location of a copy logged beside
``global_adapter``, ``registered_adapter/round_NNNN`` (:func:`registered_path`), which no later
resume rewrites; the files live as long as the run's artifacts.

:func:`load_registered_adapter` downloads a version's files to a local directory, which
``peft.PeftModel.from_pretrained(base_model, path)`` loads; :func:`load_registered_peft_model`
does both (and adds ``base_delta.safetensors`` to the base weights first).

MLflow, peft and torch are imported inside the functions that need them, so that ``fedsim
run`` can import this module before it pays for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config.strict import ascii_int
from fedsim.version import __version__

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig
    from fedsim.tracking.tracker import Tracker


_log = logging.getLogger(__name__)

ADAPTER_PATH = "global_adapter"


def registered_path(rounds: int) -> str:
    """Where a run logs the copy of its final global adapter that a registered version points
    at: one directory per final round, never rewritten (``global_adapter`` is rewritten when a
    finished run is extended with ``--resume``; the version registered before must keep its
    files)."""
    return f"registered_adapter/round_{rounds:04d}"


BASE_DELTA_FILE = "base_delta.safetensors"
# the version's source column of MLflow's SQL stores
MAX_SOURCE_LENGTH = 500
_TAG_VALUE_LENGTH = 5000  # far below MLflow's limit; a rank list of 1M clients is cut here
MODEL_DESCRIPTION = (
    "fedsim global LoRA adapter: the final global adapter of fedsim federated simulations, "
    "one version per run, in peft's format (adapter_config.json + adapter_model.safetensors; "
    "base_delta.safetensors beside it when a method updated the base weights). Load a version "
    "with fedsim.tracking.model_registry.load_registered_adapter(name, version) and "
    "peft.PeftModel.from_pretrained(base_model, path)."
)


class RegistryError(LookupError):
    """A registered model or version that cannot be found or read; the message names the
    model, the version and the store."""


def _tag(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _TAG_VALUE_LENGTH else text[: _TAG_VALUE_LENGTH - 3] + "..."


def version_tags(cfg: FedSimConfig, global_rank: int, base_delta: bool) -> dict[str, str]:
    """The tags of a registered version: what trained the adapter and what it loads onto."""
    from fedsim.config.registry import enabled_methods
    from fedsim.tracking.tracker import run_tags

    m = cfg.model
    tags = {
        **run_tags(cfg),  # the run's own: method, merge, objective, scenario, dataset, ...
        "fedsim.version": __version__,
        "fedsim.methods": ",".join(method.name for method in enabled_methods(cfg)) or "none",
        "fedsim.ranks": cfg.clients.ranks,
        "fedsim.global_rank": global_rank,
        "fedsim.backbone": m.backbone,
        "fedsim.rounds": cfg.rounds,
        "fedsim.base_delta": str(base_delta).lower(),
    }
    for key in ("name_or_path", "text_encoder", "vision_encoder"):
        if getattr(m, key):
            tags["fedsim.base_model" if key == "name_or_path" else f"fedsim.{key}"] = getattr(
                m, key
            )
    return {k: _tag(v) for k, v in tags.items()}


def register_run(
    run_id: str,
    name: str,
    tracking_uri: str | None = None,
    *,
    tags: dict[str, str] | None = None,
    description: str | None = None,
    path: str = ADAPTER_PATH,
):
    """Register run ``run_id``'s adapter artifact ``path`` (by default ``global_adapter``) as a
    new version of ``name``.

    The registered model is created when missing. The store is ``tracking_uri`` (None:
    ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``: :func:`fedsim.config.tracking_uri`)
    for the run and the registry alike.

    Returns:
        The new :class:`mlflow.entities.model_registry.ModelVersion` (status READY).

    Raises:
        RegistryError: the version did not become READY.
        mlflow.exceptions.MlflowException: the store refused (an invalid name, a name taken by
            a prompt, no such run).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    from fedsim.config import tracking_uri as resolve_uri

    uri = resolve_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        try:
            client.get_registered_model(name)
        except MlflowException:  # the name is taken, not by a model (MLflow 3: by a prompt)
            raise exc from None
    # The run's artifact location itself (what mlflow.register_model records for a runs:/ URI
    # holding an MLmodel), so the version resolves without going through the run; a location
    # too long for the SQL stores' source column is kept run-relative instead.
    runs_uri = f"runs:/{run_id}/{path}"
    source = RunsArtifactRepository.get_underlying_uri(runs_uri, uri)
    if len(source) > MAX_SOURCE_LENGTH:
        source = runs_uri
    version = client.create_model_version(
        name, source, run_id=run_id, tags=tags, description=description
    )
    if version.status != "READY":
        raise RegistryError(
            f"version {version.version} of registered model {name!r} in the store {uri} is "
            f"{version.status}: {version.status_message}"
        )
    return version


def register_global_adapter(
    cfg: FedSimConfig, tracker: Tracker, global_rank: int, base_delta: bool
):
    """Register the run's final global adapter as a new version of ``tracking.register_model``
    (the engine calls this after logging the adapter to ``global_adapter`` and to its lasting
    copy :func:`registered_path`, which the version points at).

    A registration the store refuses does not fail the run: its metrics and artifacts stay,
    the run is tagged ``fedsim.registry_error`` and a warning names the call that registers it
    later. On success the run is tagged ``fedsim.registered_model`` (``NAME/VERSION``).

    Returns:
        The new model version, or None when the registration failed.
    """
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.register_model
    description = (
        f"fedsim global LoRA adapter of run {tracker.run_id} (experiment "
        f"{cfg.tracking.experiment!r}): {cfg.model.backbone} backbone, aggregation "
        f"{cfg.aggregation.method}, global rank {global_rank}, {cfg.rounds} rounds on "
        f"{cfg.data.dataset}."
        + (f" Base model: {cfg.model.name_or_path}." if cfg.model.name_or_path else "")
        + (
            f" Add {BASE_DELTA_FILE} to the base weights before loading the adapter."
            if base_delta
            else ""
        )
    )
    try:
        version = register_run(
            tracker.run_id,
            name,
            tracker.uri,
            tags=version_tags(cfg, global_rank, bool(base_delta)),
            description=description,
            path=registered_path(cfg.rounds),
        )
    except (MlflowException, RegistryError, OSError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        tracker.client.set_tag(tracker.run_id, "fedsim.registry_error", _tag(reason))
        path = registered_path(cfg.rounds)
        _log.warning(
            "registering the global adapter as tracking.register_model=%s failed: %s. The run "
            "%s and its %s artifact are kept; register it later with "
            "fedsim.tracking.model_registry.register_run(%r, NAME, %r, path=%r)",
            name,
            reason,
            tracker.run_id,
            path,
            tracker.run_id,
            tracker.uri,
            path,
        )
        return None
    tracker.client.set_tag(tracker.run_id, "fedsim.registered_model", f"{name}/{version.version}")
    return version


def _store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is missing (opening it would create an empty one)."""
    from fedsim.tracking.store import store_path  # the one parser of store URIs

    if not uri.startswith("sqlite:///"):
        return True
    path = store_path(uri)
    return path in (None, ":memory:") or Path(path).is_file()


def _resolve_version(client, name: str, version: int | str | None, uri: str):
    """The registered version that ``version`` names: None the latest, a number, an alias."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"no registered model {name!r} in the MLflow store {uri}") from None
    if version is None:
        if not model.latest_versions:
            raise RegistryError(f"registered model {name!r} has no versions in the store {uri}")
        return max(model.latest_versions, key=lambda v: int(v.version))
    # a version number in ASCII digits ("²" passes str.isdigit but is no version), else an alias
    number = version if isinstance(version, int) else ascii_int(str(version))
    try:
        if number is not None:
            return client.get_model_version(name, str(number))
        return client.get_model_version_by_alias(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        kind = "version" if number is not None else "alias"
        raise RegistryError(
            f"registered model {name!r} has no {kind} {version} in the MLflow store {uri}"
        ) from None


def load_registered_adapter(
    name: str,
    version: int | str | None = None,
    tracking_uri: str | None = None,
    dst: str | Path | None = None,
) -> Path:
    """Download a registered version of the global adapter; return the local directory.

    ``peft.PeftModel.from_pretrained(base_model, path)`` loads the directory onto the
    backbone the run trained (``build_backbone(cfg.model, ...).model``, or the Hugging Face
    model of ``model.name_or_path``); when it holds ``base_delta.safetensors``, add those
    updates to the base weights first (:func:`load_registered_peft_model` does).

    Args:
        name: the registered model (``tracking.register_model`` of the runs).
        version: a version number, an alias (``champion``), or None for the latest version.
        tracking_uri: the store (the runs' ``tracking.uri``); None: ``MLFLOW_TRACKING_URI``,
            else ``sqlite:///mlflow.db`` (:func:`fedsim.config.tracking_uri`).
        dst: the directory to download into (created if missing); None: a new temporary one.
            The files are always a copy, never the store's own.

    Raises:
        RegistryError: no such store, model, version or alias, or files that cannot be read;
            the message names the model, the version and the store.
    """
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fedsim.config import tracking_uri as resolve_uri
    from fedsim.tracking.tracker import quiet_mlflow

    quiet_mlflow()
    uri = resolve_uri(tracking_uri)
    if not _store_exists(uri):
        raise RegistryError(f"no MLflow store at {uri} (looking for registered model {name!r})")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = _resolve_version(client, name, version, uri)
    label = f"version {found.version} of registered model {name!r} in the MLflow store {uri}"
    if found.status != "READY":
        raise RegistryError(f"{label} is {found.status}, not READY")
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="fedsim-adapter-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        download_uri = client.get_model_version_download_uri(name, found.version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, dst_path=str(target), tracking_uri=uri
            )
        )
    except (MlflowException, OSError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        raise RegistryError(
            f"the files of {label} ({found.source}) cannot be read: {reason}"
        ) from None
    if not (local / "adapter_config.json").is_file():
        raise RegistryError(f"{label} is not a peft adapter (no adapter_config.json in {local})")
    return local


def load_registered_peft_model(
    base_model,
    name: str,
    version: int | str | None = None,
    tracking_uri: str | None = None,
    dst: str | Path | None = None,
    **peft_options,
):
    """A registered global adapter loaded onto ``base_model`` as a ``peft.PeftModel``.

    ``base_model`` is the backbone the run trained (see :func:`load_registered_adapter`); a
    ``base_delta.safetensors`` beside the adapter is added to its weights (in place) first.
    ``peft_options`` go to ``PeftModel.from_pretrained`` (``is_trainable=True``, ...).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    path = load_registered_adapter(name, version, tracking_uri, dst)
    if (path / BASE_DELTA_FILE).is_file():
        modules = dict(base_model.named_modules())
        with torch.no_grad():
            for prefix, delta in load_file(str(path / BASE_DELTA_FILE)).items():
                module = prefix.removesuffix(".").removeprefix("base_model.model.")
                weight = modules[module].weight
                weight.add_(delta.to(weight))
    return PeftModel.from_pretrained(base_model, str(path), **peft_options)
