"""Poly (Polytropon routing over LoRA skills, MHR with n_splits > 1): peft parity both ways given each
example's task id, the paper's equation per example, and the task-id path's refusals."""

from __future__ import annotations

import json

import kit
import pytest
import torch
from kit.models import base_model
from kit.parity import auto_class, max_diff

from peftcli.export import load_adapter
from peftcli.recipe import RecipeError

pytestmark = pytest.mark.slow

# the options that change results: rank, skills, tasks, MHR splits, B's init; and seq_cls on bert
ROWS = {
    "default": [],
    "mhr-splits": ["method.n_splits=4", "method.n_skills=3"],
    "three-tasks-rank2": ["method.n_tasks=3", "method.r=2", "method.n_splits=1"],
    "one-task": ["method.n_tasks=1", "data.task_id_column=null"],
    "bert-seq_cls": [
        "model.name=tiny:bert",
        "model.task=seq_cls",
        "data.format=classification",
        "method.target_modules=[query,value]",  # the pooler gets (B, H): peft bmm-s (B, T, H)
    ],
}


def probe(built: kit.Built) -> dict[str, torch.Tensor]:
    """Three rows (the third padded) of tasks 0, 1 and the last one: each example routes on its own."""
    batch = kit.batch(built.task, built.model.config.vocab_size, lengths=(10, 7, 5))
    batch["task_ids"] = torch.tensor([0, 1, 2]).clamp(max=built.method.cfg.n_tasks - 1)
    return batch


@pytest.mark.parametrize("row", list(ROWS))
def test_peft_loads_ours_and_we_load_peft(row, tmp_path):
    built = kit.build("poly", tmp_path, ROWS[row])
    kit.perturb(built.model)
    model = built.model.eval()
    batch = probe(built)
    ours = kit.logits(model, batch, built.task)
    base = base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert (
        max_diff(ours, kit.logits(base, {k: v for k, v in batch.items() if k != "task_ids"}, built.task))
        > 1e-3
    )
    adapter = kit.save(
        tmp_path, model, built.method, built.tokenizer, built.base_path, built.recipe, built.labels
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "POLY"
    extra = {"num_labels": len(built.labels)} if built.labels else {}
    theirs = kit.load_in_peft(adapter, built.base_path, auto_class(built.task), **extra)
    assert max_diff(ours, kit.peft_logits(theirs, batch, built.task)) <= 1e-5  # peft loads ours

    kit.perturb(theirs, seed=3)  # peft's weights, moved: saved by peft, loaded by us
    theirs.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(tmp_path / "peft")
    assert loaded.method.name == "poly"
    assert (
        max_diff(kit.peft_logits(theirs, batch, built.task), kit.logits(loaded.model, batch, built.task))
        <= 1e-5
    )


def test_the_papers_equation_per_example(tmp_path):
    """y = W0 x + (1/r) x A_t B_t, A_t = Σ_s w_t,s A_s, w_t = σ(Z_t) / Σ σ(Z_t) (eval), per example."""
    built = kit.build("poly", tmp_path, ["method.n_splits=1"])
    kit.perturb(built.model)
    layer = built.model.get_submodule("model.layers.0.self_attn.q_proj").eval()
    x = torch.randn(2, 5, layer.in_features)
    layer.task_ids.current = torch.tensor([1, 0])
    with torch.no_grad():
        got = layer(x)
    for b, task in enumerate((1, 0)):
        gates = torch.sigmoid(layer.poly_router.module_logits[task])
        w = gates / gates.sum()
        a = torch.einsum("s,sdr->dr", w, layer.poly_lora_A[0])
        bb = torch.einsum("s,srd->rd", w, layer.poly_lora_B[0])
        want = layer.base_layer(x[b]) + x[b] @ a @ bb / layer.r
        assert max_diff(got[b], want.detach()) <= 1e-6
    layer.task_ids.current = None


def test_training_draws_relaxed_bernoulli_weights_that_sum_to_one(tmp_path):
    built = kit.build("poly", tmp_path, ["method.n_splits=2"])
    router = built.model.get_submodule("model.layers.0.self_attn.q_proj").poly_router.train()
    torch.manual_seed(0)
    w1, w2 = router(torch.tensor([0, 1])), router(torch.tensor([0, 1]))
    assert w1.shape == (2, 2, 4)
    assert torch.allclose(w1.sum(-1), torch.ones(2, 2), atol=1e-6)
    assert max_diff(w1, w2) > 1e-3  # sampled, not the eval weights


def test_a_forward_without_task_ids_or_past_n_tasks_is_one_line(tmp_path):
    built = kit.build("poly", tmp_path)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(6, 6))
    with pytest.raises(RecipeError, match="needs each example's task id"):
        built.model(**kit.inputs(batch))
    batch["task_ids"] = torch.tensor([0, 2])
    with pytest.raises(RecipeError, match="a task id is 2 but method.n_tasks is 2"):
        built.model(**kit.inputs(batch))


def test_recipes_it_cannot_run_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="data.task_id_column"):
        kit.build("poly", tmp_path, ["data.task_id_column=null"])
    with pytest.raises(RecipeError, match="generation carries no task ids"):
        kit.build("poly", tmp_path, ["eval.generate=true"])
    with pytest.raises(RecipeError, match="packed row holds examples of several tasks"):
        kit.build("poly", tmp_path, ["train.packing=true"])
    with pytest.raises(RecipeError, match="cannot train on a quantized base"):
        kit.build("poly", tmp_path, ["model.quantization.bits=4"])
    with pytest.raises(RecipeError, match="not divisible by n_splits 3"):
        kit.build("poly", tmp_path, ["method.n_splits=3"])


def test_a_missing_task_id_column_names_it(tmp_path):
    from peftcli import api

    rows = [{"prompt": "a =", "completion": " b"}] * 4
    data = tmp_path / "no_ids.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"data.train={data}",
        "data.eval=null",
        "train.max_steps=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(RecipeError, match="column 'task_id' not found"):
        api.train(str(kit.RECIPES / "tiny" / "poly.yaml"), overrides=overrides)


def test_a_bad_task_id_names_file_row_and_column(tmp_path):
    from peftcli import api

    rows = [{"prompt": "a =", "completion": " b", "task_id": 0}] * 3 + [{"prompt": "c =", "completion": " d"}]
    data = tmp_path / "bad_id.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"data.train={data}",
        "data.eval=null",
        "train.max_steps=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(RecipeError) as err:
        api.train(str(kit.RECIPES / "tiny" / "poly.yaml"), overrides=overrides)
    line = str(err.value)
    assert "bad_id.jsonl" in line and "4" in line and "'task_id'" in line and "\n" not in line
