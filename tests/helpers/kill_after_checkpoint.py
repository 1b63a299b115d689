"""Run the peftcli CLI and SIGKILL the process right after checkpoint N has been written.

    python tests/helpers/kill_after_checkpoint.py N -- train RECIPE ...

A real crash, caused from the test side: the library has no test hook. It wraps
``peftcli.checkpoint.save_checkpoint`` (which the loop calls through the module) so that once
``checkpoints/step-N`` is complete the process kills itself the hardest way, then runs ``peftcli.cli.main``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def run_killed_after_checkpoint(step: int, recipe: Path) -> subprocess.CompletedProcess:
    """`peftcli train RECIPE` in a subprocess that SIGKILLs itself right after checkpoint ``step``."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, __file__, str(step), "--", "train", str(recipe), "-q"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: kill_after_checkpoint.py N -- peftcli-args...")
    kill_at = int(argv[0])

    import peftcli.checkpoint as ckpt
    from peftcli.cli import main as cli_main

    save_checkpoint = ckpt.save_checkpoint

    def save_then_die(run_dir, step, payload, keep):
        path = save_checkpoint(run_dir, step, payload, keep)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    ckpt.save_checkpoint = save_then_die
    sys.argv = ["peftcli", *argv[2:]]
    cli_main()


if __name__ == "__main__":
    main()
