"""Atomic checkpoints for exact resume, and atomic file writes in general.

A checkpoint holds everything the loop needs to continue as if it had never stopped: the trainable
weights, the method's own state (e.g. AdaLoRA's importance scores), the optimizer and scheduler,
every RNG state, and the position in the data. Nothing is pickled: tensors go to safetensors and
the structure around them to JSON, so a checkpoint can never run code when it is loaded.

A checkpoint is written into a temporary directory, marked complete, then renamed into place, so a
run killed at any moment leaves only complete checkpoints behind. Adapter weight files are read here
too (:func:`read_adapter_state`), for export and for the methods that start from another adapter.
"""

from __future__ import annotations

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
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name, in every adapter directory


def read_adapter_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path/adapter_model.safetensors`` (ours or peft's), or a RecipeError."""
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise RecipeError(
            "adapter", f"{weights} is missing", "point at a directory written by peftcli train or peft"
        )
    with safe_open(str(weights), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
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
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / f"{name}.safetensors")
    )
    (directory / f"{name}.json").write_text(json.dumps(structure))


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


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith("step-") and (child / COMPLETE_MARKER).exists():
            try:
                found.append((int(child.name.removeprefix("step-")), child))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically; keep only the newest ``keep`` checkpoints."""
    final = checkpoints_dir(run_dir) / f"step-{step}"
    with AtomicDir(final) as tmp:
        save_tree(payload["trainable"], tmp, "trainable")
        save_tree(payload["optimizer"], tmp, "optimizer")
        save_tree(payload["method_state"], tmp, "method_state")
        save_tree(payload["rng"], tmp, "rng")
        (tmp / "trainer_state.json").write_text(json.dumps(payload["trainer_state"], indent=2))
        (tmp / COMPLETE_MARKER).write_text("")
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    return {
        "trainable": load_tree(path, "trainable"),
        "optimizer": load_tree(path, "optimizer"),
        "method_state": load_tree(path, "method_state"),
        "rng": load_tree(path, "rng"),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }
