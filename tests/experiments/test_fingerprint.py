"""experiments/fingerprint.py: its comparison finds a changed number and forgives only layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "fingerprint.py"


def _module():
    spec = importlib.util.spec_from_file_location("fingerprint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(fp, tensor: torch.Tensor, layout: str, history: list[dict]) -> dict:
    return {
        "history": history,
        "server": fp.digest({layout: {"m.lora_A.weight": tensor}}),
        "clients": {},
        "ranks": [4],
    }


def _write(path: Path, case: dict) -> Path:
    path.write_text(json.dumps({"case": case}))
    return path


def test_renamed_containers_and_a_dropped_zero_metric_still_compare_identical(tmp_path, capsys):
    fp = _module()
    t = torch.arange(6.0).reshape(2, 3)
    before = _case(fp, t, "scaffold_c", [{"round": 1, "x": 0.5, "editing/edited_tensors": 0}])
    after = _case(fp, t.clone(), "methods", [{"round": 1, "x": 0.5}])
    code = fp.compare(_write(tmp_path / "a.json", before), _write(tmp_path / "b.json", after))
    assert code == 0 and "1 identical, 0 different" in capsys.readouterr().out


def test_one_changed_bit_or_metric_is_reported(tmp_path, capsys):
    fp = _module()
    t = torch.arange(6.0).reshape(2, 3)
    flipped = t.clone()
    flipped[0, 0] = torch.nextafter(flipped[0, 0], torch.tensor(1.0))
    history = [{"round": 1, "x": 0.5}]
    a = _write(tmp_path / "a.json", _case(fp, t, "global", history))
    b = _write(tmp_path / "b.json", _case(fp, flipped, "global", history))
    assert fp.compare(a, b) == 1
    assert "DIFFERENT in server tensors" in capsys.readouterr().out
    c = _write(tmp_path / "c.json", _case(fp, t, "global", [{"round": 1, "x": 0.5000001}]))
    assert fp.compare(a, c) == 1
    assert "DIFFERENT in metrics" in capsys.readouterr().out


def test_it_fingerprints_the_checkout_it_lies_in_not_the_installed_fedsim(tmp_path):
    """A worktree's copy of the script imports the worktree's fedsim (an editable install
    elsewhere would otherwise be fingerprinted), and hands the path on to Ray's workers."""
    import os
    import subprocess
    import sys

    checkout = tmp_path / "other-checkout"
    (checkout / "experiments").mkdir(parents=True)
    (checkout / "experiments" / "fingerprint.py").write_text(SCRIPT.read_text())
    (checkout / "fedsim").mkdir()
    (checkout / "fedsim" / "__init__.py").write_text("WHERE = 'the other checkout'\n")
    copy = str(checkout / "experiments" / "fingerprint.py")
    code = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('fp', {copy!r})\n"
        "fp = importlib.util.module_from_spec(spec); spec.loader.exec_module(fp)\n"
        "fp._this_checkout_first()\n"
        "import fedsim\n"
        "print(fedsim.WHERE); print(os.environ['PYTHONPATH'].split(os.pathsep)[0])\n"
    )
    env = {**os.environ, "PYTHONPATH": "/somewhere/else"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert out == ["the other checkout", str(checkout)]
