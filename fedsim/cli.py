"""The ``fedsim`` command line: ``fedsim run [CONFIG] [key=value ...]``.

CONFIG is an experiment YAML or the name of a shipped experiment (``fedsim run vlm_emoji``);
without one, the shipped default experiment runs, from any directory and any install.
Results go to stdout, diagnostics to stderr (:mod:`fedsim.logs`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from fedsim import experiments
from fedsim.errors import ConfigError, RunFailed, Terminated
from fedsim.termination import EXIT_STATUS, handle_sigterm
from fedsim.version import __version__

QUIET_HELP = (
    "print no results on stdout (no summary, run id or MLflow link) and no progress bar; "
    "warnings and errors still go to stderr, and the exit status tells success"
)


def _config_path(ref: str | None) -> Path:
    """The YAML file of CONFIG: a file, a shipped experiment's name, or (none) the default."""
    return experiments.find(ref) if ref else experiments.default_path()


def _log_to_driver(ns: argparse.Namespace) -> bool:
    """``resources.log_to_driver`` of the run about to start, read from its YAML file and
    overrides alone, before Ray starts (the full config, which imports the methods, loads
    while Ray comes up). True when it cannot be read: the full load then names the problem."""
    try:
        import yaml

        from fedsim.config.yaml_file import read_yaml_text

        if ns.resume:
            path, overrides = Path(ns.resume) / "config.yaml", ns.args
        else:
            ref, overrides = _split_args(ns.args)
            path = _config_path(ref)
        # within the limits of every config read (a huge file is refused here in milliseconds)
        loaded = yaml.safe_load(read_yaml_text(path, "config", "config keys"))
        section = loaded.get("resources") if isinstance(loaded, dict) else None
        value = section.get("log_to_driver", True) if isinstance(section, dict) else True
        for item in overrides:
            key, _, raw = item.partition("=")
            if key.strip() == "resources.log_to_driver":
                value = yaml.safe_load(raw)
        return value if isinstance(value, bool) else True
    except Exception:  # noqa: BLE001 - only a hint for Ray's start; the real load reports
        return True


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


DESCRIPTION = (
    "fedsim simulates federated LoRA fine-tuning of vision-language models on Ray: every "
    "client has its own LoRA rank, its own data and its own missing modalities."
)
KEYS_HELP = (
    "Configuration is layered: the typed defaults, then the CONFIG file, then key=value "
    "overrides. List every key with its type, default, allowed values and help with "
    "'fedsim config --keys [PREFIX]'; the docs' configuration reference "
    "(docs/reference/config.md) has the same list."
)

CONFIG_ARGS = (
    "an experiment: a YAML file or a shipped experiment's name (default: the shipped default "
    "experiment), then key=value overrides applied after it"
)
STUDY_HELP = (
    "a study YAML or a shipped study's name: its variants, seeds, grid cells, metric and "
    "output table"
)
STUDY_ARGS = "overrides applied to every run of the study"
PARALLEL_HELP = (
    "runs at once on the Ray cluster (default: the study's parallel key, whose 0 means as "
    "many as the cluster's resources hold with each run's own actor pool)"
)
RESUME_STUDY_HELP = (
    "continue the latest try of this study in its MLflow experiment: runs that finished there "
    "with the same settings are read back, not run again; the others run under the same parent "
    "run (without an earlier try: a new study)"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``fedsim`` command's parser (the docs' CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(prog="fedsim", description=DESCRIPTION, epilog=KEYS_HELP)
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    shipped = ", ".join(experiments.names("run"))
    run_p = sub.add_parser(
        "run",
        help="run a simulation",
        usage="fedsim run [-h] [-q] [--resume RUN_DIR [--new-run]] [CONFIG] [key=value ...]",
        description="Run a simulation. CONFIG is an experiment YAML or the name of a shipped "
        f"experiment ({shipped}); with no CONFIG, the shipped default experiment runs.",
        epilog=KEYS_HELP,
    )
    run_p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help=CONFIG_ARGS)
    run_p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    run_p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from the latest checkpoint in RUN_DIR (e.g. runs/<run id>); "
        "overrides may extend rounds or change resources, nothing that changes the numbers",
    )
    run_p.add_argument(
        "--new-run",
        action="store_true",
        help="with --resume: continue into a new MLflow run instead of the checkpoint's own "
        "(for a run whose MLflow store was lost or whose MLflow run was deleted); every round "
        "the checkpoint holds is logged into the new run first, and later checkpoints name it",
    )
    show_p = sub.add_parser(
        "config",
        help="print the resolved config as YAML, or list the config keys (--keys)",
        usage="fedsim config [-h] [--keys [PREFIX]] [CONFIG] [key=value ...]",
        description="Print the resolved config as YAML (re-loadable with fedsim run), or, "
        "with --keys, every config key with its type, default, allowed values and help.",
        epilog=KEYS_HELP,
    )
    show_p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help=CONFIG_ARGS)
    show_p.add_argument(
        "--keys",
        nargs="?",
        const="",
        metavar="PREFIX",
        help="list the config keys (those that start with PREFIX, e.g. data. or privacy)",
    )
    part_p = sub.add_parser(
        "partition",
        help="print each client's data (samples, labels, modalities) under a config",
        usage="fedsim partition [-h] [--heatmap PNG] [CONFIG] [key=value ...]",
        description="Print, per client, its rank, train and held-out sizes, label histogram "
        "and how many rows have both modalities, the image only, the text only or neither, "
        "under a config; nothing is trained.",
    )
    part_p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help=CONFIG_ARGS)
    part_p.add_argument("--heatmap", metavar="PNG", help="also save a heat map of the label split")
    studies = ", ".join(experiments.names("study"))
    cmp_p = sub.add_parser(
        "compare",
        help="run a comparison study (variants x seeds) and write a Markdown table",
        description="Run a study: a YAML file or the name of a shipped study "
        f"({studies}); overrides apply to every run.",
    )
    cmp_p.add_argument("study", metavar="STUDY", help=STUDY_HELP)
    cmp_p.add_argument("args", nargs="*", metavar="key=value", help=STUDY_ARGS)
    cmp_p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    cmp_p.add_argument("--parallel", type=_runs_at_once, metavar="N", help=PARALLEL_HELP)
    cmp_p.add_argument("--resume", action="store_true", help=RESUME_STUDY_HELP)
    sweep_p = sub.add_parser(
        "sweep",
        help="run a grid study (cells x variants x seeds) under one MLflow parent run",
        description="Run a study with grids: a YAML file or the name of a shipped study, such "
        "as fedmllm_grid; overrides apply to every run.",
    )
    sweep_p.add_argument("study", metavar="STUDY", help=STUDY_HELP)
    sweep_p.add_argument("args", nargs="*", metavar="key=value", help=STUDY_ARGS)
    sweep_p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sweep_p.add_argument("--parallel", type=_runs_at_once, metavar="N", help=PARALLEL_HELP)
    sweep_p.add_argument("--resume", action="store_true", help=RESUME_STUDY_HELP)
    insp_p = sub.add_parser(
        "inspect",
        help="print one round's merge diagnostics of a run (clients, ranks, labels, shares)",
        description="Print round T of a run: each merged client's rank, sample count, top "
        "band, the labels it holds and its contribution to the merged update, then the merge "
        "per dimension band. Without --round: the round whose global score dropped most.",
    )
    insp_p.add_argument("run_id", metavar="RUN_ID", help="the MLflow run id a run prints")
    insp_p.add_argument(
        "--round",
        type=_round_number,
        dest="round_idx",
        metavar="T",
        help="the round to show (default: the round whose global score fell most)",
    )
    insp_p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db, as for "
        "a run whose config sets no tracking.uri)",
    )
    return parser


def _round_number(text: str) -> int:
    """``--round``'s value: a round number in ASCII digits (``int`` would take ``"٣"``)."""
    from fedsim.config.strict import ascii_int

    value = ascii_int(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a round number (digits 0-9)")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsim`` console script; returns the exit status.

    ``run``, ``compare`` and ``sweep`` handle SIGTERM like Ctrl-C (:mod:`fedsim.termination`):
    the MLflow run is marked KILLED, the resume line printed, and the status is 143.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    trains = ns.command in ("run", "compare", "sweep")
    try:
        with handle_sigterm() if trains else contextlib.nullcontext():
            return _command(ns)
    except ConfigError as exc:  # a user mistake: one line naming the key, never a traceback
        print(f"fedsim: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # the run started and could not go on; its MLflow run is FAILED
        print(f"fedsim: run failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Terminated:  # SIGTERM: Ctrl-C's path, with the status a shell gives SIGTERM
        print("fedsim: terminated (SIGTERM); the MLflow run is marked KILLED", file=sys.stderr)
        return EXIT_STATUS
    except KeyboardInterrupt:
        print("fedsim: interrupted; the MLflow run is marked KILLED", file=sys.stderr)
        return 130


def _command(ns: argparse.Namespace) -> int:
    """Run the parsed command; for ``run``, Ray starts first, in the background, while the
    config, torch and the data load."""
    executor = None
    if ns.command == "run" and ns.new_run and not ns.resume:  # before Ray starts
        raise ConfigError("--new-run", "goes with --resume RUN_DIR (it names where to continue)")
    if ns.command == "run":
        from actors.ray_init import RayStart

        start = RayStart(_log_to_driver(ns))
        from actors.executor import RayExecutor

        executor = RayExecutor(start)
    try:
        return _dispatch(ns, executor)
    finally:
        if executor is not None:  # a run closes it itself; this stops Ray after an early error
            executor.close(None, None)


def _runs_at_once(text: str) -> int:
    """``--parallel N``: a whole number of runs at once (ASCII digits), 0 for automatic."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _one_line(exc: BaseException) -> str:
    """An error message on one line (YAML and MLflow errors span several)."""
    return " ".join(str(exc).split())


def _dispatch(ns: argparse.Namespace, executor=None) -> int:
    """Run the parsed command; config errors propagate to :func:`main`.

    Args:
        executor: for ``run``, the :class:`actors.executor.RayExecutor` whose Ray is starting.
    """
    if ns.command == "inspect":
        from fedsim.tracking.merge_report import inspect_run

        print(inspect_run(ns.run_id, ns.round_idx, ns.tracking_uri), end="")
        return 0
    if ns.command in ("compare", "sweep"):
        from fedsim.simulation.study import run_study

        run_study(ns.study, ns.args, quiet=ns.quiet, parallel=ns.parallel, resume=ns.resume)
        return 0
    if ns.command == "run" and ns.resume:
        from fedsim.simulation.run import resume

        if ns.args and "=" not in ns.args[0]:
            raise ConfigError("--resume", f"a resumed run uses its own config; drop {ns.args[0]!r}")
        resume(ns.resume, ns.args, new_run=ns.new_run, executor=executor, quiet=ns.quiet)
        return 0
    if ns.command == "config" and ns.keys is not None:
        return _print_keys(ns.keys, ns.args)
    from fedsim.config import load_config

    ref, overrides = _split_args(ns.args)
    cfg = load_config(_config_path(ref), overrides)
    if ns.command == "partition":
        from fedsim.tracking.partition_report import partition_report

        partition_report(cfg, ns.heatmap)
    elif ns.command == "config":
        from fedsim.config import to_yaml

        print(to_yaml(cfg), end="")
    else:
        start_run(cfg, executor, quiet=ns.quiet)
    return 0


def _print_keys(prefix: str, args: list[str]) -> int:
    """``fedsim config --keys [PREFIX]``: the schema's keys with their help."""
    from fedsim.config.keys import config_keys, format_keys

    if args:
        raise ConfigError(
            "--keys", f"lists the schema's keys and takes no config; drop {args[0]!r}"
        )
    keys = config_keys(prefix)
    if not keys:
        sections = sorted({k.key.split(".")[0] for k in config_keys()})
        raise ConfigError(
            "--keys", f"no config key starts with {prefix!r}; top-level keys: {', '.join(sections)}"
        )
    print(format_keys(keys), end="")
    return 0


def start_run(cfg, executor=None, quiet: bool = False):
    """What ``fedsim run`` does with a loaded config: the client actors start in the
    background (on the Ray that ``executor`` is starting) while this process checks the data
    and outputs and imports the rest; a failed check stops them again (``main`` closes the
    executor). ``quiet``: see :func:`fedsim.simulation.run.run`. Returns the
    :class:`fedsim.simulation.run.RunResult`.
    """
    from actors.executor import RayExecutor
    from fedsim.simulation.preflight import preflight

    executor = executor or RayExecutor()
    executor.launch(cfg)
    try:
        dataset = preflight(cfg)
    except BaseException:
        executor.close(None, None)
        raise
    from fedsim.simulation.run import run

    return run(cfg, dataset=dataset, executor=executor, quiet=quiet)


if __name__ == "__main__":
    sys.exit(main())
