"""Find the rounds where global accuracy drops and explain each with the merge diagnostics.

Reads every run of a study's MLflow experiment (``fedsim compare experiments/merge_study.yaml``
makes them), finds each round ``t`` whose global accuracy is more than ``--threshold`` below
round ``t - 1``'s, and prints per drop: the merged clients and ranks, the client with the
largest share of the merged update (its rank, share, the part of its contribution on its own
top band, the labels it holds), and the dimension band whose update norm was largest against
the same run's median for that band, with who covered it. Then, per merge method, the drop
count and how the largest client share and the top band's update norm compare between drop
rounds and the other rounds.

    python3 experiments/merge_study.py [--store sqlite:///mlflow.db]
        [--experiment fedsim-merge-study] [--threshold 0.10] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedsim.tracking.merge_report import read_table  # noqa: E402

SCORE = "global/accuracy"


def _labels(histogram: str, classes: list[str]) -> str:
    counts = np.array([int(v) for v in str(histogram).split()])
    if counts.sum() == 0:
        return "-"
    order = np.argsort(-counts, kind="stable")[:2]
    top = ", ".join(f"{classes[i]} {counts[i] / counts.sum():.0%}" for i in order if counts[i])
    return f"{top}; {int((counts > 0).sum())} of {len(counts)} classes"


def collect(store: str, experiment: str) -> list[dict]:
    """Every finished run of ``experiment``: its method label, seed, accuracy per round, and
    per merged round the diagnostics and client table."""
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {store}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="merge-study-") as tmp:
        for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, SCORE)}
            if not history:  # a study's parent run
                continue
            rid = run.info.run_id
            where = Path(tmp) / rid
            where.mkdir()
            merged = [
                int(re.search(r"(\d+)", a.path.rsplit("/", 1)[-1]).group(1))
                for a in client.list_artifacts(rid, "merge")
            ]
            rounds = {}
            for t in merged:
                dims = json.loads(
                    Path(
                        client.download_artifacts(rid, f"merge/round_{t:04d}.json", str(where))
                    ).read_text()
                )
                rows = read_table(
                    Path(
                        client.download_artifacts(rid, f"clients/round_{t:04d}.json", str(where))
                    ).read_text()
                )
                rounds[t] = {"dims": dims, "rows": rows}
            data = read_table(
                Path(client.download_artifacts(rid, "data/clients.json", str(where))).read_text()
            )
            classes_file = client.download_artifacts(rid, "data/classes.tsv", str(where))
            classes = [
                line.split("\t", 1)[1] for line in Path(classes_file).read_text().splitlines()
            ]
            name = run.info.run_name or rid
            runs.append(
                {
                    "run_id": rid,
                    "method": re.sub(r"\s+seed=\d+$", "", name),
                    "seed": int(run.data.tags.get("fedsim.seed", run.data.params.get("seed", 0))),
                    "history": history,
                    "rounds": rounds,
                    "clients": {r["client"]: r for r in data},
                    "classes": classes,
                    "ranks": sorted({r["rank"] for r in data}),
                }
            )
    return sorted(runs, key=lambda r: (r["method"], r["seed"]))


def explain(run: dict, t: int) -> dict:
    """What the diagnostics say about round ``t`` of ``run``."""
    info = run["rounds"][t]
    dims, rows = info["dims"], [r for r in info["rows"] if r.get("status") == "ok"]
    width = len(dims["coverage"])
    top = max(rows, key=lambda r: r["share"])
    # no top band where clients hold other dimensions than their leading ones (Fed-PLoRA)
    own = None
    if top.get("contribution_top") is not None:
        own = (top["contribution_top"] / top["contribution"]) ** 2 if top["contribution"] else 0.0
    holder = run["clients"].get(top["client_id"], {})
    # the dimensions a single merged client covers, and their part of the global update
    lone = [j for j in range(width) if dims["coverage"][j] == 1]
    total = float(np.sum(np.square(dims["update_norm"])))
    # FLoRA's global adapter restarts every round (the merge goes into the base weights):
    # no update on the adapter's dimensions to split
    lone_share = None
    if total > 0:
        lone_share = float(np.sum(np.square([dims["update_norm"][j] for j in lone]))) / total
    return {
        "clients": ", ".join(
            f"{r['client_id']}(r{r['rank']})" for r in sorted(rows, key=lambda r: r["client_id"])
        ),
        "top": top,
        "own": own,
        "labels": _labels(holder["labels"], run["classes"]) if "labels" in holder else "-",
        "lone": f"{lone[0]}-{lone[-1]}" if lone else "-",
        "lone_share": (lone_share if lone else 0.0) if lone_share is not None else None,
    }


def drops(run: dict, threshold: float) -> list[tuple[int, float, float]]:
    """``(t, score before, score after)`` for every round whose score fell by more than
    ``threshold`` from the round before."""
    h = run["history"]
    steps = sorted(h)
    return [
        (b, h[a], h[b])
        for a, b in zip(steps, steps[1:])
        if h[a] - h[b] > threshold and b in run["rounds"]
    ]


def render(runs: list[dict], threshold: float) -> str:
    lines = [
        f"Rounds where global accuracy fell by more than {threshold * 100:.0f} points from the "
        "round before, with what the merge diagnostics show.",
        "",
        "| method | seed | round | accuracy | merged clients (rank) | largest share: client, rank, "
        "share, on its top band, labels it holds | dims one client covers: their part of the "
        "global update |",
        "|---|---|---|---|---|---|---|",
    ]
    stats: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        found = drops(run, threshold)
        dropped = {t for t, _, _ in found}
        h = run["history"]
        explained = {t: explain(run, t) for t in run["rounds"]}  # once per round
        for t, info in run["rounds"].items():
            rows = [r for r in info["rows"] if r.get("status") == "ok"]
            key = "drop" if t in dropped else "other"
            share = max(r["share"] for r in rows)
            lone = explained[t]["lone_share"]
            stats[run["method"]][f"share_{key}"].append(share)
            if lone is not None:
                stats[run["method"]][f"lone_{key}"].append(lone)
            if t - 1 in h and t in h:
                change = h[t] - h[t - 1]
                stats[run["method"]]["pairs"].append((share, lone or 0.0, change))
                if t >= 2:  # round 1's jump from the untrained adapter says nothing here
                    alone = any(c == 1 for c in info["dims"]["coverage"])
                    stats[run["method"]]["alone" if alone else "shared"].append(change)
        stats[run["method"]]["drops"].append(len(found))
        for t, before, after in found:
            e = explained[t]
            top = e["top"]
            lines.append(
                f"| {run['method']} | {run['seed']} | {t} | {before:.3f} -> {after:.3f} | "
                f"{e['clients']} | {top['client_id']}, r{top['rank']}, {top['share']:.0%}, "
                + ("-" if e["own"] is None else f"{e['own']:.0%}")
                + f", {e['labels']} | {e['lone']}: "
                + ("-" if e["lone_share"] is None else f"{e['lone_share']:.0%}")
                + " |"
            )
    if len(lines) == 4:
        lines.append("| (none) | | | | | | |")
    lines += [
        "",
        "Per method, over every merged round of every seed: the largest client's share of the "
        "merged update and the part of the global update on dimensions one client covered, in "
        "the drop rounds and the others, and their correlation with the round's change in "
        "global accuracy.",
        "",
        "| method | runs | drops | largest share: drops / others | one-client dims' part of "
        "the update: drops / others | corr(largest share, change) | corr(one-client part, "
        "change) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in stats.items():

        def mean(v):
            return f"{np.mean(v):.0%}" if v else "-"

        pairs = np.array(s["pairs"]) if s["pairs"] else np.zeros((0, 3))

        def corr(i, pairs=pairs):
            if len(pairs) < 3 or np.std(pairs[:, i]) == 0 or np.std(pairs[:, 2]) == 0:
                return "-"
            return f"{np.corrcoef(pairs[:, i], pairs[:, 2])[0, 1]:+.2f}"

        lines.append(
            f"| {method} | {len(s['drops'])} | {sum(s['drops'])} | {mean(s['share_drop'])} / "
            f"{mean(s['share_other'])} | {mean(s['lone_drop'])} / {mean(s['lone_other'])} | "
            f"{corr(0)} | {corr(1)} |"
        )
    lines += [
        "",
        "Per method, from round 2 on: the rounds in which some rank dimension was covered by "
        "one merged client alone (a high-rank client sampled without a peer of its rank) "
        "against the others: how many, the mean and standard deviation of the change in "
        "global accuracy, and how many fell by more than the threshold.",
        "",
        "| method | rounds with a lone coverer | change: mean ± std | drops | other rounds | "
        "change: mean ± std | drops |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in stats.items():
        cells = []
        for key in ("alone", "shared"):
            v = s[key]
            mean = f"{np.mean(v) * 100:+.1f} ± {np.std(v) * 100:.1f} pts" if v else "-"
            cells += [str(len(v)), mean, str(sum(c < -threshold for c in v))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="fedsim-merge-study")
    parser.add_argument("--threshold", type=float, default=0.10)
    parser.add_argument("--output", default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    text = render(collect(args.store, args.experiment), args.threshold)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text)
    return text


if __name__ == "__main__":
    main()
