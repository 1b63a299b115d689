"""Built-in chat templates for ``model.chat_template``: a name here, or a Jinja template string.

Templates are the models' own, trimmed to what training renders (no tool-call formatting): ChatML
(Qwen, OpenHermes, many fine-tunes) and Llama 3's header/eot format.
"""

from __future__ import annotations

from peftcli.recipe import RecipeError, did_you_mean

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}


def resolve_chat_template(value: str) -> str:
    """The Jinja source for ``model.chat_template``: a built-in name or a template string itself."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    hint = did_you_mean(value, BUILTIN_CHAT_TEMPLATES) or (
        f"use one of {', '.join(BUILTIN_CHAT_TEMPLATES)} or a Jinja template string"
    )
    raise RecipeError("model.chat_template", f"{value!r} is neither a built-in template nor Jinja", hint)
