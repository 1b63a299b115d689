"""Run the peftcli CLI and hold it still right after checkpoint N, until a file appears.

    python tests/helpers/pause_after_checkpoint.py N PAUSED_FILE GO_FILE -- train RECIPE ...

Once ``checkpoints/step-N`` is written it creates PAUSED_FILE and waits for GO_FILE, so a test can act
while the run is certainly in progress (e.g. start a second train in the same directory). The library
has no test hook: this wraps ``peftcli.checkpoint.save_checkpoint``, which the loop calls through the module.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 4 or argv[3] != "--":
        raise SystemExit("usage: pause_after_checkpoint.py N PAUSED_FILE GO_FILE -- peftcli-args...")
    pause_at, paused, go = int(argv[0]), Path(argv[1]), Path(argv[2])

    import peftcli.checkpoint as ckpt
    from peftcli.cli import main as cli_main

    save_checkpoint = ckpt.save_checkpoint

    def save_then_wait(run_dir, step, payload, keep):
        path = save_checkpoint(run_dir, step, payload, keep)
        if step == pause_at:
            paused.write_text("")
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return path

    ckpt.save_checkpoint = save_then_wait
    sys.argv = ["peftcli", *argv[4:]]
    cli_main()


if __name__ == "__main__":
    main()
