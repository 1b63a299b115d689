"""What adapters written by peft itself need before they load here.

peft writes ``modules_to_save: ["classifier", "score"]`` into the config of every SEQ_CLS adapter,
whatever head the model has (``classifier`` for BERT, ``score`` for llama), and ignores the names that
match no module when it loads one. We do the same for an adapter peft wrote (``peft_type`` set and no
``peftcli_adapter.json`` beside it), with a note; a recipe's own ``modules_to_save`` stays strict
(a typo there raises in ``make_trainable_copies``).
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("peftcli")


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a ``modules_to_save`` entry: the full name, or a suffix after a dot."""
    return module_name == target or module_name.endswith("." + target)


def drop_unmatched_modules_to_save(model: nn.Module, method_cfg, adapter_dir: str) -> list[str]:
    """Remove the ``modules_to_save`` entries of a peft-written config that match no module of
    ``model``; return the removed names (and log one line naming them)."""
    names = list(getattr(method_cfg, "modules_to_save", None) or [])
    module_names = [name for name, _ in model.named_modules() if name]
    dropped = [t for t in names if not any(_matches(name, t) for name in module_names)]
    if dropped:
        method_cfg.modules_to_save = [t for t in names if t not in dropped]
        log.warning(
            "note: %s: modules_to_save %s: no such module in %s; skipped, as peft does "
            "(peft lists both classifier and score for every classification adapter)",
            adapter_dir,
            ", ".join(repr(t) for t in dropped),
            type(model).__name__,
        )
    return dropped
