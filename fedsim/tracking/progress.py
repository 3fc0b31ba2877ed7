"""Console output of a run: a progress bar with live metrics (stderr), then a summary table
with the MLflow run id and link (stdout); see :mod:`fedsim.logs` for the rule."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_SHORT = {
    "global/accuracy": "acc",
    "global/macro_f1": "f1",
    "personalized/accuracy_mean": "pers_acc",
    "global/bleu": "bleu",
    "global/rouge_l": "rougeL",
    "train/loss_mean": "loss",
}


class RoundProgress:
    """A tqdm bar over rounds whose postfix shows the last round's key metrics."""

    def __init__(self, rounds: int, enabled: bool = True, initial: int = 0):
        if not 0 <= initial <= rounds:
            raise ValueError(f"initial={initial} rounds done is outside 0..{rounds}")
        self.bar = tqdm(
            total=rounds,
            initial=initial,
            desc="rounds",
            unit="round",
            disable=not enabled,
            file=sys.stderr,
        )

    def update(self, round_idx: int, metrics: dict[str, float]) -> None:
        shown = {short: f"{metrics[k]:.3f}" for k, short in _SHORT.items() if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        if round_idx > 0:
            self.bar.update(1)
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    @staticmethod
    def summary(
        history: list[dict[str, float]],
        run_id: str,
        ui_command: str,
        registered_model: str | None = None,
    ) -> None:
        """Print (to stdout) a per-round table, the MLflow run id and how to open the run in
        the MLflow UI, and the registered model version (``NAME/VERSION``) if there is one."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title="fedsim run summary")
        columns = [
            ("round", "round", "{:.0f}"),
            ("global/accuracy", "global acc", "{:.4f}"),
            ("global/macro_f1", "global F1", "{:.4f}"),
            ("personalized/accuracy_mean", "pers. acc (mean)", "{:.4f}"),
            ("personalized/macro_f1_mean", "pers. F1 (mean)", "{:.4f}"),
            ("global/bleu", "global BLEU", "{:.4f}"),
            ("global/rouge_l", "global ROUGE-L", "{:.4f}"),
            ("personalized/rouge_l_mean", "pers. ROUGE-L", "{:.4f}"),
            ("train/loss_mean", "train loss", "{:.4f}"),
            ("editing/edited_tensors", "edited", "{:.0f}"),
            ("time/round_s", "time s", "{:.1f}"),
        ]
        # only the columns this run has (a classifier's or a generative model's metrics)
        columns = [c for c in columns if any(c[0] in h for h in history)]
        for _, title, _ in columns:
            table.add_column(title, justify="right")
        for h in history:
            table.add_row(*[fmt.format(h[k]) if k in h else "-" for k, _, fmt in columns])
        console = Console()
        console.print(table)
        console.print(f"MLflow run {run_id}. Browse it with:  {ui_command}", soft_wrap=True)
        if registered_model:
            name, _, version = registered_model.rpartition("/")
            console.print(f"Registered the global adapter as model {name!r} version {version}.")
