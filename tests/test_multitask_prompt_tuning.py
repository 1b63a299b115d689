"""Multitask prompt tuning against the paper's equation and peft 0.21 as the oracle, fp32 on the CPU:

- the equation: row i of a batch runs as the frozen base on ``[P* ⊙ (u_k v_kᵀ); E(x_i)]`` for its task
  k (the base given those input embeddings, ≤ 1e-5), and another task gives other logits;
- with each option that changes the numbers (``num_tasks`` / ``num_ranks``, ``init: text``) and on
  tiny:bert seq_cls, our adapter loads in ``PeftModel.from_pretrained`` and peft, given the same
  ``task_ids``, gives our logits (≤ 1e-5); an adapter peft wrote loads in ``peftcli.export.load_adapter``
  with peft's logits (≤ 1e-5);
- the source inits (``average_source_tasks``, ``exact_source_task``, ``only_source_shared``) from a
  trained source adapter start where peft's own init from the same file starts (bit for bit);
- the data stage carries ``data.task_id_column`` into every batch as ``task_ids``; a missing column, a
  bad value, a task id past ``num_tasks`` and a forward without task ids (generation) are one-line
  errors, as are the recipes that cannot work (no task column, seq2seq, eval generation, a source init
  without ``init_from``).
"""

from __future__ import annotations

import json

import kit
import pytest
import torch
from kit.parity import PEFT_TASK_TYPES
from safetensors.torch import load_file

from peftcli.data.collate import collate
from peftcli.data.pipeline import load_data
from peftcli.evaluate import greedy_generate
from peftcli.export import load_adapter
from peftcli.models import resolve_model_name
from peftcli.recipe import DataConfig, RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

# run id -> (overrides, the probe's task ids)
OPTION_RUNS = {
    "default": ([], [1, 0]),
    "num_tasks-num_ranks": (["method.num_tasks=4", "method.num_ranks=3"], [3, 1]),
    "init-text": (["method.init=text", "method.init_text=reverse the word"], [0, 1]),
    "bert": (BERT, [1, 0]),
}

# run id -> (task, model, peft MultitaskPromptTuningConfig options, the probe's task ids)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"num_virtual_tokens": 5, "num_tasks": 3, "num_ranks": 2}, [2, 0]),
    "llama-one-task": ("causal_lm", "tiny:llama", {"num_virtual_tokens": 4}, [0, 0]),
    "bert": ("seq_cls", "tiny:bert", {"num_virtual_tokens": 6, "num_tasks": 2}, [1, 0]),
}


def probe(task: str, vocab: int, task_ids: list[int]) -> dict[str, torch.Tensor]:
    batch = kit.batch(task, vocab, lengths=(10, 7))
    batch["task_ids"] = torch.tensor(task_ids)
    return batch


def test_each_row_runs_the_base_on_its_task_prompt(tmp_path):
    built = kit.build("multitask_prompt_tuning", tmp_path, ["method.num_ranks=2"])
    kit.perturb(built.model, scale=0.5)
    batch = probe("causal_lm", built.model.config.vocab_size, [1, 0])
    ours = built.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]
    )
    prompt = built.model.input_prompt
    base = built.model.base_model
    n = prompt.num_virtual_tokens
    for row, task in enumerate(batch["task_ids"].tolist()):
        u, v = prompt.prefix_task_cols[task], prompt.prefix_task_rows[task]  # (n, r), (r, h)
        task_prompt = prompt.embedding.weight * (u @ v)  # P* ⊙ (u_k v_kᵀ)
        length = int(batch["attention_mask"][row].sum())
        embeds = torch.cat([task_prompt, base.get_input_embeddings()(batch["input_ids"][row, :length])])
        with torch.no_grad():
            expected = base(inputs_embeds=embeds[None]).logits[0, n:]
        assert kit.max_diff(ours.logits[row, :length].detach(), expected) <= 1e-5
    swapped = built.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        task_ids=batch["task_ids"].flip(0),
    )
    assert kit.max_diff(ours.logits.detach(), swapped.logits.detach()) > 1e-2


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    overrides, task_ids = OPTION_RUNS[run]
    built = kit.build("multitask_prompt_tuning", tmp_path, overrides)
    kit.perturb(built.model)
    batch = probe(built.task, built.model.config.vocab_size, task_ids)
    ours = kit.logits(built.model, batch, built.task)
    adapter = kit.save(
        tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe, built.labels
    )
    extra = {"num_labels": len(built.labels)} if built.labels else {}
    theirs = kit.load_in_peft(adapter, built.base_path, kit.auto_class(built.task), **extra)
    assert kit.max_diff(ours, kit.peft_logits(theirs, batch, built.task)) <= 1e-5
    stored = {k: tuple(v.shape) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    assert {k: v for k, v in stored.items() if "classifier" not in k} == {
        k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items() if "classifier" not in k
    }


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options, task_ids = PEFT_RUNS[run]
    torch.manual_seed(0)
    extra = {"num_labels": 2} if task == "seq_cls" else {}
    base = kit.auto_class(task).from_pretrained(resolve_model_name(model_name), dtype=torch.float32, **extra)
    config = peft.MultitaskPromptTuningConfig(task_type=PEFT_TASK_TYPES[task], **options)
    theirs = peft.get_peft_model(base, config)
    kit.perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    batch = probe(task, base.config.vocab_size, task_ids)
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.method.name == "multitask_prompt_tuning"
    assert kit.max_diff(kit.peft_logits(theirs, batch, task), kit.logits(loaded.model, batch, task)) <= 1e-5


@pytest.fixture
def source_adapter(tmp_path):
    """A 3-task source run's adapter, moved off its init."""
    built = kit.build(
        "multitask_prompt_tuning", tmp_path / "source", ["method.num_tasks=3", "method.num_ranks=2"]
    )
    kit.perturb(built.model, seed=5, scale=0.5)
    return kit.save(
        tmp_path / "source", built.model, built.method, built.tokenizer, built.base_path, built.recipe
    )


@pytest.mark.parametrize(
    "init,tasks",
    [("average_source_tasks", 1), ("exact_source_task", 1), ("only_source_shared", 2)],
)
def test_source_inits_start_where_peft_starts(init, tasks, source_adapter, tmp_path):
    overrides = [f"method.init={init}", f"method.init_from={source_adapter}", f"method.num_tasks={tasks}"]
    overrides += ["method.num_ranks=2", "method.init_task=2"]
    ours = kit.build("multitask_prompt_tuning", tmp_path, overrides).model.input_prompt
    base = kit.auto_class("causal_lm").from_pretrained(resolve_model_name("tiny:llama"), dtype=torch.float32)
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=ours.num_virtual_tokens,
        num_tasks=tasks,
        num_ranks=2,
        prompt_tuning_init=init.upper(),
        prompt_tuning_init_state_dict_path=str(source_adapter / "adapter_model.safetensors"),
        prompt_tuning_init_task=2,
    )
    theirs = peft.get_peft_model(base, config).prompt_encoder["default"]
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)
    source = load_file(str(source_adapter / "adapter_model.safetensors"))
    assert torch.equal(ours.embedding.weight, source["prompt_embeddings"])
    if init != "only_source_shared":
        assert torch.equal(ours.prefix_task_cols, theirs.prefix_task_cols)
        assert torch.equal(ours.prefix_task_rows, theirs.prefix_task_rows)
    saved = kit.build("multitask_prompt_tuning", tmp_path / "again", overrides)
    adapter = kit.save(
        tmp_path / "again", saved.model, saved.method, saved.tokenizer, saved.base_path, saved.recipe
    )
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["prompt_tuning_init"] == "RANDOM" and written["prompt_tuning_init_state_dict_path"] is None


def test_the_data_stage_batches_each_example_task_id(tmp_path):
    tokenizer = kit.tokenizer("llama")
    rows = [{"prompt": "apple =", "completion": " elppa", "task": t} for t in (1, 0, "2")]
    cfg = DataConfig(
        train=kit.write_jsonl(tmp_path / "t.jsonl", rows), format="completion", task_id_column="task"
    )
    train = load_data(cfg, tokenizer, "causal_lm").train
    assert [example["task_id"] for example in train] == [1, 0, 2]
    batch = collate(list(train), tokenizer, "causal_lm")
    assert batch["task_ids"].tolist() == [1, 0, 2]
    assert "task_ids" not in collate(
        list(load_data(DataConfig(train=cfg.train, format="completion"), tokenizer, "causal_lm").train),
        tokenizer,
        "causal_lm",
    )


@pytest.mark.parametrize(
    "rows,column,key,words",
    [
        (
            [{"prompt": "a =", "completion": " a"}],
            "task_id",
            "data.task_id_column",
            "column 'task_id' not found",
        ),
        (
            [{"prompt": "a =", "completion": " a", "task_id": "x"}],
            "task_id",
            "data.train",
            "not a task index",
        ),
        ([{"prompt": "a =", "completion": " a", "task_id": -1}], "task_id", "data.train", "not a task index"),
    ],
)
def test_data_mistakes_are_one_line_errors(rows, column, key, words, tmp_path):
    cfg = DataConfig(
        train=kit.write_jsonl(tmp_path / "t.jsonl", rows), format="completion", task_id_column=column
    )
    with pytest.raises(RecipeError) as err:
        load_data(cfg, kit.tokenizer("llama"), "causal_lm")
    assert err.value.key.startswith(key) and words in str(err.value) and "\n" not in str(err.value)


def test_a_forward_without_or_past_the_task_ids_is_a_one_line_error(tmp_path):
    built = kit.build("multitask_prompt_tuning", tmp_path, [])
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    for task_ids, words in (
        (None, "needs each example's task id"),
        (torch.tensor([0, 2]), "method.num_tasks is 2"),
    ):
        with pytest.raises(RecipeError) as err:
            built.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=task_ids
            )
        assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["data.task_id_column=null"], "data.task_id_column"),
        (["model.name=tiny:t5", "model.task=seq2seq"], "model.task"),
        (["eval.generate=true"], "eval.generate"),
        (["method.init=only_source_shared"], "method.init"),
        (["method.init_from=some/adapter"], "method.init_from"),
        (["method.init=average_source_tasks", "method.init_from=some/adapter"], "method.num_tasks"),
    ],
)
def test_recipes_that_cannot_work_are_refused_at_start(overrides, key, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.tiny_recipe("multitask_prompt_tuning", tmp_path, overrides)
    assert err.value.key == key and "\n" not in str(err.value)


def test_one_task_needs_no_task_ids(tmp_path):
    """num_tasks 1 (the paper's target task): no column, every example is task 0, generation works."""
    overrides = ["method.num_tasks=1", "data.task_id_column=null", "eval.generate=true"]
    built = kit.build("multitask_prompt_tuning", tmp_path, overrides)
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    task_zero = {**batch, "task_ids": torch.zeros(2, dtype=torch.long)}
    assert kit.max_diff(kit.logits(built.model, batch), kit.logits(built.model, task_zero)) == 0.0
    pad = built.tokenizer.pad_token_id
    assert len(greedy_generate(built.model, [[40, 41, 42]], 3, set(), pad, torch.device("cpu"))[0]) == 3
