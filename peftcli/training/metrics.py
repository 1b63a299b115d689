"""``RUN/metrics.jsonl``: one JSON event per line, and this module is its one reader and writer.

The loop appends ``{"event": "train" | "eval" | "skipped", "step": N, ...}`` as it goes (rank 0 only);
a resumed run first drops the events logged after its checkpoint, since they will be logged again.
``peftcli report`` and ``compare`` read the same file while a run is going or after it stopped.

One rule for a damaged line, whoever reads: the *last* line may be torn (a run killed, or still
writing, mid-line), and is left out; a bad line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftcli.checkpoint import atomic_write_text
from peftcli.recipe import RecipeError

FILE = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every event in the file, in order (a torn last line left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        event = _parse(line)
        if event is None:
            if number == len(lines):
                break  # the line being written when we read, or torn by a kill
            raise RecipeError(
                f"{path}:{number}",
                "is not a metrics event",
                "metrics.jsonl holds one JSON object {'event': ..., 'step': ...} per line; "
                "delete the damaged line or start the run anew",
            )
        events.append(event)
    return events


def _parse(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or "event" not in event or "step" not in event:
        return None
    return event


def start(path: Path, step: int) -> None:
    """A fresh run (``step`` 0) starts the file anew; a resumed one keeps the events up to ``step``."""
    if step == 0:
        path.unlink(missing_ok=True)
        return
    if path.exists():
        kept = [event for event in read_events(path) if event["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(event) + "\n" for event in kept))


def append(path: Path, event: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(event) + "\n")


def first_eval(path: Path) -> dict[str, float] | None:
    """The metrics of the step-0 eval (a resumed run's "before" column)."""
    for event in read_events(path):
        if event["event"] == "eval" and event["step"] == 0:
            return {k: v for k, v in event.items() if k not in ("event", "step")}
    return None


def elapsed_at(path: Path, step: int) -> float:
    """Training seconds at ``step``, from the last train event up to it (0 for a fresh run)."""
    elapsed = 0.0
    if step == 0:
        return elapsed
    for event in read_events(path):
        if event["event"] == "train" and event["step"] <= step:
            elapsed = event.get("elapsed_s", elapsed)
    return elapsed
