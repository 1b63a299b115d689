"""Cartridge (arXiv 2506.06266) against peft 0.21 as the oracle and the paper's definition, fp32 on the CPU:

- the paper's definition: a cartridge initialised from a document *is* the base's KV cache of the
  document's first n tokens, so at step 0 the model on x equals the base on those n tokens + x
  (≤ 1e-5), and its rows equal peft's ``initialize_kv_prefix_from_text`` on the same text (≤ 1e-6;
  with the chat template off, as the tiny tokenizer has none);
- the attention sink: after a loop step the first ``num_frozen_tokens`` rows are bit-identical and
  the rest moved; only (n − f)·L·2·kv_dim numbers train;
- with each option that changes the numbers (init, num_frozen_tokens, an MHA model), our adapter moved
  off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and a peft cartridge (moved
  off init) loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5);
- what cannot work is refused in one line naming the key.
"""

from __future__ import annotations

import json

import kit
import pytest
import torch

from peftcli.export import load_adapter
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

DOC = "reverse a word by writing its letters from the last to the first: apple = elppa"

OPTION_RUNS = {
    "text-init-sink-1": [],
    "random-no-sink": ["method.init=random", "method.num_frozen_tokens=0"],
    "text-init-sink-3": ["method.num_frozen_tokens=3", "method.num_virtual_tokens=6"],
    "gpt2-mha": ["model.name=tiny:gpt2", "method.init=random"],
}

# run id -> (model, peft CartridgeConfig options)
PEFT_RUNS = {
    "llama-sink-1": ("tiny:llama", {"num_virtual_tokens": 6, "num_frozen_tokens": 1}),
    "llama-no-sink": ("tiny:llama", {"num_virtual_tokens": 4, "num_frozen_tokens": 0}),
    "gpt2-sink-2": ("tiny:gpt2", {"num_virtual_tokens": 5, "num_frozen_tokens": 2}),
}


def text_method(n: int = 8, frozen: int = 1, chat_template: bool = False) -> dict:
    return {
        "name": "cartridge",
        "num_virtual_tokens": n,
        "num_frozen_tokens": frozen,
        "init": "text",
        "init_text": DOC,
        "init_chat_template": chat_template,
    }


def test_text_init_is_the_base_cache_of_the_document():
    """Step 0 on x equals the base reading the document's first n tokens, then x."""
    n = 8
    _, _, tokenizer, model, _ = kit.build_inline("causal_lm", text_method(n))
    document = tokenizer(DOC)["input_ids"][:n]
    x = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        full = torch.cat([torch.tensor([document] * 2), x], 1)
        reference = model.base_model(input_ids=full).logits[:, n:]
    assert kit.max_diff(ours, reference) <= 1e-5


@pytest.mark.parametrize("chat_template", [True, False])
def test_text_init_equals_peft_initialize_kv_prefix_from_text(chat_template):
    """The tiny causal tokenizer has a chat template: True wraps the document as a system message."""
    from peft import CartridgeConfig, get_peft_model
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text

    n = 12
    recipe, base_path, tokenizer, model, method = kit.build_inline(
        "causal_lm", text_method(n, 1, chat_template)
    )
    base = kit.base_model(base_path, recipe, pad_token_id=tokenizer.pad_token_id)
    theirs = get_peft_model(base, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    rows = initialize_kv_prefix_from_text(theirs, tokenizer, text=DOC, use_chat_template=chat_template)
    assert kit.max_diff(method.stored_rows(model), rows.float()) <= 1e-6


@pytest.mark.parametrize("frozen", [1, 3])
def test_sink_rows_stay_frozen_and_only_the_rest_train(frozen):
    n = 6
    _, _, _, model, method = kit.build_inline("causal_lm", text_method(n, frozen))
    before = method.stored_rows(model).clone()
    kit.train_step(model, method, kit.batch("causal_lm"), lr=1e-2)
    after = method.stored_rows(model)
    assert torch.equal(after[:frozen], before[:frozen])
    assert (after[frozen:] - before[frozen:]).abs().amax(dim=1).min() > 0  # every trainable row moved
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == (n - frozen) * before.shape[1] == method.expected_trainable_parameters(model)


@pytest.mark.slow
@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("cartridge", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "CARTRIDGE"
    assert config["num_frozen_tokens"] == result.built.method.cfg.num_frozen_tokens
    their_frozen = result.peft_model.prompt_encoder["default"].num_frozen_tokens
    assert their_frozen == result.built.method.cfg.num_frozen_tokens


@pytest.mark.slow
@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    from peft import CartridgeConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftcli.models import resolve_model_name

    name, options = PEFT_RUNS[run]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_name(name), dtype=torch.float32)
    theirs = get_peft_model(base, CartridgeConfig(task_type="CAUSAL_LM", **options))
    kit.perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    probe = kit.batch("causal_lm", theirs.config.vocab_size, lengths=(10, 7))
    expected = kit.peft_logits(theirs, probe)
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.method.name == "cartridge"
    assert loaded.method.cfg.num_frozen_tokens == options["num_frozen_tokens"]
    assert kit.max_diff(expected, kit.logits(loaded.model, probe)) <= 1e-5


def test_saved_text_init_reloads_without_its_document(tmp_path):
    """The adapter replays the trained cache: moving the document away does not break a reload."""
    document = tmp_path / "doc.txt"
    document.write_text(DOC, encoding="utf-8")
    built = kit.build("cartridge", tmp_path, [f"method.init_text_file={document}"])
    kit.train_step(built.model, built.method, kit.batch("causal_lm"), lr=1e-2)
    probe = kit.batch("causal_lm", seed=1)
    ours = kit.logits(built.model, probe)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    document.unlink()
    assert kit.max_diff(ours, kit.logits(load_adapter(adapter).model, probe)) <= 1e-6


REFUSALS = {
    "all-frozen": ([], {"num_frozen_tokens": 4, "num_virtual_tokens": 4}, "method.num_frozen_tokens"),
    "text-on-seq2seq": (["model.name=tiny:t5", "model.task=seq2seq"], {}, "method.init"),
    "document-too-short": ([], {"init_text": "abc", "num_virtual_tokens": 40}, "method.init_text"),
    "no-document-file": ([], {"init_text_file": "/nonexistent/doc.txt"}, "method.init_text_file"),
    "gradient-checkpointing": (["model.gradient_checkpointing=true"], {}, "model.gradient_checkpointing"),
    "packing": (["train.packing=true"], {}, "train.packing"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_at_start_in_one_line(case, tmp_path):
    overrides, method, key = REFUSALS[case]
    method_overrides = [f"method.{k}={v}" for k, v in method.items()]
    with pytest.raises(RecipeError) as err:
        kit.build("cartridge", tmp_path, [*overrides, *method_overrides])
    assert err.value.key == key
    assert "\n" not in str(err.value)
