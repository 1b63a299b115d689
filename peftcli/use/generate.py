"""``peftcli generate``: complete every row of a JSON-lines file, batched, resumable.

A row is ``{"prompt": ...}`` (tokenized as training tokenized prompts: BOS, then the text) or
``{"messages": [...]}`` (rendered through the tokenizer's chat template with the assistant's turn
opened). The output has one line per input row, in input order: the row as written plus
``completion``, ``prompt_tokens``, ``completion_tokens`` and ``finish_reason`` (``stop`` at EOS,
``length`` at ``--max-new-tokens``).

Each batch's lines are appended and flushed as soon as it is decoded, so a crash loses at most the
batch in flight. A rerun with the same output file checks that its complete lines are the first input
rows, drops a partial last line (rewriting the file through a temporary name) and continues after
them; sampling draws per row (see :mod:`peftcli.decoding`), so the resumed file equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.recipe import RecipeError

ADDED_KEYS = ("completion", "prompt_tokens", "completion_tokens", "finish_reason")


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0


def check_options(options: GenerateOptions) -> None:
    checks = [
        ("--max-new-tokens", options.max_new_tokens >= 1, "at least 1"),
        ("--temperature", options.temperature >= 0.0, "0 (greedy) or more"),
        ("--top-p", 0.0 < options.top_p <= 1.0, "in (0, 1]"),
        ("--batch-size", options.batch_size >= 1, "at least 1"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise RecipeError(key, f"is out of range: must be {allowed}", f"pass a value {allowed}")


def prompt_ids(tokenizer, row: dict[str, Any], where: str) -> list[int]:
    """The prompt tokens of one input row; ``where`` (file line N) names it in errors."""
    from peftcli.data.formats import BadRow, check_messages, encode_prompt, render_chat

    if "messages" in row:
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError(
                "--input",
                f"{where} has messages, but the model's tokenizer has no chat template",
                'write {"prompt": ...} rows, or train with model.chat_template so the adapter saves one',
            )
        try:
            text = render_chat(tokenizer, check_messages(row["messages"]), add_generation_prompt=True)
        except BadRow as bad:
            raise RecipeError("--input", f"{where}: {bad.detail}", bad.hint or "fix the messages") from None
        return encode_prompt(tokenizer, text, "causal_lm")
    if isinstance(row.get("prompt"), str):
        return encode_prompt(tokenizer, row["prompt"], "causal_lm")
    raise RecipeError(
        "--input",
        f"{where} has neither a 'prompt' string nor 'messages'",
        'write one {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} per line',
    )


def read_inputs(path: Path) -> tuple[list[dict], list[int]]:
    from peftcli.data.sources import read_json_lines

    rows, lines = read_json_lines(path, "--input")
    for row, line in zip(rows, lines, strict=True):
        taken = [key for key in ADDED_KEYS if key in row]
        if taken:
            raise RecipeError(
                "--input",
                f"{path} line {line} already has {taken[0]!r}, which generate writes",
                f"rename that column (e.g. to 'reference_{taken[0]}')",
            )
    return rows, lines


def rows_already_written(output: Path, inputs: list[dict]) -> int:
    """How many leading input rows ``output`` already holds; a partial last line is cut off safely."""
    from peftcli.checkpoint import atomic_write_bytes

    if not output.exists():
        return 0
    raw = output.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # a crash mid-write leaves a last line without its newline
    written = 0
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RecipeError(
                "--output",
                f"{output} line {number} is not JSON, so the file cannot be resumed",
                "move the file aside, or pass a new --output",
            ) from None
        echoed = {key: value for key, value in record.items() if key not in ADDED_KEYS}
        if written >= len(inputs) or echoed != inputs[written]:
            raise RecipeError(
                "--output",
                f"{output} line {number} is not the output of input row {written + 1}: "
                "the file was written for other input",
                "pass a new --output, or delete the file to start over",
            )
        written += 1
    if complete != raw:
        atomic_write_bytes(output, complete)
    return written


def generate_file(
    target: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    options: GenerateOptions = GenerateOptions(),
    console=None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Complete every row of ``input_path`` with the model or adapter ``target``; append to ``output_path``.

    Returns counts: rows, already written, generated now, prompt and completion tokens, seconds.
    """
    from peftcli.models import resolve_device
    from peftcli.use.load import load_model_or_adapter, require_causal_lm

    check_options(options)
    input_path, output_path = Path(input_path), Path(output_path)
    inputs, lines = read_inputs(input_path)
    done = rows_already_written(output_path, inputs)
    summary: dict[str, Any] = {
        "input": str(input_path),
        "output": str(output_path),
        "rows": len(inputs),
        "already_written": done,
        "generated": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "seconds": 0.0,
    }
    if done == len(inputs):
        return summary
    if done and log:
        log(f"{output_path} holds the first {done} rows; continuing at row {done + 1}")
    device = resolve_device("auto")
    loaded = load_model_or_adapter(target, device)
    require_causal_lm(loaded, target, "generate")
    prompts = [
        prompt_ids(loaded.tokenizer, row, f"{input_path} line {line}")
        for row, line in zip(inputs, lines, strict=True)
    ]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    complete_rows(loaded, device, inputs, prompts, done, output_path, options, console, summary)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def complete_rows(
    loaded,
    device,
    inputs: list[dict[str, Any]],
    prompts: list[list[int]],
    done: int,
    output_path: Path,
    options: GenerateOptions,
    console,
    summary: dict[str, Any],
) -> None:
    """Decode rows ``done`` onwards in batches, appending each batch's records to ``output_path`` (flushed:
    a crash loses nothing already decoded) and counting tokens into ``summary``."""
    from peftcli.data.collate import pad_token_id
    from peftcli.decoding import Sampling, decode, eos_token_ids

    tokenizer = loaded.tokenizer
    eos, pad = eos_token_ids(loaded.model, tokenizer), pad_token_id(tokenizer)
    sampling = Sampling(options.temperature, options.top_p, options.seed)
    with RowProgress(console, len(inputs), done) as advance, output_path.open("a", encoding="utf-8") as out:
        for start in range(done, len(inputs), options.batch_size):
            rows = list(range(start, min(start + options.batch_size, len(inputs))))
            batch = [prompts[i] for i in rows]
            completions = decode(
                loaded.model,
                batch,
                options.max_new_tokens,
                eos,
                pad,
                device,
                sampling,
                row_ids=rows,
                use_cache=loaded.use_cache,
            )
            for i, tokens in zip(rows, completions, strict=True):
                record = {
                    **inputs[i],
                    "completion": tokenizer.decode(tokens, skip_special_tokens=True),
                    "prompt_tokens": len(prompts[i]),
                    "completion_tokens": len(tokens),
                    "finish_reason": "length" if len(tokens) == options.max_new_tokens else "stop",
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                summary["prompt_tokens"] += len(prompts[i])
                summary["completion_tokens"] += len(tokens)
            out.flush()
            summary["generated"] += len(rows)
            advance(len(rows))


class RowProgress:
    """A rich bar over the rows (nothing when ``console`` is None); yields ``advance(n)``."""

    def __init__(self, console, total: int, done: int):
        self.console, self.total, self.done = console, total, done
        self.progress = None

    def __enter__(self) -> Callable[[int], None]:
        if self.console is None:
            return lambda n: None
        from peftcli.data.progress import make_progress

        self.progress = make_progress(self.console)
        self.progress.__enter__()
        task = self.progress.add_task("generating", total=self.total, completed=self.done)
        return lambda n: self.progress.update(task, advance=n)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
