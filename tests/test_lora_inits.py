"""LoRA's initialisations against peft's own ``init_lora_weights`` and their defining properties.

References and tolerances (fp32, CPU, the recipe's seed, which is also what peft's draws start from):
- gaussian, orthogonal and pissa_niter_N draw from torch's generator in peft's order, so with the same
  seed A, B (and PiSSA's residual W0) equal peft's ``get_peft_model`` with that init, ≤ 1e-6 (1e-5 for
  the SVD-based residual);
- orthogonal: B·A = 0 (≤ 1e-6), so the logits at step 0 equal the base's (≤ 1e-5), with A and B ≠ 0;
- pissa_niter: W_res + s·B A = W0 (≤ 1e-5); s·B A's singular values are at most W0's top r and within
  10 % of them (the randomized SVD's error on the tiny model's flat spectra: up to ~6 %); the export, a plain LoRA on the
  original base, gives our trained logits in peft (≤ 1e-5);
- a peft adapter config naming ``pissa_niter_N`` reads back as ``init: pissa`` with ``pissa_niter: N``;
- corda (ipm and kpm): the same examples through peft's ``preprocess_corda`` (one example per forward,
  as peft requires) and ours fed the same forwards give A, B and the residual W0 ≤ 1e-6 (measured: 0);
  ours fed padded batches (training's way, padding skipped) gives s·B A within 5e-3 relative;
  W_res + s·B A = W0 (≤ 1e-5); a run with ``init: corda`` (or ``lora_ga``) through ``peftcli.api.train``
  reads the data,
  and its exported adapter (a plain rank-2r LoRA) loads in peft with the logits peftcli loads it with
  (≤ 1e-5), which equal those of the trained model in memory (≤ 1e-5, in-process);
- lora_ga: the averaged loss gradient equals peft's ``preprocess_loraga`` bit for bit (≤ 1e-7); A and B
  equal peft's up to signs and the randomized SVD's sketch (≤ 2e-2 of the largest entry); A's rows are
  orthonormal and hold ≥ 99 % of the gradient's top-r energy; W_res + s·B A = W0 (≤ 1e-5); the export
  on the original base gives the trained logits in peft and in peftcli (≤ 1e-5);
- eva (ρ 2 and 4, τ 0.9 for speed; on these batches one layer ends at rank 0 and loses its adapter): the same batches through peft's
  ``initialize_lora_eva_weights`` give the same ranks, rank/alpha patterns, targets and A (≤ 1e-6;
  measured 0), B = 0, A's rows orthonormal, the rank budget Σ r kept; the saved adapter (with its
  rank_pattern) loads in peft and peftcli with the trained logits (≤ 1e-5);
- loftq (α = r, so s = 1: peft's LoftQ ignores the scale): A, B and the quantized base equal peft's
  ``init_lora_weights="loftq"`` for loftq_iter 1 and 3 (≤ 1e-5; peft's ``loftq_init`` run on the CPU by
  mapping its "cuda" to the CPU, bitsandbytes quantizing there too); at s = 4 its defining property: Q is
  NF4-exact (re-quantizing changes nothing), Q + s·B·A is nearer W than q(W), and nearer with each
  iteration; our adapter loads in peftcli and peft (each rebuilding Q from the original base) and on the
  written base with the trained logits (≤ 1e-5), merged ≤ 1e-4; peft's loftq adapter loads here (≤ 1e-5);
- adapters peft saves with an init (gaussian, orthogonal, pissa, olora, eva; unconverted) load here with
  peft's logits (≤ 1e-5) and merge (≤ 1e-4); peft's unconverted corda / lora_ga saves are refused in one
  line, and its converted ones load with its trained model's logits (≤ 1e-5);
- adapters trained from a recipe with gaussian, orthogonal or pissa_niter load in peft and peftcli with
  the trained logits (≤ 1e-5);
- a run with a data-driven init SIGKILLed after a checkpoint resumes to the uninterrupted run's losses
  (≤ 1e-6) and adapter (≤ 1e-6, config equal), its repeated data pass reading the same examples and
  leaving the same init bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kit import (
    base_model,
    batch,
    batch_of,
    build,
    load_in_peft,
    logits,
    peft_logits,
    perturb,
    save,
    train_steps,
    write_recipe,
)

from peftcli.methods.lora import LoRA
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

LOFTQ = ["method.init=loftq", "method.r=4", "method.alpha=4"]  # s = 1: peft's LoftQ ignores the scale
INITS = {  # ours (overrides) -> peft's init_lora_weights (and its other LoraConfig fields)
    "gaussian": (["method.init=gaussian", "method.r=4"], "gaussian"),
    "orthogonal": (["method.init=orthogonal", "method.r=4"], "orthogonal"),
    "pissa_niter": (["method.init=pissa", "method.pissa_niter=4", "method.r=4"], "pissa_niter_4"),
    "loftq": (LOFTQ, {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}),
    "loftq_iter3": (
        [*LOFTQ, "method.loftq_iter=3"],
        {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 3}},
    ),
}


@pytest.fixture(autouse=True)
def peft_loftq_on_the_cpu(monkeypatch):
    """peft's ``loftq_init`` moves the weight to "cuda" (or "xpu") to quantize it; bitsandbytes quantizes on
    the CPU as well, so the device is mapped to the CPU for the duration of the call, nothing else."""
    from peft.tuners.lora import layer as peft_layer

    from peftcli.quantize import import_bitsandbytes

    original = peft_layer.loftq_init

    def on_cpu(*args, **kwargs):
        bnb = import_bitsandbytes()
        cpu = {"cuda": "cpu", "xpu": "cpu"}

        def mapped(to):
            def moved(self, *a, **k):
                a = tuple(cpu.get(x, x) if isinstance(x, str) else x for x in a)
                if isinstance(k.get("device"), str):
                    k["device"] = cpu.get(k["device"], k["device"])
                return to(self, *a, **k)

            return moved

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "to", mapped(torch.Tensor.to))
            patch.setattr(bnb.nn.Params4bit, "to", mapped(bnb.nn.Params4bit.to))
            return original(*args, **kwargs)

    monkeypatch.setattr(peft_layer, "loftq_init", on_cpu)


def peft_twin(built, init: str | dict):
    """peft's model with the same targets, r, alpha and ``init``, built from the same seed."""
    recipe, base_path, _, model, method = built
    fields = method.adapter_config(model)
    fields.pop("fan_in_fan_out")
    fields.update(r=method.cfg.r, lora_alpha=method.cfg.alpha)
    fields.update(init if isinstance(init, dict) else {"init_lora_weights": init})
    base = base_model(base_path, recipe)
    torch.manual_seed(recipe.train.seed)  # as build_model seeds before attaching the method
    return peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **fields))


@pytest.mark.parametrize("init", list(INITS))
def test_init_equals_peft_for_the_same_seed(init, tmp_path):
    overrides, peft_init = INITS[init]
    built = build("lora", tmp_path, overrides)
    theirs = dict(peft_twin(built, peft_init).base_model.model.named_modules())
    tolerance = 1e-5 if init.startswith(("pissa", "loftq")) else 1e-6
    for name, layer in built.method.lora_layers(built.model):
        other = theirs[name]
        assert (layer.lora_A.weight - other.lora_A["default"].weight).abs().max().item() <= tolerance
        assert (layer.lora_B.weight - other.lora_B["default"].weight).abs().max().item() <= tolerance
        assert (layer.base_layer.weight - other.base_layer.weight).abs().max().item() <= tolerance


# peft's adapters saved as peft saves them (init_lora_weights: the init's name, not converted): a loader
# redoes an init that rewrites W0 (PiSSA, OLoRA, LoftQ) from the original base, as peft's does
PEFT_SAVED = {
    "gaussian": INITS["gaussian"],
    "orthogonal": INITS["orthogonal"],
    "pissa": (["method.init=pissa", "method.r=4"], "pissa"),
    "olora": (["method.init=olora", "method.r=4"], "olora"),
    "eva": (["method.init=eva", "method.r=4"], "eva"),  # no data pass: peft's EVA layers before it
}


@pytest.mark.parametrize("init", list(PEFT_SAVED))
def test_peft_saved_adapter_with_the_init_loads_and_merges_here(init, tmp_path):
    """peft's adapter with ``init_lora_weights`` = the init, tensors moved as if trained: peftcli loads it
    with peft's logits (≤ 1e-5) and merges it to them (≤ 1e-4)."""
    from peftcli.export import load_adapter

    overrides, peft_init = PEFT_SAVED[init]
    built = build("lora", tmp_path, overrides)
    peft_model = peft_twin(built, peft_init)
    perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert (
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == peft_init
    )
    batch_ = batch_of(built.model.config.vocab_size)
    theirs = peft_logits(peft_model.eval(), batch_)
    loaded = load_adapter(tmp_path / "peft", base=built.base_path)
    assert loaded.method.cfg.init == init
    assert (logits(loaded.model, batch_) - theirs).abs().max().item() <= 1e-5
    merged = loaded.method.merge(loaded.model)
    assert (logits(merged, batch_) - theirs).abs().max().item() <= 1e-4


def test_orthogonal_starts_at_the_base_with_both_factors_nonzero(tmp_path):
    recipe, base_path, _, model, method = build("lora", tmp_path, INITS["orthogonal"][0])
    for _, layer in method.lora_layers(model):
        assert layer.lora_A.weight.abs().min().item() > 0 and layer.lora_B.weight.abs().max().item() > 1e-3
        assert (layer.lora_B.weight @ layer.lora_A.weight).abs().max().item() <= 1e-6
    batch = batch_of(model.config.vocab_size)
    assert (logits(model, batch) - logits(base_model(base_path, recipe), batch)).abs().max().item() <= 1e-5


def test_pissa_niter_holds_the_top_singular_part(tmp_path):
    recipe, base_path, _, model, method = build("lora", tmp_path, INITS["pissa_niter"][0])
    originals = dict(base_model(base_path, recipe).named_modules())
    for name, layer in method.lora_layers(model):
        held = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        assert (layer.base_layer.weight + held - originals[name].weight).abs().max().item() <= 1e-5
        # a projection of W0 onto an r-dimensional subspace: each singular value at most W0's (interlacing),
        # near it when the subspace is near the top one
        top = torch.linalg.svdvals(originals[name].weight)[: layer.r]
        found = torch.linalg.svdvals(held)[: layer.r]
        assert (found <= top + 1e-5).all()
        assert ((top - found) / top).max().item() <= 0.1


def trained_adapter_loads_both_ways(tmp_path, recipe, base_path, tokenizer, model, method) -> Path:
    """Two steps of the loop's Stepper, then save: peft and peftcli load the adapter on the original base
    with the trained logits (≤ 1e-5). Returns the adapter directory."""
    from peftcli.export import load_adapter

    batch_ = batch_of(model.config.vocab_size)
    train_steps(model, method, batch_, steps=2)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    ours = logits(model, batch_)
    assert (logits(load_in_peft(adapter, base_path), batch_) - ours).abs().max().item() <= 1e-5
    assert (logits(load_adapter(adapter).model, batch_) - ours).abs().max().item() <= 1e-5
    return adapter


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "pissa_niter"])
def test_trained_adapter_loads_in_peft_and_here_on_the_original_base(init, tmp_path):
    """Built from the recipe with the init, trained two steps of the loop's Stepper and saved: peft and
    peftcli load it on the original base with the trained logits (≤ 1e-5)."""
    recipe, base_path, tokenizer, model, method = build("lora", tmp_path, INITS[init][0])
    trained_adapter_loads_both_ways(tmp_path, recipe, base_path, tokenizer, model, method)


def test_peft_pissa_niter_config_reads_back():
    cfg = LoRA.config_from_adapter({"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa_niter_16"})
    assert (cfg.init, cfg.pissa_niter) == ("pissa", 16)


def test_peft_loftq_config_reads_back():
    config = {"r": 4, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 5}}
    cfg = LoRA.config_from_adapter(config)
    assert (cfg.init, cfg.loftq_bits, cfg.loftq_iter) == ("loftq", 4, 5)
    with pytest.raises(RecipeError, match="loftq_bits"):  # peft's int8 LoftQ: refused in one line
        LoRA.config_from_adapter({**config, "loftq_config": {"loftq_bits": 8, "loftq_iter": 1}})


def loftq_errors(built) -> tuple[float, float]:
    """(‖W − (Q + s·B·A)‖, ‖W − Q‖) over every adapted layer, W the original base's weight."""
    originals = dict(base_model(built.base_path, built.recipe).named_modules())
    with_adapter = quantized_only = 0.0
    for name, layer in built.method.lora_layers(built.model):
        gap = originals[name].weight - layer.base_layer.weight
        held = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        with_adapter += ((gap - held).norm() ** 2).item()
        quantized_only += (gap.norm() ** 2).item()
    return with_adapter**0.5, quantized_only**0.5


@pytest.mark.slow  # ~13 s: seven alternations' SVDs and NF4 round trips per layer
def test_loftq_starts_nearer_w_than_its_quantization_and_improves_with_iterations(tmp_path):
    """LoftQ's defining property, at a scale s = α/r = 4 (ours divides it out; peft's would not): Q holds
    NF4 values (quantizing it again changes nothing), Q + s·B·A is nearer W than q(W) alone, and the
    error falls as loftq_iter grows (measured on tiny:llama, r = 4, 1 → 2 → 4 iterations: 0.449 → 0.423 →
    0.406 against ‖W − q(W)‖ = 0.499)."""
    from peftcli.methods.lora_loftq import nf4_round_trip

    errors = []
    for iterations in (1, 2, 4):
        overrides = ["method.init=loftq", "method.r=4", "method.alpha=16", f"method.loftq_iter={iterations}"]
        built = build("lora", tmp_path / str(iterations), overrides)
        errors.append(loftq_errors(built))
        if iterations == 1:
            plain_q = errors[0][1]  # with one alternation Q = q(W), plain QLoRA's base
            for _, layer in built.method.lora_layers(built.model):
                weight = layer.base_layer.weight
                assert torch.equal(nf4_round_trip(weight), weight)
    assert errors[0][0] < plain_q
    assert errors[0][0] > errors[1][0] > errors[2][0], errors


@pytest.mark.slow  # ~7 s
def test_loftq_adapter_loads_here_and_in_peft_with_its_base_written_beside_it(tmp_path):
    """Our LoftQ adapter (trained 2 steps) is written as peft writes one (init_lora_weights: loftq, its
    loftq_config), with Q in loftq_base.safetensors beside it. peftcli (rebuilding Q from the original base)
    and peft (its own LoftQ on that base) both give the trained logits (≤ 1e-5); the original base with the
    written Q swapped in, plus the adapter as plain LoRA, gives them too; merged, ≤ 1e-4."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from peftcli.export import load_adapter
    from peftcli.methods.lora import LOFTQ_BASE_FILE

    recipe, base_path, tokenizer, model, method = build("lora", tmp_path, [*LOFTQ, "method.loftq_iter=2"])
    batch_ = batch_of(model.config.vocab_size)
    train_steps(model, method, batch_, steps=2)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq"
    assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    written = load_file(str(adapter / LOFTQ_BASE_FILE))
    layers = dict(method.lora_layers(model))
    assert sorted(written) == sorted(f"{n}.weight" for n in layers)
    for name, layer in layers.items():
        assert torch.equal(written[f"{name}.weight"], layer.base_layer.weight)
    ours = logits(model, batch_)
    loaded = load_adapter(adapter)
    assert (logits(loaded.model, batch_) - ours).abs().max().item() <= 1e-5
    assert (logits(load_in_peft(adapter, base_path), batch_) - ours).abs().max().item() <= 1e-5
    base = base_model(base_path, recipe)
    base.load_state_dict(written, strict=False)  # the written base, then the adapter as plain LoRA
    plain = peft.LoraConfig(**{**config, "init_lora_weights": True, "loftq_config": {}})
    paired = PeftModel.from_pretrained(base, str(adapter), config=plain)
    assert (logits(paired, batch_) - ours).abs().max().item() <= 1e-5
    merged = loaded.method.merge(loaded.model)
    assert (logits(merged, batch_) - ours).abs().max().item() <= 1e-4


@pytest.mark.slow  # ~7 s
def test_peft_loftq_adapter_loads_here(tmp_path):
    """An adapter peft trained from its LoftQ init (saved with init_lora_weights: loftq, as peft saves it)
    loads in peftcli, which rebuilds Q from the original base as peft's loader does: peft's logits ≤ 1e-5."""
    from peftcli.export import load_adapter

    built = build("lora", tmp_path, [*LOFTQ, "method.loftq_iter=2"])
    peft_model = peft_twin(
        built, INITS["loftq_iter3"][1] | {"loftq_config": {"loftq_bits": 4, "loftq_iter": 2}}
    )
    perturb(peft_model)  # as if trained
    peft_model.save_pretrained(str(tmp_path / "peft"))
    batch_ = batch_of(built.model.config.vocab_size)
    theirs = peft_logits(peft_model.eval(), batch_)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq"
    loaded = load_adapter(tmp_path / "peft", base=built.base_path)
    assert (loaded.method.cfg.init, loaded.method.cfg.loftq_iter) == ("loftq", 2)
    assert (logits(loaded.model, batch_) - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.init=orthogonal", "method.r=5"], "r=5 is odd"),
        (["method.init=orthogonal", "method.rank_pattern={q_proj: 3}"], "r=3 is odd"),
        (["method.pissa_niter=4"], "method.pissa_niter"),
        (["method.init=loftq", "method.loftq_bits=8"], "8 bits"),
        (["method.loftq_iter=3"], "method.loftq_iter"),
        (["method.init=loftq", "model.quantization={bits: 4}"], "computes the 4-bit base itself"),
    ],
)
def test_refused_init_options(overrides, needle, tmp_path):
    with pytest.raises(RecipeError, match=needle):
        build("lora", tmp_path, overrides)


def corda_examples(vocab_size: int) -> dict[str, torch.Tensor]:
    return batch("causal_lm", vocab_size, lengths=(12, 9, 5, 11), seed=3)


def peft_corda(built, mode: str, examples: dict[str, torch.Tensor]):
    """peft's CorDA on a fresh base: ``preprocess_corda`` runs the examples one at a time (its hook keeps
    one example per call), then ``get_peft_model`` starts the adapter from the decomposition."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    recipe, base_path, _, model, method = built
    fields = method.adapter_config(model)
    fields.pop("fan_in_fan_out")
    fields.update(r=method.cfg.r, lora_alpha=method.cfg.alpha, init_lora_weights="corda")
    config = peft.LoraConfig(task_type="CAUSAL_LM", corda_config=CordaConfig(corda_method=mode), **fields)
    base = base_model(base_path, recipe)

    def run_model() -> None:
        for ids, mask in zip(examples["input_ids"], examples["attention_mask"].bool(), strict=True):
            base(input_ids=ids[mask][None])

    with torch.no_grad():
        preprocess_corda(base, config, run_model=run_model)
    return peft.get_peft_model(base, config)


def one_per_batch(examples: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each example alone, unpadded: the forwards peft's calibration runs."""
    lengths = examples["attention_mask"].sum(dim=1).tolist()
    return [{k: v[i : i + 1, :length] for k, v in examples.items()} for i, length in enumerate(lengths)]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_equals_peft_for_the_same_examples(mode, tmp_path):
    """Fed the same forwards, ours equals peft's bit for bit (≤ 1e-6). Fed padded batches of two, as
    training reads them, the activations differ from the one-example forwards by float rounding, which
    the inverse covariance amplifies most in kpm's smallest directions: s·B·A within 5e-3 relative
    (measured 9e-4 ipm, 2.7e-3 kpm), W_res + s·B A = W0 ≤ 1e-5 either way."""
    theirs, ours = None, {}
    for feed in ("alone", "batched"):
        built = build(
            "lora", tmp_path / feed, ["method.init=corda", f"method.corda_method={mode}", "method.r=4"]
        )
        examples = corda_examples(built.model.config.vocab_size)  # the same ids both times (seeded)
        batches = (
            one_per_batch(examples)
            if feed == "alone"
            else [
                {k: v[:2] for k, v in examples.items()},
                {k: v[2:] for k, v in examples.items()},
            ]
        )
        built.method.init_from_data(built.model, batches)
        ours[feed] = built
        theirs = theirs or dict(peft_corda(built, mode, examples).base_model.model.named_modules())
    originals = dict(base_model(built.base_path, built.recipe).named_modules())
    for feed, tolerance in (("alone", 1e-6), ("batched", None)):
        for name, layer in ours[feed].method.lora_layers(ours[feed].model):
            other = theirs[name]
            held = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
            peft_held = (
                other.scaling["default"] * other.lora_B["default"].weight @ other.lora_A["default"].weight
            )
            assert (layer.base_layer.weight + held - originals[name].weight).abs().max().item() <= 1e-5
            if tolerance is None:
                assert ((held - peft_held).norm() / peft_held.norm()).item() <= 5e-3
                continue
            for ours_t, theirs_t in (
                (layer.lora_A.weight, other.lora_A["default"].weight),
                (layer.lora_B.weight, other.lora_B["default"].weight),
                (layer.base_layer.weight, other.base_layer.weight),
            ):
                assert (ours_t - theirs_t).abs().max().item() <= tolerance


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_unconverted_peft_data_driven_adapter_is_refused(init, tmp_path):
    """peft saves CorDA and LoRA-GA adapters unconverted unless asked (init_lora_weights: corda / lora_ga,
    rank r): they trained on a residual base the file does not hold. peft refuses CorDA's (no eigens) and
    loads LoRA-GA's on the untouched base, which is not the trained model; peftcli refuses both in one
    line, pointing at the conversion."""
    from peftcli.export import load_adapter

    built = build("lora", tmp_path, [f"method.init={init}", "method.r=4"])
    examples = corda_examples(built.model.config.vocab_size)
    peft_model = peft_corda(built, "ipm", examples) if init == "corda" else peft_lora_ga(built, examples)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == init
    with pytest.raises(RecipeError, match="saved unconverted") as err:
        load_adapter(tmp_path / "peft", base=built.base_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_converted_peft_data_driven_adapter_loads_with_the_trained_logits(init, tmp_path):
    """The same adapters saved with peft's ``path_initial_model_for_weight_conversion`` (a plain rank-2r
    LoRA on the original base): peftcli loads them with the logits of peft's trained model in memory, on
    its residual base (≤ 1e-5)."""
    from peftcli.export import load_adapter

    built = build("lora", tmp_path, [f"method.init={init}", "method.r=4"])
    examples = corda_examples(built.model.config.vocab_size)
    peft_model = peft_corda(built, "ipm", examples) if init == "corda" else peft_lora_ga(built, examples)
    peft_model.save_pretrained(str(tmp_path / "initial"))
    perturb(peft_model)  # as if trained
    peft_model.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    batch_ = batch_of(built.model.config.vocab_size)
    theirs = peft_logits(peft_model.eval(), batch_)
    loaded = load_adapter(tmp_path / "converted", base=built.base_path)
    assert (logits(loaded.model, batch_) - theirs).abs().max().item() <= 1e-5


def test_corda_export_on_the_original_base_gives_the_trained_logits(tmp_path):
    recipe, base_path, tokenizer, model, method = build("lora", tmp_path, ["method.init=corda", "method.r=4"])
    method.init_from_data(model, [corda_examples(model.config.vocab_size)])
    trained_adapter_loads_both_ways(tmp_path, recipe, base_path, tokenizer, model, method)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["corda", "lora_ga", "eva"])
def test_data_driven_run_reads_the_training_data(init, tmp_path):
    from safetensors.torch import load_file

    from peftcli.api import train
    from peftcli.export import load_adapter

    method = {"name": "lora", "init": init, "r": 4, "init_examples": 8}
    recipe = write_recipe(tmp_path, method=method, train={"max_steps": 2, "batch_size": 4})
    result = train(recipe)
    state = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    if init == "eva":  # A holds principal directions (orthonormal rows) at the ranks EVA chose
        config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert config["rank_pattern"] and config["init_lora_weights"] is True
        assert a.shape[0] == config["rank_pattern"].get("model.layers.0.self_attn.q_proj", 4)
    else:
        assert a.shape[0] == 8 and a[4:].abs().max().item() > 0  # [A ; A0]: A0 came from the data pass
    batch_ = batch_of(100)
    peft_logits = logits(load_in_peft(result.adapter_dir, load_adapter(result.adapter_dir).base_path), batch_)
    assert (logits(load_adapter(result.adapter_dir).model, batch_) - peft_logits).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_loftq_run_writes_its_base_and_says_so(tmp_path):
    """``peftcli.api.train`` with init: loftq: the adapter dir holds loftq_base.safetensors (the adapted
    layers' NF4 weights, which quantize to themselves) and summary.md says so."""
    from safetensors.torch import load_file

    from peftcli.api import train
    from peftcli.methods.lora import LOFTQ_BASE_FILE
    from peftcli.methods.lora_loftq import nf4_round_trip

    method = {"name": "lora", "init": "loftq", "r": 4, "loftq_iter": 2}
    result = train(write_recipe(tmp_path, method=method, train={"max_steps": 2, "batch_size": 4}))
    written = load_file(str(result.adapter_dir / LOFTQ_BASE_FILE))
    assert written and all(torch.equal(nf4_round_trip(w), w) for w in written.values())
    assert f"adapter/{LOFTQ_BASE_FILE}" in (result.run_dir / "summary.md").read_text()


def record_data_init(monkeypatch) -> list[dict]:
    """Each call of ``LoRA.init_from_data`` in this process: the examples it read (input ids, in order) and
    what it left (every layer's rank, A, B, base weight and, for a residual init, A0 and B0)."""
    calls = []
    original = LoRA.init_from_data

    def recorded(self, model, batches):
        ids = []

        def reading():
            for b in batches:
                ids.append(b["input_ids"].clone())
                yield b

        original(self, model, reading())
        layers = {}
        for name, layer in self.lora_layers(model):
            tensors = [layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight]
            tensors += [getattr(layer, k) for k in ("pissa_A0", "pissa_B0") if hasattr(layer, k)]
            layers[name] = (layer.r, [t.detach().clone() for t in tensors])
        calls.append({"ids": ids, "layers": layers})

    monkeypatch.setattr(LoRA, "init_from_data", recorded)
    return calls


def train_losses(run) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


@pytest.mark.slow  # three runs of a data-driven init (~20–60 s each for eva)
@pytest.mark.parametrize("init", ["corda", "lora_ga", "eva"])
def test_data_driven_init_resumes_exactly_after_sigkill(init, tmp_path, monkeypatch):
    """A run SIGKILLed right after its step-2 checkpoint and resumed ends as the uninterrupted run: the same
    train losses at every step (≤ 1e-6) and the same adapter, tensors and config (rank_pattern included).
    The resumed run repeats the data pass before restoring the checkpoint; it reads the same examples in the
    same order and leaves the same init (ranks, A, B, the residual base, A0 and B0: bit for bit) as the
    uninterrupted run's pass, so the frozen tensors the checkpoint does not hold are the ones trained on."""
    import signal
    import subprocess
    import sys

    from kit import HELPERS
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from peftcli.cli import app

    method = {"name": "lora", "init": init, "r": 4, "init_examples": 8, "dropout": 0.1}
    train = {"max_steps": 4, "batch_size": 4, "save_every": 2, "log_every": 1, "lr": 5e-3, "seed": 3}
    recipe = write_recipe(tmp_path, output_dir=False, method=method, train=train)
    calls = record_data_init(monkeypatch)

    def cli(run, *extra):
        result = CliRunner().invoke(app, ["train", str(recipe), "--output-dir", str(run), "-q", *extra])
        assert result.exit_code == 0, result.output

    cli(tmp_path / "straight")
    killed = tmp_path / "killed"
    command = [sys.executable, str(HELPERS / "kill_after_checkpoint.py"), "2", "--", "train", str(recipe)]
    proc = subprocess.run(
        [*command, "--output-dir", str(killed), "-q"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (killed / "adapter").exists()
    cli(killed, "--resume")
    straight_pass, resumed_pass = calls
    assert len(straight_pass["ids"]) == 2  # 8 examples in batches of 4
    assert all(torch.equal(a, b) for a, b in zip(straight_pass["ids"], resumed_pass["ids"], strict=True))
    assert straight_pass["layers"].keys() == resumed_pass["layers"].keys()
    for name, (rank, tensors) in straight_pass["layers"].items():
        again_rank, again = resumed_pass["layers"][name]
        assert rank == again_rank and all(torch.equal(a, b) for a, b in zip(tensors, again, strict=True))
    full, resumed = train_losses(tmp_path / "straight"), train_losses(killed)
    assert [s for s, _ in full] == [s for s, _ in resumed] == [1, 2, 3, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(full, resumed, strict=True)) <= 1e-6
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    config = "adapter/adapter_config.json"
    assert json.loads((tmp_path / "straight" / config).read_text()) == json.loads(
        (killed / config).read_text()
    )


def peft_lora_ga(built, examples: dict[str, torch.Tensor]):
    """peft's LoRA-GA on a fresh base: ``preprocess_loraga`` averages the gradient of the same batch's loss,
    then ``get_peft_model`` starts the adapter from its SVD (peft's defaults: ArB2r, stable scale, γ 16)."""
    from peft.tuners.lora.loraga import preprocess_loraga

    recipe, base_path, _, model, method = built
    fields = method.adapter_config(model)
    fields.pop("fan_in_fan_out")
    fields.update(r=method.cfg.r, lora_alpha=method.cfg.alpha, init_lora_weights="lora_ga")
    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_ga_config=peft.LoraGAConfig(), **fields)
    base = base_model(base_path, recipe)
    preprocess_loraga(base, config, lambda: base(**examples).loss.backward())
    return peft.get_peft_model(base, config)


def sign_aligned(ours: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
    """``ours`` with each row (dim=1) or column (dim=0) flipped to agree in sign with ``theirs``."""
    sign = torch.sign((ours * theirs).sum(dim=dim, keepdim=True))
    return ours * torch.where(sign == 0, 1.0, sign)


def test_lora_ga_equals_peft(tmp_path, monkeypatch):
    """The averaged gradient equals peft's bit for bit; the decomposition is a randomized SVD (q = 4r,
    4 iterations) in both, from different sketches, so the tensors agree up to each singular vector's
    sign and the sketch's error: ≤ 2e-2 of the largest entry (measured 1.1e-2 on the tiny model, whose
    gradient singular values lie close together). Its defining property, exactly: A's rows are orthonormal
    and span the top r right singular directions of G (≥ 99 % of their energy)."""
    from peftcli.methods.lora import LoraGa

    built = build("lora", tmp_path, ["method.init=lora_ga", "method.r=4"])
    examples = corda_examples(built.model.config.vocab_size)
    gradients = {}
    observe = LoraGa.observe
    monkeypatch.setattr(
        LoraGa,
        "observe",
        lambda self, layer, g: (gradients.setdefault(id(layer), g), observe(self, layer, g)),
    )
    built.method.init_from_data(built.model, [examples])
    peft_model = peft_lora_ga(built, examples)
    theirs = dict(peft_model.base_model.model.named_modules())
    originals = dict(base_model(built.base_path, built.recipe).named_modules())
    worst = 0.0
    for name, layer in built.method.lora_layers(built.model):
        other = theirs[name]
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        peft_a, peft_b = other.lora_A["default"].weight.detach(), other.lora_B["default"].weight.detach()
        worst = max(
            worst, (sign_aligned(a, peft_a, 1) - peft_a).abs().max().item() / peft_a.abs().max().item()
        )
        worst = max(
            worst, (sign_aligned(b, peft_b, 0) - peft_b).abs().max().item() / peft_b.abs().max().item()
        )
        held = layer.scaling * b @ a
        assert (layer.base_layer.weight + held - originals[name].weight).abs().max().item() <= 1e-5
        gradient = gradients[id(layer)]
        assert (a @ a.T - torch.eye(4)).abs().max().item() <= 1e-5
        top = torch.linalg.svdvals(gradient)[:4]
        assert ((gradient @ a.T).norm() ** 2 / (top**2).sum()).item() >= 0.99
    assert worst <= 2e-2, worst


def test_lora_ga_gradient_is_peft_gradient(tmp_path, monkeypatch):
    from peft.tuners.lora.loraga import preprocess_loraga

    from peftcli.methods.lora import LoraGa

    built = build("lora", tmp_path, ["method.init=lora_ga", "method.r=4"])
    examples = corda_examples(built.model.config.vocab_size)
    gradients = {}
    monkeypatch.setattr(LoraGa, "observe", lambda self, layer, g: gradients.setdefault(id(layer), g))
    built.method.init_from_data(built.model, [examples, examples])  # two batches: the mean of two
    base = base_model(built.base_path, built.recipe)
    fields = built.method.adapter_config(built.model)
    fields.pop("fan_in_fan_out")
    fields["init_lora_weights"] = "lora_ga"
    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_ga_config=peft.LoraGAConfig(), **fields)

    def two_steps() -> None:
        for _ in range(2):
            base(**examples).loss.backward()

    preprocess_loraga(base, config, two_steps)
    modules = dict(base.named_modules())
    for name, layer in built.method.lora_layers(built.model):
        assert (gradients[id(layer)] - modules[name]._peft_loraga_grad).abs().max().item() <= 1e-7


def test_lora_ga_export_on_the_original_base_gives_the_trained_logits(tmp_path):
    recipe, base_path, tokenizer, model, method = build(
        "lora", tmp_path, ["method.init=lora_ga", "method.r=4"]
    )
    method.init_from_data(model, [corda_examples(model.config.vocab_size)])
    assert not any(p.grad is not None for p in model.parameters())  # the pass leaves no gradient behind
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n
    }
    trained_adapter_loads_both_ways(tmp_path, recipe, base_path, tokenizer, model, method)


def eva_batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    return [batch("causal_lm", vocab_size, lengths=(12, 9, 12, 11), seed=seed) for seed in range(4)]


def peft_eva(built, batches: list[dict[str, torch.Tensor]], rho: float, tau: float, fields: dict):
    """peft's EVA: ``initialize_lora_eva_weights`` over the same batches (its dataloader, cycled), for the
    adapter config ``fields`` ours had before its data pass."""
    fields = {k: v for k, v in fields.items() if k != "fan_in_fan_out"}
    fields.update(init_lora_weights="eva")
    config = peft.LoraConfig(task_type="CAUSAL_LM", eva_config=peft.EvaConfig(rho=rho, tau=tau), **fields)
    peft_model = peft.get_peft_model(base_model(built.base_path, built.recipe), config)
    peft.initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    return peft_model


@pytest.mark.slow  # ~40 s: the examples cycle until the components settle
@pytest.mark.parametrize("rho", [2.0, 4.0])
def test_eva_equals_peft_for_the_same_batches(rho, tmp_path):
    tau = 0.9  # fewer passes until the components settle than the default 0.99: the same in both
    built = build(
        "lora", tmp_path, ["method.init=eva", "method.r=4", f"method.eva_rho={rho}", f"method.eva_tau={tau}"]
    )
    adapted = len(built.method.lora_layers(built.model))
    fields = built.method.adapter_config(built.model)  # before the pass moves ranks and drops targets
    batches = eva_batches(built.model.config.vocab_size)
    built.method.init_from_data(built.model, batches)
    peft_model = peft_eva(built, batches, rho, tau, fields)
    peft_config = peft_model.peft_config["default"]
    assert built.method.cfg.rank_pattern == peft_config.rank_pattern
    assert built.method.cfg.alpha_pattern == peft_config.alpha_pattern
    theirs = dict(peft_model.base_model.model.named_modules())
    layers = built.method.lora_layers(built.model)
    assert sorted(n for n, _ in layers) == sorted(peft_config.target_modules)
    assert sum(layer.r for _, layer in layers) == 4 * adapted  # the rank budget, moved between layers
    assert len(layers) < adapted  # on these batches one layer ends at rank 0: its adapter removed, as peft
    for name, layer in layers:
        other = theirs[name]
        assert (layer.lora_A.weight - other.lora_A["default"].weight).abs().max().item() <= 1e-6
        assert layer.scaling == pytest.approx(other.scaling["default"]) == pytest.approx(16.0 / 4)
        assert not layer.lora_B.weight.any()
        a = layer.lora_A.weight
        assert (a @ a.T - torch.eye(layer.r)).abs().max().item() <= 1e-5  # principal directions: orthonormal


@pytest.mark.slow  # ~40 s: the examples cycle until the components settle
def test_eva_adapter_loads_with_its_ranks(tmp_path):

    recipe, base_path, tokenizer, model, method = build(
        "lora", tmp_path, ["method.init=eva", "method.r=4", "method.eva_rho=4", "method.eva_tau=0.9"]
    )
    method.init_from_data(model, eva_batches(model.config.vocab_size))
    trained_adapter_loads_both_ways(tmp_path, recipe, base_path, tokenizer, model, method)


def test_incremental_pca_equals_the_pca_of_all_rows():
    """EVA's incremental PCA over four batches gives the principal directions and explained-variance
    ratios of the four batches at once (centred SVD), up to sign: ≤ 1e-4, on rows of rank 4 around a
    mean (with more directions than it keeps, the incremental PCA is an approximation by design)."""
    from peftcli.methods.lora_eva import IncrementalPCA

    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([4.0, 2.0, 1.0, 0.5])
    rows = (torch.randn(200, 4, generator=gen) * scales) @ torch.linalg.qr(torch.randn(16, 4, generator=gen))[
        0
    ].T
    rows = rows + torch.randn(16, generator=gen)
    pca = IncrementalPCA(4)
    for part in rows.split(50):
        pca.partial_fit(part)
    centred = (rows - rows.mean(dim=0)).double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    ours = pca.vectors.double()
    assert (sign_aligned(ours, vh[:4], 1) - vh[:4]).abs().max().item() <= 1e-4
    expected_ratio = s[:4] ** 2 / (s**2).sum()
    assert (pca.explained_variance_ratio - expected_ratio).abs().max().item() <= 1e-4
