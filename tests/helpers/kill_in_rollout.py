"""Run the peftcli CLI and SIGKILL the process in the middle of GRPO's rollout of optimizer step N
(1-based): after its first micro-batch's completions are sampled, before the step's update.

    python tests/helpers/kill_in_rollout.py N -- train RECIPE ...

A real crash, caused from the test side: it wraps ``peftcli.training.objectives.rollout``'s
``roll_out`` (to know the step) and ``decode`` (to die right after one sampling call), then runs
``peftcli.cli.main``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def run_killed_in_rollout(step: int, recipe: Path) -> subprocess.CompletedProcess:
    """`peftcli train RECIPE` in a subprocess that SIGKILLs itself while sampling for step ``step``."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, __file__, str(step), "--", "train", str(recipe), "-q"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: kill_in_rollout.py N -- peftcli-args...")
    kill_at = int(argv[0])

    import peftcli.training.objectives.rollout as rollout
    from peftcli.cli import main as cli_main

    roll_out, decode, current = rollout.roll_out, rollout.decode, {}

    def roll_out_noting_step(objective, model, tokenizer, window, step, *args, **kwargs):
        current["step"] = step + 1
        return roll_out(objective, model, tokenizer, window, step, *args, **kwargs)

    def decode_then_die(*args, **kwargs):
        out = decode(*args, **kwargs)
        if current.get("step") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    rollout.roll_out, rollout.decode = roll_out_noting_step, decode_then_die
    sys.argv = ["peftcli", *argv[2:]]
    cli_main()


if __name__ == "__main__":
    main()
