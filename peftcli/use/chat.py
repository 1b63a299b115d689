"""``peftcli chat``: a conversation through the model's chat template, streamed token by token.

Every turn renders the whole conversation (system prompt, earlier turns with the replies as decoded,
the new user message, the assistant's turn opened) and decodes from it, so turn ``k`` sees exactly
what greedy decoding of that templated conversation sees. Lines starting with ``/`` are commands:
``/reset`` forgets the turns (the system prompt stays), ``/system TEXT`` sets the system prompt
(``/system`` alone removes it), ``/exit`` ends. Piped input is answered one turn per line, each
reply on its own line of stdout, so a conversation can be scripted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli.recipe import RecipeError
from peftcli.use.generate import GenerateOptions, check_options

COMMANDS = "/reset, /system TEXT, /exit"


@dataclass
class Turn:
    user: str
    reply: str
    prompt_ids: list[int]  # the templated conversation the reply was decoded from
    reply_ids: list[int]  # new tokens, cut before EOS


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)  # user / assistant turns

    def with_user(self, text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages, {"role": "user", "content": text}]


class TextStream:
    """Turns decoded tokens into text pieces as they arrive; what it emits adds up to the final decode.

    A byte-level token can end inside a UTF-8 character, which decodes to U+FFFD until the next
    token completes it, so text ending in U+FFFD is held back.
    """

    def __init__(self, tokenizer, write: Callable[[str], None], eos_ids: set[int]):
        self.tokenizer, self.write, self.eos_ids = tokenizer, write, eos_ids
        self.tokens: list[int] = []
        self.shown = ""
        self.ended = False

    def add(self, step: list[int]) -> None:
        token = step[0]
        if self.ended or token in self.eos_ids:
            self.ended = True
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.write(text[len(self.shown) :])
            self.shown = text

    def finish(self, final: str) -> None:
        if final.startswith(self.shown):
            self.write(final[len(self.shown) :])
        self.shown = final


def chat(
    target: str | Path,
    lines: Iterable[str],
    write: Callable[[str], None],
    note: Callable[[str], None] = lambda text: None,
    system: str | None = None,
    options: GenerateOptions = GenerateOptions(max_new_tokens=256),
) -> list[Turn]:
    """Answer each user line of ``lines`` (commands aside), streaming replies through ``write``;
    ``note`` gets what is not a reply (command acknowledgements). Returns the turns."""
    check_options(options)
    replier = Replier.load(target, options, write)
    conversation = Conversation(system=system)
    turns: list[Turn] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not run_command(line, conversation, note):
                break
            continue
        turns.append(replier.answer(conversation, line, row=len(turns)))
    return turns


def run_command(line: str, conversation: Conversation, note: Callable[[str], None]) -> bool:
    """Apply a ``/`` command to ``conversation``; False when it ends the chat."""
    command, _, argument = line.partition(" ")
    if command == "/exit" or command == "/quit":
        return False
    if command == "/reset":
        conversation.messages.clear()
        note("conversation reset")
    elif command == "/system":
        conversation.system = argument.strip() or None
        note(f"system prompt {'set' if conversation.system else 'removed'}")
    else:
        note(f"unknown command {command}; commands: {COMMANDS}")
    return True


@dataclass
class Replier:
    """The chat model and how it decodes: one :meth:`answer` per user line."""

    loaded: Any  # peftcli.use.load's loaded model or adapter
    device: Any
    options: GenerateOptions
    write: Callable[[str], None]
    eos: set[int]
    pad: int
    sampling: Any  # peftcli.decoding.Sampling: one generator for the whole chat

    @classmethod
    def load(cls, target: str | Path, options: GenerateOptions, write: Callable[[str], None]) -> Replier:
        """Load ``target`` on the best device; refuse a model that is not causal or has no chat template."""
        from peftcli.data.collate import pad_token_id
        from peftcli.decoding import Sampling, eos_token_ids
        from peftcli.models import resolve_device
        from peftcli.use.load import load_model_or_adapter, require_causal_lm

        device = resolve_device("auto")
        loaded = load_model_or_adapter(target, device)
        require_causal_lm(loaded, target, "chat")
        tokenizer = loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError(
                "MODEL_OR_ADAPTER",
                f"the tokenizer of {target} has no chat template",
                "train with model.chat_template (chatml, llama3 or Jinja) so the adapter saves one, "
                "or complete plain prompts with peftcli generate",
            )
        eos, pad = eos_token_ids(loaded.model, tokenizer), pad_token_id(tokenizer)
        sampling = Sampling(options.temperature, options.top_p, options.seed)
        return cls(loaded, device, options, write, eos, pad, sampling)

    def answer(self, conversation: Conversation, line: str, row: int) -> Turn:
        """Render the conversation with ``line`` through the chat template, stream the reply, and add both
        to ``conversation``."""
        from peftcli.data.formats import BadRow, encode_prompt, render_chat
        from peftcli.decoding import decode

        tokenizer = self.loaded.tokenizer
        try:
            text = render_chat(tokenizer, conversation.with_user(line), add_generation_prompt=True)
        except BadRow as bad:  # e.g. a template that insists on alternating roles
            raise RecipeError(
                "MODEL_OR_ADAPTER", bad.detail, "/reset and start the conversation again"
            ) from None
        prompt = encode_prompt(tokenizer, text, "causal_lm")
        stream = TextStream(tokenizer, self.write, self.eos)
        (reply_ids,) = decode(
            self.loaded.model,
            [prompt],
            self.options.max_new_tokens,
            self.eos,
            self.pad,
            self.device,
            self.sampling,
            row_ids=[row],
            on_step=stream.add,
            use_cache=self.loaded.use_cache,
        )
        reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
        stream.finish(reply)
        self.write("\n")
        conversation.messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
        return Turn(line, reply, prompt, reply_ids)
