"""The run directory before training starts: one run at a time, what is already there, and the checks
that must pass before any weights are loaded.

- :func:`claim_run_dir`: the lock held for the whole run, then what a killed run left, a finished run,
  --overwrite.
- :class:`RunLock`: ``RUN/.peftcli.lock`` holds the pid, host and start time of the run that owns the
  directory. It is an ``fcntl`` lock, so the kernel releases it when its process dies, even by SIGKILL:
  a lock file whose lock nobody holds was left by a dead run, and is taken over with a note.
- :func:`finished_run`: a directory whose ``results.json`` exists holds a finished run.
- :func:`discard_run` (``--overwrite``) and :func:`remove_partial_files` (what a killed run left behind).
- :func:`preflight`: the output directory is writable, the data files exist and are readable, and the
  disk has room for the checkpoints and the adapter (estimated from the trainable size and the
  optimizer's state before the weights are loaded, see :func:`estimate_trainable`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.checkpoint import human_bytes
from peftcli.recipe import Recipe, RecipeError, TrainConfig, expand_path
from peftcli.recipe_loader import validate_files

if TYPE_CHECKING:
    from peftcli.training.console import Reporter

LOCK_NAME = ".peftcli.lock"
RUN_FILES = (
    "checkpoints",
    "adapter",
    "results.json",
    "summary.md",
    "metrics.jsonl",
    "loggers.json",
    "recipe.yaml",
)


# --------------------------------------------------------------------------------------------
# One run per directory
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def claim_run_dir(recipe: Recipe, resume: bool, overwrite: bool, reporter: Reporter):
    """Hold the run directory's lock for the whole run: no second train (a racing --resume included)
    writes into it. Inside: what a killed run left half-written is removed, a finished run is refused
    unless resumed, and --overwrite discards the earlier run."""
    run_dir = Path(recipe.output_dir)
    if resume and overwrite:
        raise RecipeError("--overwrite", "cannot be combined with --resume", "pass one of them")
    created = not run_dir.exists()
    lock = acquire_lock(run_dir, note=reporter.warn)
    try:
        remove_partial_files(run_dir)
        finished = finished_run(run_dir)
        if finished is not None and not resume and not overwrite:
            raise refuse_finished(run_dir, finished)
        if overwrite:
            removed = discard_run(run_dir)
            if removed:
                reporter.note(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
        yield lock
    finally:
        lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed its checks leaves no empty directory behind


def _process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused pid from the original."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class RunLock:
    """Held for the whole run; :meth:`release` (or process death) frees the directory."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe_holder(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def acquire_lock(run_dir: Path, note=print) -> RunLock:
    """Take ``RUN/.peftcli.lock`` or raise RecipeError naming the run that holds it.

    ``note`` receives one line when a stale lock (its process is gone) is taken over.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_lock(path)
            raise RecipeError(
                "output_dir",
                f"{run_dir} is in use by another peftcli train ({_describe_holder(holder)})",
                "wait for that run to finish, or train into another --output-dir",
            ) from None
        # We hold a lock on this inode; another process may have unlinked the path meanwhile.
        if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            continue
        previous = _read_lock(path)
        if previous and previous.get("host") not in (None, host) and _flock_unreliable(path):
            os.close(fd)
            raise RecipeError(
                "output_dir",
                f"{run_dir} is locked by a run on another machine ({_describe_holder(previous)})",
                f"if that run is no longer going, delete {path}",
            )
        if previous:
            note(f"removed a stale lock in {run_dir}: {_describe_holder(previous)} is no longer running")
        info = {
            "pid": os.getpid(),
            "host": host,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pid_start_ticks": _process_start_ticks(os.getpid()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        return RunLock(path, fd)
    raise RecipeError("output_dir", f"could not take the lock {path}", "retry, or use another --output-dir")


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _flock_unreliable(path: Path) -> bool:
    """Whether the lock file sits on a network file system, where flock may not see other hosts."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return True
    target, best, kind = str(path.resolve()), "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind.startswith(("nfs", "cifs", "smb", "fuse.sshfs", "9p", "lustre", "gpfs"))


# --------------------------------------------------------------------------------------------
# What the directory already holds
# --------------------------------------------------------------------------------------------


def finished_run(run_dir: Path) -> dict[str, Any] | None:
    """The results of the finished run in ``run_dir`` (its results.json), or None."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def refuse_finished(run_dir: Path, results: dict[str, Any]) -> RecipeError:
    steps = results.get("steps", "?")
    return RecipeError(
        "output_dir",
        f"{run_dir} holds a finished run ({steps} steps, adapter in {Path(run_dir) / 'adapter'})",
        "pass --resume to continue it, choose a new --output-dir, or pass --overwrite to discard it",
    )


def discard_run(run_dir: Path) -> list[str]:
    """Remove what a previous run wrote (``--overwrite``); other files in the directory stay."""
    removed = []
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_dir():
            doomed = path.with_name(f".{name}.discarded-{os.getpid()}")
            os.replace(path, doomed)  # gone at once for anyone looking, then deleted
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(name)
        elif path.exists():
            path.unlink()
            removed.append(name)
    return removed


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files and directories a killed run left (call only while holding the lock)."""
    run_dir = Path(run_dir)
    found = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            name = child.name
            if name.startswith(".") and (".tmp" in name or ".old-" in name or ".deleting" in name):
                found.append(child)
            elif name.startswith(".") and parent == run_dir and name != LOCK_NAME and "." in name[1:]:
                # atomic_write_text's temp files: .results.json.abc123
                stem = name[1:].rsplit(".", 1)[0]
                if stem in RUN_FILES or stem.endswith((".json", ".yaml", ".jsonl", ".md")):
                    found.append(child)
    for path in found:
        name = path.name
        if ".old-" in name and path.is_dir():
            # A kill between AtomicDir's two renames: the old copy is the only one; put it back.
            original = path.with_name(name[1:].split(".old-")[0])
            if not original.exists():
                os.replace(path, original)
                continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


# --------------------------------------------------------------------------------------------
# Checks before loading weights
# --------------------------------------------------------------------------------------------

# Bytes of optimizer state per trainable parameter (fp32 moments unless the optimizer quantizes them).
OPTIMIZER_BYTES = {
    "adamw": 8.0,
    "paged_adamw_32bit": 8.0,
    "adamw_8bit": 2.0,
    "paged_adamw_8bit": 2.0,
    "paged_lion_8bit": 1.0,
}


def checkpoint_bytes(trainable: int, train: TrainConfig) -> int:
    """Estimated size of one checkpoint: fp32 weights, optimizer state, and method state (slack)."""
    optimizer = OPTIMIZER_BYTES.get(train.optimizer, 0.0)
    if train.optimizer == "sgd":
        optimizer = 4.0 if train.momentum > 0 else 0.0
    # 25% + 1 MB covers method state (e.g. AdaLoRA's importance scores), RNG states and JSON.
    return int(trainable * (4.0 + optimizer) * 1.25) + 1_000_000


def adapter_bytes(trainable: int) -> int:
    """Estimated size of the adapter directory: fp32 tensors (PiSSA exports twice its rank) + tokenizer."""
    return int(trainable * 4 * 2) + 20_000_000


def space_needed(trainable: int, train: TrainConfig, checkpoints_on_disk: int = 0) -> tuple[int, str]:
    """Bytes the run still has to write at its peak, and how that figure was made."""
    # Rotation writes the newest checkpoint before deleting the oldest: keep + 1 exist for a moment.
    peak = max(2, train.keep_checkpoints + 1) if train.save_every else 2
    new = max(0, peak - checkpoints_on_disk)
    one = checkpoint_bytes(trainable, train)
    total = new * one + adapter_bytes(trainable)
    how = (
        f"{new} checkpoint(s) of ~{human_bytes(one)} + the adapter, for {trainable:,} trainable "
        f"parameters with {train.optimizer}"
    )
    return total, how


def check_writable(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test.tmp") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise RecipeError(
            "output_dir",
            f"cannot write to {run_dir}: {err.strerror or err}",
            "choose another --output-dir or fix its permissions",
        ) from None


def check_data_files(recipe: Recipe) -> None:
    """The local data files the recipe names exist and can be read (columns are checked by data)."""
    validate_files(recipe)
    named: list[tuple[str, str]] = []
    if isinstance(recipe.data.train, list):  # a mixture: one path per source
        named += [(f"data.train[{i}].path", source.path) for i, source in enumerate(recipe.data.train)]
    elif recipe.data.train:
        named.append(("data.train", recipe.data.train))
    if recipe.data.eval:
        named.append(("data.eval", recipe.data.eval))
    for key, value in named:
        path = Path(expand_path(value))
        if path.is_file() and not os.access(path, os.R_OK):
            raise RecipeError(key, f"cannot read {value} (permission denied)", "fix the file's permissions")


def check_free_space(run_dir: Path, needed: int, how: str) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise RecipeError(
            "output_dir",
            f"{run_dir} has {human_bytes(free)} free; this run needs about {human_bytes(needed)} ({how})",
            "free some space, lower train.keep_checkpoints, or choose another --output-dir",
        )


def estimate_trainable(recipe: Recipe, base_path: str) -> int | None:
    """The trainable-parameter count of ``recipe``'s model, built on the meta device (no weights read,
    no memory used). None when the model or method cannot be built that way; the caller then checks
    the space with the exact count once the model is loaded."""
    import torch
    import transformers

    from peftcli.methods.catalog import get_method_class
    from peftcli.models import TASK_AUTO, hub_kwargs
    from peftcli.tiny import quiet_transformers

    quiet_transformers()
    offline = hub_kwargs(base_path, recipe.model)  # no network and nothing cached: one line, now
    try:
        config = transformers.AutoConfig.from_pretrained(
            base_path,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            **offline,
        )
        if recipe.model.task == "seq_cls":
            config.num_labels = 1 if recipe.objective.name == "reward" else recipe.model.num_labels or 2
        auto = getattr(transformers, TASK_AUTO[recipe.model.task])
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
            method = get_method_class(recipe.method.name)(recipe.method, recipe.model.task)
            model = method.attach(model)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    except Exception:  # any model or method that cannot live on the meta device
        return None


def preflight(recipe: Recipe, base_path: str, checkpoints_on_disk: int = 0) -> int | None:
    """Everything that can fail cheaply, before the weights are loaded; the estimated trainable count
    (None when it could not be estimated, see :func:`estimate_trainable`)."""
    run_dir = Path(recipe.output_dir)
    check_writable(run_dir)
    check_data_files(recipe)
    trainable = estimate_trainable(recipe, base_path)
    if trainable is not None:
        check_free_space(run_dir, *space_needed(trainable, recipe.train, checkpoints_on_disk))
    return trainable
