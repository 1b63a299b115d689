"""Soft prompts (prompt tuning, P-tuning, prefix tuning, P-tuning v2, SPoT, ensembles).

References and tolerances, all fp32 on the CPU with fixed seeds:
- peft 0.21 (``PeftModel.from_pretrained`` on our adapter dir): logits on the real positions ≤ 1e-5;
- the same model run without a KV cache (full recompute each step) for cached generation: equal tokens;
- the unpadded single row for padded batches: ≤ 1e-5;
- the base model reading the real words for the real-word prefix init: ≤ 1e-5;
- the mean / majority of the members' logits for ensembles: ≤ 1e-6 / exact.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import kit
import pytest
import torch
from kit import EVAL, RECIPES

from peftcli.evaluate import EnsembleModel, greedy_generate
from peftcli.export import load_adapter, save_adapter
from peftcli.methods.soft_prompt import repeat_to
from peftcli.models import load_model, load_tokenizer
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import recipe_from_dict
from peftcli.training.loop import token_loss_sum

METHODS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4},
    "p_tuning_mlp": {"name": "p_tuning", "num_virtual_tokens": 4},
    "p_tuning_lstm": {
        "name": "p_tuning",
        "num_virtual_tokens": 4,
        "encoder": "lstm",
        "encoder_hidden_size": 24,
    },
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 48},
    "p_tuning_v2": {"name": "p_tuning_v2", "num_virtual_tokens": 4},
}
PEFT_TYPE = {
    "prompt_tuning": "PROMPT_TUNING",
    "p_tuning_mlp": "P_TUNING",
    "p_tuning_lstm": "P_TUNING",
    "prefix_tuning": "PREFIX_TUNING",
    "p_tuning_v2": "PREFIX_TUNING",
}
CASES = [(t, m) for t in kit.TASK_MODELS for m in METHODS if not (t != "causal_lm" and m == "p_tuning_lstm")]


def peft_prefix_refuses(task: str, key: str) -> bool:
    """peft 0.21 decides that a model supports prefixes by finding ``past_key_values`` in the base
    model's ``forward`` signature; transformers 5.24 renamed that argument ``cache`` and encoder-only
    models (BERT) lost the name, so peft refuses them. The written-out reference below stays."""
    from importlib.metadata import version

    from packaging.version import Version

    if task != "seq_cls" or PEFT_TYPE[key] != "PREFIX_TUNING":
        return False
    return Version(version("transformers")) >= Version("5.24") and Version(version("peft")) < Version("0.22")


@pytest.mark.parametrize("task,key", CASES)
def test_peft_loads_our_adapter_with_equal_logits(task, key, tmp_path):
    peft = pytest.importorskip("peft")
    if peft_prefix_refuses(task, key):
        pytest.skip(
            "peft < 0.22 refuses prefix tuning on BERT under transformers >= 5.24 ('Model does not support "
            "past key values'); test_bert_prefix_equals_attention_over_prefix_written_out is the reference"
        )
    recipe, base_path, tokenizer, model, method = built = kit.build_inline(task, METHODS[key])
    labels = built.labels
    kit.train_step(model, method, kit.batch(task), task=task, lr=1e-2)
    input_ids, mask, kwargs, _ = kit.parts(kit.batch(task, seed=1), task)
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits
    save_adapter(tmp_path / "adapter", model, method, tokenizer, base_path, recipe.model, labels)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE[key]
    base = load_model(
        base_path, recipe.model, torch.device("cpu"), label_names=labels, pad_token_id=tokenizer.pad_token_id
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    reference.eval()
    with torch.no_grad():
        theirs = reference(input_ids=input_ids, attention_mask=mask, **kwargs).logits
    if task == "causal_lm":
        # peft returns [B, n_virtual + T, V] for input prompts; compare the real, unpadded positions.
        assert ours.shape == (*input_ids.shape, base.config.vocab_size)
        theirs = theirs[:, -input_ids.shape[1] :]
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    assert (ours - theirs).abs().max().item() <= 1e-5


def reference_bert_classifier(bert, rows: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor):
    """BERT sequence classification with prefixes, written out: per layer l with prefix keys/values
    P_k, P_v (heads × n × d), rows laid out ``[k_0, v_0, k_1, v_1, ...]`` as peft stores them,

        a = softmax(q [P_k; K]^T / √d + [0; M]) [P_v; V];  h = LN(h + O a);  h = LN(h + W₂ gelu(W₁ h))

    M = -inf on padded keys (the prefix is never masked). Positions start at n, after the prefix, as
    BERT counts a prefilled cache (and as peft's prefix tuning on BERT always gave)."""
    encoder = bert.bert.encoder
    heads = bert.config.num_attention_heads
    d = bert.config.hidden_size // heads
    n, n_layers = rows.shape[0], len(encoder.layer)
    blocks = rows.view(n, 2 * n_layers, heads, d).permute(1, 2, 0, 3)  # (2L, H, n, d)
    batch, length = input_ids.shape
    positions = torch.arange(n, n + length)[None]  # (1, T)
    hidden = bert.bert.embeddings(input_ids=input_ids, position_ids=positions)  # (B, T, h)
    masked = torch.zeros(batch, 1, 1, n + length)
    masked[:, :, :, n:] = torch.where(mask.bool(), 0.0, float("-inf"))[:, None, None, :]
    for layer, block in enumerate(encoder.layer):
        attention = block.attention

        def heads_of(x):
            return x.view(batch, length, heads, d).transpose(1, 2)  # (B, H, T, d)

        q = heads_of(attention.self.query(hidden))
        k = torch.cat([blocks[2 * layer].expand(batch, -1, -1, -1), heads_of(attention.self.key(hidden))], 2)
        v = torch.cat(
            [blocks[2 * layer + 1].expand(batch, -1, -1, -1), heads_of(attention.self.value(hidden))], 2
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + masked, dim=-1)  # (B, H, T, n + T)
        context = (weights @ v).transpose(1, 2).reshape(batch, length, heads * d)
        hidden = attention.output.LayerNorm(attention.output.dense(context) + hidden)
        hidden = block.output.LayerNorm(block.output.dense(block.intermediate(hidden)) + hidden)
    pooled = bert.bert.pooler(hidden)  # tanh(W h_[CLS])
    return bert.classifier(pooled)


@pytest.mark.parametrize("key", ["prefix_tuning", "p_tuning_v2"])
def test_bert_prefix_equals_attention_over_prefix_written_out(key):
    """Where peft drops out as the oracle (BERT under transformers >= 5.24), the equation is the reference."""
    *_, model, method = kit.build_inline("seq_cls", METHODS[key])
    kit.train_step(model, method, kit.batch("seq_cls"), task="seq_cls", lr=1e-2)
    input_ids, mask, kwargs, _ = kit.parts(kit.batch("seq_cls", seed=1), "seq_cls")  # row 1 right-padded
    rows = method.stored_rows(model)
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits
        reference = reference_bert_classifier(model.base_model, rows, input_ids, mask)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_gqa_prefix_shapes_in_saved_config(tmp_path):
    recipe, base_path, tokenizer, model, method = kit.build_inline("causal_lm", METHODS["prefix_tuning"])
    save_adapter(tmp_path / "a", model, method, tokenizer, base_path, recipe.model)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # tiny llama: hidden 64, 4 query heads, 2 kv heads, head_dim 16 -> token_dim 2·16 = 32
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (32, 2, 2)
    rows = method.adapter_state_dict(model)["prompt_embeddings"]
    assert tuple(rows.shape) == (4, 2 * 2 * 32)
    k, v = model.prefix.key_values(3)[1]
    assert tuple(k.shape) == tuple(v.shape) == (3, 2, 4, 16)


@pytest.mark.parametrize("key", ["prompt_tuning", "prefix_tuning"])
def test_left_and_right_padding_give_the_unpadded_logits(key):
    *_, model, method = kit.build_inline("causal_lm", METHODS[key])
    kit.train_step(model, method, kit.batch("causal_lm"), task="causal_lm", lr=1e-2)
    row = torch.randint(5, 200, (1, 6), generator=torch.Generator().manual_seed(3))
    other = torch.randint(5, 200, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        alone = model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0]  # (6, V)
        pad = torch.zeros(1, 3, dtype=torch.long)
        right = model(
            input_ids=torch.cat([torch.cat([row, pad], 1), other]),
            attention_mask=torch.tensor([[1] * 6 + [0] * 3, [1] * 9]),
        ).logits[0, :6]
        left = model(
            input_ids=torch.cat([torch.cat([pad, row], 1), other]),
            attention_mask=torch.tensor([[0] * 3 + [1] * 6, [1] * 9]),
        ).logits[0, 3:]
    assert (alone - right).abs().max().item() <= 1e-5
    assert (alone - left).abs().max().item() <= 1e-5


def recompute_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Reference decoding: the full sequence re-run without a cache at every step."""
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


REAL_WORDS = {"init": "real_words", "init_text": "abcd"}  # prefixes that leave the model's output varied


@pytest.mark.parametrize(
    "method,lr",
    [
        (METHODS["prompt_tuning"], 5e-2),
        (METHODS["p_tuning_mlp"], 5e-2),
        ({**METHODS["prefix_tuning"], **REAL_WORDS}, 1e-3),
        ({**METHODS["p_tuning_v2"], **REAL_WORDS}, 5e-2),
    ],
    ids=["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"],
)
def test_cached_generation_inserts_the_prompt_once(method, lr):
    *_, model, tuned = kit.build_inline("causal_lm", method)
    kit.train_step(model, tuned, kit.batch("causal_lm"), task="causal_lm", lr=lr)
    prompts = [[40, 41, 42, 43, 44, 45, 46], [50, 51, 52], [60, 61, 62, 63, 64]]  # left-padded in one batch
    cached = greedy_generate(
        model, prompts, max_new_tokens=6, eos_ids=set(), pad_id=0, device=torch.device("cpu")
    )
    assert len({t for row in cached for t in row}) >= 5  # a varied continuation, so the check has teeth
    assert cached == [recompute_greedy(model, p, 6) for p in prompts]


@pytest.mark.parametrize("key", ["prompt_tuning", "prefix_tuning"])
def test_seq2seq_generate_matches_recompute(key):
    *_, model, method = kit.build_inline("seq2seq", METHODS[key])
    kit.train_step(model, method, kit.batch("seq2seq"), task="seq2seq", lr=5e-2)
    kit.assert_seq2seq_generate_matches_recompute(model)


def test_gradient_checkpointing_works_for_prompt_tuning_and_is_refused_for_prefixes():
    grads = []
    for checkpointing in (False, True):
        *_, model, _ = kit.build_inline(
            "causal_lm", METHODS["prompt_tuning"], {"gradient_checkpointing": checkpointing}
        )
        model.train()
        input_ids, mask, _, labels = kit.parts(kit.batch("causal_lm"), "causal_lm")
        loss, n = token_loss_sum(model(input_ids=input_ids, attention_mask=mask).logits, labels, "causal_lm")
        (loss / n).backward()
        grads.append(model.input_prompt.embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6
    for name in ("prefix_tuning", "p_tuning_v2"):
        with pytest.raises(RecipeError, match="gradient_checkpointing"):
            kit.build_inline("causal_lm", {"name": name}, {"gradient_checkpointing": True})


def test_text_and_sample_vocab_inits_are_real_token_embeddings():
    *_, model, _ = kit.build_inline(
        "causal_lm", {"name": "prompt_tuning", "num_virtual_tokens": 7, "init": "text", "init_text": "abc"}
    )
    tokenizer = load_tokenizer(
        model.name_or_path,
        recipe_from_dict({"model": {"name": "tiny:llama"}, "data": {"train": "x.jsonl"}}).model,
    )
    ids = repeat_to(tokenizer("abc", add_special_tokens=False)["input_ids"], 7)
    table = model.get_input_embeddings().weight
    assert torch.equal(model.input_prompt.embedding.weight, table[ids])
    *_, model, _ = kit.build_inline(
        "causal_lm",
        {"name": "prompt_tuning", "num_virtual_tokens": 16, "init": "sample_vocab", "sample_vocab_top_k": 40},
    )
    rows = model.input_prompt.embedding.weight
    table = model.get_input_embeddings().weight
    picked = [int((table == r).all(-1).nonzero()[0]) for r in rows]  # each row is one vocabulary row
    assert all(4 <= i < 40 for i in picked)  # among the first 40 ids, never a special token (0-3)
    *_, model, _ = kit.build_inline(
        "seq_cls", {"name": "prompt_tuning", "num_virtual_tokens": 5, "init": "text"}
    )
    tokenizer = load_tokenizer(
        model.name_or_path,
        recipe_from_dict(
            {
                "model": {"name": "tiny:bert", "task": "seq_cls"},
                "data": {"train": "x.jsonl", "format": "classification"},
            }
        ).model,
    )
    ids = repeat_to(
        tokenizer("negative positive", add_special_tokens=False)["input_ids"], 5
    )  # the label words
    assert torch.equal(model.input_prompt.embedding.weight, model.get_input_embeddings().weight[ids])


@pytest.mark.parametrize("projection", [True, False])
def test_real_word_prefix_equals_reading_the_words(projection):
    """Li & Liang's real-word init: the prefix is the model's own keys/values of the words, so at step 0
    the prefixed model on x equals the base model on words + x (reference: base, ≤ 1e-5)."""
    method = {
        "name": "prefix_tuning" if projection else "p_tuning_v2",
        "num_virtual_tokens": 5,
        "init": "real_words",
        "init_text": "hello",
    }  # 5 bytes = 5 tokens for the byte tokenizer
    _, _, tokenizer, model, _ = kit.build_inline("causal_lm", method)
    words = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert len(words) == 5
    x = torch.randint(5, 200, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        prefixed = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
        full = torch.cat([torch.tensor([words]), x], 1)
        reference = model.base_model(input_ids=full).logits[0, 5:]
    assert (prefixed - reference).abs().max().item() <= 1e-5
    with pytest.raises(RecipeError, match="real_words"):
        kit.build_inline("seq_cls", {**method, "name": "p_tuning_v2"})


def source_adapter(tmp_path: Path, method: dict, task: str = "causal_lm") -> Path:
    recipe, base_path, tokenizer, model, m = built = kit.build_inline(task, method, seed=7)
    labels = built.labels
    kit.train_step(model, m, kit.batch(task), task=task, lr=5e-2)
    save_adapter(tmp_path / "source", model, m, tokenizer, base_path, recipe.model, labels)
    return tmp_path / "source"


@pytest.mark.parametrize(
    "source,target",
    [
        ("prompt_tuning", "prompt_tuning"),
        ("p_tuning_mlp", "prompt_tuning"),
        ("p_tuning_v2", "prefix_tuning"),
        ("prefix_tuning", "p_tuning_v2"),
    ],
)
def test_spot_init_reproduces_the_source_prompt_at_step_0(source, target, tmp_path):
    path = source_adapter(tmp_path, METHODS[source])
    stored = load_adapter(path)
    *_, model, method = kit.build_inline("causal_lm", {**METHODS[target], "init_from": str(path)})
    rows = method.stored_rows(model)
    assert torch.equal(rows, stored.method.stored_rows(stored.model))
    input_ids, mask, _, _ = kit.parts(kit.batch("causal_lm", seed=2), "causal_lm")
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=mask).logits
        theirs = stored.model(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)
    trained = model.input_prompt if target == "prompt_tuning" else model.prefix  # what SPoT initialised
    assert trained is not None and all(p.requires_grad for p in trained.parameters())


def test_spot_shape_mismatch_is_a_clear_error(tmp_path):
    path = source_adapter(tmp_path, METHODS["prompt_tuning"])
    with pytest.raises(RecipeError, match=r"method.init_from.*\(4, 64\).*\(6, 64\)"):
        kit.build_inline(
            "causal_lm", {"name": "prompt_tuning", "num_virtual_tokens": 6, "init_from": str(path)}
        )
    with pytest.raises(RecipeError, match="method.init_from.*virtual tokens"):
        kit.build_inline(
            "causal_lm", {"name": "p_tuning_v2", "num_virtual_tokens": 4, "init_from": str(path)}
        )
    with pytest.raises(RecipeError, match="not an adapter directory"):
        kit.build_inline("causal_lm", {"name": "prompt_tuning", "init_from": str(tmp_path / "nowhere")})
    with pytest.raises(RecipeError, match="p_tuning"):
        kit.build_inline("causal_lm", {"name": "p_tuning", "init_from": str(path)})


def test_ensemble_averages_logits_and_votes():
    members = []
    for seed in (1, 2):
        *_, model, method = kit.build_inline("causal_lm", METHODS["prompt_tuning"], seed=seed)
        kit.train_step(model, method, kit.batch("causal_lm", seed=seed), task="causal_lm", lr=1e-2)
        members.append(model)
    input_ids, mask, _, _ = kit.parts(kit.batch("causal_lm", seed=3), "causal_lm")
    with torch.no_grad():
        each = [m(input_ids=input_ids, attention_mask=mask).logits for m in members]
        mean = EnsembleModel(members)(input_ids=input_ids, attention_mask=mask).logits
    assert (mean - (each[0] + each[1]) / 2).abs().max().item() <= 1e-6
    # The ensemble decodes greedily from the averaged logits, with one KV cache per member.
    prompts = [[40, 41, 42], [50, 51, 52, 53]]
    ensemble = EnsembleModel(members)
    assert greedy_generate(ensemble, prompts, 4, set(), 0, torch.device("cpu")) == [
        recompute_greedy(ensemble, p, 4) for p in prompts
    ]

    class Fixed(torch.nn.Module):  # a classifier that always returns the given logits
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, **_):
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=self.logits.clone())

    # Two weak votes for class 0 beat one confident vote for class 1; the mean picks class 1.
    fixed = [Fixed([[0.2, 0.0]]), Fixed([[0.2, 0.0]]), Fixed([[0.0, 9.0]])]
    assert EnsembleModel(fixed)(input_ids=None).logits.argmax(-1).item() == 1
    voted = EnsembleModel(fixed, vote=True)(input_ids=None).logits
    assert voted.argmax(-1).item() == 0
    assert torch.allclose(voted.exp().sum(-1), torch.tensor([1.0]))  # log vote shares


@pytest.mark.slow
def test_cli_eval_ensemble_of_classifiers(tmp_path):
    from peftcli.api import evaluate_target

    adapters = []
    for seed in (1, 2, 3):
        built = kit.build_inline("seq_cls", METHODS["prompt_tuning"], seed=seed)
        recipe, base_path, tokenizer, model, method = built
        labels = built.labels
        kit.train_step(model, method, kit.batch("seq_cls", seed=seed), task="seq_cls", lr=5e-2)
        save_adapter(tmp_path / f"a{seed}", model, method, tokenizer, base_path, recipe.model, labels)
        adapters.append(str(tmp_path / f"a{seed}"))
    data = str(RECIPES / "data" / "tiny_cls_eval.jsonl")
    alone = [evaluate_target(a, data=data) for a in adapters]
    voted = evaluate_target(adapters[0], data=data, ensemble=adapters[1:], vote=True)
    mean = evaluate_target(adapters[0], data=data, ensemble=adapters[1:])
    assert voted["eval_examples"] == mean["eval_examples"] == alone[0]["eval_examples"] == 64
    # Reference: the same vote computed by hand from the three loaded adapters.
    from peftcli.data.collate import collate
    from peftcli.data.pipeline import load_data
    from peftcli.recipe import DataConfig

    loaded = [load_adapter(a) for a in adapters]
    bundle = load_data(
        DataConfig(train=data, eval=data, format="classification"),
        loaded[0].tokenizer,
        "seq_cls",
        label_names=loaded[0].label_names,
    )
    batch = collate(bundle.eval, loaded[0].tokenizer, "seq_cls")
    with torch.no_grad():
        logits = torch.stack(
            [
                m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                for m in loaded
            ]
        )
    by_mean = (logits.mean(0).argmax(-1) == batch["labels"]).float().mean().item()
    assert mean["accuracy"] == pytest.approx(by_mean)
    votes = torch.nn.functional.one_hot(logits.argmax(-1), 2).sum(0)  # 3 voters, 2 classes: never a tie
    assert voted["accuracy"] == pytest.approx((votes.argmax(-1) == batch["labels"]).float().mean().item())
    causal = source_adapter(tmp_path, METHODS["prompt_tuning"])
    with pytest.raises(RecipeError, match="--vote"):
        evaluate_target(causal, data=EVAL, vote=True)
