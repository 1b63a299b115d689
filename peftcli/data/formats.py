"""Formats: render a row to text, tokenize it and mask the loss, batch by batch inside ``datasets.map``.

Tokenized examples, by task:

* ``causal_lm``: ``input_ids`` and ``loss_mask`` (1 where the token carries loss). ``labels`` is
  ``input_ids`` with the masked positions set to -100, *unshifted* (Hugging Face causal LMs shift
  internally); storing a byte-wide mask instead of a second id column keeps the cache small. The
  prompt and the answer are tokenized separately and concatenated, so the mask boundary falls
  exactly between them (tokenizing the joined string could merge a token across the boundary).
* ``seq2seq``: ``input_ids`` (encoder ids) and ``labels`` (target ids).
* ``seq_cls``: ``input_ids`` and ``label`` (class index).
* ``preference`` data (causal_lm): the chosen sequence as ``input_ids``/``loss_mask`` (prompt, then the
  chosen answer and EOS, tokenized separately as the completion format does) and the rejected one as
  ``rejected_ids``/``rejected_mask``; ``length`` is the two sequences' tokens together.
* ``prompt`` data (causal_lm, grpo): the prompt's ids as ``input_ids`` (BOS first; a chat-message prompt
  rendered with the generation prompt; an over-long prompt keeps its end, as generation does), no trained
  token, and every other column of the row as JSON in ``references`` (what rewards compare with).
* ``unpaired_preference`` data (causal_lm, KTO): the prompt, the completion and EOS as
  ``input_ids``/``loss_mask`` as the completion format tokenizes them, with ``prompt_length`` (where the
  completion starts, for the batch's mismatched KL rows) and ``desirable`` (the row's label, 1 or 0).

Every row also gets ``length`` (the sampler's lengths array), ``truncated`` and ``status``: "" for a
kept row, "dropped" when truncation left no trained token, else "bad:<reason>\\t<detail>" for a row
the format cannot read. Bad rows never raise inside a worker process; the data stage reads the status
column afterwards and raises (naming the file and line) or skips them, as ``data.on_bad_row`` says.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from peftcli.data.sources import parse_json
from peftcli.recipe import RecipeError, did_you_mean

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: positions that carry no loss

# The Alpaca template (Taori et al., 2023, github.com/tatsu-lab/stanford_alpaca), verbatim, so
# adapters trained here prompt the same way as the many Alpaca-style checkpoints. The prompt is
# everything up to and including "### Response:\n"; the answer is the ``output`` column.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Our column names per format: required first, then optional ones.
FORMAT_COLUMNS: dict[str, tuple[list[str], list[str]]] = {
    "text": (["text"], []),
    "completion": (["prompt", "completion"], []),
    "instruction": (["instruction", "output"], ["input"]),
    "chat": (["messages"], []),
    "sharegpt": (["conversations"], []),
    "classification": (["text", "label"], ["text_pair"]),
    "preference": (["prompt", "chosen", "rejected"], []),
    "prompt": (["prompt"], []),  # and any reference columns, passed through (map_columns)
    "unpaired_preference": (["prompt", "completion", "label"], []),
}

# Which formats each task can train on.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal_lm": (
        "text",
        "completion",
        "instruction",
        "chat",
        "sharegpt",
        "preference",
        "unpaired_preference",
        "prompt",
    ),
    "seq2seq": ("completion", "instruction"),
    "seq_cls": ("classification",),
}

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` values -> chat roles; data.roles adds to or overrides these.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


class BadRow(Exception):
    """A row the format cannot read: ``reason`` groups it in counts, ``detail`` names the problem."""

    def __init__(self, reason: str, detail: str, hint: str):
        self.reason, self.detail, self.hint = reason, detail, hint
        super().__init__(detail)


@dataclass
class FormatSpec:
    """Everything that decides the tokens of a row (all of it goes into the cache key but the tokenizer)."""

    format: str
    task: str
    columns: dict[str, str]  # ours -> theirs, only for columns present in the source
    max_length: int
    train_on_prompt: bool
    add_eos: bool
    roles: dict[str, str] = field(default_factory=dict)
    label_names: list[str] | None = None
    keep_examples: bool = False  # eval sets keep {prompt, answer} for generation metrics
    task_id_column: str | None = None  # data.task_id_column: each row's task index, kept as task_id

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def map_columns(column_names: list[str], fmt: str, columns: dict[str, str], key: str) -> dict[str, str]:
    """ours -> theirs for the columns the format reads; checks they exist (schema level, all rows)."""
    required, optional = FORMAT_COLUMNS[fmt]
    ours = required + optional
    if fmt == "prompt":  # every column the user renames is a reference column the rewards read
        ours = ours + [name for name in columns if name not in ours]
    columns_key = f"{key}.columns" if "[" in key else "data.columns"  # data.train[1].columns in a mixture
    for name in columns:
        if name not in ours:
            hint = did_you_mean(name, ours) or f"the {fmt} format reads: {', '.join(ours)}"
            raise RecipeError(f"{columns_key}.{name}", f"not a column of the {fmt} format", hint)
    mapping = {}
    for name in ours:
        theirs = columns.get(name, name)
        if theirs in column_names:
            mapping[name] = theirs
            continue
        if name in optional and name not in columns:
            continue
        where = f"column '{theirs}' not found in {key} (columns: {', '.join(column_names)})"
        hint = f"map it with data.columns: {{{name}: <your column>}}"
        raise RecipeError(f"{columns_key}.{name}" if name in columns else columns_key, where, hint)
    if fmt == "prompt":  # the other columns pass through as references, under their own names
        taken = set(mapping.values())
        mapping |= {name: name for name in column_names if name not in taken and name not in mapping}
    return mapping


def render_instruction(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example, ending in ``"### Response:\\n"``."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def check_chat_template(tokenizer, fmt: str, model_name: str = "the model") -> None:
    if fmt in ("chat", "sharegpt") and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            "model.chat_template",
            f"the tokenizer of {model_name} has no chat template, so {fmt} data cannot be rendered",
            "set model.chat_template: chatml (or llama3, or a Jinja template string), "
            "or use the completion/instruction format",
        )


# --------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------


def _as_list(value: Any, column: str) -> list:
    if isinstance(value, str):  # CSV and some exports store the conversation as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            value = parse_json(value)
    if not isinstance(value, list):
        raise BadRow("not a list", f"'{column}' is a {type(value).__name__}, not a list of turns", "")
    return value


def check_messages(value: Any) -> list[dict]:
    """OpenAI-style ``messages``: [{role, content, train?}], roles system/user/assistant/tool."""
    messages = _as_list(value, "messages")
    out = []
    for turn, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow(
                "malformed message",
                f"message {turn} is not a {{role, content}} object",
                "e.g. [{role: user, content: Hi}, {role: assistant, content: Hello}]",
            )
        if message["role"] not in CHAT_ROLES:
            raise BadRow(
                "unknown role",
                f"message {turn} has role {message['role']!r}",
                f"roles are {', '.join(CHAT_ROLES)}",
            )
        out.append(message)
    return out


def sharegpt_messages(value: Any, roles: dict[str, str]) -> list[dict]:
    """ShareGPT ``conversations: [{from, value}]`` as chat messages (roles mapped by ``roles``)."""
    turns = _as_list(value, "conversations")
    mapping = {**SHAREGPT_ROLES, **roles}
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRow(
                "malformed turn",
                f"turn {number} is not a {{from, value}} object",
                "e.g. [{from: human, value: Hi}, {from: gpt, value: Hello}]",
            )
        role = mapping.get(str(turn["from"]))
        if role is None:
            raise BadRow(
                "unknown role",
                f"turn {number} is from {turn['from']!r}",
                f"map it with data.roles: {{{turn['from']}: assistant}} (known: {', '.join(mapping)})",
            )
        message = {"role": role, "content": "" if turn["value"] is None else str(turn["value"])}
        if "train" in turn:
            message["train"] = turn["train"]
        messages.append(message)
    return messages


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    plain = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:
        if not messages:
            return ""  # some templates reject an empty conversation; it renders to nothing
        raise BadRow("template error", f"the chat template failed: {str(err)[:120]}", "") from None


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


def encode(tokenizer, text: str, encoded: dict[str, list[int]] | None = None) -> list[int]:
    """Token ids of ``text`` with no special tokens added (special tokens *in* the text are kept);
    ``encoded`` holds texts already encoded together (see tokenize_batch)."""
    if encoded is not None and text in encoded:
        return list(encoded[text])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_ids(tokenizer) -> list[int]:
    # Pieces are encoded without special tokens, so BOS is added here once, at the very start,
    # whether or not the tokenizer would have added it itself.
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def eos_ids(tokenizer, add_eos: bool) -> list[int]:
    return [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []


def encode_prompt(tokenizer, prompt: str, task: str, max_length: int | None = None) -> list[int]:
    """Prompt ids exactly as training saw them before the answer (used for generation at eval).

    Causal LMs keep the *end* of an over-long prompt (after BOS): the answer continues from there.
    """
    if task == "seq2seq":
        kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
        return list(tokenizer(prompt, **kwargs)["input_ids"])
    bos = bos_ids(tokenizer)
    ids = encode(tokenizer, prompt)
    if ids[: len(bos)] == bos:
        bos = []  # the prompt (a rendered chat template) already starts with BOS
    if max_length and len(bos) + len(ids) > max_length:
        ids = ids[len(ids) - (max_length - len(bos)) :]
    return bos + ids


def _truncate(input_ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    # Keep the start: the prompt the answer depends on comes first.
    return input_ids[:max_length], mask[:max_length], len(input_ids) > max_length


def causal_chat(tokenizer, messages: list[dict], spec: FormatSpec) -> tuple[list[int], list[int], bool]:
    """(input_ids, loss_mask, truncated) for a conversation; assistant turns carry loss by default.

    Assistant spans are found by rendering prefixes: turn ``i`` starts where ``messages[:i]`` rendered
    with the generation prompt ends and stops where ``messages[:i+1]`` ends. This works for every chat
    template (``{% generation %}`` markers are rare). The span includes what the template puts after
    the content (an EOS or end-of-turn token), so the model learns to stop. ``train: false`` on an
    assistant message keeps that turn out of the loss.
    """
    input_ids = encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False))
    bos = bos_ids(tokenizer)
    if input_ids[: len(bos)] == bos:
        bos = []  # the template writes BOS itself
    input_ids = bos + input_ids
    if spec.train_on_prompt:
        mask = [1] * len(input_ids)
    else:
        mask = [0] * len(input_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("train", True) is False:
                continue
            start = len(bos) + len(encode(tokenizer, render_chat(tokenizer, messages[:i], True)))
            end = len(bos) + len(encode(tokenizer, render_chat(tokenizer, messages[: i + 1], False)))
            mask[start:end] = [1] * (end - start)
    return _truncate(input_ids, mask, spec.max_length)


def _seq2seq_ids(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """Ids with the tokenizer's own special tokens; truncation by the tokenizer keeps its closing EOS."""
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) <= max_length:
        return ids, False
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]), True


def infer_label_names(labels: list[Any]) -> list[str]:
    """Sorted distinct label names; integer labels (also "0", "1" from CSV) sort as numbers."""
    names = {str(label) for label in labels}
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _value(row: dict, name: str, spec: FormatSpec, required: bool = True) -> Any:
    value = row.get(name)
    if value is None and required:
        theirs = spec.columns.get(name, name)
        raise BadRow(
            f"missing '{theirs}'",
            f"has no '{theirs}' value",
            "fill it in (the other rows have it)",
        )
    return value


def _prompt_and_answer(row: dict, spec: FormatSpec) -> tuple[str, str]:
    """The (prompt, answer) texts of a completion or instruction row; raises BadRow."""
    if spec.format == "completion":
        return str(_value(row, "prompt", spec)), str(_value(row, "completion", spec))
    given = row.get("input")
    prompt = render_instruction(str(_value(row, "instruction", spec)), given and str(given))
    return prompt, str(_value(row, "output", spec))


def plain_texts(row: dict, spec: FormatSpec) -> list[str]:
    """The texts a causal text/completion/instruction row encodes; raises BadRow."""
    if spec.format == "text":
        return [str(_value(row, "text", spec))]
    return list(_prompt_and_answer(row, spec))


_BATCH_ENCODED_FORMATS = ("text", "completion", "instruction")


def tokenize_row(
    tokenizer, row: dict, spec: FormatSpec, encoded: dict[str, list[int]] | None = None
) -> dict[str, Any]:
    """One row (our column names) -> its tokenized columns; raises BadRow."""
    example: dict | None = None
    if spec.format == "classification":
        return _classification_row(tokenizer, row, spec)
    if spec.format == "preference":
        return _preference_row(tokenizer, row, spec)
    if spec.format == "prompt":
        return _prompt_row(tokenizer, row, spec)
    if spec.format == "unpaired_preference":
        return _unpaired_row(tokenizer, row, spec)
    if spec.format == "text":
        text = str(_value(row, "text", spec))
        ids = bos_ids(tokenizer) + encode(tokenizer, text, encoded) + eos_ids(tokenizer, spec.add_eos)
        input_ids, mask, cut = _truncate(ids, [1] * len(ids), spec.max_length)
    elif spec.format in ("chat", "sharegpt"):
        input_ids, mask, cut, example = _chat_ids(tokenizer, row, spec)
    else:
        prompt, answer = _prompt_and_answer(row, spec)
        example = {"prompt": prompt, "answer": answer}
        if spec.task == "seq2seq":
            return _seq2seq_row(tokenizer, prompt, answer, spec, example)
        prompt_ids = bos_ids(tokenizer) + encode(tokenizer, prompt, encoded)
        answer_ids = encode(tokenizer, answer, encoded) + eos_ids(tokenizer, spec.add_eos)
        prompt_mask = [1 if spec.train_on_prompt else 0] * len(prompt_ids)
        input_ids, mask, cut = _truncate(
            prompt_ids + answer_ids, prompt_mask + [1] * len(answer_ids), spec.max_length
        )
    # A causal LM never predicts position 0, so a label there alone trains nothing.
    dropped = not any(mask[1:])
    return {
        "input_ids": input_ids,
        "loss_mask": mask,
        "truncated": cut,
        "example": example,
        "dropped": dropped,
    }


def preference_texts(
    tokenizer, row: dict, spec: FormatSpec, answers: tuple[str, ...] = ("chosen", "rejected")
) -> tuple[str, ...]:
    """(prompt, *answers) texts of a preference row (unpaired: ``answers`` is ("completion",)). Each
    column is a string or a list of chat messages: a message prompt is rendered with the generation
    prompt, and a message answer is what the template adds after that prompt (its end-of-turn token
    included), so every answer shares the prompt."""
    prompt, *given = (_value(row, name, spec) for name in ("prompt", *answers))
    if not any(isinstance(v, list) for v in (prompt, *given)):
        return (str(prompt), *(str(v) for v in given))
    if not getattr(tokenizer, "chat_template", None):
        raise BadRow(
            "no chat template",
            "holds chat messages but the tokenizer has no chat template",
            "set model.chat_template: chatml (or llama3), or give the texts as strings",
        )
    turns = check_messages(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    prompt_text = render_chat(tokenizer, turns, add_generation_prompt=True)
    return (prompt_text, *(_chat_answer(tokenizer, turns, answer, prompt_text) for answer in given))


def _chat_answer(tokenizer, turns: list[dict], answer: Any, prompt_text: str) -> str:
    """The text the chat template renders after ``prompt_text`` for ``answer`` (messages, or a string
    taken as one assistant message)."""
    messages = (
        check_messages(answer)
        if isinstance(answer, list)
        else [{"role": "assistant", "content": str(answer)}]
    )
    full = render_chat(tokenizer, turns + messages, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise BadRow(
            "template error", "the chat template renders the answer's conversation with another prefix", ""
        )
    return full[len(prompt_text) :]


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A preference prompt's ids, BOS first (once: a rendered chat template may already start with it)."""
    bos, prompt_ids = bos_ids(tokenizer), encode(tokenizer, prompt)
    if prompt_ids[: len(bos)] == bos:
        bos = []
    return bos + prompt_ids


def _preference_row(tokenizer, row: dict, spec: FormatSpec) -> dict[str, Any]:
    """A pair: the prompt's ids (BOS first) followed by each answer's ids and EOS, prompt and answer
    tokenized separately; dropped when truncation leaves either answer without a trained token."""
    prompt, chosen, rejected = preference_texts(tokenizer, row, spec)
    prompt_ids = _prompt_ids(tokenizer, prompt)
    prompt_mask = [1 if spec.train_on_prompt else 0] * len(prompt_ids)
    sequences = []
    for answer in (chosen, rejected):
        answer_ids = encode(tokenizer, answer) + eos_ids(tokenizer, spec.add_eos)
        sequences.append(
            _truncate(prompt_ids + answer_ids, prompt_mask + [1] * len(answer_ids), spec.max_length)
        )
    (chosen_ids, chosen_mask, chosen_cut), (rejected_ids, rejected_mask, rejected_cut) = sequences
    return {
        "input_ids": chosen_ids,
        "loss_mask": chosen_mask,
        "rejected_ids": rejected_ids,
        "rejected_mask": rejected_mask,
        "truncated": chosen_cut or rejected_cut,
        "example": None,
        "dropped": not any(chosen_mask[1:]) or not any(rejected_mask[1:]),
    }


def prompt_text(tokenizer, prompt: Any) -> str:
    """A prompt row's text: a string as it is, chat messages rendered with the generation prompt."""
    if not isinstance(prompt, list):
        return str(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise BadRow(
            "no chat template",
            "holds chat messages but the tokenizer has no chat template",
            "set model.chat_template: chatml (or llama3), or give the prompt as a string",
        )
    return render_chat(tokenizer, check_messages(prompt), add_generation_prompt=True)


def _prompt_row(tokenizer, row: dict, spec: FormatSpec) -> dict[str, Any]:
    """A prompt to sample completions of: its ids as generation sees them (no trained token, so never
    dropped) and the row's other columns, the references, as JSON."""
    text = prompt_text(tokenizer, _value(row, "prompt", spec))
    full = encode_prompt(tokenizer, text, "causal_lm")
    input_ids = encode_prompt(tokenizer, text, "causal_lm", spec.max_length)
    references = {name: value for name, value in row.items() if name != "prompt"}
    return {
        "input_ids": input_ids,
        "loss_mask": [0] * len(input_ids),
        "references": json.dumps(references, default=str),
        "truncated": len(full) > len(input_ids),
        "example": {"prompt": text, **references},
        "dropped": False,
    }


LABEL_VALUES = {True: 1, False: 0, "true": 1, "false": 0}  # 1 and 0 hash as True and False


def desirable_label(row: dict, spec: FormatSpec) -> int:
    """An unpaired row's label as 1 (desirable) or 0: true/false (JSON booleans, or those words)."""
    value = _value(row, "label", spec)
    key = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(key, (bool, int, str)) or key not in LABEL_VALUES:
        theirs = spec.columns.get("label", "label")
        raise BadRow("bad label", f"'{theirs}' is {value!r}, not true or false", "write true or false")
    return LABEL_VALUES[key]


def _unpaired_row(tokenizer, row: dict, spec: FormatSpec) -> dict[str, Any]:
    """One KTO example: the prompt's ids (BOS first), the completion's ids and EOS (tokenized apart, as
    the completion format does), where the completion starts, and the label (1 desirable, 0 not)."""
    label = desirable_label(row, spec)
    prompt, completion = preference_texts(tokenizer, row, spec, ("completion",))
    prompt_ids = _prompt_ids(tokenizer, prompt)
    answer_ids = encode(tokenizer, completion) + eos_ids(tokenizer, spec.add_eos)
    prompt_mask = [1 if spec.train_on_prompt else 0] * len(prompt_ids)
    input_ids, mask, cut = _truncate(
        prompt_ids + answer_ids, prompt_mask + [1] * len(answer_ids), spec.max_length
    )
    return {
        "input_ids": input_ids,
        "loss_mask": mask,
        "prompt_length": min(len(prompt_ids), len(input_ids)),
        "desirable": label,
        "truncated": cut,
        "example": None,
        "dropped": not any(mask[1:]),
    }


def _classification_row(tokenizer, row: dict, spec: FormatSpec) -> dict[str, Any]:
    """Text (and an optional text pair) -> input ids and the label's index in ``spec.label_names``."""
    text = str(_value(row, "text", spec))
    pair = row.get("text_pair")
    pair = None if pair is None or pair == "" else str(pair)  # CSV writes a missing pair as ""
    name = str(_value(row, "label", spec))
    if name not in spec.label_names:
        hint = did_you_mean(name, spec.label_names) or f"known labels: {', '.join(spec.label_names)}"
        raise BadRow("unknown label", f"label {name!r} is not one of the training labels", hint)
    label = spec.label_names.index(name)
    full = tokenizer(text, pair)["input_ids"]
    cut = len(full) > spec.max_length
    if cut:
        full = tokenizer(text, pair, truncation=True, max_length=spec.max_length)["input_ids"]
    example = {"text": text, "label": label} | ({"text_pair": pair} if pair is not None else {})
    return {"input_ids": list(full), "label": label, "truncated": cut, "example": example}


def _chat_ids(tokenizer, row: dict, spec: FormatSpec) -> tuple[list[int], list[int], bool, dict | None]:
    """A conversation (chat or sharegpt) -> ids, loss mask, truncated, and the last assistant turn as the
    example's answer (None when no assistant speaks)."""
    if spec.format == "chat":
        messages = check_messages(_value(row, "messages", spec))
    else:
        messages = sharegpt_messages(_value(row, "conversations", spec), spec.roles)
    input_ids, mask, cut = causal_chat(tokenizer, messages, spec)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    example = None
    if last is not None:
        example = {
            "prompt": render_chat(tokenizer, messages[:last], True),
            "answer": str(messages[last]["content"]),
        }
    return input_ids, mask, cut, example


def _seq2seq_row(tokenizer, prompt: str, answer: str, spec: FormatSpec, example: dict) -> dict[str, Any]:
    """Encoder ids from the prompt, labels from the answer (closed by EOS); dropped when no label is left."""
    input_ids, prompt_cut = _seq2seq_ids(tokenizer, prompt, spec.max_length)
    labels, answer_cut = _seq2seq_ids(tokenizer, answer, spec.max_length)
    eos = eos_ids(tokenizer, spec.add_eos)
    if eos and labels[-1:] != eos:  # the tokenizer did not close the target itself
        labels = labels[: spec.max_length - 1] + eos
    return {
        "input_ids": input_ids,
        "labels": labels,
        "truncated": prompt_cut or answer_cut,
        "example": example,
        "dropped": not labels,
    }


def output_columns(spec: FormatSpec, vocab_size: int) -> Any:
    """The ``datasets.Features`` of a tokenized dataset (ids as uint16 when the vocabulary fits)."""
    import datasets

    id_type = datasets.Value("uint16" if vocab_size <= 2**16 else "int32")
    columns: dict[str, Any] = {"input_ids": datasets.List(id_type)}
    if spec.task == "causal_lm":
        columns["loss_mask"] = datasets.List(datasets.Value("uint8"))
        if spec.format == "preference":
            columns["rejected_ids"] = datasets.List(id_type)
            columns["rejected_mask"] = datasets.List(datasets.Value("uint8"))
        if spec.format == "prompt":
            columns["references"] = datasets.Value("string")
        if spec.format == "unpaired_preference":
            columns["prompt_length"] = datasets.Value("int32")
            columns["desirable"] = datasets.Value("uint8")
    elif spec.task == "seq2seq":
        columns["labels"] = datasets.List(id_type)
    else:
        columns["label"] = datasets.Value("int32")
    columns |= {
        "length": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "status": datasets.Value("string"),
    }
    if spec.keep_examples:
        columns["example"] = datasets.Value("string")
    if spec.task_id_column:
        columns["task_id"] = datasets.Value("int32")
    return datasets.Features(columns)


UNPAIRED_COLUMNS = ["prompt_length", "desirable"]  # unpaired_preference's columns beside the ids

# The columns of a bad row (kept until the stage raises or drops it, so row numbers stay aligned).
_EMPTY_ROW = {
    "input_ids": [],
    "loss_mask": [],
    "labels": [],
    "label": -1,
    "rejected_ids": [],
    "rejected_mask": [],
    "references": "{}",
    "prompt_length": 0,
    "desirable": 0,
    "truncated": False,
    "example": None,
    "task_id": -1,
}


def task_id_of(row: dict, spec: FormatSpec) -> int:
    """The row's task index (``data.task_id_column``): an integer ≥ 0 (also "2" from CSV); raises BadRow."""
    value = row.get("task_id")
    text = str(value).strip() if value is not None and not isinstance(value, bool | float) else ""
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if not text.isdigit():
        column = spec.task_id_column
        raise BadRow(
            f"bad '{column}'",
            f"has '{column}' {value!r}, not a task index (an integer ≥ 0)",
            "give every row its task's index 0, 1, …",
        )
    return int(text)


def tokenize_batch(batch: dict[str, list], tokenizer, spec: FormatSpec) -> dict[str, list]:
    """The ``datasets.map(batched=True)`` function: a batch of source rows -> tokenized columns."""
    names = list(spec.columns)
    n = len(batch[spec.columns[names[0]]]) if names else 0
    out: dict[str, list] = {name: [] for name in output_columns_names(spec)}
    rows = [{ours: batch[theirs][i] for ours, theirs in spec.columns.items()} for i in range(n)]
    encoded = None
    if spec.task == "causal_lm" and spec.format in _BATCH_ENCODED_FORMATS:
        # One tokenizer call for the whole batch: the per-call overhead is ~a quarter of the time of
        # tokenizing short rows one by one. The ids are the same as encoding each text alone.
        texts = []
        for row in rows:
            with contextlib.suppress(BadRow):  # tokenize_row raises it again, for this row only
                texts += plain_texts(row, spec)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        encoded = dict(zip(texts, ids, strict=True))
    for row in rows:
        try:
            result = tokenize_row(tokenizer, row, spec, encoded)
            if spec.task_id_column:
                result = {**result, "task_id": task_id_of(row, spec)}
            status = "dropped" if result.get("dropped") else ""
        except BadRow as bad:
            result = _EMPTY_ROW
            status = "\t".join(
                ["bad:" + bad.reason, bad.detail.replace("\t", " "), bad.hint.replace("\t", " ")]
            )
        out["input_ids"].append(result["input_ids"])
        if spec.task == "causal_lm":
            out["loss_mask"].append(result["loss_mask"])
            if spec.format == "preference":
                out["rejected_ids"].append(result["rejected_ids"])
                out["rejected_mask"].append(result["rejected_mask"])
            if spec.format == "prompt":
                out["references"].append(result["references"])
            if spec.format == "unpaired_preference":
                out["prompt_length"].append(result["prompt_length"])
                out["desirable"].append(result["desirable"])
        elif spec.task == "seq2seq":
            out["labels"].append(result["labels"])
        else:
            out["label"].append(result["label"])
        out["length"].append(len(result["input_ids"]) + len(result.get("rejected_ids", ())))
        out["truncated"].append(bool(result["truncated"]))
        out["status"].append(status)
        if spec.keep_examples:
            example = result.get("example")
            out["example"].append("" if example is None else json.dumps(example))
        if spec.task_id_column:
            out["task_id"].append(result["task_id"])
    return out


def output_columns_names(spec: FormatSpec) -> list[str]:
    middle = {"causal_lm": "loss_mask", "seq2seq": "labels"}.get(spec.task, "label")
    extra = {
        "preference": ["rejected_ids", "rejected_mask"],
        "unpaired_preference": UNPAIRED_COLUMNS,
        "prompt": ["references"],
    }
    pairs = extra.get(spec.format, []) if spec.task == "causal_lm" else []
    return (
        ["input_ids", middle, *pairs, "length", "truncated", "status"]
        + (["example"] if spec.keep_examples else [])
        + (["task_id"] if spec.task_id_column else [])
    )
