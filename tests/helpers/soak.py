"""Soak: SIGKILL a training run at random moments, resume it each time, until it finishes.

    python tests/helpers/soak.py RECIPE REFERENCE_DIR RUN_DIR KILLS SEED REPORT_JSON

This process is a zygote: it imports torch and peftcli once, then forks every attempt (the child runs
``peftcli.cli.main`` with ``train RECIPE -o DIR -q`` and ``--resume`` after the first) and kills it
from outside with SIGKILL, so an attempt costs a model load, not a Python start. First one
uninterrupted run into REFERENCE_DIR (timed), then attempts into RUN_DIR until KILLS kills were made
and the last attempt finished by itself. The kills alternate between

- a random moment of the attempt (start-up, lock, data, steps, writes, export: whatever it hits), and
- a moment inside a checkpoint write: the parent waits until a checkpoint's temporary directory
  exists (the 1st, 2nd or 3rd write of the attempt) and kills a few milliseconds later.

To make the second kind reliable, the children sleep 5 ms after each file of a checkpoint (a test-side
patch of ``peftcli.checkpoint.save_tree``; it changes timing, not numbers). After each kill the parent
records whether partial files were left (the kill landed inside a write). The report (JSON) lists
every attempt: mode, seconds until the kill, partial files seen, exit status.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path


def partial_files(run_dir: Path) -> list[str]:
    found = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if parent.is_dir():
            found += [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    return found


def checkpoint_writes_started(run_dir: Path) -> set[str]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if p.name.startswith(".step-") and ".tmp-" in p.name}


def spawn(recipe: str, run_dir: Path, resume: bool) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        from peftcli.cli import main

        sys.argv = ["peftcli", "train", recipe, "-o", str(run_dir), "-q", *(["--resume"] if resume else [])]
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> None:
    recipe, reference, run_dir, kills, seed, report_path = sys.argv[1:7]
    reference, run_dir, kills, rng = Path(reference), Path(run_dir), int(kills), random.Random(int(seed))

    import torch

    import peftcli.checkpoint as ckpt

    torch.set_num_threads(1)  # the same in every child, and two cores are shared
    save_tree = ckpt.save_tree

    def slow_save_tree(obj, directory, name):
        save_tree(obj, directory, name)
        time.sleep(0.005)

    ckpt.save_tree = slow_save_tree

    started = time.monotonic()
    code = wait(spawn(recipe, reference, resume=False))
    reference_s = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed with {code}")

    attempts, made = [], 0
    while True:
        mode = "none" if made >= kills else ("random" if len(attempts) % 2 == 0 else "write")
        started = time.monotonic()
        pid = spawn(recipe, run_dir, resume=bool(attempts))
        killed_at, reaped = None, None
        if mode == "random":
            time.sleep(rng.uniform(0.0, 0.5 * reference_s))
        elif mode == "write":
            seen, remaining = checkpoint_writes_started(run_dir), rng.randint(1, 3)
            deadline = time.monotonic() + 3 * reference_s
            while time.monotonic() < deadline:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:  # finished (or failed) on its own before the chosen write
                    pid, reaped = None, (-os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw))
                    break
                new = checkpoint_writes_started(run_dir) - seen
                if new:
                    remaining, seen = remaining - len(new), seen | new
                    if remaining <= 0:
                        time.sleep(rng.uniform(0.0, 0.01))
                        break
                time.sleep(0.0005)
        if pid is not None and mode != "none":
            try:
                os.kill(pid, signal.SIGKILL)
                killed_at = round(time.monotonic() - started, 3)
            except ProcessLookupError:
                pass
        status = wait(pid) if pid is not None else reaped
        killed = status == -signal.SIGKILL
        made += killed
        attempts.append(
            {
                "mode": mode,
                "killed": killed,
                "after_s": killed_at,
                "partial_files": partial_files(run_dir) if killed else [],
                "status": status,
            }
        )
        if status not in (0, -signal.SIGKILL):
            break  # a real failure: reported, the test fails on it
        if made >= kills and status == 0:
            break
        if len(attempts) > 10 * kills + 20:
            break
    report = {
        "reference_s": round(reference_s, 3),
        "kills": made,
        "kills_inside_writes": sum(bool(a["partial_files"]) for a in attempts),
        "attempts": attempts,
    }
    Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
