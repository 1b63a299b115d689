"""Reading data sources into Arrow tables (``datasets``), with errors that name the file and line.

A source is a .jsonl/.json/.csv/.parquet file, a directory written by ``datasets``' ``save_to_disk``,
or a hub dataset id. Files are read by ``datasets.load_dataset`` (pyarrow's parsers, converted to
Arrow once and memory-mapped); only when that fails do we scan the file line by line to name the
first bad line, so the fast path never pays for the diagnosis. With ``on_bad_row: skip`` the lines
that cannot be parsed are left out and counted by reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli.recipe import RecipeError, did_you_mean

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Suffixes that mark a missing local file rather than a hub id (hub ids may contain dots: "org/ds-1.5").
_FILE_LIKE_SUFFIXES = (*FILE_SUFFIXES, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".yaml", ".yml")
_WHOLE_FILE_HASH_LIMIT = 16 * 2**20  # files up to this size are hashed whole
_MIB = 2**20


@dataclass
class Source:
    """A loaded source: its Arrow rows and how to name row ``i`` in an error."""

    dataset: Any  # datasets.Dataset
    name: str  # what the user wrote (data.train)
    path: Path | None  # the local file, when it is one
    kind: str  # jsonl | json | csv | parquet | saved | hub
    skipped: Counter = field(default_factory=Counter)  # unreadable lines left out (on_bad_row: skip)
    lines: list[int] | None = None  # line of each row, when rows were parsed one line at a time

    def where(self, row: int) -> str:
        """``file line N`` (1-based) for the 0-based row ``row``; computed only for errors."""
        if self.lines is not None:
            return f"{self.path} line {self.lines[row]}"
        if self.kind == "jsonl" and self.path is not None:
            return f"{self.path} line {_line_of_row(self.path, row)}"
        if self.kind == "csv":
            return f"{self.path} row {row + 1} (after the header)"
        if self.kind in ("json", "parquet") and self.path is not None:
            return f"{self.path} row {row + 1}"
        return f"{self.name} row {row + 1}"


def looks_like_local_path(source: str) -> bool:
    """True when ``source`` was meant as a file or directory rather than a hub id like ``org/name``.

    A hub id has at most one slash and no file suffix, so a plain ``org/name`` still goes to the hub.
    """
    return (
        source.lower().endswith(_FILE_LIKE_SUFFIXES)
        or ("/" not in source and Path(source).suffix != "")
        or source.startswith(("/", ".", "~"))
        or source.count("/") >= 2
        or "\\" in source
    )


def quiet_datasets() -> None:
    """datasets' own log lines ("Failed to load JSON ...") would duplicate our one-line errors."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # ours are rich bars (data/progress.py), shown only while we build
    logging.getLogger("datasets").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# Fingerprints: what identifies a source's content without reading all of it
# --------------------------------------------------------------------------------------------


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        if size <= _WHOLE_FILE_HASH_LIMIT:
            for block in iter(lambda: handle.read(_MIB), b""):
                digest.update(block)
            return
        # Big files: first and last MiB, eight 64 KiB probes between them, and the mtime, so an
        # edit anywhere is caught without reading gigabytes on every start.
        digest.update(handle.read(_MIB))
        for k in range(1, 9):
            handle.seek(size * k // 9)
            digest.update(handle.read(64 * 1024))
        handle.seek(size - _MIB)
        digest.update(handle.read(_MIB))
        digest.update(str(path.stat().st_mtime_ns).encode())


def source_fingerprint(source: str, split: str, key: str) -> str | None:
    """A content hash of a local file or saved dataset directory; None for hub ids (see load_source)."""
    path = Path(os.path.expanduser(source))
    digest = hashlib.sha256()
    if path.is_file():
        _file_digest(path, digest)
    elif path.is_dir():
        digest.update(split.encode())
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            _file_digest(file, digest)
    else:
        _check_exists(source, key)
        return None
    return digest.hexdigest()


def _check_exists(source: str, key: str) -> None:
    path = Path(os.path.expanduser(source))
    if not path.exists() and looks_like_local_path(source):
        raise RecipeError(
            key, f"file not found: {path}", "check the path (relative paths start from the current directory)"
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_source(
    source: str,
    split: str,
    key: str,
    on_bad_row: str = "error",
    cache_dir: str | Path | None = None,
    limit: int | None = None,
) -> Source:
    """Read ``source`` into a memory-mapped ``datasets.Dataset``; ``key`` (``data.train``) names it in errors.

    ``limit`` reads only the first rows (``peftcli validate``): files are then parsed line by line.
    """
    import datasets

    quiet_datasets()
    path = Path(os.path.expanduser(source))
    raw_cache = str(Path(cache_dir) / "raw") if cache_dir else None
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise RecipeError(
                key,
                f"{path} is a directory but not a dataset saved with save_to_disk",
                "point at a data file, or save the dataset with Dataset.save_to_disk",
            ) from None
        result = Source(_pick_split(data, source, split, key), source, path, "saved")
    elif path.is_file():
        result = _load_file(path, source, key, on_bad_row, raw_cache, limit)
    elif looks_like_local_path(source):
        _check_exists(source, key)
        raise AssertionError("unreachable")  # _check_exists raised
    else:
        try:
            data = datasets.load_dataset(source, split=split, cache_dir=None)
        except Exception as err:
            detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise RecipeError(
                key,
                f"{source!r} is not a local file or directory, and the hub dataset was not found "
                f"or the hub cannot be reached ({detail})",
                "check the path or the dataset id; offline, point at a local file",
            ) from None
        result = Source(_pick_split(data, source, split, key), source, None, "hub")
    if limit is not None and len(result.dataset) > limit:
        result.dataset = result.dataset.select(range(limit))
    if len(result.dataset) == 0:
        raise RecipeError(key, f"no examples in {source}", "check that the file or split has data")
    return result


def _pick_split(data: Any, source: str, split: str, key: str) -> Any:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        splits = list(data.keys())
        if split not in splits:
            hint = did_you_mean(split, splits) or f"available splits: {', '.join(splits)}"
            split_key = key.replace("data.train", "data.train_split").replace("data.eval", "data.eval_split")
            split_key = split_key if split_key != key else f"{key}.split"
            raise RecipeError(split_key, f"split {split!r} not in {source}", hint)
        data = data[split]
    return data


TOO_DEEP = "arrays or objects nested too deeply to read"


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` whose every failure is a ``JSONDecodeError``: arrays or objects nested past
    Python's recursion limit raise RecursionError in the stdlib parser, which would escape as a
    traceback instead of a line number."""
    try:
        return json.loads(text)
    except RecursionError:
        document = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        raise json.JSONDecodeError(TOO_DEEP, document, _too_deep_at(document)) from None


def _nested_too_deep(path: Path, kind: str) -> bool:
    """Whether some JSON value in ``path`` nests deeper than Python's parser goes (~1,000 levels).

    A line (or document) with fewer opening brackets than that cannot be that deep, so only the rare
    bracket-heavy ones are parsed. JSON documents over 256 MiB are not checked (use JSON lines)."""
    threshold = 900
    if kind == "jsonl":
        with path.open("rb") as handle:
            chunks = (line for line in handle if line.count(b"[") + line.count(b"{") > threshold)
            return any(_too_deep(line) for line in chunks)
    if path.stat().st_size > 256 * _MIB:
        return False
    document = path.read_bytes()
    return document.count(b"[") + document.count(b"{") > threshold and _too_deep(document)


def _too_deep(text: bytes) -> bool:
    try:
        parse_json(text)
    except json.JSONDecodeError as error:
        return error.msg == TOO_DEEP
    except UnicodeDecodeError:
        return False
    return False


def _too_deep_at(document: str, depth_limit: int = 500) -> int:
    """The offset where nesting (outside strings) first passes ``depth_limit``: where the parser gave up."""
    depth, in_string, escaped = 0, False, False
    for offset, char in enumerate(document):
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = char == "\\", char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > depth_limit:
                return offset
        elif char in "]}":
            depth -= 1
    return 0


def _json_layout(path: Path, key: str) -> tuple[str, str | None]:
    """("json", field) for a JSON document (a list, or an object with a "data" list); ("jsonl", None)."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if path.suffix.lower() == ".jsonl" or not head:
        return "jsonl", None
    if head[:1] == b"[":
        return "json", None
    if head[:1] == b"{" and path.stat().st_size <= 256 * _MIB:
        try:
            document = parse_json(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "jsonl", None  # one object per line (or broken: the line scan will say where)
        if isinstance(document, dict):
            if isinstance(document.get("data"), list):
                return "json", "data"
            raise RecipeError(
                key,
                f"{path} is a JSON object without a 'data' list",
                'use a list of objects, {"data": [...]}, or one object per line (.jsonl)',
            )
    return "jsonl", None


def _load_file(
    path: Path, source: str, key: str, on_bad_row: str, raw_cache: str | None, limit: int | None
) -> Source:
    import datasets

    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise RecipeError(
            key,
            f"unsupported file type {suffix or '(none)'}: {path}",
            f"use one of {', '.join(FILE_SUFFIXES)}",
        )
    if suffix in (".jsonl", ".json"):
        kind, json_field = _json_layout(path, key)
        if kind == "jsonl" and limit is not None:
            rows, skipped, lines = _scan_json_lines(path, key, on_bad_row, limit)
            if not rows:
                raise RecipeError(key, f"no examples in {source}", "check that the file has data")
            return Source(datasets.Dataset.from_list(rows), source, path, kind, skipped, lines)
        builder, kwargs = "json", ({"field": json_field} if json_field else {})
    elif suffix == ".csv":
        kind, builder = "csv", "csv"
        kwargs = {"keep_default_na": False, "features": _csv_string_features(path)}  # cells as written
        _screen_csv_rows(path, key)  # pandas fills a short row's missing cells with "" instead of failing
    else:
        kind, builder, kwargs = "parquet", "parquet", {}
    if kind in ("json", "jsonl") and _nested_too_deep(path, kind):
        # pyarrow's JSON reader recurses on the C stack and segfaults past a few thousand levels:
        # the line-by-line reader names the line (or skips it with on_bad_row: skip).
        return _diagnose(path, source, key, kind, on_bad_row, raw_cache, ValueError("nested too deeply"))
    try:
        data = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=raw_cache, **kwargs
        )
        # pyarrow's JSON reader stores invalid UTF-8 (a Latin-1 "é") unchecked; a full validation
        # finds it here (linear, vectorised) instead of as a UnicodeDecodeError mid-tokenization.
        data.data.table.validate(full=True)
    except Exception as err:
        return _diagnose(path, source, key, kind, on_bad_row, raw_cache, err)
    return Source(data, source, path, kind)


def _csv_string_features(path: Path) -> Any:
    """Every CSV column as a string, as written ("" for an empty cell), like csv.DictReader reads it."""
    import csv

    import datasets

    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except UnicodeDecodeError:
        return None  # the load fails and _diagnose names the line
    if not header or len(set(header)) != len(header):
        return None
    return datasets.Features({name: datasets.Value("string") for name in header})


def _diagnose(
    path: Path, source: str, key: str, kind: str, on_bad_row: str, raw_cache: str | None, err: Exception
) -> Source:
    """datasets could not read the file: find the first bad line and name it (or skip bad lines)."""
    if kind == "jsonl":
        return _read_good_json_lines(path, source, key, kind, on_bad_row)
    text = _utf8_text(path, key)
    if kind == "json":
        try:
            parse_json(text)
        except json.JSONDecodeError as json_error:
            raise RecipeError(
                key,
                f"{path} line {json_error.lineno} is not valid JSON: {json_error.msg}",
                "fix the JSON syntax",
            ) from None
        raise RecipeError(
            key,
            f"{path} could not be read as a list of objects ({_first_line(err)})",
            "use a list of objects with the same columns, or one object per line (.jsonl)",
        ) from None
    if kind == "csv":
        _check_csv_rows(io.StringIO(text, newline=""), path, key)
    raise RecipeError(
        key,
        f"{path} could not be read as {kind} ({_first_line(err)})",
        f"check that it is a valid .{kind} file",
    ) from None


def _read_good_json_lines(path: Path, source: str, key: str, kind: str, on_bad_row: str) -> Source:
    """JSON lines read one by one: the first bad line refused, or bad lines skipped (on_bad_row: skip)."""
    import datasets

    rows, skipped, lines = _scan_json_lines(path, key, on_bad_row, None)
    if not rows:
        raise RecipeError(key, f"no examples in {source}", "check that the file has data")
    try:
        data = datasets.Dataset.from_list(rows)  # only the skip path lands here: bad lines are rare
    except Exception as inner:
        raise RecipeError(
            key,
            f"{path}: the rows do not share one schema ({_first_line(inner)})",
            "give each column one type in every row",
        ) from None
    return Source(data, source, path, kind, skipped, lines)


def _utf8_text(path: Path, key: str) -> str:
    """The file as text; a byte that is not UTF-8 is refused with its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as decode_error:
        line = raw.count(b"\n", 0, decode_error.start) + 1
        raise RecipeError(
            key,
            f"{path} line {line} is not UTF-8 (byte 0x{raw[decode_error.start]:02x})",
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def _screen_csv_rows(path: Path, key: str) -> None:
    """Before datasets reads a CSV: a row with too few fields (a missing label cell) would load with
    empty cells, so the file is read once with the csv module (C speed) and the first ragged row named.
    Undecodable bytes are left to the load, whose failure names their line."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            _check_csv_rows(handle, path, key)
    except UnicodeDecodeError:
        return


def _check_csv_rows(lines: Iterable[str], path: Path, key: str) -> None:
    """Refuse the first row whose field count differs from the header's. Cells of any size are read
    (the csv module's default limit is 128 KiB; pandas has none), the limit restored after."""
    import csv

    limit = csv.field_size_limit(2**31 - 1)
    try:
        reader = csv.reader(lines)
        header = next(reader, None)
        for row in reader:
            if header is not None and row and len(row) != len(header):
                raise RecipeError(
                    key,
                    f"{path} line {reader.line_num} has {len(row)} fields, the header has {len(header)}",
                    "quote fields that contain commas, or fix the row",
                )
    finally:
        csv.field_size_limit(limit)


def _first_line(err: BaseException) -> str:
    cause = err.__cause__ or err.__context__ or err
    text = str(cause).strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:200]


def _scan_json_lines(
    path: Path, key: str, on_bad_row: str, limit: int | None
) -> tuple[list[dict], Counter, list[int]]:
    """Parse a JSON-lines file line by line: (rows, skipped by reason, line of each row); raises on the
    first bad line unless on_bad_row is skip."""
    rows: list[dict] = []
    lines: list[int] = []
    skipped: Counter = Counter()
    with path.open("rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            problem = hint = reason = None
            try:
                record = parse_json(raw_line.decode("utf-8"))
            except UnicodeDecodeError as err:
                reason = "not UTF-8"
                problem = f"is not UTF-8 (byte 0x{raw_line[err.start]:02x})"
                hint = "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            except json.JSONDecodeError as err:
                reason = "invalid JSON"
                problem, hint = f"is not valid JSON: {err.msg}", "write one JSON object per line"
            else:
                if not isinstance(record, dict):
                    reason = "not an object"
                    problem = f"is a JSON {type(record).__name__}, not an object"
                    hint = "each line must be one object with named columns"
            if problem is not None:
                if on_bad_row != "skip":
                    skip = ", or set data.on_bad_row: skip" if key.startswith("data.") else ""
                    raise RecipeError(key, f"{path} line {number} {problem}", hint + skip)
                skipped[reason] += 1
                continue
            rows.append(record)
            lines.append(number)
            if limit is not None and len(rows) >= limit:
                break
    return rows, skipped, lines


def _line_of_row(path: Path, row: int) -> int:
    """1-based line of the 0-based row ``row`` of a JSON-lines file (blank lines hold no row)."""
    seen = -1
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return row + 1


def read_json_lines(path: str | Path, key: str) -> tuple[list[dict], list[int]]:
    """Every object of a JSON-lines file exactly as written, with its 1-based line; the first bad line
    raises naming ``key``, the file and the line (``peftcli generate --input``)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise RecipeError(key, f"file not found: {path}", "check the path")
    rows, _, lines = _scan_json_lines(path, key, "error", None)
    return rows, lines


def load_records(source: str, split: str, key: str) -> list[dict]:
    """The records of ``source`` as a list of dicts (small data and tests; training reads Arrow)."""
    return load_source(source, split, key).dataset.to_list()
