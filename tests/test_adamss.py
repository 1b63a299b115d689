"""AdaMSS against peft 0.21 as the oracle, scikit-learn's k-means and the paper's equation, fp32 on the CPU:

- the clustering: :func:`kmeans_labels` gives scikit-learn's ``KMeans(init="random", n_init=1,
  max_iter=10, random_state=123456789)`` labels (what peft calls), exactly, on the SVD rows of every
  tiny:llama layer and on random points (not on duplicated points: see the docs);
- the init: for a seed, our layer's Vᵀ, row order, A_k (≤ 1e-6) and zero B_k are the ones peft's layer
  builds, with a bias column, with fixed and with dynamic ranks;
- the paper's equation: a layer's output equals ``W̃ x̃ + P(⊕ B_k A_k) Vᵀ x̃`` written out subspace by
  subspace, and merge then unmerge gives back the logits (≤ 1e-4) and the weights and biases (≤ 1e-6);
- with each option that changes the numbers (``r``, ``num_subspaces``, ``subspace_rank``,
  ``use_dynamic_rank`` / ``svd_threshold``, ``random_seed``, ``layers_to_transform``), our adapter moved
  off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote
  loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it
  with peft's logits (≤ 1e-4), on tiny:llama and tiny:bert seq_cls (biases), and ours on tiny:t5 seq2seq
  (the method table holds the defaults on llama and bert);
- ASA: the same steps through the loop's ``Stepper`` and through peft's ``AdamssAsaCallback`` freeze
  the same subspaces after every step and end with the same logits (≤ 1e-5); a resumed run re-freezes;
- refusals in one line: r reaching a layer's outputs, an empty ASA ramp, GPT-2's Conv1D, ASA under DDP.
"""

from __future__ import annotations

import kit
import numpy as np
import pytest
import torch

from peftcli.methods.adamss import AdamssConfig, AdamssLinear, kmeans_labels, seeded_svd
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]

OPTION_RUNS = {
    "r-subspaces-rank": ["method.r=8", "method.num_subspaces=3", "method.subspace_rank=3"],
    "dynamic-rank": [
        "method.use_dynamic_rank=true",
        "method.svd_threshold=0.3",
        "method.subspace_rank=4",
        "method.target_modules=[q_proj, v_proj, down_proj]",
    ],
    "seed-layers": [
        "method.random_seed=5",
        "method.target_modules=[q_proj, v_proj]",
        "method.layers_to_transform=[1]",
    ],
    "t5-seq2seq": ["model.name=tiny:t5", "model.task=seq2seq", "method.target_modules=[q, v, wo]"],
}  # the defaults on llama and bert seq_cls: the method table's peft rows
# run id -> (task, model, targets, peft AdamssConfig options)
PEFT_RUNS = {
    "llama-dynamic": (
        "causal_lm",
        "tiny:llama",
        LLAMA_TARGETS,
        {"r": 12, "num_subspaces": 5, "subspace_rank": 3, "use_dynamic_rank": True, "svd_threshold": 0.2},
    ),
    "llama-seed-layers": (
        "causal_lm",
        "tiny:llama",
        ["q_proj", "k_proj"],
        # init_weights None: peft's random-B testing init; the file's B is read, so it loads all the same
        {"r": 8, "num_subspaces": 2, "random_seed": 3, "layers_to_transform": [0], "init_weights": None},
    ),
    "bert": ("seq_cls", "tiny:bert", BERT_TARGETS, {"r": 8, "num_subspaces": 3, "subspace_rank": 2}),
}


def sklearn_labels(points: torch.Tensor, k: int) -> torch.Tensor:
    cluster = pytest.importorskip("sklearn.cluster")
    kmeans = cluster.KMeans(n_clusters=k, init="random", n_init=1, max_iter=10, random_state=123456789)
    return torch.from_numpy(kmeans.fit_predict(points.numpy().astype("float32"))).long()


@pytest.mark.slow
def test_kmeans_is_scikit_learns_on_svd_rows_and_random_points():
    model = kit.tiny("llama")
    checked = 0
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name != "lm_head":
            for rank, k in ((8, 5), (16, 8)):
                u, _ = seeded_svd(layer.weight.detach().float(), rank, 0)
                assert torch.equal(kmeans_labels(u, k), sklearn_labels(u, k)), f"{name} r={rank} K={k}"
                checked += 1
    rng = np.random.RandomState(0)
    for n, d, k in ((200, 6, 12), (40, 3, 9)):
        points = torch.from_numpy(rng.standard_normal((n, d)).astype("float32"))
        assert torch.equal(kmeans_labels(points, k), sklearn_labels(points, k)), (n, d, k)
    assert checked == 28


@pytest.mark.slow  # peft's AdaMSS imports scikit-learn (~3 s), which nothing in the fast tier needs
@pytest.mark.parametrize(
    "bias,options",
    [
        (True, {}),
        (False, {"subspace_rank": 3}),
        (True, {"use_dynamic_rank": True, "svd_threshold": 0.2, "subspace_rank": 4}),
    ],
    ids=["bias", "no-bias", "dynamic-rank"],
)
def test_init_is_peft_layer(bias, options):
    from peft.tuners.adamss.layer import Linear as PeftAdamss

    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    settings = {"r": 12, "num_subspaces": 4, "random_seed": 7, **options}
    torch.manual_seed(5)
    theirs = PeftAdamss(linear, "default", r=12, config=peft.AdamssConfig(**settings))
    torch.manual_seed(5)
    ours = AdamssLinear(linear, AdamssConfig(**settings))
    assert torch.equal(ours.adamss_newB, theirs.adamss_newB["default"])
    assert torch.equal(torch.argsort(ours.inverse_order), theirs.scatter_index["default"])
    assert len(ours.adamss_A) == theirs.num_subspaces["default"]
    for k, (a, b) in enumerate(zip(ours.adamss_A, ours.adamss_B, strict=True)):
        assert kit.max_diff(a, theirs.adamss_A["default"][k]) <= 1e-6
        assert b.shape == theirs.adamss_B["default"][k].shape and not b.any()


def perturbed_layer(bias: bool = True) -> AdamssLinear:
    """An AdamssLinear around a random nn.Linear(24 → 40) (non-zero bias), A_k and B_k moved off init."""
    torch.manual_seed(0)
    layer = AdamssLinear(
        torch.nn.Linear(24, 40, bias=bias), AdamssConfig(r=12, num_subspaces=4, subspace_rank=2)
    )
    kit.perturb(layer, scale=0.5)
    return layer


def test_layer_is_the_paper_update():
    layer = perturbed_layer()
    w = torch.cat([layer.base_layer.weight, layer.base_layer.bias.unsqueeze(1)], dim=1).detach().double()
    vt = layer.adamss_newB.double()
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    x_aug = torch.cat([x, torch.ones(3, 1)], dim=1).double()
    expected = x_aug @ w.T
    rows = torch.argsort(layer.inverse_order).split([b.shape[0] for b in layer.adamss_B])
    for k, subspace in enumerate(rows):  # y[S_k] += B_k A_k Vᵀ x̃
        a, b = layer.adamss_A[k].detach().double(), layer.adamss_B[k].detach().double()
        expected[:, subspace] += x_aug @ (b @ a @ vt).T
    assert sorted(torch.cat(rows).tolist()) == list(range(layer.out_features))
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_merge_unmerge_round_trip(bias):
    layer = perturbed_layer(bias)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = layer(x)
        base = layer.base_layer
        weight = base.weight.detach().clone()
        bias_before = None if base.bias is None else base.bias.detach().clone()
        layer.merge()
        layer.merged = True
        assert kit.max_diff(ours, layer(x)) <= 1e-5
        if bias:  # the bias column of Δ[W | b] is folded into the bias
            assert kit.max_diff(base.bias, bias_before) > 1e-3
        layer.unmerge()
        layer.merged = False
        assert kit.max_diff(base.weight, weight) <= 1e-6
        if bias:
            assert kit.max_diff(base.bias, bias_before) <= 1e-6
        assert kit.max_diff(ours, layer(x)) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("adamss", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, targets, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.AdamssConfig, task, tmp_path, model_name, target_modules=targets, **options
    )
    assert result.method == "adamss" and result.loaded <= 1e-5 and result.merged <= 1e-4


ASA = [
    "method.target_modules=[q_proj, v_proj]",
    "method.use_asa=true",
    "method.asa_target_subspaces=6",
    "method.init_warmup=1",
    "method.final_warmup=6",
    "method.mask_interval=2",
    "method.asa_schedule_exponent=2.0",
]


def frozen_in_peft(peft_model) -> list[str]:
    names = [n for n, p in peft_model.named_parameters() if "adamss_" in n and not p.requires_grad]
    return sorted(n.removeprefix("base_model.model.").replace(".default.", ".") for n in names)


@pytest.mark.slow
def test_asa_freezes_what_peft_callback_freezes_step_for_step(tmp_path):
    """Same adapter, same AdamW, same batch; peft's AdamssAsaCallback.on_optimizer_step with the
    Trainer's global_step (0-based at that point) against our after_step from the loop's Stepper."""
    from peft.tuners.adamss.asa_callback import AdamssAsaCallback
    from transformers import TrainerControl, TrainerState

    built = kit.build("adamss", tmp_path, ASA)
    model, method = built.model, built.method
    kit.perturb(model)  # B off zero, so A has gradients from the first step
    fields = method.adapter_config(model)
    config = peft.AdamssConfig(task_type="CAUSAL_LM", **fields)
    peft_model = peft.get_peft_model(kit.base_model(built.base_path, built.recipe), config)
    kit.copy_into_peft(peft_model, method.adapter_state_dict(model))
    batch = kit.batch_of(model.config.vocab_size)
    ours = kit.stepper(model, method, lr=1e-2, weight_decay=0.01)
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    callback, control = AdamssAsaCallback(), TrainerControl()
    model.train()
    peft_model.train()
    for step in range(8):
        ours.step([batch], step)
        peft_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        peft_opt.step()
        callback.on_optimizer_step(None, TrainerState(global_step=step), control, model=peft_model)
        peft_opt.zero_grad()
        assert method.frozen == frozen_in_peft(peft_model), f"frozen subspaces differ after step {step}"
    # maskings at steps 2, 4, 6 with targets 12, 7, 6: 11 kept, then 6; at step 6 the target equals the
    # 6 still trainable, so none more: A and B of 10 of the 16 subspaces frozen
    assert len(method.frozen) == 2 * 10
    model.eval()
    peft_model.eval()
    assert kit.max_diff(kit.logits(model, batch), kit.logits(peft_model, batch)) <= 1e-5


def test_asa_schedule_is_the_papers_and_a_resumed_run_refreezes(tmp_path):
    built = kit.build("adamss", tmp_path, ASA)
    method = built.method
    # target(t) = T + (N − T)(1 − (t − 1)/5)^2 with N = 16 subspaces, T = 6
    assert [method.target_subspaces(t, 16) for t in (1, 2, 4, 6)] == [16, 12, 7, 6]
    frozen = sorted(
        n for n, _ in built.model.named_parameters() if n.endswith((".adamss_A.0", ".adamss_B.0"))
    )
    resumed = type(method)(method.cfg)
    resumed.load_method_state({**method.method_state(), "frozen": frozen})
    before = {n: p.detach().clone() for n, p in built.model.named_parameters() if n in frozen}
    kit.train_step(built.model, resumed, kit.batch_of(built.model.config.vocab_size))
    for name, param in built.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before[name]) and not param.requires_grad, name


@pytest.mark.slow
def test_refusals_are_one_line(tmp_path, monkeypatch):
    cases = [
        (["method.r=32"], "method.r: 32 reaches model.layers.0.self_attn.k_proj's 32 outputs"),
        (["method.use_asa=true", "method.init_warmup=5", "method.final_warmup=5"], "method.init_warmup"),
        (["model.name=tiny:gpt2"], "is a Conv1D; adamss adapts nn.Linear layers only"),
    ]
    for overrides, expected in cases:
        with pytest.raises(RecipeError) as err:
            kit.build("adamss", tmp_path, overrides)
        assert expected in str(err.value) and "\n" not in str(err.value)
    built = kit.build("adamss", tmp_path, ASA)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(RecipeError, match="method.use_asa: freezes subspaces mid-run"):
        built.method.on_train_start(built.model, 10)
