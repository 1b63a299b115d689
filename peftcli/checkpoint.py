"""Atomic checkpoints for exact resume, and atomic file writes in general.

A checkpoint holds everything the loop needs to continue as if it had never stopped: the trainable
weights, the method's own state (e.g. AdaLoRA's importance scores), the optimizer and scheduler,
every RNG state, and the position in the data. Nothing is pickled: tensors go to safetensors and
the structure around them to JSON, so a checkpoint can never run code when it is loaded.

A checkpoint is written into a temporary directory, then renamed into place, so a run killed at any
moment leaves only complete checkpoints behind. Its last file is ``manifest.json``: the size and
SHA-256 of every other file. ``--resume`` verifies the newest checkpoint against it and falls back to
the one before, with a warning naming what was wrong, when a file is missing, short or damaged
(:func:`resume_checkpoint`). A write that fails (a full disk, an I/O error) removes its partial files,
leaves the previous checkpoint as it was and stops with one line saying how much space is needed
(:func:`save_checkpoint`).
Adapter weight files are read here too (:func:`read_adapter_state`), for export and for the methods
that start from another adapter.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftcli.recipe import RecipeError

COMPLETE_MARKER = "complete"
MANIFEST = "manifest.json"
# Write errors that say the disk, not the program, is at fault: answered with one line, not a traceback.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name, in every adapter directory


def read_adapter_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path/adapter_model.safetensors`` (ours or peft's), or a RecipeError."""
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise RecipeError(
            "adapter", f"{weights} is missing", "point at a directory written by peftcli train or peft"
        )
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as err:  # SafetensorError, or an OSError from a truncated file
        raise RecipeError(
            "adapter",
            f"{weights} is not a readable safetensors file ({str(err).splitlines()[0][:120]})",
            "write the adapter again (peftcli train --resume) or copy it again",
        ) from None


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, data, "wb")


def _atomic_write(path: str | Path, content: str | bytes, mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicDir:
    """``with AtomicDir(final) as tmp:`` write into ``tmp``; on success it replaces ``final`` whole."""

    def __init__(self, final: str | Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        _fsync_path(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Tensor trees without pickle
# --------------------------------------------------------------------------------------------


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def _key(k: Any) -> Any:
    return k if isinstance(k, (str, int)) else str(k)


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
    return obj


def save_tree(obj: Any, directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(obj, tensors, name)
    # safetensors refuses tensors that share memory; clone the rare aliases.
    seen: dict[int, str] = {}
    for key, value in list(tensors.items()):
        ptr = value.data_ptr() if value.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[key] = value.clone()
        seen[ptr] = key
    weights = directory / f"{name}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights))
    _fsync_path(weights)
    _write_synced(directory / f"{name}.json", json.dumps(structure))


def load_tree(directory: Path, name: str) -> Any:
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _unflatten(json.loads((directory / f"{name}.json").read_text()), tensors)


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("step-")) if path.name.startswith("step-") else None
    except ValueError:
        return None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints whose write finished (their manifest exists), oldest first; not yet verified."""
    return [(step, path) for step, path in _step_dirs(run_dir) if (path / MANIFEST).is_file()]


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(_step_of(child), child) for child in root.iterdir() if child.is_dir()]
    return sorted((step, child) for step, child in found if step is not None)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """Record the size and SHA-256 of every file in ``directory``; written last, it marks the write done."""
    files = {
        child.name: {"bytes": child.stat().st_size, "sha256": _sha256(child)}
        for child in sorted(directory.iterdir())
        if child.is_file() and child.name != MANIFEST
    }
    _write_synced(directory / MANIFEST, json.dumps({"step": step, "files": files}, indent=2) + "\n")


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path``, or None when every file matches its manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{MANIFEST} is missing (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = manifest["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    if step != _step_of(path):
        return f"{MANIFEST} is for step {step}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, the manifest says {expected.get('bytes')}"
        if _sha256(file) != expected.get("sha256"):
            return f"{name} is damaged (its SHA-256 differs from the manifest's)"
    for required in ("trainable.safetensors", "optimizer.safetensors", "trainer_state.json"):
        if required not in files:
            return f"{required} is not in the manifest"
    return None


def resume_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is named to ``warn`` with what is
    wrong. None when there is no checkpoint at all; RecipeError when there are some but none is intact."""
    candidates = _step_dirs(run_dir)
    problems = []
    for step, path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            if problems:
                warn(f"resuming from step-{step} instead")
            return path
        problems.append(f"step-{step}: {problem}")
        warn(f"checkpoint {path} is not usable: {problem}")
    if problems:
        raise RecipeError(
            "--resume",
            f"no intact checkpoint in {checkpoints_dir(run_dir)} ({'; '.join(problems)})",
            "start the run again with --overwrite, or train into another --output-dir",
        )
    return None


def check_tensors(
    found: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    source: str,
    exact_dtype: bool = True,
    shapes: bool = True,
) -> None:
    """Refuse tensors whose names, shapes or dtypes differ from ``expected``, listing the names.

    ``exact_dtype=False`` accepts any floating dtype for a floating tensor (an adapter saved in bf16);
    ``shapes=False`` leaves shapes out (a method that resizes itself to what it loads, e.g. AdaLoRA)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(found) & set(expected)
        if shapes and found[k].shape != expected[k].shape
    )

    def dtype_fits(k: str) -> bool:
        got, want = found[k].dtype, expected[k].dtype
        return got == want or (not exact_dtype and got.is_floating_point and want.is_floating_point)

    wrong_dtype = sorted(
        f"{k} {str(found[k].dtype).removeprefix('torch.')} (expected {str(expected[k].dtype).removeprefix('torch.')})"
        for k in set(found) & set(expected)
        if not dtype_fits(k)
    )
    parts = []
    for label, names in (
        ("unexpected", unexpected),
        ("missing", missing),
        ("wrong shape", wrong_shape),
        ("wrong dtype", wrong_dtype),
    ):
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            parts.append(f"{label}: {shown}")
    if parts:
        raise RecipeError(
            source,
            f"its tensors do not fit this model ({'; '.join(parts)})",
            "load it with the base model and method options it was trained with",
        )


def tree_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload (what a checkpoint of it will take on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tree_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_bytes(v) for v in obj)
    return 0


def disk_error(err: OSError, what: str, directory: Path, needed: int, previous: Path | None) -> RecipeError:
    """One line for a write that the disk refused: what failed, how much space it needs, what is intact."""
    try:
        free = f"{human_bytes(shutil.disk_usage(directory).free)} is free"
    except OSError:
        free = "the free space is unknown"
    kept = f"{previous} is intact" if previous is not None else "no earlier checkpoint exists"
    return RecipeError(
        "output_dir",
        f"could not write {what} in {directory}: {err.strerror or err}; it needs about "
        f"{human_bytes(needed)} and {free}; {kept}",
        "free some space (or fix the disk) and continue with --resume",
    )


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically; keep only the newest ``keep`` checkpoints.

    On a full disk or an I/O error the partial directory is removed, the previous checkpoints stay,
    and a RecipeError says how much space the checkpoint needs."""
    final = checkpoints_dir(run_dir) / f"step-{step}"
    previous = latest_checkpoint(run_dir)
    try:
        with AtomicDir(final) as tmp:
            save_tree(payload["trainable"], tmp, "trainable")
            save_tree(payload["optimizer"], tmp, "optimizer")
            save_tree(payload["method_state"], tmp, "method_state")
            save_tree(payload["rng"], tmp, "rng")
            _write_synced(tmp / "trainer_state.json", json.dumps(payload["trainer_state"], indent=2))
            _write_synced(tmp / COMPLETE_MARKER, "")
            write_manifest(tmp, step)
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        needed = int(tree_bytes(payload) * 1.05) + 100_000
        raise disk_error(err, f"checkpoint step-{step}", checkpoints_dir(run_dir), needed, previous) from None
    for _, old in list_checkpoints(run_dir)[:-keep]:
        # Renamed away first, so a kill during the delete never leaves a half-deleted step-N behind.
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def load_checkpoint(path: Path, expected_trainable: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Read a checkpoint; with ``expected_trainable``, refuse one whose trainable tensors differ in name,
    shape or dtype from the model's (listing them)."""
    trainable = load_tree(path, "trainable")
    if expected_trainable is not None:
        check_tensors(trainable, expected_trainable, f"checkpoint {path}")
    return {
        "trainable": trainable,
        "optimizer": load_tree(path, "optimizer"),
        "method_state": load_tree(path, "method_state"),
        "rng": load_tree(path, "rng"),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
