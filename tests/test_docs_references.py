"""The algorithm reference, ``docs/algorithms.md``, and the files that cite it agree.

- Every citation of a section (``docs/algorithms.md`` followed by a section sign and a number)
  in the packages, the experiments, the cluster files, the tests, the README and ``docs/``
  names a section that has a heading in ``docs/algorithms.md``; the retired short form (the
  word ALGORITHMS and a number) and the old file names are refused.
- No text file of the repository (tracked, or new and not ignored) refers to a path outside it
  (the ``shared`` folder beside the checkout, or the machine's work directory).
- Every test that ``docs/algorithms.md`` (or another page of ``docs/``) names
  (``tests/...py::test_name``) and every function and file it names (``package/...py::name``)
  exists; every equation number ``docs/algorithms.md`` cites is defined, and every section that
  defines an equation names a test.

Pure file scanning (no import of the package), so it takes milliseconds.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "algorithms.md"

# Where citations are collected (directories and single files, relative to ROOT).
CITING = ("fedsim", "actors", "aggregation", "experiments", "cluster", "tests", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".sh", ".txt", ".ini", ".json"}
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "mlruns"}

SECTION = r"\d+[a-z]?(?:\.\d+)*"
SIGN = "\u00a7"  # the section sign, spelt as an escape so this file cites nothing itself
HEADING = re.compile(rf"^#{{1,6}}\s+({SECTION})\.?\s", re.MULTILINE)
# a citation starts at the file name when it is given (a wrapped one reports its first line)
CITATION = re.compile(rf"(?:docs/algorithms\.md\s*)?{SIGN}\s*({SECTION})")
# The forms no file may use any more: the short form and the names of the files outside.
OLD_FORMS = (
    (re.compile(r"\bALGORITHMS\s+\d"), "the retired short citation form"),
    (re.compile(r"\bALGORITHMS\.md\b"), "the old reference file"),
    (re.compile(r"\bVLM\.md\b"), "the old VLM notes (now docs/vlm.md)"),
    (re.compile(r"docs/algorithms\.md\s+\d"), "a citation without the section sign"),
)
# Paths outside the repository; written so that this file does not match them itself.
OUTSIDE = (
    (re.compile(r"\.\./shared\b"), "the shared folder beside the checkout"),
    (re.compile(r"/work(?=/)"), "the machine's work directory"),
)
TEST_REF = re.compile(r"(?<![\w/])(tests/[\w/]+\.py)::(\w+)")
CODE_REF = re.compile(r"(?<![\w/])((?:aggregation|fedsim|actors|experiments)/[\w/]+\.py)::([\w.]+)")
PATH_REF = re.compile(r"`((?:aggregation|fedsim|actors|experiments|tests|cluster|docs)/[\w/.-]+)`")
EQ_TAG = re.compile(rf"\\tag\{{({SECTION})\}}")
EQ_REF = re.compile(r"\((\d+[a-z]?\.\d+\.\d+)\)")


def _is_text(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.name == "Dockerfile" or path.parent.name == ".ci"


def _repository_files() -> list[Path]:
    """The tracked files and the untracked ones git does not ignore; without git, a walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)
        ]
    return sorted(p for p in files if p.is_file() and _is_text(p))


def _citing_files() -> list[Path]:
    inside = [ROOT / name for name in CITING]
    return [p for p in _repository_files() if any(p == d or d in p.parents for d in inside)]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def doc_sections(text: str) -> set[str]:
    """The section numbers that have a heading (``## 1.``, ``### 1.10 ...``, ``## 4b. ...``)."""
    return set(HEADING.findall(text))


def bad_citations(path: Path, text: str, sections: set[str]) -> Iterator[str]:
    """``file:line`` and the problem, for each citation of a missing section or old form."""
    for match in CITATION.finditer(text):
        if match.group(1) not in sections:
            yield f"{_where(path, text, match.start())}: section {match.group(1)} is not a heading"
    for pattern, what in OLD_FORMS:
        for match in pattern.finditer(text):
            yield f"{_where(path, text, match.start())}: {what} ({match.group(0)!r})"


def outside_references(path: Path, text: str) -> Iterator[str]:
    for pattern, what in OUTSIDE:
        for match in pattern.finditer(text):
            yield f"{_where(path, text, match.start())}: refers to {what}"


def _defines(source: str, name: str) -> bool:
    if re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", source, re.M):
        return True
    return re.search(rf"^{re.escape(name)}\s*[:=]", source, re.M) is not None


def missing_names(text: str, doc: Path = DOC) -> Iterator[str]:
    """Tests, functions and files a document names that do not exist."""
    for match in TEST_REF.finditer(text):
        path, name = ROOT / match.group(1), match.group(2)
        where = _where(doc, text, match.start())
        if not path.is_file():
            yield f"{where}: {match.group(1)} does not exist"
        elif not _defines(_read(path), name):
            yield f"{where}: {match.group(1)} has no test {name}"
    for match in CODE_REF.finditer(text):
        path, dotted = ROOT / match.group(1), match.group(2)
        where = _where(doc, text, match.start())
        if not path.is_file():
            yield f"{where}: {match.group(1)} does not exist"
            continue
        source = _read(path)
        for part in dotted.split("."):
            if not _defines(source, part):
                yield f"{where}: {match.group(1)} does not define {part}"
    for match in PATH_REF.finditer(text):
        if not (ROOT / match.group(1)).exists():
            yield f"{_where(doc, text, match.start())}: {match.group(1)} does not exist"


def equation_problems(text: str) -> Iterator[str]:
    """Equation numbers defined twice, cited but undefined, or in a section without a heading
    or without a test."""
    tags = [(m.group(1), m.start()) for m in EQ_TAG.finditer(text)]
    seen: set[str] = set()
    for tag, start in tags:
        if tag in seen:
            yield f"{_where(DOC, text, start)}: equation ({tag}) is defined twice"
        seen.add(tag)
    for match in EQ_REF.finditer(text):
        if match.group(1) not in seen:
            yield f"{_where(DOC, text, match.start())}: equation ({match.group(1)}) is not defined"
    headings = [(m.group(1), m.start()) for m in HEADING.finditer(text)] + [("", len(text))]
    body = {num: text[a:b] for (num, a), (_, b) in zip(headings, headings[1:])}
    for tag, start in tags:
        section = tag.rsplit(".", 1)[0]
        if section not in body:
            yield f"{_where(DOC, text, start)}: equation ({tag}) has no section {section}"
        elif not TEST_REF.search(body[section]):
            yield f"{_where(DOC, text, start)}: section {section} defines ({tag}) but names no test"


# -- the checks on the repository ----------------------------------------------------------


def test_every_citation_names_a_section_of_the_reference():
    sections = doc_sections(_read(DOC))
    assert {"1.1", "1.8", "1.9", "1.10", "2", "3", "4", "4b"} <= sections
    files = _citing_files()
    assert ROOT / "README.md" in files and ROOT / "aggregation" / "fedilora.py" in files
    problems = [p for f in files for p in bad_citations(f, _read(f), sections)]
    assert not problems, "citations of docs/algorithms.md that resolve to nothing:\n" + "\n".join(
        problems
    )
    cited = {m.group(1) for f in files for m in CITATION.finditer(_read(f))}
    assert {"1.2", "1.9", "1.10", "4b"} <= cited  # the scan does find the code's citations


def test_no_file_refers_to_a_path_outside_the_repository():
    files = _repository_files()
    assert ROOT / "setup.cfg" in files and ROOT / "README.md" in files
    problems = [p for f in files for p in outside_references(f, _read(f))]
    assert not problems, "paths outside the repository:\n" + "\n".join(problems)


def test_every_test_and_function_the_docs_name_exists():
    text = _read(DOC)
    assert len(TEST_REF.findall(text)) > 100 and len(CODE_REF.findall(text)) > 50
    docs = sorted((ROOT / "docs").rglob("*.md"))
    assert ROOT / "docs" / "vlm.md" in docs and ROOT / "docs" / "reference" / "api.md" in docs
    problems = [p for doc in docs for p in missing_names(_read(doc), doc)]
    assert not problems, "docs/ names what does not exist:\n" + "\n".join(problems)


def test_equations_are_defined_once_and_each_section_names_a_test():
    text = _read(DOC)
    assert len(EQ_TAG.findall(text)) > 40
    problems = list(equation_problems(text))
    assert not problems, "\n".join(problems)


# -- the checks can fail -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (f"see docs/algorithms.md {SIGN}1.11 for it", "section 1.11 is not a heading"),
        (f"docs/algorithms.md\n{SIGN}7) wrapped", "section 7 is not a heading"),
        (f"({SIGN}1.2, {SIGN}9.9)", "section 9.9 is not a heading"),
        ("(ALGORITHMS" + " 1.2)", "retired short citation form"),
        ("in ALGORITHMS" + ".md", "old reference file"),
        ("see docs/algorithms.md" + " 1.2", "without the section sign"),
    ],
)
def test_a_bad_citation_is_named_with_its_line(text, found):
    path = ROOT / "aggregation" / "example.py"  # never written: only its name is reported
    problems = list(bad_citations(path, f"x\n\n{text}\n", {"1.2", "1.10", "4b"}))
    assert len(problems) == 1 and found in problems[0]
    assert problems[0].startswith("aggregation/example.py:3:")


def test_good_citations_pass():
    text = f"docs/algorithms.md {SIGN}1.10; {SIGN}4b and {SIGN}1.2. ({SIGN}x.y is prose)"
    assert not list(bad_citations(ROOT / "a.py", text, {"1.2", "1.10", "4b"}))


@pytest.mark.parametrize("text", [".." + "/shared/ALGO.md", "/wo" + "rk/venv/bin/python x.py"])
def test_a_path_outside_the_repository_is_named(text):
    problems = list(outside_references(ROOT / "README.md", f"a\n{text}\n"))
    assert len(problems) == 1 and problems[0].startswith("README.md:2:")


def test_a_missing_test_or_function_is_named():
    text = (
        "ok `tests/test_docs_references.py::test_good_citations_pass`\n"
        "`tests/test_docs_references.py::test_that_was_never_written`\n"
        "`tests/nowhere.py::test_x` `aggregation/fedilora.py::no_such_function`\n"
        "`aggregation/rank_merger.py::RankMerger.stream` `fedsim/no_such_file.yaml`\n"
    )
    problems = list(missing_names(text))
    assert len(problems) == 4, problems
    assert "has no test test_that_was_never_written" in problems[0]
    assert "tests/nowhere.py does not exist" in problems[1]
    assert "does not define no_such_function" in problems[2]
    assert "fedsim/no_such_file.yaml does not exist" in problems[3]


def test_an_equation_without_a_test_or_definition_is_named():
    text = (
        "## 1. A\n\n### 1.1 B\n\n$$ x \\tag{1.1.1} $$\n\nsee (1.1.2)\n"
        "### 1.2 C\n\n$$ y \\tag{1.2.1} $$\n"
        "`tests/test_docs_references.py::test_good_citations_pass`\n"
    )
    problems = list(equation_problems(text))
    assert len(problems) == 2, problems
    assert "equation (1.1.2) is not defined" in problems[0]
    assert "section 1.1 defines (1.1.1) but names no test" in problems[1]
