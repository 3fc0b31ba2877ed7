"""The frontier comparison's report: scores, rank collapse, bytes and time per merge.

Reads the runs of a study's MLflow experiment (``fedsim compare experiments/frontier.yaml``
or ``frontier_vlm.yaml`` makes them: one child run per variant and seed under the study's
parent run; the latest parent is read) and writes one Markdown table, one row per variant:

- the scores (accuracy and macro-F1, or BLEU-4 and ROUGE-L for a generative model), global
  and personalised: mean +- std over seeds of each run's mean over its last ``--last-rounds``
  rounds, as ``fedsim compare``'s own table;
- ``merge/rank_collapse`` at the final round (docs/algorithms.md §6.1: the share of the global
  adapter's energy in rank dimensions 1..r_min) and the share of the top rank band, with how
  many seeds ended with that band exactly empty;
- upload and download MB per round and seconds per round (rounds 1..R; round 0 trains
  nothing).

Then it says, from these numbers, which merges collapse (the top band's share is exactly 0 at
the final round in at least one seed), which variant scores best on each score, and which
others are inside the seed spread of the best (their mean +- std interval overlaps the
best's), so a reader does not take a difference inside the noise for a ranking. Only the
variants with every seed finished are ranked (a study still running, or one with failed runs,
names the others).

    python3 experiments/frontier.py --experiment fedsim-frontier \\
        [--store sqlite:///mlflow.db] [--last-rounds 3] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

import numpy as np

CLASSIFIER = [
    ("global/accuracy", "global acc"),
    ("global/macro_f1", "global macro-F1"),
    ("personalized/accuracy_mean", "pers. acc"),
]
GENERATIVE = [
    ("global/bleu", "global BLEU-4"),
    ("global/rouge_l", "global ROUGE-L"),
    ("personalized/bleu_mean", "pers. BLEU-4"),
]
COLLAPSE = "merge/rank_collapse"
BAND = re.compile(r"^merge/energy_share_band_(\d+)-(\d+)$")
UPLOAD, DOWNLOAD, ROUND_S = "comm/upload_bytes", "comm/download_bytes", "time/round_s"


def collect(store: str, experiment: str) -> dict[str, list[dict]]:
    """The latest study's finished child runs, by variant: each a dict of metric -> {step:
    value} (every metric the run logged) plus its ``seed``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"frontier: no experiment {experiment!r} in {store}")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    children = defaultdict(list)
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            children[parent].append(run)
    parents = [r for r in runs if r.info.run_id in children]
    if not parents:
        raise SystemExit(f"frontier: experiment {experiment!r} holds no study (no child runs)")
    latest = max(parents, key=lambda r: r.info.start_time)
    out: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(children[latest.info.run_id], key=lambda r: r.info.start_time):
        if run.info.status != "FINISHED":
            continue
        name = run.info.run_name or run.info.run_id
        match = re.search(r"\s+seed=(\d+)$", name)
        variant = name[: match.start()] if match else name
        history = {  # system metrics: one read each per run, and no row reads them
            key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics
            if not key.startswith("system/")
        }
        history["seed"] = int(match.group(1)) if match else 0
        out[variant].append(history)
    return dict(out)


def _last_mean(history: dict, key: str, last: int) -> float | None:
    steps = history.get(key)
    if not steps:
        return None
    values = [steps[s] for s in sorted(steps)[-last:]]
    return float(np.mean(values))


def _final(history: dict, key: str) -> float | None:
    steps = history.get(key)
    return float(steps[max(steps)]) if steps else None


def _per_round(history: dict, key: str) -> float | None:
    steps = {s: v for s, v in (history.get(key) or {}).items() if s >= 1}
    return float(np.mean(list(steps.values()))) if steps else None


def _stats(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and (population) std over the seeds that have the value; None if none has."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return float(np.mean(got)), float(np.std(got))


def top_band(runs: list[dict]) -> str | None:
    """The name of the highest rank band these runs logged (None: no band metric)."""
    bands = {k: int(m.group(2)) for r in runs for k in r if (m := BAND.match(str(k)))}
    return max(bands, key=bands.get) if bands else None


def summarise(results: dict[str, list[dict]], last: int) -> dict:
    """Per variant: the scores' (mean, std), rank collapse and top band at the final round,
    the seeds whose top band ended exactly empty, MB up/down and seconds per round."""
    generative = any("global/bleu" in r for runs in results.values() for r in runs)
    scores = GENERATIVE if generative else CLASSIFIER
    rows = {}
    for variant, runs in results.items():
        band = top_band(runs)
        finals = [_final(r, band) for r in runs] if band else []
        rows[variant] = {
            "seeds": sorted(r["seed"] for r in runs),
            "scores": {k: _stats([_last_mean(r, k, last) for r in runs]) for k, _ in scores},
            "collapse": _stats([_final(r, COLLAPSE) for r in runs]),
            "band": band,
            "top_band": _stats(finals),
            "empty_top": sum(1 for v in finals if v is not None and v == 0.0),
            "measured": sum(1 for v in finals if v is not None),
            "upload_mb": _stats([_mb(_per_round(r, UPLOAD)) for r in runs]),
            "download_mb": _stats([_mb(_per_round(r, DOWNLOAD)) for r in runs]),
            "round_s": _stats([_per_round(r, ROUND_S) for r in runs]),
        }
    return {"scores": scores, "rows": rows}


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def _fmt(stat: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def complete(rows: dict) -> dict:
    """The variants that finished as many seeds as the most complete one (a mean over fewer
    seeds, or a std over one, is not compared with the others)."""
    most = max((len(row["seeds"]) for row in rows.values()), default=0)
    return {v: row for v, row in rows.items() if len(row["seeds"]) == most}


def best_and_ties(rows: dict, key: str) -> tuple[str, list[str]] | None:
    """The variant with the best mean on ``key`` and the others whose mean +- std interval
    overlaps the best's."""
    have = {v: row["scores"][key] for v, row in rows.items() if row["scores"].get(key)}
    if not have:
        return None
    best = max(have, key=lambda v: have[v][0])
    low = have[best][0] - have[best][1]
    ties = [v for v, (m, s) in have.items() if v != best and m + s >= low]
    return best, ties


def report(summary: dict, last: int, experiment: str) -> str:
    scores, rows = summary["scores"], summary["rows"]
    head = ["method", "seeds", *[t for _, t in scores], "rank collapse (final)"]
    head += ["top band (final)", "up MB / round", "down MB / round", "s / round"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for variant, row in rows.items():
        band = row["band"].removeprefix("merge/energy_share_band_") if row["band"] else ""
        top = "-" if row["top_band"] is None else f"{_fmt(row['top_band'])} ({band})"
        cells = [variant, str(len(row["seeds"]))]
        cells += [_fmt(row["scores"][k]) for k, _ in scores]
        cells += [_fmt(row["collapse"]), top]
        cells += [_fmt(row["upload_mb"], 2), _fmt(row["download_mb"], 2), _fmt(row["round_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for row in rows.values() for s in row["seeds"]})
    text = [
        f"Study `{experiment}`, seeds {seeds}. Scores: mean ± std over seeds of each run's mean "
        f"over its last {last} rounds. Rank collapse: the share of the global adapter's energy "
        "in rank dimensions 1..r_min at the final round (docs/algorithms.md §6.1); top band: "
        "the share of the highest rank band. Bytes and seconds: per round, rounds 1 on.",
        "\n".join(lines),
    ]
    collapsed = [
        f"{v} (top band exactly empty in {row['empty_top']} of {row['measured']} seeds)"
        for v, row in rows.items()
        if row["empty_top"]
    ]
    unmeasured = [v for v, row in rows.items() if row["collapse"] is None]
    text.append(
        "**Collapse.** "
        + (
            "Merges whose top rank band ended exactly empty: " + "; ".join(collapsed) + "."
            if collapsed
            else "No merge ended with its top rank band exactly empty."
        )
        + (
            " Not measured (no global product to measure, docs/algorithms.md §6.1): "
            + ", ".join(unmeasured)
            + "."
            if unmeasured
            else ""
        )
    )
    compared = complete(rows)
    if len(compared) < len(rows):
        most = len(next(iter(compared.values()))["seeds"])
        short = [
            f"{v} ({len(row['seeds'])} of {most} seeds)"
            for v, row in rows.items()
            if v not in compared
        ]
        text.append("**Not ranked** (not every seed finished): " + ", ".join(short) + ".")
    for key, title in scores:
        found = best_and_ties(compared, key)
        if found is None:
            continue
        best, ties = found
        mean, std = rows[best]["scores"][key]
        tied = (
            "inside its seed spread (mean ± std intervals overlap): " + ", ".join(ties)
            if ties
            else "no other variant is inside its seed spread"
        )
        text.append(f"**{title}.** Best: {best} ({mean:.3f} ± {std:.3f}); {tied}.")
    return "\n\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="the MLflow store")
    parser.add_argument("--experiment", default="fedsim-frontier", help="the study's experiment")
    parser.add_argument("--last-rounds", type=int, default=3, help="rounds each score averages")
    parser.add_argument("--output", help="also write the report here")
    args = parser.parse_args(argv)
    if args.last_rounds < 1:
        parser.error("--last-rounds must be at least 1")
    results = collect(args.store, args.experiment)
    text = report(summarise(results, args.last_rounds), args.last_rounds, args.experiment)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
