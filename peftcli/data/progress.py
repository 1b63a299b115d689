"""Rich progress bars for ``datasets``' own long stages (reading a file to Arrow, ``map``).

``datasets`` reports progress through a tqdm class it imports as ``hf_tqdm``; while a build runs we
point that name at a small adapter that drives a rich ``Progress``. Progress from ``map``'s worker
processes reaches the parent through datasets' own queue, so the one bar covers every process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _RichTqdm:
    """The slice of tqdm's interface datasets uses: construct, update, close, context manager."""

    progress: Progress | None = None

    def __init__(
        self,
        iterable=None,
        *args: Any,
        total: Any = None,
        desc: str | None = None,
        initial: int = 0,
        **kwargs: Any,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.task = self.progress.add_task(desc or "working", total=total, completed=initial)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.progress.update(self.task, advance=n)

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        task = self.progress._tasks.get(self.task)
        if task is not None and task.total is not None:
            self.progress.update(self.task, completed=task.total)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def datasets_progress(console: Console | None) -> Iterator[Progress | None]:
    """Inside: datasets' bars are rich bars on ``console`` (or off when ``console`` is None)."""
    import datasets.arrow_dataset
    import datasets.builder

    if console is None:  # datasets' own bars stay off (quiet_datasets turned them off)
        yield None
        return
    progress = make_progress(console)
    adapter = type("RichTqdm", (_RichTqdm,), {"progress": progress})
    modules = [datasets.arrow_dataset, datasets.builder]
    saved = [getattr(module, "hf_tqdm", None) for module in modules]
    for module in modules:
        module.hf_tqdm = adapter
    try:
        with progress:
            yield progress
    finally:
        for module, original in zip(modules, saved, strict=True):
            if original is not None:
                module.hf_tqdm = original
