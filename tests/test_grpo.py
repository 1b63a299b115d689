"""GRPO (peftcli/training/objectives/grpo.py, rollout.py, rewards.py) against TRL 1.16's GRPOTrainer, and
its rollout, rewards, data format, metrics and resume.

Loss parity: TRL's trainer is built offline on the same tiny:llama carrying the same perturbed LoRA
adapter (ours saved, loaded by peft with ``is_trainable``), and its own ``compute_loss`` is driven with a
hand-made inputs dict (fixed prompts, completions and advantages: what its rollout would hand the loss),
the reference log-probs from TRL's own ``_get_per_token_logps_and_entropies`` with peft's adapter disabled.
Ours is the loop's own forward/backward (``Stepper.backward_window``) on the batch our rollout collates
from the same tokens. The loss and every adapter gradient agree ≤ 1e-4 in fp32, for each loss_type, with
and without the KL term, over one micro-batch and over an accumulation window of two.
Prompts are of one token length: TRL left-pads prompts and its forward passes no position ids.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import kit
import pytest
import torch

from peftcli.recipe import RecipeError
from peftcli.recipe_loader import load_recipe
from peftcli.training.objectives.grpo import group_advantages, summed_rewards, unbiased_std
from peftcli.training.objectives.registry import build_objective
from peftcli.training.objectives.rollout import completion_batch
from peftcli.training.step import Stepper

RECIPE = kit.ROOT / "recipes" / "objectives" / "grpo.yaml"
TOLERANCE = 1e-4
GROUP = 3
PROMPTS = ["1+2=", "4+4=", "7+0=", "3+5="]  # one token length: TRL left-pads prompts
# Per prompt G completions: some end in EOS, some are cut at max_new_tokens; lengths differ.
COMPLETIONS = [
    ["3", "12", "x9z"],
    ["8", "", "eight"],
    ["7 ", "70", "0"],
    ["8", "53", "8!"],
]
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.2, 0.0, 0.9, 1.0, 0.3, 1.0]
MAX_NEW = 5


def grpo_recipe(tmp_path: Path, overrides: list[str]):
    return load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path / 'run'}",
            f"objective.group_size={GROUP}",
            f"objective.max_new_tokens={MAX_NEW}",
            "objective.temperature=0.7",
            "method.target_modules=all-linear",  # TRL refuses an adapter on lm_head (it reads its weight)
            *overrides,
        ],
    )


def completion_tokens(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids per completion row, completion ids): EOS closes every completion under MAX_NEW tokens."""
    prompts, outputs = [], []
    for prompt, group in zip(PROMPTS, COMPLETIONS, strict=True):
        ids = [tokenizer.bos_token_id, *kit.ids(tokenizer, prompt)]
        for text in group:
            tokens = kit.ids(tokenizer, text)[:MAX_NEW]
            outputs.append([*tokens, tokenizer.eos_token_id] if len(tokens) < MAX_NEW else tokens)
            prompts.append(ids)
    return prompts, outputs


def advantages_for(recipe) -> torch.Tensor:
    return group_advantages(torch.tensor(REWARDS), GROUP, recipe.objective.scale_rewards)


def our_side(tmp_path: Path, overrides: list[str], n_micro: int):
    recipe = grpo_recipe(tmp_path, overrides)
    built = kit.build(recipe)
    kit.perturb(built.model)
    prompts, outputs = completion_tokens(built.tokenizer)
    advantages = advantages_for(recipe)
    per = len(prompts) // n_micro
    micro = [
        completion_batch(prompts[i : i + per], outputs[i : i + per], advantages[i : i + per], 0)
        for i in range(0, len(prompts), per)
    ]
    built.model.train()
    objective = build_objective(recipe.objective, built.method, built.model)
    stepper = Stepper(model=built.model, method=built.method, optimizer=None, objective=objective)
    built.model.zero_grad(set_to_none=True)
    loss, _, _ = stepper.backward_window(micro, 1)
    grads = {
        built.method.stored_key(n): p.grad.clone()
        for n, p in built.model.named_parameters()
        if p.grad is not None
    }
    return recipe, built, loss, grads, objective.step_metrics()


def trl_trainer(tmp_path: Path, built, recipe, n_micro: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    adapter = kit.save(
        tmp_path / "ours", built.model, built.method, built.tokenizer, built.base_path, built.recipe
    )
    model = kit.load_in_peft(adapter, built.base_path)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    cfg = recipe.objective
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default autocasts to bf16; the comparison is fp32
        per_device_train_batch_size=len(REWARDS) // n_micro,
        gradient_accumulation_steps=n_micro,
        num_generations=GROUP,
        max_completion_length=MAX_NEW,
        temperature=cfg.temperature,
        beta=cfg.kl_coef,
        loss_type=cfg.loss_type,
        epsilon=cfg.epsilon,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=built.tokenizer,
    )
    trainer.current_gradient_accumulation_steps = n_micro
    return trainer


def trl_inputs(trainer, tokenizer, rows: slice, advantages: torch.Tensor, n_items: int) -> dict:
    """What TRL's rollout hands ``compute_loss``: prompts, right-padded completions and their mask."""
    prompts, outputs = completion_tokens(tokenizer)
    prompts, outputs = prompts[rows], outputs[rows]
    width = max(len(o) for o in outputs)
    pad = tokenizer.pad_token_id
    inputs = {
        "prompt_ids": torch.tensor(prompts),
        "prompt_mask": torch.ones(len(prompts), len(prompts[0]), dtype=torch.long),
        "completion_ids": torch.tensor([o + [pad] * (width - len(o)) for o in outputs]),
        "completion_mask": torch.tensor([[1] * len(o) + [0] * (width - len(o)) for o in outputs]),
        "advantages": advantages[rows],
        "num_items_in_batch": torch.tensor(n_items),
    }
    if trainer.beta != 0.0:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad(), trainer.model.disable_adapter():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width)
        inputs["ref_per_token_logps"] = ref
    return inputs


def trl_side(tmp_path: Path, built, recipe, n_micro: int):
    trainer = trl_trainer(tmp_path, built, recipe, n_micro)
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    _, outputs = completion_tokens(built.tokenizer)
    n_items = sum(len(o) for o in outputs)
    per, total = len(REWARDS) // n_micro, 0.0
    for start in range(0, len(REWARDS), per):
        inputs = trl_inputs(
            trainer, built.tokenizer, slice(start, start + per), advantages_for(recipe), n_items
        )
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        total += loss.item()
    grads = {n.replace(".default.", "."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    kl = trainer._metrics["train"].get("kl")
    return total, grads, kl


CASES = {  # id: (recipe overrides, micro-batches in the window)
    "dapo": ([], 1),
    "dapo-accum2": ([], 2),
    "dapo-kl": (["objective.kl_coef=0.05"], 1),
    "dapo-kl-accum2": (["objective.kl_coef=0.1"], 2),
    "grpo-accum2": (["objective.loss_type=grpo"], 2),
    "bnpo-kl": (["objective.loss_type=bnpo", "objective.kl_coef=0.05"], 1),
    "dr_grpo-accum2": (["objective.loss_type=dr_grpo"], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_one_loss_and_gradients_equal_trl(case, tmp_path):
    pytest.importorskip("trl")
    overrides, n_micro = CASES[case]
    recipe, built, loss, grads, metrics = our_side(tmp_path, overrides, n_micro)
    trl_loss, trl_grads, trl_kl = trl_side(tmp_path, built, recipe, n_micro)
    assert math.isfinite(loss) and (abs(loss) > 1e-4 or recipe.objective.kl_coef == 0)
    assert loss == pytest.approx(trl_loss, abs=TOLERANCE)
    assert set(grads) == set(trl_grads)
    scale = max(float(g.abs().max()) for g in trl_grads.values())
    assert scale > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], atol=TOLERANCE * scale, rtol=0, msg=name)
    if recipe.objective.kl_coef:
        assert metrics["kl"] > 0
        assert metrics["kl"] == pytest.approx(sum(trl_kl) / len(trl_kl), rel=0.05)


def test_start_reference_is_the_policy_at_step_one(tmp_path):
    """``reference: start``: at step 1 the reference is the policy itself, so the KL is 0 and the loss and
    gradients are those without the KL term (the k3 term and its gradient vanish at ref = logp)."""
    _, _, loss, grads, metrics = our_side(tmp_path, ["objective.kl_coef=0.5", "objective.reference=start"], 2)
    _, _, plain_loss, plain_grads, _ = our_side(tmp_path, [], 2)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    assert loss == pytest.approx(plain_loss, abs=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-7, rtol=0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_two_ranks_shares_sum_to_one_process(loss_type, tmp_path):
    """The window's normalisers under torchrun: 4 prompts in micro-batches of 3 and 1, on 2 ranks (rank 1
    holds one prompt of the first and a stand-in copy of the last). The ranks' loss shares sum to one
    process's loss, and their gradients (as DDP averages them) to one process's (≤ 1e-6), for every
    loss_type, with the KL term."""
    from peftcli.training.distributed import Dist

    recipe = grpo_recipe(tmp_path, [f"objective.loss_type={loss_type}", "objective.kl_coef=0.05"])
    built = kit.build(recipe)
    kit.perturb(built.model)
    prompts, outputs = completion_tokens(built.tokenizer)
    advantages = advantages_for(recipe)
    window = [[0, 1, 2], [3]]

    def micro_batches(dist: Dist) -> list[dict[str, torch.Tensor]]:
        rows = [[p * GROUP + k for p in batch for k in range(GROUP)] for batch in dist.rank_slice(window)]
        micro = [
            completion_batch([prompts[i] for i in r], [outputs[i] for i in r], advantages[r], 0) for r in rows
        ]
        dist.mask_padding(micro, dist.padding_flags(window))
        return micro

    loss, grads = kit.rank_window(built, recipe.objective, micro_batches(Dist()), Dist())
    ranks = kit.thread_ranks(2, lambda d: kit.rank_window(built, recipe.objective, micro_batches(d), d))
    assert abs(loss) > 1e-4
    assert ranks[0][0] + ranks[1][0] == pytest.approx(loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(ranks[0][1][name] + ranks[1][1][name], grad, atol=1e-6, rtol=0, msg=name)


# -- advantages and rewards ------------------------------------------------------------------------


def test_group_advantage_is_trls_equation():
    """Â = (r − mean of its group) / (unbiased std of its group + 1e-4); batch: the window's std; none:
    not divided. A group of equal rewards gets 0, an unscored (NaN) completion gets 0."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.0, math.nan, 1.0])
    got = group_advantages(rewards, 3, "group")
    for g in range(3):
        group = [r for r in rewards[3 * g : 3 * g + 3].tolist() if not math.isnan(r)]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for i in range(3):
            r = rewards[3 * g + i].item()
            expected = 0.0 if math.isnan(r) else (r - mean) / (std + 1e-4)
            assert got[3 * g + i].item() == pytest.approx(expected, abs=1e-6)
    scored = rewards[~rewards.isnan()]
    batch_std = float(scored.std())
    assert float(unbiased_std(rewards)) == pytest.approx(batch_std, abs=1e-6)
    assert group_advantages(rewards, 3, "batch")[0].item() == pytest.approx(
        (1.0 - 0.5) / (batch_std + 1e-4), abs=1e-6
    )
    assert group_advantages(rewards, 3, "none")[0].item() == pytest.approx(0.5, abs=1e-6)


def test_weighted_rewards_sum_and_unscored():
    per = torch.tensor([[1.0, 0.5], [math.nan, 1.0], [math.nan, math.nan]])
    total = summed_rewards(per, torch.tensor([2.0, -1.0]))
    assert total[0].item() == pytest.approx(1.5) and total[1].item() == pytest.approx(-1.0)
    assert math.isnan(total[2].item())


def test_built_in_rewards():
    from peftcli.recipe import RewardConfig
    from peftcli.training.objectives.rewards import Completions, build_rewards

    completions = Completions(
        prompts=["1+2="] * 4,
        texts=[" 3 ", "3!", "13", "x"],
        token_ids=[[1, 2, 3], [1, 2], [1, 2, 3, 4, 5, 6], [7]],
        references=[{"answer": 3}] * 4,
    )
    rewards = build_rewards(
        [
            RewardConfig(exact_match="answer"),
            RewardConfig(contains="answer"),
            RewardConfig(regex=r"^\d+$"),
            RewardConfig(length=4),
            RewardConfig(regex="x", name="has_x"),
        ]
    )
    assert [r.name for r in rewards] == ["exact_match", "contains", "regex", "length", "has_x"]
    scores = [r.score(completions) for r in rewards]
    assert scores[0] == [1.0, 0.0, 0.0, 0.0]
    assert scores[1] == [1.0, 1.0, 1.0, 0.0]
    assert scores[2] == [0.0, 0.0, 1.0, 0.0]
    assert scores[3] == [-0.25, -0.5, -0.5, -0.75]
    assert scores[4] == [0.0, 0.0, 0.0, 1.0]


# -- data, recipe errors, --allow-code -----------------------------------------------------------


def test_prompt_rows_are_the_prompt_and_their_references(tmp_path):
    """A prompt row: BOS + the prompt's ids, no trained token, every other column kept as a reference;
    a chat-message prompt renders through the template with the generation prompt."""
    from peftcli.data.pipeline import load_data

    rows = [
        {"prompt": "2+3=", "answer": "5", "id": 7},
        {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4", "id": 8},
    ]
    data = kit.write_jsonl(tmp_path / "prompts.jsonl", rows)
    recipe = load_recipe(
        RECIPE, [f"data.train={data}", "data.eval=null", "model.chat_template=chatml", "data.max_length=128"]
    )
    tok = kit.build(recipe).tokenizer
    got = load_data(recipe.data, tok, "causal_lm").train
    assert got[0]["input_ids"] == [tok.bos_token_id, *kit.ids(tok, "2+3=")]
    assert set(got[0]["labels"]) == {-100}
    assert got[0]["references"] == {"answer": "5", "id": 7}
    chat = tok.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert got[1]["input_ids"][-len(kit.ids(tok, chat)) :] == kit.ids(tok, chat)
    assert got[1]["references"] == {"answer": "4", "id": 8}


def test_a_row_missing_prompt_names_file_row_and_column(tmp_path):
    from peftcli.data.pipeline import load_data

    data = kit.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"answer": "3"}])
    recipe = load_recipe(RECIPE, [f"data.train={data}", "data.eval=null"])
    with pytest.raises(RecipeError) as err:
        load_data(recipe.data, kit.tokenizer(), "causal_lm")
    message = str(err.value)
    assert "\n" not in message and "prompts.jsonl line 2" in message and "'prompt'" in message, message


NO_GRPO_OPTIONS = ["objective.rewards=[]", "objective.max_new_tokens=64"]  # grpo.yaml's back to defaults


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["objective.rewards=[]"], "objective.rewards", "at least one reward"),
        (["objective.rewards=[{regex: a, length: 3}]"], "objective.rewards[0]", "2 rewards"),
        (["objective.rewards=[{weight: 2}]"], "objective.rewards[0]", "names no reward"),
        (["objective.rewards=[{regex: '('}]"], "objective.rewards[0].regex", "not a regular expression"),
        (["objective.rewards=[{python: 'no colon'}]"], "objective.rewards[0].python", "module:function"),
        (["objective.beta=0.3"], "objective.beta", "kl_coef"),
        (["objective.name=sft", *NO_GRPO_OPTIONS], "data.format", "prompt data is for objective grpo"),
        (["objective.name=dpo", *NO_GRPO_OPTIONS], "data.format", "preference data"),
        (["objective.name=sft"], "objective.max_new_tokens", "only grpo uses it"),
        (["data.format=completion"], "data.format", "samples completions of prompts"),
        (["train.packing=true"], "train.packing", "not packed"),
    ],
)
def test_recipe_errors_are_one_line(overrides, key, words):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_grpo_options_on_another_objective_are_refused():
    with pytest.raises(RecipeError) as err:
        load_recipe(kit.ROOT / "recipes/objectives/dpo.yaml", ["objective.group_size=4"])
    assert err.value.key == "objective.group_size" and "only grpo" in str(err.value)


def test_a_reward_column_missing_from_the_data_is_refused_before_training(tmp_path):
    from peftcli.training.loop import train

    recipe = load_recipe(
        RECIPE, [f"output_dir={tmp_path / 'run'}", "objective.rewards=[{exact_match: solution}]"]
    )
    with pytest.raises(RecipeError) as err:
        train(recipe)
    assert err.value.key == "objective.rewards[0].exact_match"
    assert "'solution'" in str(err.value) and "answer" in str(err.value)


def write_reward_module(directory: Path) -> None:
    (directory / "my_rewards.py").write_text(
        "def has_five(prompts, completions, completion_ids, answer, **kw):\n"
        "    return [float('5' in c) for c in completions]\n"
    )


def test_python_rewards_need_allow_code(tmp_path, monkeypatch):
    """Without --allow-code: one line naming the flag, exit 2, nothing run (the module is never imported,
    no run directory written). With it, the function scores the completions and is logged by name."""
    import sys

    from typer.testing import CliRunner

    from peftcli.cli import app

    write_reward_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = [
        "train",
        str(RECIPE),
        "-q",
        "-o",
        str(run),
        f"data.train={kit.ROOT / 'recipes/data/tiny_grpo_train.jsonl'}",
        "objective.rewards=[{python: 'my_rewards:has_five'}]",
        "train.max_steps=1",
        "objective.group_size=2",
        "data.eval=null",
    ]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "--allow-code" in refused.output and "my_rewards" not in sys.modules
    assert not run.exists()
    allowed = CliRunner().invoke(app, [*args, "--allow-code"])
    assert allowed.exit_code == 0, allowed.output
    (event,) = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"train"' in line]
    assert "rewards/has_five" in event and 0.0 <= event["rewards/has_five"] <= 1.0


# -- the loop ------------------------------------------------------------------------------------


def test_metrics_log_rewards_kl_and_the_progress_bar_shows_the_reward(tmp_path):
    """metrics.jsonl's train events carry the reward's mean and std, each reward's mean, the completion
    length and (kl_coef > 0) the KL; the progress bar shows reward mean ± std; eval logs greedy rewards."""
    import io

    from rich.console import Console

    from peftcli.training.console import Reporter
    from peftcli.training.loop import train

    recipe = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "objective.group_size=4",
            "objective.kl_coef=0.05",
            "train.eval_every=0",
        ],
    )
    out = io.StringIO()
    train(recipe, reporter=Reporter(Console(file=out, force_terminal=True, width=250)))
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    trains = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in trains] == [1, 2]
    for e in trains:
        assert {
            "reward",
            "reward_std",
            "rewards/contains",
            "rewards/regex",
            "completion_length",
            "kl",
        } <= set(e)
        assert e["reward"] == pytest.approx(e["rewards/contains"] + 0.5 * e["rewards/regex"], abs=1e-6)
        assert 1 <= e["completion_length"] <= recipe.objective.max_new_tokens
    assert trains[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as the base
    assert trains[1]["kl"] > 0
    evals = [e for e in events if e["event"] == "eval"]
    assert {"eval_reward", "eval_rewards/contains", "eval_rewards/regex"} <= set(evals[-1])
    assert "reward " in out.getvalue() and " ± " in out.getvalue()
    assert "| eval_reward |" in (tmp_path / "run" / "summary.md").read_text()


def test_fsdp_is_refused_at_start_and_ddp_is_not():
    """DDP runs grpo (tests/test_distributed.py: 2 ranks = 1 process); FSDP would shard the weights the
    rollout samples with."""
    from peftcli.training.distributed import Dist
    from peftcli.training.setup import check_objective

    check_objective(load_recipe(RECIPE), Dist(rank=0, world_size=2, local_rank=0, mode="ddp"))
    with pytest.raises(RecipeError) as err:
        check_objective(load_recipe(RECIPE), Dist(rank=0, world_size=2, local_rank=0, mode="fsdp"))
    assert "grpo cannot run under fsdp with 2 processes: its rollout samples" in str(err.value)


@pytest.mark.slow
def test_grpo_raises_the_mean_reward(tmp_path):
    """The shipped recipe (single-digit sums; rewarded for the right digit and for starting with a digit)
    raises the sampled reward's mean: the last 5 steps' mean well above the first 5 steps'."""
    from peftcli.training.loop import train

    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}", "train.eval_every=0"])
    train(recipe)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    rewards = [e["reward"] for e in events if e["event"] == "train"]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"], evals


@pytest.mark.slow
def test_sigkill_during_rollout_resumes_exactly(tmp_path):
    """Killed while sampling step 5's completions (checkpoints every 2 steps, with the KL on) and resumed:
    the adapter, the logged losses and rewards equal an uninterrupted run's (≤ 1e-6): step 5 samples
    again what it sampled before the kill."""
    import sys

    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from peftcli.cli import app

    sys.path.insert(0, str(kit.HELPERS))
    from kill_in_rollout import run_killed_in_rollout

    raw = yaml.safe_load(RECIPE.read_text())
    raw["data"] = {k: str(kit.ROOT / v) if k == "train" else v for k, v in raw["data"].items() if k != "eval"}
    raw["objective"].update(group_size=4, kl_coef=0.05)
    raw["train"].update(max_steps=6, save_every=2, log_every=1, eval_every=0)
    runs = {}
    for name in ("full", "killed"):
        runs[name] = tmp_path / name
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(runs[name])}))
    full = CliRunner().invoke(app, ["train", str(tmp_path / "full.yaml"), "-q"])
    assert full.exit_code == 0, full.output
    proc = run_killed_in_rollout(5, tmp_path / "killed.yaml")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(
        p.name for p in (runs["killed"] / "checkpoints").iterdir() if p.name.startswith("step-")
    ) == [
        "step-2",
        "step-4",
    ]
    resumed = CliRunner().invoke(app, ["train", str(tmp_path / "killed.yaml"), "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_file(runs[n] / "adapter" / "adapter_model.safetensors") for n in ("full", "killed"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    def logged(run):
        events = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        return [(e["step"], e["loss"], e["reward"], e["kl"]) for e in events if e["event"] == "train"]

    got, expected = logged(runs["killed"]), logged(runs["full"])
    assert [s for s, *_ in got] == list(range(1, 7))
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-6)


def test_rollout_is_seeded_by_step_and_row_and_scales_over_the_window(tmp_path):
    """The same step samples the same completions (a resumed run's rollout), another step others; G per
    prompt on consecutive rows, each ending at its first EOS or at max_new_tokens; with scale_rewards
    batch the advantages of a two-micro-batch window use the whole window's std (TRL's generation batch)."""
    from peftcli.data.pipeline import load_data
    from peftcli.training.objectives.rollout import roll_out

    recipe = grpo_recipe(tmp_path, ["objective.scale_rewards=batch", "objective.rewards=[{regex: '[0-9]'}]"])
    built = kit.build(recipe)
    rows = load_data(recipe.data, built.tokenizer, "causal_lm").train
    window = [rows.take([0, 1]), rows.take([2, 3])]
    objective = build_objective(recipe.objective, built.method, built.model)
    cpu = torch.device("cpu")
    first = roll_out(objective, built.model, built.tokenizer, window, 3, 0, cpu)
    stats = objective.step_metrics()
    again = roll_out(objective, built.model, built.tokenizer, window, 3, 0, cpu)
    other = roll_out(objective, built.model, built.tokenizer, window, 4, 0, cpu)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other, strict=True))
    eos, rewards = built.tokenizer.eos_token_id, []
    for batch, prompt_rows in zip(first, window, strict=True):
        assert batch["input_ids"].size(0) == GROUP * len(prompt_rows)
        for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
            prompt = prompt_rows[i // GROUP]["input_ids"]
            completion = ids[len(prompt) :][labels[len(prompt) :] != -100].tolist()
            assert ids[: len(prompt)].tolist() == prompt
            assert completion[-1] == eos or len(completion) == MAX_NEW
            assert eos not in completion[:-1]
            text = built.tokenizer.decode([t for t in completion if t != eos], skip_special_tokens=True)
            rewards.append(float(any(c.isdigit() for c in text)))
    assert 0 < sum(rewards) < len(rewards)  # the advantages are not all 0
    got = torch.cat([b["advantages"] for b in first])
    expected = torch.tensor(rewards)
    std = expected.std()
    expected = (expected - expected.view(-1, GROUP).mean(1).repeat_interleave(GROUP)) / (std + 1e-4)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert stats["reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)


def test_data_columns_rename_the_prompt_and_references(tmp_path):
    from peftcli.data.pipeline import load_data

    data = kit.write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "solution": "2", "level": 1}])
    recipe = load_recipe(
        RECIPE, [f"data.train={data}", "data.eval=null", "data.columns={prompt: question, answer: solution}"]
    )
    tok = kit.tokenizer()
    (row,) = load_data(recipe.data, tok, "causal_lm").train
    assert row["input_ids"] == [tok.bos_token_id, *kit.ids(tok, "1+1=")]
    assert row["references"] == {"answer": "2", "level": 1}
