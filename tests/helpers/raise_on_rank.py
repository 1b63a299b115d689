"""Run the peftcli CLI in a torchrun worker and raise in one rank at one optimizer step.

    torchrun --nproc-per-node 2 tests/helpers/raise_on_rank.py RANK STEP -- train RECIPE ...

A real failure in one rank, caused from the test side (the library has no test hook): it wraps
``peftcli.training.loop.optimizer_step`` (which the loop looks up at every step) so that the rank whose ``RANK``
is RANK raises ``RuntimeError("injected failure on rank R at step S")`` before its step S (1-based).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: raise_on_rank.py RANK STEP -- peftcli-args...")
    rank, at_step = int(argv[0]), int(argv[1])

    import peftcli.training.loop as loop
    from peftcli.cli import main as cli_main

    optimizer_step = loop.optimizer_step

    def failing_step(run, micro, n_targets, step):
        if int(os.environ.get("RANK", "0")) == rank and step + 1 == at_step:
            raise RuntimeError(f"injected failure on rank {rank} at step {at_step}")
        return optimizer_step(run, micro, n_targets, step)

    loop.optimizer_step = failing_step
    sys.argv = ["peftcli", *argv[3:]]
    cli_main()


if __name__ == "__main__":
    main()
