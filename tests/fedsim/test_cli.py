"""The ``fedsim`` command's own options: ``--version``, ``--help`` and ``config --keys``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fedsim import cli
from fedsim.config.keys import config_keys
from fedsim.version import __version__

# reStructuredText or Markdown markup that has no business in a terminal
MARKUP = re.compile(r"``|:(?:func|class|mod|meth|attr):|\*\*|`[^`']+`")


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_version_prints_the_package_version(capsys):
    assert _help(capsys, ["--version"]) == f"fedsim {__version__}\n"


def test_version_from_the_console_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "fedsim", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"fedsim {__version__}"


@pytest.mark.parametrize(
    "argv",
    [[], ["run"], ["config"], ["partition"], ["compare"], ["sweep"], ["inspect"]],
)
def test_help_is_plain_text(capsys, argv):
    text = _help(capsys, [*argv, "--help"])
    assert text.startswith("usage: fedsim")
    assert not MARKUP.search(text), MARKUP.search(text)


@pytest.mark.parametrize("argv", [[], ["run"], ["config"]])
def test_help_says_where_the_keys_are_documented(capsys, argv):
    text = " ".join(_help(capsys, [*argv, "--help"]).split())
    assert "fedsim config --keys [PREFIX]" in text
    assert "docs/reference/config.md" in text


def test_config_keys_lists_every_key_with_its_help(capsys):
    assert cli.main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert heads == [f"{k.key}: {k.type} = {k.default}" for k in config_keys()]
    assert "    one of: raise, skip" in out  # data.on_error's choices
    assert "lora.dropout: float = 0.0\n    LoRA dropout." in out


def test_config_keys_with_a_prefix(capsys):
    assert cli.main(["config", "--keys", "privacy.clip"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert heads == [
        "privacy.clipping: str = fixed",
        "privacy.clip_norm: float = 1.0",
        "privacy.clip_lr: float = 0.2",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["config", "--keys", "nope"], "--keys: no config key starts with 'nope'"),
        (["config", "--keys", "data", "rounds=3"], "--keys: lists the schema's keys"),
    ],
)
def test_config_keys_mistakes_are_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedsim: config error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("value", ["٣", "²", "1.5", "x"])
def test_inspect_takes_a_round_number_in_ascii_digits_only(capsys, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(["inspect", "0123abc", "--round", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--round" in err and "is not a round number" in err and "Traceback" not in err
