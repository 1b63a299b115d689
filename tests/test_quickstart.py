"""The README's first command does what the README says: on a CPU, offline, the eval metric before
and after training shows a clear gain and the train loss falls by well over 20%."""

from __future__ import annotations

import pytest
from kit import ROOT

import peftcli


@pytest.mark.slow
def test_quickstart_learns_to_reverse_unseen_words(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the repository root
    result = peftcli.train("recipes/quickstart.yaml", output_dir=str(tmp_path / "run"))
    assert result.eval_before["exact_match"] <= 0.02
    assert result.eval_after["exact_match"] >= 0.9
    assert result.last_loss < 0.2 * result.first_loss
    assert result.eval_after["eval_loss"] < 0.2 * result.eval_before["eval_loss"]
