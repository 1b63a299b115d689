"""The preference objectives (peftcli/training/objectives/) against TRL, and the objective plumbing.

Reference: TRL 1.16 (a test dependency, like peft). Full trainers are built offline on the same
tiny:llama model carrying the same perturbed LoRA adapter (ours saved, loaded by peft with
``is_trainable``), the same pairs and the same β, and their own ``compute_loss`` is called on the batch
their own collator builds (their tokenization, concatenated forward and label handling). Ours is the
loop's own forward/backward (``Stepper.backward_window``) on the batch our data stage builds. The token
ids are checked equal first, then the step-1 loss and every adapter gradient, ≤ 1e-4 in fp32:

* dpo: ``DPOTrainer`` (loss_type sigmoid); ipo: ``DPOTrainer`` (loss_type ipo). reference ``base``: TRL's
  model with its adapters disabled (its ``ref`` copy removed); ``start``: TRL's ``ref`` copy of the
  adapter it was given.
* simpo: ``trl.experimental.cpo.CPOTrainer`` (loss_type simpo, cpo_alpha 0, simpo_gamma γ).
* orpo: ``trl.experimental.orpo.ORPOTrainer``, with its SFT term restricted to the answer's tokens and
  EOS as the issue defines it (TRL's experimental ORPO also scores the prompt tokens there); the
  odds-ratio term, the average log-probs and the forward are TRL's.
* kto: ``KTOTrainer`` (loss_type kto, its KL term from the batch's completions rotated by one) on
  unpaired examples with both labels, unequal desirable/undesirable weights, both references.

TRL 1.16's DPO ``sigmoid`` has no label smoothing; cDPO's ``label_smoothing`` is checked against the
definition written out instead.

Beyond parity: KTO's KL term against its definition (each mismatched row scored alone); precomputed
reference log-probs give the very same logged losses and evals as scoring the reference every step, and
their cache key follows the data, the base's files and the start adapter; a run killed (SIGKILL) after a
checkpoint and resumed ends as the uninterrupted run did (≤ 1e-6) for dpo with ``reference: start``, kto
and reward (GRPO's is in tests/test_grpo.py); ``model.adapter`` starts a run
from a trained adapter's tensors, with ``reference: start`` scoring exactly that adapter; ``report`` and
``compare`` show a preference run's objective and reward metrics (checked against metrics.jsonl and
results.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import kit
import pytest
import torch
import torch.nn.functional as F

from peftcli.data.collate import collate_rows
from peftcli.data.pipeline import load_data
from peftcli.recipe import ObjectiveConfig, RecipeError
from peftcli.recipe_loader import load_recipe
from peftcli.training.objectives.base import pair_counts, score_pairs
from peftcli.training.objectives.registry import build_objective
from peftcli.training.step import Stepper

pytest.importorskip("trl")

RECIPE = kit.ROOT / "recipes" / "objectives" / "dpo.yaml"
KTO_RECIPE = kit.ROOT / "recipes" / "objectives" / "kto.yaml"
REWARD_RECIPE = kit.ROOT / "recipes" / "objectives" / "reward.yaml"
PAIRS = [json.loads(line) for line in (kit.ROOT / "recipes/data/tiny_pref_train.jsonl").open()][:4]
# Unequal answer lengths, so padding, per-answer counts and averages all matter.
PAIRS[1] = {**PAIRS[1], "chosen": " very happy indeed"}
PAIRS[2] = {**PAIRS[2], "rejected": " sad, sad"}
# KTO's unpaired examples: both labels, interleaved, and the answers of unequal lengths above.
UNPAIRED = [
    {"prompt": PAIRS[i]["prompt"], "completion": PAIRS[i][answer], "label": answer == "chosen"}
    for i, answer in [
        (0, "chosen"),
        (1, "rejected"),
        (2, "chosen"),
        (3, "rejected"),
        (1, "chosen"),
        (2, "rejected"),
    ]
]
BETA = 0.2
TOLERANCE = 1e-4
KTO_WEIGHTS = {"desirable_weight": 1.3, "undesirable_weight": 0.7}
# kit.perturb's seed per objective: under seed 7 the mismatched KL rows gain log-probability against the
# base (z ≈ 0.63), so KTO's KL term is not clamped to 0 and the parity covers it.
PERTURB_SEED = {"kto": 7}

# name: (recipe objective overrides, which TRL trainer, its config)
CASES = {
    "dpo-base": ({"name": "dpo", "reference": "base"}, "dpo", {"loss_type": "sigmoid"}),
    "dpo-start": ({"name": "dpo", "reference": "start"}, "dpo", {"loss_type": "sigmoid"}),
    "ipo-base": ({"name": "ipo", "reference": "base"}, "dpo", {"loss_type": "ipo"}),
    "simpo": (
        {"name": "simpo", "gamma": 0.3},
        "cpo",
        {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.3},
    ),
    "orpo": ({"name": "orpo"}, "orpo", {}),
    "kto-base": ({"name": "kto", "reference": "base", **KTO_WEIGHTS}, "kto", KTO_WEIGHTS),
    "kto-start": ({"name": "kto", "reference": "start", **KTO_WEIGHTS}, "kto", KTO_WEIGHTS),
}


def examples_for(objective: dict) -> list[dict]:
    return UNPAIRED if objective.get("name") == "kto" else PAIRS


def recipe_for(tmp_path: Path, objective: dict):
    data = kit.write_jsonl(tmp_path / "pairs.jsonl", examples_for(objective))
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={data}",
        "data.eval=null",
        f"objective.beta={BETA}",
    ]
    if objective.get("name") == "kto":
        overrides.append("data.format=unpaired_preference")
    overrides += [f"objective.{k}={v}" for k, v in objective.items()]
    return load_recipe(RECIPE, overrides)


def step_one(recipe, built, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loop's own Stepper on one window of ``batch``: the step-1 loss and the adapter's gradients by
    peft's key."""
    built.model.train()
    objective = build_objective(recipe.objective, built.method, built.model)
    stepper = Stepper(model=built.model, method=built.method, optimizer=None, objective=objective)
    built.model.zero_grad(set_to_none=True)
    loss, _, _ = stepper.backward_window([batch], 1)
    grads = {
        built.method.stored_key(n): p.grad.clone()
        for n, p in built.model.named_parameters()
        if p.grad is not None
    }
    return loss, grads


def our_side(tmp_path: Path, objective: dict):
    """(batch, step-1 loss, adapter gradients by peft's key, built model) from the loop's own step."""
    recipe = recipe_for(tmp_path, objective)
    built = kit.build(recipe)
    kit.perturb(built.model, seed=PERTURB_SEED.get(objective["name"], 1))
    rows = load_data(recipe.data, built.tokenizer, "causal_lm").train
    batch = collate_rows(rows, range(len(rows)), built.tokenizer, "causal_lm")
    return (batch, *step_one(recipe, built, batch), built)


def trl_trainer(tmp_path: Path, built, kind: str, options: dict):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = kit.save(
        tmp_path / "ours", built.model, built.method, built.tokenizer, built.base_path, built.recipe
    )
    base = AutoModelForCausalLM.from_pretrained(built.base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    examples = UNPAIRED if kind == "kto" else PAIRS
    common = {
        "output_dir": str(tmp_path / "trl"),
        "beta": BETA,
        "per_device_train_batch_size": len(examples),
        "report_to": [],
        "use_cpu": True,
        "max_length": 64,
    }
    if kind == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    elif kind == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
    elif kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    args = Config(**common, **options)
    rows = examples
    if kind in (
        "dpo",
        "kto",
    ):  # DPO/KTOTrainer tokenize the prompt as it is; ours (and CPO/ORPO's) start with BOS
        rows = [{**row, "prompt": built.tokenizer.bos_token + row["prompt"]} for row in examples]
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=built.tokenizer
    )
    return trainer


def trl_rows(trainer, kind: str, inputs) -> list[list[int]]:
    """The token ids of TRL's concatenated rows (chosen first), padding left out."""
    if kind == "kto":  # the examples, then their mismatched KL rows (ours: the same 2B rows)
        parts = [(inputs[f"{k}input_ids"], inputs[f"{k}attention_mask"]) for k in ("", "KL_")]
    elif kind == "dpo":
        parts = [(inputs["input_ids"], inputs["attention_mask"])]
    else:  # CPO and ORPO collate chosen and rejected apart, each padded to its own width
        parts = [(inputs[f"{k}_input_ids"], inputs[f"{k}_attention_mask"]) for k in ("chosen", "rejected")]
    return [row[m.bool()].tolist() for ids, mask in parts for row, m in zip(ids, mask, strict=True)]


def completion_nll_orpo(trainer) -> None:
    """TRL's ORPO forward with its SFT term over the answer's tokens and EOS only (the issue's definition):
    −Σ logp_c / Σ(tokens + 1), from TRL's own average log-probs and the chosen labels' counts."""
    forward = trainer.concatenated_forward

    def forward_with_completion_nll(model, batch):
        out = list(forward(model, batch))
        counts = (batch["chosen_labels"][:, 1:] != -100).sum(-1).to(out[0].device)
        out[4] = -(out[0] * counts).sum() / counts.sum()
        return tuple(out)

    trainer.concatenated_forward = forward_with_completion_nll


def trl_side(tmp_path: Path, built, case: str):
    objective, kind, options = CASES[case]
    trainer = trl_trainer(tmp_path, built, kind, options)
    model = trainer.model
    if kind in ("dpo", "kto") and objective.get("reference") == "base" and "ref" in model.peft_config:
        model.delete_adapter("ref")  # TRL then takes the reference with the adapters disabled: the base
    if kind == "orpo":
        completion_nll_orpo(trainer)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n.replace(".default.", "."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return trl_rows(trainer, kind, inputs), loss.item(), grads


def our_rows(batch) -> list[list[int]]:
    return [
        row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_step_one_loss_and_gradients_equal_trl(case, tmp_path):
    batch, loss, grads, built = our_side(tmp_path, CASES[case][0])
    trl_ids, trl_loss, trl_grads = trl_side(tmp_path, built, case)
    assert our_rows(batch) == trl_ids  # the same tokens: prompt, answer, EOS
    assert abs(loss) > 1e-3 and math.isfinite(loss)
    assert loss == pytest.approx(trl_loss, abs=TOLERANCE)
    assert set(grads) == set(trl_grads)
    scale = max(float(g.abs().max()) for g in trl_grads.values())
    assert scale > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], atol=TOLERANCE * scale, rtol=0, msg=name)


def test_dpo_label_smoothing_is_cdpo(tmp_path):
    """cDPO: (1 − ε)·−logσ(βd) + ε·−logσ(−βd), with d the log-ratio difference, over the batch."""
    batch, loss, _, built = our_side(tmp_path, {"name": "dpo", "label_smoothing": 0.2})
    objective = build_objective(built.recipe.objective, built.method, built.model)
    with torch.no_grad():
        s = score_pairs(built.model, batch, objective.reference, built.model)
    d = (s.chosen - s.ref_chosen) - (s.rejected - s.ref_rejected)
    expected = (0.8 * -F.logsigmoid(BETA * d) + 0.2 * -F.logsigmoid(-BETA * d)).mean()
    assert loss == pytest.approx(float(expected), abs=1e-6)


def test_kto_kl_term_is_the_batch_mismatched_pairs(tmp_path):
    """z = max(0, mean over i of logp − logref of example i's prompt followed by example i−1's completion
    and EOS), each scored alone here; the loss is the weighted 1 − σ of the definition, with z > 0."""
    from peftcli.training.objectives.base import sequence_logps

    batch, loss, _, built = our_side(tmp_path, {"name": "kto", **KTO_WEIGHTS})
    objective = build_objective(built.recipe.objective, built.method, built.model)
    tok = built.tokenizer
    shifted = []
    for i, row in enumerate(UNPAIRED):
        prompt = [tok.bos_token_id, *kit.ids(tok, row["prompt"])]
        answer = [*kit.ids(tok, UNPAIRED[i - 1]["completion"]), tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        one = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        one["labels"] = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            policy = sequence_logps(built.model, one)[0]
            with objective.reference():
                ref = sequence_logps(built.model, one)[0]
        shifted.append(float(policy - ref))
    z = max(0.0, sum(shifted) / len(shifted))
    with torch.no_grad():
        s = objective.score(built.model, batch)
    assert z > 0.1 and float(s.kl[0]) == pytest.approx(z, abs=1e-5)
    ratio = s.logps - s.ref
    labels = torch.tensor([row["label"] for row in UNPAIRED])
    expected = torch.where(
        labels, 1.3 * (1 - torch.sigmoid(BETA * (ratio - z))), 0.7 * (1 - torch.sigmoid(BETA * (z - ratio)))
    ).mean()
    assert loss == pytest.approx(float(expected), abs=1e-6)


def test_kto_on_two_ranks_is_one_process(tmp_path):
    """Under torchrun a rank's KL rows take the completions of the examples before its own in the whole
    micro-batch, and z is the mean over both ranks' rows (Kto.score across_ranks): 6 examples in
    micro-batches of 5 and 1 on 2 ranks (rank 1 holds 2 of the first and a stand-in copy of the last)
    give one process's loss (the ranks' shares summed) and gradients (≤ 1e-6), with z > 0."""
    from peftcli.data.collate import collate_unpaired
    from peftcli.training.distributed import Dist

    recipe = recipe_for(tmp_path, {"name": "kto", **KTO_WEIGHTS})
    built = kit.build(recipe)
    kit.perturb(built.model, seed=PERTURB_SEED["kto"])
    rows = load_data(recipe.data, built.tokenizer, "causal_lm").train
    window = [[0, 1, 2, 3, 4], [5]]

    def micro_batches(dist: Dist) -> list[dict[str, torch.Tensor]]:
        before = dist.rank_slice([[batch[i - 1] for i in range(len(batch))] for batch in window])
        micro = [
            collate_unpaired(rows.take(mine), built.tokenizer, rows.take(partners))
            for mine, partners in zip(dist.rank_slice(window), before, strict=True)
        ]
        dist.mask_padding(micro, dist.padding_flags(window))
        return micro

    one = [collate_rows(rows, batch, built.tokenizer, "causal_lm") for batch in window]
    with torch.no_grad():
        objective = build_objective(recipe.objective, built.method, built.model)
        assert float(objective.score(built.model, one[0]).kl[0]) > 0.1
    loss, grads = kit.rank_window(built, recipe.objective, one, Dist())
    ranks = kit.thread_ranks(2, lambda d: kit.rank_window(built, recipe.objective, micro_batches(d), d))
    assert ranks[0][0] + ranks[1][0] == pytest.approx(loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(ranks[0][1][name] + ranks[1][1][name], grad, atol=1e-6, rtol=0, msg=name)


def test_reference_base_is_the_model_without_its_adapter(tmp_path):
    """With the adapter switched off, the model's log-probs are the plain base model's, and switching it
    off leaves the tuned model as it was."""
    batch, _, _, built = our_side(tmp_path, {"name": "dpo"})
    base = kit.base_model(built.base_path, built.recipe, built.tokenizer.pad_token_id)
    built.model.eval()
    with torch.no_grad():
        tuned_before = built.model(input_ids=batch["input_ids"]).logits
        with built.method.adapter_disabled(built.model):
            off = built.model(input_ids=batch["input_ids"]).logits
        tuned_after = built.model(input_ids=batch["input_ids"]).logits
        plain = base(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)
    assert torch.equal(tuned_before, tuned_after)
    assert (tuned_before - plain).abs().max() > 1e-3


def test_window_loss_is_the_mean_over_the_windows_pairs(tmp_path):
    """Two micro-batches of two pairs each give the same loss and gradients as one batch of four."""
    recipe = recipe_for(tmp_path, {"name": "simpo"})
    built = kit.build(recipe)
    kit.perturb(built.model)
    rows = load_data(recipe.data, built.tokenizer, "causal_lm").train
    objective = build_objective(recipe.objective, built.method, built.model)
    stepper = Stepper(model=built.model, method=built.method, optimizer=None, objective=objective)
    results = []
    for window in ([range(4)], [range(2), range(2, 4)]):
        micro = [collate_rows(rows, indices, built.tokenizer, "causal_lm") for indices in window]
        built.model.zero_grad(set_to_none=True)
        loss, _, _ = stepper.backward_window(micro, 1)
        results.append(
            (loss, {n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None})
        )
    (one, g1), (two, g2) = results
    assert one == pytest.approx(two, abs=1e-6)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5)
    assert pair_counts(micro) == {
        "pairs": 4,
        "chosen_tokens": int(sum((b["labels"][:2, 1:] != -100).sum() for b in micro)),
    }


# -- recipe and data -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["data.format=completion"], "data.format", "preference data"),
        (["objective.name=sft"], "objective.name", "preference objective"),
        (["objective.name=dpx"], "objective.name", "did you mean 'dpo'"),
        (["objective.gama=1"], "objective.gama", "did you mean 'gamma'"),
        (["objective.gamma=1"], "objective.gamma", "only simpo"),
        (["objective.label_smoothing=0.1", "objective.name=ipo"], "objective.label_smoothing", "only dpo"),
        (["objective.reference=bse"], "objective.reference", "base"),
        (["train.packing=true"], "train.packing", "not packed"),
        (["objective.name=reward"], "model.task", "one-output seq_cls head"),
        (
            ["objective.name=reward", "model.task=seq_cls", "model.num_labels=2"],
            "model.num_labels",
            "one output",
        ),
        (["objective.name=reward", "model.task=seq2seq"], "model.task", "not seq2seq"),
        (["objective.name=kto"], "data.format", "data.format: unpaired_preference"),
        (["objective.desirable_weight=2"], "objective.desirable_weight", "only kto"),
        (
            ["objective.precompute_reference=true", "objective.name=simpo"],
            "precompute_reference",
            "no reference",
        ),
        (
            ["objective.precompute_reference=true", "objective.name=kto", "data.format=unpaired_preference"],
            "objective.precompute_reference",
            "KL rows",
        ),
        (["data.format=unpaired_preference"], "data.format", "trains on preference data"),
    ],
)
def test_recipe_errors_are_one_line(overrides, key, words):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, overrides)
    message = str(err.value)
    assert "\n" not in message and key in message and words in message, message


def test_objective_defaults():
    cfg = ObjectiveConfig()
    assert (cfg.name, cfg.beta, cfg.reference) == ("sft", 0.1, "base")
    assert dataclasses.replace(cfg, beta=0.4).simpo_gamma() == pytest.approx(0.2)
    assert load_recipe(kit.TINY / "lora.yaml").objective == cfg


def test_a_row_missing_rejected_names_file_row_and_column(tmp_path):
    rows = [PAIRS[0], {"prompt": "p", "chosen": " c"}, PAIRS[1]]
    data = kit.write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = load_recipe(RECIPE, [f"data.train={data}", "data.eval=null"])
    with pytest.raises(RecipeError) as err:
        load_data(recipe.data, kit.tokenizer(), "causal_lm")
    message = str(err.value)
    assert "\n" not in message and "pairs.jsonl line 2" in message and "'rejected'" in message, message


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"prompt": "p", "completion": " c"}, "'label'"),
        ({"prompt": "p", "completion": " c", "label": "maybe"}, "not true or false"),
        ({"prompt": "p", "label": True}, "'completion'"),
    ],
)
def test_an_unpaired_row_without_a_label_names_file_row_and_column(tmp_path, row, words):
    data = kit.write_jsonl(tmp_path / "kto.jsonl", [UNPAIRED[0], row, UNPAIRED[1]])
    recipe = load_recipe(KTO_RECIPE, [f"data.train={data}", "data.eval=null"])
    with pytest.raises(RecipeError) as err:
        load_data(recipe.data, kit.tokenizer(), "causal_lm")
    message = str(err.value)
    assert "\n" not in message and "kto.jsonl line 2" in message and words in message, message


def test_unpaired_rows_are_prompt_then_completion_then_eos_with_their_label(tmp_path):
    """BOS and the prompt, the completion tokenized apart, then EOS; labels on the completion and EOS;
    the batch's second half pairs each prompt with the previous example's completion (cyclically)."""
    tok = kit.tokenizer()
    rows_in = [UNPAIRED[0], UNPAIRED[4], UNPAIRED[5], {**UNPAIRED[3], "label": "False"}]  # 4 answers
    data = kit.write_jsonl(tmp_path / "kto.jsonl", rows_in)
    recipe = load_recipe(KTO_RECIPE, [f"data.train={data}", "data.eval=null"])
    rows = load_data(recipe.data, tok, "causal_lm").train
    batch = collate_rows(rows, range(4), tok, "causal_lm")
    assert batch["desirable"].tolist() == [True, True, False, False]
    for i in range(8):
        row, answer_row = rows_in[i % 4], rows_in[i if i < 4 else (i - 5) % 4]
        prompt = [tok.bos_token_id, *kit.ids(tok, row["prompt"])]
        answer = [*kit.ids(tok, answer_row["completion"]), tok.eos_token_id]
        n = len(prompt) + len(answer)
        assert batch["input_ids"][i, :n].tolist() == prompt + answer
        assert batch["labels"][i, :n].tolist() == [-100] * len(prompt) + answer
        assert batch["attention_mask"][i].sum() == n

    chat = {
        "prompt": [{"role": "user", "content": "the day was good. feeling?"}],
        "completion": [{"role": "assistant", "content": "happy"}],
        "label": True,
    }
    data = kit.write_jsonl(tmp_path / "chat.jsonl", [chat])
    recipe = load_recipe(
        KTO_RECIPE,
        [f"data.train={data}", "data.eval=null", "model.chat_template=chatml", "data.max_length=256"],
    )
    from peftcli.models import load_tokenizer, resolve_model_name

    tok = load_tokenizer(resolve_model_name(recipe.model.name), recipe.model)
    (example,) = load_data(recipe.data, tok, "causal_lm").train
    prompt = tok.apply_chat_template(chat["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(chat["prompt"] + chat["completion"], tokenize=False)
    prompt_ids = [tok.bos_token_id, *kit.ids(tok, prompt)]
    assert example["input_ids"] == [*prompt_ids, *kit.ids(tok, full[len(prompt) :]), tok.eos_token_id]
    assert example["prompt_length"] == len(prompt_ids) and example["desirable"] == 1


def test_preference_rows_are_prompt_then_answer_then_eos(tmp_path):
    """BOS, then the prompt and each answer tokenized separately, then EOS; labels only on the answer
    and EOS; chosen rows first."""
    tok = kit.tokenizer()
    data = kit.write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    recipe = load_recipe(RECIPE, [f"data.train={data}", "data.eval=null"])
    rows = load_data(recipe.data, tok, "causal_lm").train
    batch = collate_rows(rows, [0, 1], tok, "causal_lm")
    for i, (pair, answer) in enumerate([(p, k) for k in ("chosen", "rejected") for p in PAIRS[:2]]):
        prompt = [tok.bos_token_id, *kit.ids(tok, pair["prompt"])]
        reply = [*kit.ids(tok, pair[answer]), tok.eos_token_id]
        n = len(prompt) + len(reply)
        assert batch["input_ids"][i, :n].tolist() == prompt + reply
        assert batch["labels"][i, :n].tolist() == [-100] * len(prompt) + reply
        assert (batch["labels"][i, n:] == -100).all() and batch["attention_mask"][i].sum() == n
    assert rows.lengths.tolist() == [
        2 * (1 + len(kit.ids(tok, p["prompt"])))
        + len(kit.ids(tok, p["chosen"]))
        + len(kit.ids(tok, p["rejected"]))
        + 2
        for p in PAIRS[:2]
    ]


def test_chat_message_pairs_render_through_the_template(tmp_path):
    """A message-list prompt is rendered with the generation prompt; each answer is what the template
    adds after it (its end-of-turn included), then EOS."""
    recipe_overrides = ["model.chat_template=chatml", "data.max_length=256"]
    pair = {
        "prompt": [{"role": "user", "content": "the day was good. feeling?"}],
        "chosen": [{"role": "assistant", "content": "happy"}],
        "rejected": [{"role": "assistant", "content": "sad"}],
    }
    data = kit.write_jsonl(tmp_path / "chat.jsonl", [pair])
    recipe = load_recipe(RECIPE, [f"data.train={data}", "data.eval=null", *recipe_overrides])
    from peftcli.models import load_tokenizer, resolve_model_name

    tok = load_tokenizer(resolve_model_name(recipe.model.name), recipe.model)
    rows = load_data(recipe.data, tok, "causal_lm").train
    example = rows[0]
    prompt = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False)
    prompt_ids = [tok.bos_token_id, *kit.ids(tok, prompt)]
    answer_ids = [*kit.ids(tok, full[len(prompt) :]), tok.eos_token_id]
    assert full[len(prompt) :].startswith("happy")
    assert example["input_ids"] == prompt_ids + answer_ids
    assert example["labels"] == [-100] * len(prompt_ids) + answer_ids


# -- the loop --------------------------------------------------------------------------------------


def run_train(tmp_path: Path, overrides: list[str], recipe_path: Path = RECIPE):
    from peftcli.training.loop import train

    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'run'}", *overrides])
    result = train(recipe)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    return recipe, result, events


def test_metrics_log_the_objective_before_any_update_and_pair_rewards(tmp_path):
    """Step 1's logged loss is the objective on the first batch before the update; eval events carry the
    rewards, their margin and the pair accuracy, and before training (adapter = base) every reward is 0."""
    _, result, events = run_train(tmp_path, ["train.max_steps=2", "train.batch_size=4", "train.log_every=1"])
    first_train = next(e for e in events if e["event"] == "train")
    evals = [e for e in events if e["event"] == "eval"]
    assert first_train["step"] == 1 and first_train["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["step"] == 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert evals[0][key] == pytest.approx(0.0, abs=1e-6)
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_examples"] == 32  # the held-out pairs
    assert set(evals[-1]) >= {
        "eval_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracy",
    }
    assert result.first_loss == pytest.approx(math.log(2), abs=1e-6)
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| rewards/accuracy |" in summary and "| rewards/margins |" in summary


def test_simpo_step_one_logged_loss_is_the_first_batch(tmp_path):
    """A loss that is not constant at init: metrics.jsonl's step 1 equals the objective on the sampler's
    first batch, computed here from the freshly built model."""
    overrides = ["objective.name=simpo", "train.max_steps=1", "train.batch_size=4", "data.eval=null"]
    recipe, _, events = run_train(tmp_path, overrides)
    from peftcli.data.sampler import BatchSampler

    built = kit.build(recipe)
    rows = load_data(recipe.data, built.tokenizer, "causal_lm").train
    first = BatchSampler(rows.lengths, 4, recipe.train.seed).window(0, 0, 1)[0]
    batch = collate_rows(rows, first, built.tokenizer, "causal_lm")
    objective = build_objective(recipe.objective, built.method, built.model)
    built.model.train()
    with torch.no_grad():
        expected = objective.micro_loss(built.model, batch, pair_counts([batch]))
    (train_event,) = [e for e in events if e["event"] == "train"]
    assert train_event["loss"] == pytest.approx(float(expected), abs=1e-6)


def test_kto_run_logs_its_loss_and_rewards(tmp_path):
    """A KTO run from a fresh (identity) LoRA: every log-ratio and z are 0 at step 1, so each example's
    loss is w·(1 − σ(0)) and the step-1 loss is 0.5; eval logs the rewards, margins, accuracy and kl."""
    from peftcli.training.loop import train

    recipe = load_recipe(
        KTO_RECIPE,
        [f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=4", "train.log_every=1"],
    )
    train(recipe)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    first = next(e for e in events if e["event"] == "train")
    evals = [e for e in events if e["event"] == "eval"]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert evals[0]["eval_loss"] == pytest.approx(0.5, abs=1e-6) and evals[0]["eval_examples"] == 64
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "kl"} <= set(
        evals[-1]
    )
    assert evals[-1]["rewards/chosen"] != 0.0


@pytest.mark.slow
def test_dpo_learns_held_out_preferences(tmp_path):
    """DPO on the synthetic feeling pairs (recipes/objectives/dpo.yaml as shipped) ranks > 90% of the
    held-out pairs right; before training every margin is exactly 0 (the adapter starts as the base)."""
    _, _, events = run_train(tmp_path, [])
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[0]["rewards/accuracy"] == 0.0
    assert evals[-1]["rewards/accuracy"] > 0.9, evals[-1]
    assert evals[-1]["rewards/margins"] > 0


# objective row -> (shipped recipe, recipe changes, step-1 loss where it is known exactly)
RESUME_CASES = {
    # the reference is the adapter the run began from, not the one restored from the checkpoint (set_up
    # keeps it before restore); a PiSSA init makes that start adapter differ from the base
    "dpo-start": (RECIPE, {"objective": {"reference": "start"}, "method": {"init": "pissa"}}, math.log(2)),
    "kto": (KTO_RECIPE, {}, None),  # its KL estimate pairs the rows of each restored batch again
    "reward": (REWARD_RECIPE, {}, None),  # the score head trains whole (modules_to_save)
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_sigkill_then_resume_matches_uninterrupted(case, tmp_path):
    """Each objective killed (SIGKILL) right after checkpoint 3 and resumed ends with the adapter and the
    logged losses of an uninterrupted run (≤ 1e-6)."""
    import sys

    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from peftcli.cli import app

    sys.path.insert(0, str(kit.HELPERS))
    from kill_after_checkpoint import run_killed_after_checkpoint

    recipe, changes, first_loss = RESUME_CASES[case]
    raw = yaml.safe_load(recipe.read_text())
    raw["data"] = {k: str(kit.ROOT / v) if k == "train" else v for k, v in raw["data"].items() if k != "eval"}
    for section, values in changes.items():
        raw[section].update(values)
    raw["train"].update(max_steps=6, save_every=3, batch_size=8, log_every=1, eval_every=0)
    runs = {}
    for name in ("full", "killed"):
        runs[name] = tmp_path / name
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(runs[name])}))
    full = CliRunner().invoke(app, ["train", str(tmp_path / "full.yaml"), "-q"])
    assert full.exit_code == 0, full.output
    proc = run_killed_after_checkpoint(3, tmp_path / "killed.yaml")
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = CliRunner().invoke(app, ["train", str(tmp_path / "killed.yaml"), "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_file(runs[n] / "adapter" / "adapter_model.safetensors") for n in ("full", "killed"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    def losses(run):
        events = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]

    got, expected = losses(runs["killed"]), losses(runs["full"])
    assert [s for s, _ in got] == list(range(1, 7))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], abs=1e-6)
    if first_loss is not None:  # DPO: policy = reference at step 1
        assert expected[0][1] == pytest.approx(first_loss, abs=1e-6)
    assert expected[-1][1] < math.log(2)


def _recipe_with_method(method: dict, **objective):
    import yaml

    from peftcli.recipe_loader import recipe_from_dict

    raw = yaml.safe_load(RECIPE.read_text())
    raw["method"], raw["objective"] = method, {**raw["objective"], **objective}
    return recipe_from_dict(raw)


@pytest.mark.parametrize(
    ("method", "words"),
    [
        ({"name": "prompt_tuning"}, "prompt_tuning cannot switch its adapter off"),
        ({"name": "lora", "init": "pissa"}, "method.init pissa rewrites the base weights"),
    ],
)
def test_reference_base_is_refused_where_the_adapter_cannot_be_switched_off(method, words):
    """Before anything loads, in one line naming objective.reference and pointing to ``start``; with
    ``reference: start`` the same recipe passes."""
    from peftcli.training.distributed import Dist
    from peftcli.training.setup import check_recipe

    with pytest.raises(RecipeError) as err:
        check_recipe(_recipe_with_method(method), Dist())
    message = str(err.value)
    assert "\n" not in message and "objective.reference" in message and words in message, message
    assert "reference: start" in message
    check_recipe(_recipe_with_method(method, reference="start"), Dist())


def test_modules_to_save_refuse_the_base_reference_when_built():
    """LoRA training lm_head whole keeps no copy of the original head: the base cannot be run."""
    recipe = _recipe_with_method({"name": "lora", "modules_to_save": ["lm_head"]})
    built = kit.build(recipe)
    assert built.method.adapter_disabled(built.model) is None
    with pytest.raises(RecipeError, match="cannot switch its adapter off"):
        build_objective(recipe.objective, built.method, built.model)


# -- reward model ----------------------------------------------------------------------------------


def reward_side(tmp_path: Path):
    """Ours for the reward objective: (batch, step-1 loss, gradients by peft's key, built model)."""
    data = kit.write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.train={data}", "data.eval=null"]
    recipe = load_recipe(REWARD_RECIPE, overrides)
    built = kit.build(recipe)
    kit.perturb(built.model)
    rows = load_data(recipe.data, built.tokenizer, "causal_lm").train
    batch = collate_rows(rows, range(len(PAIRS)), built.tokenizer, "seq_cls")
    return (batch, *step_one(recipe, built, batch), built)


def trl_reward_side(tmp_path: Path, built):
    """TRL's RewardTrainer (its defaults: no margin column, center_rewards_coefficient None) on our
    adapter loaded by peft, its own tokenization and collator: (rows, loss, gradients by peft's key)."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    adapter = kit.save(
        tmp_path / "ours",
        built.model,
        built.method,
        built.tokenizer,
        built.base_path,
        built.recipe,
        built.labels,
    )
    base = AutoModelForSequenceClassification.from_pretrained(
        built.base_path, dtype=torch.float32, num_labels=1
    )
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(PAIRS),
        report_to=[],
        use_cpu=True,
        max_length=64,
    )
    assert args.center_rewards_coefficient is None
    rows = [{**pair, "prompt": built.tokenizer.bos_token + pair["prompt"]} for pair in PAIRS]
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=built.tokenizer
    )
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {  # by the saved key: peft saves the score head's trained copy as base_model.model.score.*
        n.replace(".modules_to_save.default.", ".").replace(".default.", "."): p.grad
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return our_rows(inputs), loss.item(), grads


def test_reward_step_one_loss_and_gradients_equal_trl(tmp_path):
    """reward: −logσ(r_c − r_r) from a one-output score head read at the last real token; the loss, the
    LoRA gradients and the score head's (saved whole, modules_to_save) equal TRL's RewardTrainer."""
    batch, loss, grads, built = reward_side(tmp_path)
    trl_ids, trl_loss, trl_grads = trl_reward_side(tmp_path, built)
    assert our_rows(batch) == trl_ids
    assert abs(loss) > 1e-3 and math.isfinite(loss)
    assert loss == pytest.approx(trl_loss, abs=TOLERANCE)
    assert set(grads) == set(trl_grads)
    assert any("score" in name for name in grads)
    scale = max(float(g.abs().max()) for g in trl_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], atol=TOLERANCE * scale, rtol=0, msg=name)


def test_reward_is_the_head_at_the_last_real_token(tmp_path):
    """Each row's reward is the score head applied to the final hidden state at its last attended
    position (EOS; the padding after it is skipped), chosen rows first."""
    from peftcli.training.objectives.reward import pair_rewards

    batch, _, _, built = reward_side(tmp_path)
    built.model.eval()
    with torch.no_grad():
        s = pair_rewards(built.model, batch)
        out = built.model(input_ids=batch["input_ids"], output_hidden_states=True)
        last = batch["attention_mask"].sum(-1) - 1
        assert (batch["input_ids"][torch.arange(len(last)), last] == built.tokenizer.eos_token_id).all()
        assert (batch["attention_mask"].sum(-1) < batch["input_ids"].size(1)).any()  # some rows padded
        hidden = out.hidden_states[-1][torch.arange(len(last)), last]  # (2B, d), after the final norm
        head = built.model.get_submodule(
            next(n for n, _ in built.model.named_modules() if n.endswith("score"))
        )
        expected = head(hidden).squeeze(-1)
    half = len(PAIRS)
    torch.testing.assert_close(s.chosen, expected[:half], atol=1e-6, rtol=0)
    torch.testing.assert_close(s.rejected, expected[half:], atol=1e-6, rtol=0)


def test_reward_run_logs_pair_metrics_and_saves_the_head(tmp_path):
    """A reward run: step 1's logged loss is −logσ(r_c − r_r) on the first batch; eval logs the rewards,
    margins and accuracy; the adapter holds the one-output score head, as modules_to_save."""
    from safetensors.torch import load_file

    from peftcli.training.loop import train

    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.log_every=1",
    ]
    recipe = load_recipe(REWARD_RECIPE, overrides)
    train(recipe)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [e for e in events if e["event"] == "eval"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"} <= set(evals[0])
    margin = evals[0]["rewards/chosen"] - evals[0]["rewards/rejected"]
    assert evals[0]["rewards/margins"] == pytest.approx(margin, abs=1e-6)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights["base_model.model.score.weight"].shape == (1, 64)


# -- precomputed reference -------------------------------------------------------------------------


def losses_and_evals(run: Path) -> tuple[list, list]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    train = [(e["step"], e["loss"]) for e in events if e["event"] == "train"]
    evals = [{k: v for k, v in e.items() if k not in ("elapsed_s",)} for e in events if e["event"] == "eval"]
    return train, evals


@pytest.mark.parametrize("reference", ["base", "start"])
def test_precomputed_reference_gives_the_same_run(tmp_path, reference):
    """objective.precompute_reference: the logged losses and eval metrics of 3 DPO steps equal those of
    the run that scores the reference every step; the log-probs land in the cache and a second run reads
    them. ``start`` with a PiSSA init (its reference swaps the start adapter in)."""
    common = [
        "train.max_steps=3",
        "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=3",
        "data.max_eval_examples=12",
        f"objective.reference={reference}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    if reference == "start":
        common.append("method.init=pissa")
    runs = {}
    for name, extra in [
        ("plain", []),
        ("pre", ["objective.precompute_reference=true"]),
        ("again", ["objective.precompute_reference=true"]),
    ]:
        run_train(tmp_path / name, [*common, *extra])
        runs[name] = losses_and_evals(tmp_path / name / "run")
    assert runs["pre"][0] == runs["plain"][0]  # every logged loss, step 1 to 3
    assert runs["pre"][1] == runs["plain"][1]  # eval: loss, rewards, margins, accuracy
    assert runs["again"] == runs["pre"]
    cached = sorted((tmp_path / "cache" / "reference").glob("*.npy"))
    assert len(cached) == 2  # train and eval pairs; the second run computed nothing new
    import numpy as np

    train_ref = np.load(cached[0]) if len(np.load(cached[0])) == 96 else np.load(cached[1])
    assert train_ref.shape == (96, 2) and np.isfinite(train_ref).all()


def test_reference_cache_key_follows_the_data_the_model_and_the_start_adapter(tmp_path):
    """A changed pair, a changed base-model file or a changed start adapter gives another key; the same
    inputs give the same key."""
    import os

    from peftcli.training.objectives.precompute import reference_key

    recipe = recipe_for(tmp_path, {"name": "dpo", "reference": "start"})
    built = kit.build(recipe)
    rows = load_data(recipe.data, built.tokenizer, "causal_lm").train
    key = reference_key(recipe, built.base_path, built.model, rows, None)
    assert reference_key(recipe, built.base_path, built.model, rows, None) == key

    changed = [dict(p) for p in PAIRS]
    changed[3]["rejected"] = " glad"
    kit.write_jsonl(tmp_path / "other.jsonl", changed)
    other = load_recipe(RECIPE, [f"data.train={tmp_path / 'other.jsonl'}", "data.eval=null"]).data
    other_rows = load_data(other, built.tokenizer, "causal_lm").train
    assert reference_key(recipe, built.base_path, built.model, other_rows, None) != key

    start = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    kit.perturb(built.model)
    assert reference_key(recipe, built.base_path, built.model, rows, None) != key
    built.model.load_state_dict(start, strict=False)  # the start adapter as it was
    assert reference_key(recipe, built.base_path, built.model, rows, None) == key

    import shutil

    base = tmp_path / "base"
    shutil.copytree(built.base_path, base)
    weights = next(base.glob("*.safetensors"))
    copied = reference_key(recipe, str(base), built.model, rows, None)
    os.utime(weights, ns=(1, 1))
    assert reference_key(recipe, str(base), built.model, rows, None) != copied


# -- continuing from a trained adapter (model.adapter) ----------------------------------------------


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter trained by 3 SFT steps of recipes/tiny/lora.yaml (the DPO recipe's LoRA options)."""
    from peftcli.training.loop import train

    run = tmp_path_factory.mktemp("sft") / "run"
    train(load_recipe(kit.TINY / "lora.yaml", [f"output_dir={run}", "train.max_steps=3", "data.eval=null"]))
    return run / "adapter"


def set_up_run(recipe):
    from peftcli.training.console import Reporter
    from peftcli.training.setup import set_up

    return set_up(recipe, Reporter(quiet=True))


def assert_starts_from(run, adapter: Path) -> None:
    """Every trainable tensor of the run's model is the adapter's, as saved."""
    from peftcli.checkpoint import read_adapter_state

    saved = read_adapter_state(adapter)
    ours = run.stepper.method.adapter_state_dict(run.stepper.model)
    assert set(ours) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(ours[name].float(), tensor.float()), name


@pytest.mark.parametrize("reference", ["start", "base"])
def test_dpo_continues_from_an_sft_adapter_with_it_as_the_start_reference(tmp_path, sft_adapter, reference):
    """SFT → DPO: the run starts from the adapter's weights; with ``reference: start`` the step-1 reference
    log-probs are the start adapter's (loaded as ``peftcli merge`` loads it; step 1's loss is log 2) and
    stay so after an update; with ``base`` they are the base model's and step 1's loss is not log 2."""
    from peftcli.export import load_adapter
    from peftcli.training.objectives.base import sequence_logps

    recipe = recipe_for(tmp_path, {"name": "dpo", "reference": reference})
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, adapter=str(sft_adapter)))
    run = set_up_run(recipe)
    assert_starts_from(run, sft_adapter)
    batch = collate_rows(run.data.train, range(len(PAIRS)), run.tokenizer, "causal_lm")
    if reference == "start":
        expected_model = load_adapter(sft_adapter).model
    else:
        expected_model = kit.base_model(run.base_path, recipe, run.tokenizer.pad_token_id)
    with torch.no_grad():
        expected, _ = sequence_logps(expected_model, batch)
    objective = run.stepper.objective
    run.model.train()
    for step in range(2):
        with torch.no_grad():
            s = objective.score(run.model, batch)
        torch.testing.assert_close(torch.cat([s.ref_chosen, s.ref_rejected]), expected, atol=1e-5, rtol=0)
        loss = float(objective.losses(s).mean())
        if step == 0:
            assert (loss == pytest.approx(math.log(2), abs=1e-6)) == (reference == "start")
        run.stepper.step([batch], step)


def test_continued_sft_starts_from_the_adapter(tmp_path, sft_adapter):
    recipe = load_recipe(
        kit.TINY / "lora.yaml",
        [f"output_dir={tmp_path / 'run'}", f"model.adapter={sft_adapter}", "data.eval=null"],
    )
    assert_starts_from(set_up_run(recipe), sft_adapter)


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"method": {"name": "ia3"}}, "model.adapter", "is a lora adapter, not ia3"),
        ({"method": {"name": "lora", "init": "pissa"}}, "method.init", "trained with init kaiming"),
        ({"model": {"name": "tiny:qwen3"}}, "model.adapter", "trained on tiny:llama"),
    ],
)
def test_a_mismatched_start_adapter_is_one_line(tmp_path, sft_adapter, overrides, key, words):
    import yaml

    from peftcli.recipe_loader import recipe_from_dict
    from peftcli.training.distributed import Dist
    from peftcli.training.setup import check_recipe

    raw = yaml.safe_load((kit.TINY / "lora.yaml").read_text())
    raw["model"] = {**raw["model"], "adapter": str(sft_adapter), **overrides.get("model", {})}
    raw["method"] = overrides.get("method", raw["method"])
    recipe = recipe_from_dict(raw)
    with pytest.raises(RecipeError) as err:
        check_recipe(recipe, Dist())
    message = str(err.value)
    assert "\n" not in message and message.startswith(key) and words in message, message


def test_a_missing_start_adapter_is_one_line(tmp_path):
    from peftcli.recipe_loader import validate_files

    recipe = load_recipe(kit.TINY / "lora.yaml", [f"model.adapter={tmp_path / 'nope'}"])
    with pytest.raises(RecipeError, match="model.adapter: adapter directory not found"):
        validate_files(recipe)


# -- compare and report know the objective ----------------------------------------------------------


@pytest.fixture(scope="module")
def preference_runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished tiny runs, DPO and KTO (3 steps, eval at 0 and 3 on 16 held-out examples)."""
    from peftcli.training.loop import train

    root = tmp_path_factory.mktemp("preference-runs")
    common = ["train.max_steps=3", "train.batch_size=8", "train.eval_every=3", "data.max_eval_examples=16"]
    runs = {}
    for name, recipe in (("dpo", RECIPE), ("kto", KTO_RECIPE)):
        runs[name] = root / name
        train(load_recipe(recipe, [f"output_dir={runs[name]}", *common]))
    return runs


def test_report_shows_the_objective_and_its_eval_metrics(preference_runs, tmp_path):
    """`peftcli report` on a DPO run: the objective in the summary and title, the rewards, margins and
    accuracy of the first and last evals (the numbers metrics.jsonl holds), the best eval ranked by
    rewards/accuracy, and no SFT metric (perplexity)."""
    from rich.console import Console

    from peftcli.tools.report import report, report_table

    run = preference_runs["dpo"]
    summary = report(run, tmp_path / "report.png")
    evals = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert summary["objective"] == "dpo"
    assert summary["best_eval"]["metric"] == "rewards/accuracy"
    for key in ("eval_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert summary["before"][key] == evals[0][key] and summary["final"][key] == evals[-1][key]
    console = Console(record=True, width=200)
    console.print(report_table(summary))
    text = console.export_text()
    assert "(dpo, finished, step 3 of 3)" in text and "eval_loss (dpo)" in text
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert key in text
    assert "perplexity" not in text


@pytest.mark.slow
def test_compare_shows_the_objective_and_its_eval_metrics(preference_runs, tmp_path):
    """`peftcli compare` of the DPO and KTO runs: an objective column, the reward metrics after training
    as results.json holds them, ranked by rewards/accuracy; KTO's kl too."""
    from peftcli.tools.compare import compare_runs, table_rows

    result = compare_runs([preference_runs["dpo"], preference_runs["kto"]], tmp_path / "out", repeats=1)
    assert [r["objective"] for r in result["rows"]] == ["dpo", "kto"]
    assert result["primary_metric"] == "rewards/accuracy"
    header, cells = table_rows(result)
    assert header[:2] == ["method", "objective"] and "perplexity" not in header
    for row, cell in zip(result["rows"], cells, strict=True):
        after = json.loads((Path(row["run_dir"]) / "results.json").read_text())["eval_after"]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
            assert cell[header.index(key)] == f"{after[key]:.4f}"
    assert cells[1][header.index("kl")] != "-" and cells[0][header.index("kl")] == "-"
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| objective |" in markdown and "| dpo |" in markdown and "| kto |" in markdown
