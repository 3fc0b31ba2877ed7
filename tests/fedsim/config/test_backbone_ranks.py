"""``model.backbone=tiny`` alone runs the default experiment.

The tiny backbone admits LoRA ranks up to 16 and the default experiment's go to 32: when the
user switches the backbone and leaves the ranks to the experiment, they are capped at the
backbone's limit with a warning; ranks the user sets are never changed.
"""

from __future__ import annotations

import pytest

from fedsim.config import as_config, load_config


@pytest.mark.parametrize(
    ("overrides", "ranks"),
    [
        # the backbone switched alone: the experiment's ranks fit it, with a warning
        (["model.backbone=tiny"], "16,16,16,16,8,8,4,4,4,4"),
        # ranks the user sets are never changed (the run refuses a rank above 16)
        (
            ["model.backbone=tiny", "clients.ranks=[32,32,16,16,8,8,4,4,4,4]"],
            "32,32,16,16,8,8,4,4,4,4",
        ),
        (["model.backbone=tiny", "clients.ranks=8"], "8"),
        # ranks within the limit stay as they are
        (["model.backbone=minilm-effnet"], "32,32,16,16,8,8,4,4,4,4"),
    ],
)
def test_switching_to_the_tiny_backbone_fits_the_experiments_ranks(overrides, ranks, capsys):
    cfg = load_config("default", overrides)
    assert cfg.clients.ranks == ranks
    err = capsys.readouterr().err
    if ranks.startswith("16"):
        assert err.strip() == (
            "fedsim: warning: clients.ranks: the tiny backbone admits LoRA ranks up to 16, so "
            "the experiment's ranks 32 run at 16 (2 of 10 clients); set clients.ranks to "
            "choose the ranks"
        )
    else:
        assert err == ""


def test_a_file_that_names_the_tiny_backbone_keeps_its_ranks(tmp_path):
    exp = tmp_path / "mine.yaml"
    exp.write_text(
        "model:\n  backbone: tiny\nclients:\n  ranks: [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]\n"
    )
    assert load_config(exp).clients.ranks.startswith("32,32")
    assert as_config({"model": {"backbone": "tiny"}}).clients.ranks.startswith("16,16")
    assert as_config(
        {"model": {"backbone": "tiny"}, "clients": {"ranks": [32] * 10}}
    ).clients.ranks.startswith("32,32")
