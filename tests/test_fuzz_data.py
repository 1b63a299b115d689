"""Fuzzing the data loader (issue 14): malformed files end in a clean one-line error or a valid dataset.

Every generated file goes through the real data stage (``load_data``: datasets reading, formats,
tokenization, the cache). The only acceptable outcomes are a loaded dataset or a ``RecipeError``
whose message is one line and names the file or a ``data.*`` key; any other exception is a defect.
Case counts: ``PEFTCLI_FUZZ_DATA_EXAMPLES`` (default 200 per target: each case runs the whole data stage, derandomized so CI is repeatable);
``-m slow`` runs 1,000 per target. Fixed cases: empty files of every suffix, a truncated parquet file,
a ragged CSV (an error naming the line), labels of mixed types (loaded as text), a row without
its label (an error naming the line) and a 12 MB single line (longer than datasets' 10 MiB read chunk).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from peftcli.data.pipeline import load_data
from peftcli.recipe import DataConfig, RecipeError
from peftcli.tiny import ensure_tiny

CI_EXAMPLES = int(os.environ.get("PEFTCLI_FUZZ_DATA_EXAMPLES", "200"))
COMMON = {"deadline": None, "suppress_health_check": list(HealthCheck)}
ci = settings(max_examples=CI_EXAMPLES, derandomize=True, **COMMON)
slow = settings(max_examples=max(1000, CI_EXAMPLES), **COMMON)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_tiny("llama"))


def load_or_clean_error(path: Path, tokenizer, task: str = "causal_lm", **data) -> None:
    """Load ``path``; pass on success or on a clean RecipeError, fail on anything else."""
    cfg = DataConfig(train=str(path), cache_dir=str(path.parent / "cache"), **data)
    try:
        bundle = load_data(cfg, tokenizer, task)
    except RecipeError as error:
        text = str(error)
        assert "\n" not in text, text
        assert path.name in text or error.key.startswith("data"), text
        return
    assert len(bundle.train) >= 1  # an empty result must have been an error, not a silent empty run


scalars = st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())
values = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2)
)
json_rows = st.dictionaries(
    st.sampled_from(["prompt", "completion", "text", "label", "extra", ""]), values, max_size=4
).map(json.dumps)
raw_lines = st.one_of(
    json_rows,
    st.text(max_size=40),  # not JSON, or JSON of the wrong shape
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ").decode("latin-1")),  # later re-encoded raw
    st.just(""),
    st.just("[1, 2, 3]"),
    st.just('{"prompt": "a", "completion": "b"}'),
)


def jsonl_bytes(lines: list[str], raw: bool) -> bytes:
    body = "\n".join(lines) + "\n"
    return body.encode("latin-1", errors="replace") if raw else body.encode("utf-8", errors="replace")


def check_jsonl(lines: list[str], raw: bool, on_bad_row: str, tokenizer) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(jsonl_bytes(lines, raw))
        load_or_clean_error(path, tokenizer, format="completion", on_bad_row=on_bad_row)


@ci
@given(st.lists(raw_lines, max_size=8), st.booleans(), st.sampled_from(["error", "skip"]))
def test_fuzz_jsonl_lines(tokenizer, lines, raw, on_bad_row):
    check_jsonl(lines, raw, on_bad_row, tokenizer)


@pytest.mark.slow
@slow
@given(st.lists(raw_lines, max_size=8), st.booleans(), st.sampled_from(["error", "skip"]))
def test_fuzz_jsonl_lines_long(tokenizer, lines, raw, on_bad_row):
    check_jsonl(lines, raw, on_bad_row, tokenizer)


csv_cells = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=12), st.integers()
)
csv_rows = st.lists(st.lists(csv_cells, min_size=0, max_size=4), max_size=8)


def check_csv(rows: list[list], tokenizer) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.csv"
        lines = ["text,label"] + [
            ",".join(json.dumps(c) if isinstance(c, str) else str(c) for c in row) for row in rows
        ]
        path.write_text("\n".join(lines) + "\n")
        load_or_clean_error(path, tokenizer, task="seq_cls", format="classification")


@ci
@given(csv_rows)
def test_fuzz_csv_ragged_rows_and_mixed_labels(tokenizer, rows):
    check_csv(rows, tokenizer)


@pytest.mark.slow
@slow
@given(csv_rows)
def test_fuzz_csv_long(tokenizer, rows):
    check_csv(rows, tokenizer)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_file_of_every_kind_is_a_clean_error(tokenizer, tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(RecipeError) as error:
        load_data(
            DataConfig(train=str(path), cache_dir=str(tmp_path / "c"), format="text"), tokenizer, "causal_lm"
        )
    assert "\n" not in str(error.value) and path.name in str(error.value)


def test_truncated_parquet_is_a_clean_error(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(200)]}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RecipeError) as error:
        load_data(
            DataConfig(train=str(path), cache_dir=str(tmp_path / "c"), format="text"), tokenizer, "causal_lm"
        )
    assert "\n" not in str(error.value) and path.name in str(error.value)


# case -> (CSV body, None if it loads, else the one-line error it must end in); per on_bad_row alike
CSV_CASES = {
    "mixed_label_types": ('text,label\n"good",1\n"also",pos\n', None),  # labels read as text: "1", "pos"
    "ragged_row": ('text,label\n"good",1\n"ragged",1,extra,cells\n', "line 3 has 4 fields, the header has 2"),
    "all_at_once": (
        'text,label\n"good",1\n"also",pos\n"ragged",1,extra,cells\n"short"\n',
        "line 4 has 4 fields, the header has 2",
    ),
}


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
@pytest.mark.parametrize("case", list(CSV_CASES))
def test_mixed_label_types_load_and_ragged_csv_rows_are_clean_errors(tokenizer, tmp_path, case, on_bad_row):
    body, error = CSV_CASES[case]
    path = tmp_path / "mixed.csv"
    path.write_text(body)
    cfg = DataConfig(
        train=str(path), cache_dir=str(tmp_path / "c"), format="classification", on_bad_row=on_bad_row
    )
    if error is None:
        bundle = load_data(cfg, tokenizer, "seq_cls")
        assert len(bundle.train) == 2 and bundle.label_names == ["1", "pos"]
        return
    with pytest.raises(RecipeError) as raised:
        load_data(cfg, tokenizer, "seq_cls")
    text = str(raised.value)
    assert raised.value.key == "data.train" and "\n" not in text
    assert path.name in text and error in text


def test_a_csv_row_without_its_label_is_a_clean_error(tokenizer, tmp_path):
    path = tmp_path / "short.csv"
    path.write_text('text,label\n"good",1\n"short"\n')
    with pytest.raises(RecipeError, match=r"short\.csv line 3 has 1 fields, the header has 2") as raised:
        load_data(
            DataConfig(train=str(path), cache_dir=str(tmp_path / "c"), format="classification"),
            tokenizer,
            "seq_cls",
        )
    assert raised.value.key == "data.train" and "\n" not in str(raised.value)


@pytest.mark.slow  # tokenizing one 12 MB word takes ~13 s (50 MB took a worker 1-7 min)
def test_a_12_mb_single_line_is_truncated_or_a_clean_error(tokenizer, tmp_path):
    # longer than datasets' 10 MiB JSON read chunk, so the line straddles chunks
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "a" * 12_000_000}) + "\n" + json.dumps({"text": "small"}) + "\n")
    cfg = DataConfig(train=str(path), cache_dir=str(tmp_path / "c"), format="text", max_length=64)
    bundle = load_data(cfg, tokenizer, "causal_lm")
    assert len(bundle.train) == 2 and max(bundle.train.lengths) == 64  # truncated to max_length, counted
