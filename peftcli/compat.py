"""What differs between the releases of our dependencies that peftcli supports.

Each name here says which release changed what, so the day the floor passes that release the
shim can go. Nothing in peftcli imports this module's dependencies' version-specific names directly.

- transformers 5.24 renamed the KV-cache argument of every ``forward`` (and the output field) from
  ``past_key_values`` to ``cache``; the old name warns (FutureWarning, removal in 5.40). The lock keeps
  5.23 (its PEFT integration still accepts peft 0.21, see requirements/lock.txt), the newest-releases
  check runs 5.24+, so both spellings are live.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import version
from typing import Any


def _release(name: str) -> tuple[int, ...]:
    parts = []
    for piece in version(name).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@cache
def cache_argument() -> str:
    """The keyword a transformers model's ``forward`` takes its KV cache by (and its output holds it in)."""
    return "cache" if _release("transformers") >= (5, 24) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a transformers forward returned."""
    return getattr(output, cache_argument())


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Take the KV cache out of a wrapper's ``**kwargs``, by either spelling (callers such as
    ``transformers.generate`` use the installed release's; ours use ``cache_argument()``)."""
    new, old = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return new if new is not None else old
