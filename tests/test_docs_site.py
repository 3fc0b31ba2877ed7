"""The docs site stays true to the code.

- The generated reference pages (config keys, command line) are current, and the config
  reference lists exactly the schema's keys.
- Every page is in the navigation; ``mkdocs build --strict`` passes (slow: CI builds it).
- Every metric, tag and artifact name the code logs is in the MLflow reference.
- No page (nor the README) names an issue number or a particular machine.
- The commands of the tutorials, the getting-started page, the how-to guides and the README
  work: the cheap ones run (``fedsim config``, ``fedsim partition``, a one-round run on the
  tiny model, ``fedsim inspect``), the others' configs and study files load.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim import docs as gen
from fedsim.config.keys import config_keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# -- the generated reference ---------------------------------------------------------------


def test_generated_reference_pages_are_current():
    stale = gen.stale(ROOT)
    assert not stale, f"stale generated pages {stale}: run `{gen.REGENERATE}` and commit them"


def test_the_generator_writes_the_pages_and_its_check_names_a_stale_one(tmp_path, capsys):
    root = ["--root", str(tmp_path)]
    assert gen.main(["--check", *root]) == 1  # an empty tree: both pages are missing
    err = capsys.readouterr().err
    assert all(f"{path} is stale" in err for path in gen.pages())
    assert gen.main(root) == 0  # writes them
    out = capsys.readouterr().out
    assert all(f"wrote {path}" in out for path in gen.pages())
    for path, text in gen.pages().items():
        assert (tmp_path / path).read_text(encoding="utf-8") == text
    assert gen.main(["--check", *root]) == 0
    (tmp_path / gen.CLI_PAGE).write_text("an old page", encoding="utf-8")
    assert gen.main(["--check", *root]) == 1
    # only the generator's lines: a run of an earlier test in this worker may still log a
    # tracking warning from its thread (seen once in the full suite; to be found and fixed)
    lines = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("fedsim: warn")]
    assert lines == [f"{gen.CLI_PAGE} is stale; regenerate it with `{gen.REGENERATE}`"]


def reference_key_problems(text: str) -> list[str]:
    """Keys of the schema the config reference misses, and keys it names that do not exist."""
    listed = gen.config_page_keys(text)
    schema = [k.key for k in config_keys()]
    problems = [f"missing from the reference: {k}" for k in schema if k not in listed]
    problems += [f"not a schema key: {k}" for k in listed if k not in schema]
    problems += [f"listed twice: {k}" for k in sorted(set(listed)) if listed.count(k) > 1]
    return problems


def test_the_config_reference_lists_exactly_the_schema_keys():
    text = _read(ROOT / gen.CONFIG_PAGE)
    assert reference_key_problems(text) == []
    assert len(gen.config_page_keys(text)) == len(config_keys()) > 100


def test_a_missing_or_unknown_reference_key_is_named():
    text = gen.config_page()
    row = next(line for line in text.splitlines() if line.startswith("| `lora.dropout`"))
    edited = text.replace(row + "\n", "") + "\n| `lora.dropotu` | `float` | `0.0` |  | x |\n"
    assert reference_key_problems(edited) == [
        "missing from the reference: lora.dropout",
        "not a schema key: lora.dropotu",
    ]


def test_the_cli_reference_names_every_command_and_option():
    from fedsim.cli import build_parser

    text = _read(ROOT / gen.CLI_PAGE)
    for name, sub in gen._subcommands(build_parser()).items():
        assert f"## fedsim {name}\n" in text
        for action in sub._actions:
            for option in action.option_strings:
                # in a code span of the page, e.g. `-q, --quiet`
                cell = rf"`[^`\n]*(?<![\w-]){re.escape(option)}(?![\w-])[^`\n]*`"
                assert option in ("-h", "--help") or re.search(cell, text), option
    assert "`--version`" in text


# -- the site ------------------------------------------------------------------------------


def _nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    config = yaml.safe_load(_read(ROOT / "mkdocs.yml").replace("!!python", "#"))
    nav = _nav_files(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert sorted(pages - set(nav)) == []
    assert sorted(set(nav) - pages) == []
    assert {"algorithms.md", "vlm.md", "reference/config.md", "reference/cli.md"} <= pages


@pytest.mark.slow  # about 7 s on 2 cores; CI builds the site
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    try:
        import material  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise  # CI installs the test extra, which has them: never skip there
        pytest.skip(
            "mkdocs-material and mkdocstrings are in the test extra: pip install -e .[test]"
        )
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "reference" / "config" / "index.html").is_file()
    api = (tmp_path / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "merge_lora_state_dicts" in api and "load_config" in api


# -- the MLflow reference ------------------------------------------------------------------

LOGGED = re.compile(
    r"[\"']((?:global|personalized|train|comm|time|clients|editing|robust|privacy|faults|merge"
    r"|data|examples|plots|system|registered_adapter|global_adapter)/[\w.{}-]*)[\"']"
)
TAG = re.compile(r"[\"'](fedsim\.[a-z_]+|mlflow\.[A-Za-z_.]+)[\"']")


def _code_files() -> list[Path]:
    return [p for pkg in ("fedsim", "actors", "aggregation") for p in (ROOT / pkg).rglob("*.py")]


def test_every_name_the_code_logs_is_in_the_mlflow_reference():
    reference = _read(DOCS / "reference" / "mlflow.md")
    names, tags = set(), set()
    for path in _code_files():
        source = _read(path)
        names |= {n for n in LOGGED.findall(source) if "{" not in n and not n.endswith("/")}
        tags |= set(TAG.findall(source))
    tags -= {"fedsim.config", "fedsim.methods.base", "mlflow.data.context"}  # not tags
    tags = {t for t in tags if not t.startswith(("fedsim.config.", "fedsim.tracking", "mlflow.e"))}
    assert len(names) > 40 and {"global/accuracy", "fedsim.merge"} <= names | tags
    missing = sorted(n for n in names | tags if f"`{n}" not in reference)
    assert not missing, f"logged by the code, missing from docs/reference/mlflow.md: {missing}"


# -- words that do not belong in the docs --------------------------------------------------

FORBIDDEN = (
    (re.compile(r"\bissues?\s+#?\d+", re.I), "an issue number"),
    (re.compile(r"\bthis (?:CPU |GPU |2-core (?:CPU )?)?machine\b", re.I), "this machine"),
    (re.compile(r"\ba later issue\b", re.I), "a later issue"),
)


def forbidden_words(text: str) -> list[str]:
    return [f"{what}: {m.group(0)!r}" for pat, what in FORBIDDEN for m in pat.finditer(text)]


def test_no_page_names_an_issue_number_or_this_machine():
    problems = [
        f"{path.relative_to(ROOT)}: {p}"
        for path in [ROOT / "README.md", ROOT / "mkdocs.yml", *PAGES]
        for p in forbidden_words(_read(path))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "text", ["fixed in issue 14", "see Issue #3", "measured on this machine", "this CPU machine"]
)
def test_forbidden_words_are_found(text):
    assert len(forbidden_words(f"a {text} b")) == 1


def test_the_readme_is_one_screen_and_keeps_the_quickstart():
    readme = _read(ROOT / "README.md")
    assert len(readme.splitlines()) <= 200
    ci = _read(ROOT / ".ci" / "run").splitlines()
    test_command = next(line for line in ci if line.startswith("python3 -m pip install"))
    assert test_command in readme.splitlines()  # CI runs the README's command verbatim
    for page in ("getting-started.md", "tutorials/index.md", "reference/config.md"):
        assert f"docs/{page}" in readme
    assert "mkdocs serve" in readme


# -- the commands of the docs --------------------------------------------------------------

COMMAND_PAGES = [
    ROOT / "README.md",
    DOCS / "getting-started.md",
    *sorted((DOCS / "tutorials").glob("*.md")),
    *sorted((DOCS / "how-to").glob("*.md")),
]
FEDSIM = re.compile(r"(?:^|\s)python3? -m fedsim(?=\s|$)")
RUN_ID = "RUN_ID"  # what the pages write as <run id>
# study files a page makes with cp before running them
MADE_BY_THE_PAGE = {"experiments/hm_grid.yaml"}


def fences(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced block of a Markdown text."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def doc_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``python -m fedsim ...`` in a shell block of the pages."""
    found = []
    for page in COMMAND_PAGES:
        for lang, block in fences(_read(page)):
            if lang not in ("bash", "sh"):
                continue
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" # ")[0].split("  #")[0].strip()
                match = FEDSIM.search(line)
                if match and not line.startswith("$"):
                    argv = shlex.split(line[match.end() :].replace("<run id>", RUN_ID))
                    found.append((f"{page.relative_to(ROOT)}: {line}", argv))
    return found


COMMANDS = doc_commands()


def _kind(argv: list[str]) -> str:
    """How a test checks a command: run it, load its config or study, or leave it out."""
    if not argv or argv[0] in ("--version", "--help") or "--help" in argv:
        return "run"
    if "..." in argv or "--resume" in argv:
        return "skip"  # an ellipsis is no command; resuming is tested in test_resume.py
    command, args = argv[0], argv[1:]
    if command == "inspect":
        return "inspect" if RUN_ID in args else "skip"  # a recorded run's id
    if command == "config":
        return "run"
    if command == "partition":
        return "partition"
    if command == "run":
        tiny = "model.backbone=tiny" in args and "rounds=1" in args
        return "tiny-run" if tiny else "load"
    return "study"


def test_the_docs_have_commands_of_every_kind():
    kinds = [_kind(argv) for _, argv in COMMANDS]
    for kind in ("run", "partition", "tiny-run", "inspect", "load", "study"):
        assert kind in kinds, kind
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(
    ("where", "argv"), [c for c in COMMANDS if _kind(c[1]) in ("run", "load", "study")]
)
def test_a_documented_command_runs_or_its_config_loads(where, argv, capsys, monkeypatch):
    from fedsim import cli

    monkeypatch.chdir(ROOT)  # the pages' paths are relative to the repository root
    kind = _kind(argv)
    if kind == "run":
        if argv and argv[0].startswith("--") or "--help" in argv:
            with pytest.raises(SystemExit) as exc:
                cli.main(argv)
            assert exc.value.code == 0, where
        else:
            assert cli.main(argv) == 0, (where, capsys.readouterr().err)
    elif kind == "load":  # a whole run costs minutes: its config must load
        assert cli.main(["config", *argv[1:]]) == 0, (where, capsys.readouterr().err)
    else:
        from fedsim.config import load_config
        from fedsim.simulation.study import load_study

        study_file, overrides = argv[1], argv[2:]
        if study_file in MADE_BY_THE_PAGE:
            return
        _, base = load_study(study_file)
        load_config(base, overrides)


def transcripts() -> list[tuple[str, list[str], str]]:
    """``(where, argv, error line)`` of each ``$ python3 -m fedsim ...`` a page shows failing
    (a text block: the command, then the one line it prints)."""
    found = []
    for page in COMMAND_PAGES + sorted((DOCS / "concepts").glob("*.md")):
        for lang, block in fences(_read(page)):
            if lang not in ("", "text"):
                continue
            lines = block.splitlines()
            for line, out in zip(lines, lines[1:]):
                match = FEDSIM.search(line)
                if line.startswith("$ ") and match and out.startswith("fedsim: config error"):
                    argv = shlex.split(line[match.end() :].split(" # ")[0])
                    found.append((f"{page.relative_to(ROOT)}: {line}", argv, out))
    return found


TRANSCRIPTS = transcripts()


def _without_ray(argv: list[str]) -> bool:
    """A mistake found before Ray starts (not a request the cluster is asked for)."""
    return not any(a.startswith("resources.") for a in argv) and "/proc" not in " ".join(argv)


@pytest.mark.parametrize(("where", "argv", "error"), [t for t in TRANSCRIPTS if _without_ray(t[1])])
def test_a_documented_config_error_is_what_fedsim_prints(where, argv, error, capsys, monkeypatch):
    from fedsim import cli

    monkeypatch.chdir(ROOT)
    command = ["config", *argv[1:]] if argv[0] == "run" else argv  # found when it loads
    assert cli.main(command) == 2, where
    assert capsys.readouterr().err.strip() == error, where


def test_the_pages_show_config_errors():
    assert len(TRANSCRIPTS) >= 4


@pytest.fixture(scope="module")
def docs_run(warm_ray, emoji_cache, tmp_path_factory):
    """The pages' one-round run on the tiny model, with its store and checkpoints in a temp
    dir, on the session's warm pool; returns the outputs' overrides and the MLflow run id."""
    from mlflow.tracking import MlflowClient

    import actors.executor
    from fedsim import cli

    tmp = tmp_path_factory.mktemp("docs-run")
    outputs = [
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"checkpoint.dir={tmp}/runs",
        f"data.cache_dir={emoji_cache}",
        "progress=false",
    ]
    runs = sorted({tuple(argv) for _, argv in COMMANDS if _kind(argv) == "tiny-run"})
    import fedsim.simulation.run  # noqa: F401 - before the patch: it keeps the real class

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setattr(actors.executor, "RayExecutor", lambda *args, **kwargs: warm_ray)
        for argv in runs:
            assert cli.main([argv[0], *outputs, *argv[1:]]) == 0, argv
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    run = client.search_runs(experiments, order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "FINISHED"
    return outputs, run.info.run_id, tmp


@pytest.mark.slow  # a run on Ray: CI runs it, the quick loop does not
def test_the_documented_one_round_run_and_inspect(docs_run, capsys):
    from fedsim import cli

    outputs, run_id, _ = docs_run
    capsys.readouterr()
    inspects = [argv for _, argv in COMMANDS if _kind(argv) == "inspect"]
    for argv in inspects:
        args = [run_id if a == RUN_ID else a for a in argv]
        assert cli.main([*args, "--tracking-uri", outputs[0].split("=", 1)[1]]) == 0
        assert f"({run_id}), round 1" in capsys.readouterr().out


@pytest.mark.slow  # renders the 32 px emoji set and splits it
def test_the_documented_partitions(emoji_cache, tmp_path, capsys, monkeypatch):
    from fedsim import cli

    monkeypatch.chdir(ROOT)
    for where, argv in [c for c in COMMANDS if _kind(c[1]) == "partition"]:
        args = [str(tmp_path / Path(a).name) if a.endswith(".png") else a for a in argv]
        assert cli.main([args[0], f"data.cache_dir={emoji_cache}", *args[1:]]) == 0, where
        assert "client" in capsys.readouterr().out
    assert list(tmp_path.glob("*.png"))
