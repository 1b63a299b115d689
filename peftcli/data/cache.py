"""The on-disk cache of tokenized datasets: keys, atomic writes, memory-mapped reads.

An entry is a directory ``<cache_dir>/<key>/`` holding the Arrow files ``datasets.map`` wrote and a
``meta.json`` (row and token counts, truncation, skipped rows, label names). The key is a hash of
everything that changes the tokens: the source's content (see ``sources.source_fingerprint``), the
split and row selection, the tokenizer (its full serialisation and chat template), the format spec
(format, column mapping, max_length, train_on_prompt, add_eos, roles, labels) and
``DATA_STAGE_VERSION``. An entry is built in ``.tmp-<key>-<pid>/`` and renamed into place, so a
killed build never leaves a half entry; a reader sees a complete entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Bump when the tokenized columns or their meaning change, so old cache entries are not reused.
DATA_STAGE_VERSION = 2


def default_cache_dir(configured: str | None = None) -> Path:
    """``data.cache_dir``, else ``$PEFTCLI_CACHE/data``, else ``~/.cache/peftcli/data``."""
    if configured:
        return Path(os.path.expanduser(os.path.expandvars(configured)))
    root = os.environ.get("PEFTCLI_CACHE")
    return Path(root) / "data" if root else Path.home() / ".cache" / "peftcli" / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what makes the tokenizer's ids: its serialised model and rules, specials, template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)]
    digest.update(json.dumps(specials).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"version": DATA_STAGE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def open_entry(root: Path, key: str) -> tuple[Any, dict] | None:
    """(memory-mapped dataset, meta) of a complete entry, or None."""
    entry = root / key
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    import datasets

    meta = json.loads(meta_path.read_text())
    try:
        parts = [datasets.Dataset.from_file(str(entry / name)) for name in meta["files"]]
    except (FileNotFoundError, OSError, ValueError):
        return None  # damaged by hand: rebuilt below
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset, meta


def build_entry(root: Path, key: str, build: Callable[[Path], tuple[Any, dict]]) -> tuple[Any, dict]:
    """Run ``build(tmp_dir) -> (dataset, meta)`` writing into a temp dir, then rename it to ``root/key``."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dataset, meta = build(tmp)
        files = [Path(f["filename"]) for f in dataset.cache_files]
        assert all(f.parent.resolve() == tmp.resolve() for f in files), files
        meta["files"] = [f.name for f in files]
        for extra in set(tmp.iterdir()) - {tmp / f.name for f in files}:
            if extra.is_file():
                extra.unlink()  # map's unfiltered shards when rows were dropped
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        del dataset
        try:
            os.rename(tmp, root / key)
        except OSError:
            if not (root / key / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process built the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    opened = open_entry(root, key)
    assert opened is not None, root / key
    return opened


def _remove_stale_temp_dirs(root: Path) -> None:
    """Temp dirs of builds whose process is gone (killed mid-build) are removed."""
    for tmp in root.glob(".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
