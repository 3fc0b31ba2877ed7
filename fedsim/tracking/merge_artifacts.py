"""The merge diagnostics' artifacts of a run (``merge/round_NNNN.json``,
``clients/round_NNNN.json``, ``data/clients.json``, ``data/classes.tsv``): where they are and
how ``fedsim inspect`` reads them back, each checked to hold what fedsim wrote there.

A damaged artifact (truncated, edited, from another program) is a :class:`ConfigError` naming
its path and the run, never a ``KeyError`` or a ``ValueError`` from deep in the rendering.
"""

from __future__ import annotations

import math
import re

from fedsim.errors import ConfigError
from fedsim.tracking.reader import damaged, read_artifact, read_json, read_table

_ROUND_FILE = re.compile(r"round_(\d+)\.json$")
_HISTOGRAM = re.compile(r"\s*(\d+(\s+\d+)*)?\s*")  # label counts, e.g. "3 0 12"


def merge_artifact(t: int) -> str:
    """The artifact path of round ``t``'s per-dimension diagnostics."""
    return f"merge/round_{t:04d}.json"


def read_round(client, run_id: str, t: int, where: str) -> tuple:
    """Round ``t``'s client rows, the clients' data rows, the class names and the
    per-dimension diagnostics, each artifact checked.

    Args:
        client: the :class:`mlflow.MlflowClient` of the run's store.
        run_id: the run.
        t: the round.
        where: a directory to download the artifacts into.

    Returns:
        ``(rows, clients, classes, dims)``: the round's client rows, the clients' data rows by
        client id, the class names and the per-dimension vectors.

    Raises:
        ConfigError: naming ``--round`` when the round has no diagnostics, or the path of an
            artifact that is damaged.
    """
    dims_path, rows_path = merge_artifact(t), f"clients/round_{t:04d}.json"
    dims_text = read_artifact(client, run_id, dims_path, where)
    rows = read_table(read_artifact(client, run_id, rows_path, where), rows_path, run_id)
    if dims_text is None or not rows:
        merged = sorted(
            int(match.group(1))
            for a in client.list_artifacts(run_id, "merge")
            if (match := _ROUND_FILE.search(a.path))
        )
        known = (
            f"rounds with diagnostics: {_ranges(merged)}"
            if merged
            else (
                "the run logged no merge diagnostics (tracking.merge_diagnostics=false, or a run "
                "made before they existed)"
            )
        )
        raise ConfigError(
            "--round", f"run {run_id} has no merge diagnostics for round {t}; {known}"
        )
    _check_rows(rows, rows_path, run_id)
    data_path = "data/clients.json"
    clients = read_table(read_artifact(client, run_id, data_path, where), data_path, run_id)
    _check_clients(clients, data_path, run_id)
    classes_text = read_artifact(client, run_id, "data/classes.tsv", where) or ""
    classes = [line.split("\t", 1)[1] for line in classes_text.splitlines() if "\t" in line]
    dims = _check_dims(read_json(dims_text, dims_path, run_id), dims_path, run_id)
    return rows, {r["client"]: r for r in clients}, classes, dims


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rows(rows: list[dict], path: str, run_id: str) -> None:
    """A round's client rows: an id each, numbers (or nothing) where numbers are shown."""
    for i, row in enumerate(rows):
        if not isinstance(row.get("client_id"), (int, str)):
            raise damaged(path, run_id, f"row {i} has no client id")
        for column in ("contribution", "contribution_top", "share"):
            value = row.get(column)
            if value is not None and not _is_number(value):
                raise damaged(path, run_id, f"row {i}: {column} is {value!r}, not a number")


def _check_clients(rows: list[dict], path: str, run_id: str) -> None:
    """The clients' data rows: a client id each, a label histogram of counts."""
    for i, row in enumerate(rows):
        if not isinstance(row.get("client"), (int, str)):
            raise damaged(path, run_id, f"row {i} has no client id")
        labels = row.get("labels")
        if labels is not None and not _HISTOGRAM.fullmatch(str(labels)):
            raise damaged(path, run_id, f"row {i}: labels {labels!r} is no list of counts")


def _check_dims(dims, path: str, run_id: str) -> dict:
    """The per-dimension diagnostics: equally long lists of numbers, coverage of counts."""
    if not isinstance(dims, dict):
        raise damaged(path, run_id, f"a {type(dims).__name__}, not a mapping of vectors")
    coverage = dims.get("coverage")
    if not isinstance(coverage, list) or not coverage:
        raise damaged(path, run_id, "no 'coverage' list")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in coverage):
        raise damaged(path, run_id, "'coverage' holds values that are no client counts")
    for name in ("weight", "merge_weight", "update_norm"):
        values = dims.get(name)
        if values is None and name == "update_norm":  # runs before it was logged lack it
            continue
        if not isinstance(values, list) or len(values) != len(coverage):
            raise damaged(path, run_id, f"no {name!r} list as long as 'coverage'")
        if not all(_is_number(v) for v in values):
            raise damaged(path, run_id, f"{name!r} holds values that are no finite numbers")
    if "energy" in dims:  # runs before it was logged lack it
        _check_energy(dims["energy"], path, run_id)
    return dims


_BAND = re.compile(r"\d+-\d+")


def _check_energy(energy, path: str, run_id: str) -> None:
    """The energy per rank band: band names ``LO-HI`` and as many finite shares and energies
    per band, for the adapter and for each module."""
    if not isinstance(energy, dict):
        raise damaged(path, run_id, "'energy' is no mapping")
    bands = energy.get("bands")
    if not isinstance(bands, list) or not bands:
        raise damaged(path, run_id, "'energy' has no 'bands' list")
    if not all(isinstance(b, str) and _BAND.fullmatch(b) for b in bands):
        raise damaged(path, run_id, "'energy' bands are not all of the form LO-HI")
    rows = [("energy", energy.get("energy")), ("energy", energy.get("share"))]
    modules = energy.get("modules", {})
    if not isinstance(modules, dict) or not all(isinstance(m, dict) for m in modules.values()):
        raise damaged(path, run_id, "'energy' modules are no mapping of mappings")
    rows += [(f"energy of module {name!r}", m.get("share")) for name, m in modules.items()]
    for what, values in rows:
        if not isinstance(values, list) or len(values) != len(bands):
            raise damaged(path, run_id, f"{what}: no list with one value per band")
        if not all(_is_number(v) and v >= 0 for v in values):
            raise damaged(path, run_id, f"{what}: values that are no non-negative numbers")


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    return (
        f"{values[0]}-{values[-1]}"
        if values == list(range(values[0], values[-1] + 1))
        else (", ".join(map(str, values)))
    )
