"""CPT (context-aware prompt tuning) against peft 0.21 as the oracle, fp32 on the CPU:

- the context file is laid out as the paper's examples (input template, input, output template, label,
  each typed 4k+1 … 4k+4, separators 0) and the prompt starts as the context's own embeddings;
- CPT's loss (the context's labels and the row's, with and without decay) equals peft's
  ``model(..., labels, input_type_mask).loss`` on the same weights (≤ 1e-5), and the logits agree;
- the loop's own steps (``Stepper``: CPT's loss, the label-row gradient mask, the ε-projection after
  each step) land on peft's prompt after the same AdamW steps (≤ 1e-5), with label rows unmoved and
  every other row inside its ε-ball;
- parity both ways: peft loads our trained adapter with our logits, we load peft's with its logits;
- recipes it cannot run are one-line errors.
"""

from __future__ import annotations

import json

import kit
import pytest
import torch

from peftcli.export import load_adapter
from peftcli.methods.cpt import decay_weights
from peftcli.models import resolve_model_name
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

# run id -> overrides of recipes/tiny/cpt.yaml (the options that change CPT's numbers)
RUNS = {
    "decay": [],
    "no-decay-eps": [
        "method.opt_weighted_loss_type=none",
        "method.opt_projection_epsilon=0.05",
        "method.opt_projection_format_epsilon=0.3",
    ],
}


def probe(vocab: int) -> dict[str, torch.Tensor]:
    """Two right-padded rows whose first tokens are a prompt (no loss), as the completion format gives."""
    batch = kit.batch("causal_lm", vocab, lengths=(9, 6))
    batch["labels"][:, :3] = -100
    return batch


def peft_config(method, **overrides):
    cfg = method.cfg
    return peft.CPTConfig(
        task_type="CAUSAL_LM",
        cpt_token_ids=list(method.token_ids),
        cpt_mask=[1] * len(method.token_ids),
        cpt_tokens_type_mask=list(method.types),
        opt_weighted_loss_type=cfg.opt_weighted_loss_type,
        opt_loss_decay_factor=cfg.opt_loss_decay_factor,
        opt_projection_epsilon=cfg.opt_projection_epsilon,
        opt_projection_format_epsilon=cfg.opt_projection_format_epsilon,
        **overrides,
    )


def peft_twin(built):
    """peft's CPT model on the same base and context, its offsets copied from ours."""
    base = kit.auto_class("causal_lm").from_pretrained(built.base_path, dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft_config(built.method))
    with torch.no_grad():
        theirs.prompt_encoder.default.delta_embedding.weight.copy_(
            built.model.input_prompt.delta_embedding.weight
        )
    return theirs


def peft_loss(theirs, batch):
    type_mask = torch.where(batch["labels"] != -100, 4, 0)  # the row's answer is its label
    out = theirs(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"].clone(),
        input_type_mask=type_mask,
    )
    return out.loss


def our_loss(built, batch):
    method = built.method
    return method.loss_sum(built.model, batch) / method.loss_targets(batch)


@pytest.mark.slow
def test_the_context_is_laid_out_as_the_papers_examples(tmp_path):
    built = kit.build("cpt", tmp_path)
    method, tokenizer = built.method, built.tokenizer
    examples = [
        json.loads(line)
        for line in (kit.RECIPES / "data" / "tiny_cpt_context.jsonl").read_text().splitlines()
    ]
    assert tokenizer.decode(method.token_ids) == "".join(
        f"reverse {e['input']} = {e['output']}\n" for e in examples
    )
    types = torch.tensor(method.types)
    ids = torch.tensor(method.token_ids)
    for k, example in enumerate(examples):  # each example's input and label, typed 4k+2 and 4k+4
        assert tokenizer.decode(ids[types == 4 * k + 2]) == example["input"]
        assert tokenizer.decode(ids[types == 4 * k + 4]) == example["output"]
        assert tokenizer.decode(ids[types == 4 * k + 1]) == "reverse  ="
    embeddings = built.model.get_input_embeddings().weight[ids]
    assert torch.equal(built.model.input_prompt(), embeddings)  # step 0: the context itself


def test_decay_weighs_each_example_by_the_examples_after_it():
    types = torch.tensor([[1, 4, 4, 5, 8, 0, 12, 12], [1, 4, 0, 0, 8, 0, 0, 0]])
    weights = decay_weights(types, 0.5)
    assert weights.tolist() == [[1, 0.25, 0.25, 1, 0.5, 1, 1, 1], [1, 0.5, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("run", list(RUNS))
def test_loss_and_logits_equal_peft(run, tmp_path):
    built = kit.build("cpt", tmp_path, RUNS[run])
    kit.perturb(built.model, scale=0.02)
    built.method.after_step(built.model, 0)  # offsets on their ε-balls, as training leaves them
    batch = probe(built.model.config.vocab_size)
    theirs = peft_twin(built)
    theirs.eval()
    with torch.no_grad():
        assert abs(float(our_loss(built, batch)) - float(peft_loss(theirs, batch))) <= 1e-5
    assert kit.max_diff(kit.logits(built.model, batch), kit.peft_logits(theirs, batch)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("run", [*RUNS, "decay-accum2"])
def test_the_loops_steps_land_on_peft_prompt(run, tmp_path):
    """peft steps on the whole batch; ours on it too, or (accum2) on its rows as two micro-batches of
    one accumulation window, which CPT's loss normalises over the window's scored positions."""
    built = kit.build("cpt", tmp_path, RUNS.get(run, []))
    batch = probe(built.model.config.vocab_size)
    window = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)] if "accum2" in run else batch
    theirs = peft_twin(built)
    theirs.train()
    optimizer = torch.optim.AdamW(
        [p for p in theirs.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    for _ in range(4):
        peft_loss(theirs, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    results = kit.train_step(built.model, built.method, window, lr=1e-2, steps=4)
    theirs.eval()
    expected = theirs.get_prompt_embedding_to_save("default")
    ours = built.model.input_prompt
    assert kit.max_diff(ours().detach(), expected) <= 1e-5
    with torch.no_grad():
        first = float(peft_loss(peft_twin_at_start(built), batch))
    assert abs(results[0].loss - first) <= 1e-5
    delta = ours.delta_embedding.weight.detach()
    labels = (torch.tensor(built.method.types) % 4) == 0
    assert torch.equal(delta[labels], torch.zeros_like(delta[labels]))  # labels kept as given
    norms = delta.norm(dim=1)
    assert bool((norms <= ours.radii * (1 + 1e-5)).all())
    assert bool((norms[~labels] > 0.99 * ours.radii[~labels]).any())  # the projection was exercised


def peft_twin_at_start(built):
    """peft's model at step 0 (zero offsets): the first step's loss."""
    base = kit.auto_class("causal_lm").from_pretrained(built.base_path, dtype=torch.float32)
    model = peft.get_peft_model(base, peft_config(built.method))
    model.eval()
    return model


@pytest.mark.slow
def test_peft_loads_our_trained_adapter(tmp_path):
    built = kit.build("cpt", tmp_path)
    batch = probe(built.model.config.vocab_size)
    kit.train_step(built.model, built.method, batch, lr=1e-2, steps=3)
    ours = kit.logits(built.model, batch)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "CPT" and config["cpt_token_ids"] == built.method.token_ids
    theirs = kit.load_in_peft(adapter, built.base_path)
    assert kit.max_diff(ours, kit.peft_logits(theirs, batch)) <= 1e-5


@pytest.mark.slow
def test_we_load_peft_adapters(tmp_path):
    torch.manual_seed(0)
    base = kit.auto_class("causal_lm").from_pretrained(resolve_model_name("tiny:llama"), dtype=torch.float32)
    ids = list(range(5, 17))
    types = [1, 1, 2, 2, 3, 4, 0, 5, 6, 6, 7, 8]
    config = peft.CPTConfig(
        task_type="CAUSAL_LM", cpt_token_ids=ids, cpt_tokens_type_mask=types, opt_weighted_loss_type="decay"
    )
    theirs = peft.get_peft_model(base, config)
    batch = probe(base.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_loss(theirs, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.method.name == "cpt" and loaded.method.types == types
    assert kit.max_diff(kit.peft_logits(theirs, batch), kit.logits(loaded.model, batch)) <= 1e-5


@pytest.mark.slow
def test_recipes_it_cannot_run_are_refused(tmp_path):
    refusals = {
        "cpt trains causal_lm models only": [
            "model.name=tiny:bert",
            "model.task=seq_cls",
            "data.format=classification",
        ],
        "its own context loss": ["objective.name=dpo", "data.format=preference"],
        "exactly one": ["method.cpt_token_ids=[1, 2]", "method.cpt_tokens_type_mask=[1, 4]"],
        "needs each token's type": ["method.context=null", "method.cpt_token_ids=[1, 2]"],
        "differ in length": [
            "method.context=null",
            "method.cpt_token_ids=[1, 2]",
            "method.cpt_tokens_type_mask=[1]",
        ],
        "prepends the context per row": ["train.packing=true"],
    }
    for message, overrides in refusals.items():
        with pytest.raises(RecipeError, match=message) as err:
            kit.build("cpt", tmp_path, overrides)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_bad_context_file_is_one_line(tmp_path):
    bad = tmp_path / "context.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    with pytest.raises(RecipeError, match="line 2 is not an object with string input and output"):
        kit.build("cpt", tmp_path, [f"method.context={bad}"])
    bad.write_text('{"input": "a", "output": ""}\n')
    with pytest.raises(RecipeError, match="empty output"):
        kit.build("cpt", tmp_path, [f"method.context={bad}"])
    with pytest.raises(RecipeError, match="must hold exactly one"):
        kit.build("cpt", tmp_path, ["method.input_template=no placeholder"])
