"""The test kit: the one harness every test builds on (``import kit``; pytest puts tests/ on sys.path).

- paths: ROOT, RECIPES, TINY (recipes/tiny), DATA (tests/data), TRAIN / EVAL (the tiny data), HELPERS;
- models: ``tiny(arch, task)`` a bare tiny:<family> model, ``build(recipe)`` the tuned model exactly as
  training builds it (``peftcli.models.build_model`` + ``method_for``), ``base_model`` the plain base;
- files: ``write_jsonl``, ``write_recipe`` (a tiny-data recipe with the sections a test changes);
- tokenizers: ``tokenizer(arch)``, ``ids`` (byte-level reference ids);
- batches: ``batch(task, vocab, lengths=...)`` one seeded, right-padded batch for any task;
- steps: ``train_step`` / ``train_steps`` run the training loop's own ``Stepper.step``;
  ``window_gradients`` its forward/backward over a window without the update; ``thread_ranks`` and
  ``rank_window``: torchrun ranks' windows as threads (their all-reduce meets, no processes);
- generation: cached decoding against full recompute;
- parity: ``peft_loads_ours`` / ``we_load_peft``, peft parity both ways for a method's option table;
- peft: the oracle helpers (``logits``, ``perturb``, ``save``, ``load_in_peft``, ``copy_into_peft``).
"""

from kit.batches import batch, batch_of, inputs, inputs_and_labels, parts
from kit.files import write_jsonl, write_recipe
from kit.generation import assert_seq2seq_generate_matches_recompute
from kit.models import (
    LABELS,
    TASK_MODELS,
    Built,
    base_model,
    build,
    build_inline,
    ids,
    inline_recipe,
    labels_for,
    tiny,
    tiny_recipe,
    tokenizer,
)
from kit.parity import auto_class, max_diff, peft_loads_ours, we_load_peft
from kit.paths import CPU, DATA, EVAL, HELPERS, RECIPES, ROOT, TINY, TRAIN
from kit.peft import boft_in_torch, copy_into_peft, load_in_peft, logits, peft_logits, perturb, save
from kit.steps import rank_window, stepper, thread_ranks, train_step, train_steps, window_gradients

__all__ = [
    "CPU",
    "DATA",
    "EVAL",
    "HELPERS",
    "LABELS",
    "RECIPES",
    "ROOT",
    "TASK_MODELS",
    "TINY",
    "TRAIN",
    "Built",
    "assert_seq2seq_generate_matches_recompute",
    "auto_class",
    "base_model",
    "batch",
    "batch_of",
    "boft_in_torch",
    "build",
    "build_inline",
    "copy_into_peft",
    "ids",
    "inline_recipe",
    "inputs",
    "inputs_and_labels",
    "labels_for",
    "load_in_peft",
    "logits",
    "max_diff",
    "parts",
    "peft_loads_ours",
    "peft_logits",
    "perturb",
    "rank_window",
    "save",
    "stepper",
    "thread_ranks",
    "tiny",
    "tiny_recipe",
    "tokenizer",
    "train_step",
    "train_steps",
    "we_load_peft",
    "window_gradients",
    "write_jsonl",
    "write_recipe",
]
