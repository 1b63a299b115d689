"""Nothing we call warns the user about deprecations.

The CLI's user paths (the quickstart's train, eval and generate with the adapter, merge, eval of the merged model) run in
a subprocess with ``-W error::FutureWarning -W error::DeprecationWarning``, so a deprecated call of ours
fails the command, and transformers' logged deprecations ("... is deprecated ...", which it emits with
``logger.warning_once`` rather than ``warnings.warn``) fail the test from stderr. Covered for LoRA (the
quickstart recipe) and prefix tuning (its prefixes travel in the KV cache, the argument transformers 5.24
renamed) with greedy generation on, so the decoding loop runs too. Reference: an empty set of warnings.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kit import ROOT

STRICT = [sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-m", "peftcli"]
GENERATE = ["eval.generate=true", "eval.max_generate_examples=4", "eval.max_new_tokens=4"]
RECIPES = {
    "lora": ["recipes/quickstart.yaml", "train.max_steps=4", *GENERATE],
    "prefix_tuning": ["recipes/tiny/prefix_tuning.yaml", "train.max_steps=4", *GENERATE],
}


def run_strict(*args: str) -> str:
    done = subprocess.run(
        [*STRICT, *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"peftcli {' '.join(args)} failed under -W error:\n{output[-3000:]}"
    deprecations = [line for line in output.splitlines() if "deprecat" in line.lower()]
    assert not deprecations, f"peftcli {' '.join(args)} printed deprecations:\n" + "\n".join(deprecations)
    return output


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_train_eval_merge_emit_no_deprecation(name, tmp_path):
    run = tmp_path / "run"
    run_strict("train", *RECIPES[name], "--output-dir", str(run), "-q")
    run_strict("eval", str(run / "adapter"), "--max-examples", "8")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc=\\n"}\n{"prompt": "hello=\\n"}\n')
    out = tmp_path / "out.jsonl"
    run_strict(
        "generate",
        str(run / "adapter"),
        "--input",
        str(prompts),
        "--output",
        str(out),
        "--max-new-tokens",
        "4",
    )
    assert len(out.read_text().splitlines()) == 2
    if name == "lora":  # prefixes do not merge
        run_strict("merge", str(run / "adapter"), "--output", str(tmp_path / "merged"))
        run_strict("eval", str(tmp_path / "merged"), "--data", "recipes/data/quickstart_eval.jsonl")
