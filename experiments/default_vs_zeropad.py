"""Run the default experiment with FediLoRA and with zero-padding FedAvg on the same seed,
and print a Markdown table of global and personalised accuracy per round.

    python3 experiments/default_vs_zeropad.py [key=value ...]

Overrides apply to both runs (for example ``rounds=5`` or ``seed=1``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fedsim import load_config, run

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "FediLoRA (merge + editing)": [],
    "zero-padding FedAvg": ["aggregation.method=zeropad", "editing.enabled=false"],
}


def main(overrides: list[str]) -> None:
    results = {}
    for name, extra in VARIANTS.items():
        cfg = load_config(HERE / "default.yaml", [*overrides, *extra, "progress=false"])
        start = time.perf_counter()
        results[name] = (run(cfg), time.perf_counter() - start)
        print(f"{name}: {results[name][1]:.0f} s, MLflow run {results[name][0].run_id}", flush=True)
    rounds = len(next(iter(results.values()))[0].history)
    head = " | ".join(f"{n} global acc | {n} pers. acc" for n in results)
    print(f"\n| round | {head} |")
    print("|---" * (1 + 2 * len(results)) + "|")
    for t in range(rounds):
        cells = []
        for res, _ in results.values():
            h = res.history[t]
            pers = h.get("personalized/accuracy_mean")
            cells += [f"{h['global/accuracy']:.3f}", "-" if pers is None else f"{pers:.3f}"]
        print(f"| {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
