"""The method table: one row per registered method, and the promises every method keeps, checked on
every run (tiny recipe × task) its row lists, the way peft's test matrix runs every model × method.

Every check runs in fp32 on the CPU with a fixed seed, and compares numbers:

- identity at init (where the row promises it): logits equal the base's, max abs diff ≤ 1e-6;
- the trainable-parameter count equals the method's own formula, and no base *weight* is trainable
  (base biases may be, for methods that train them);
- after one step of the training loop's own ``Stepper`` (``after_step`` included, the recipe's
  optimizer) every frozen tensor is bit-identical, and the trainable ones moved;
- save → load (``peftcli.export``) reproduces the logits, ≤ 1e-6;
- merge (where the row says the method merges) reproduces the logits, ≤ 1e-4;
- peft parity (where peft has the method): our saved adapter names peft's ``peft_type``, and peft
  loading it on the original base gives our logits, ≤ 1e-5 (and, where peft stores exactly the
  trainable tensors, as many adapter numbers as we train).

The full suite runs every run of every row; the fast tier each row's first run (``EVERY_RUN_FAST``).

Adding a method adds a row to ``METHODS`` (tests/test_adding_a_method.py checks that it exists).
Method-specific references (DoRA's and PiSSA's equations, AdaLoRA's allocation, AdapterHub parity)
stay in the method's own test file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import kit
import pytest
import torch

from peftcli.export import load_adapter
from peftcli.methods.catalog import get_method_class, list_methods

BERT = ("model.name=tiny:bert", "model.task=seq_cls", "data.format=classification")
T5 = ("model.name=tiny:t5", "model.task=seq2seq")


@dataclass(frozen=True)
class Case:
    """One registered method's row: the runs it serves and the references it has.

    runs: run id → (tiny recipe, *overrides); each run is a model/task the method must serve.
    identity / mergeable: what the method promises (the class must say the same).
    peft_type: peft's name for the method, where peft has it: peft parity is checked.
    peft_counts: peft's saved adapter holds exactly our trainable tensors (same number of numbers).
    beyond_peft: run id → why peft cannot load that run's adapter (an option peft has no format for).
    slow: the row's runs run in the full suite only (the fast tier keeps its time budget; the method's
      own test file keeps a fast row).
    """

    runs: dict[str, tuple[str, ...]]
    identity: bool
    mergeable: bool
    peft_type: str | None = None
    peft_counts: bool = False
    beyond_peft: dict[str, str] = field(default_factory=dict)
    slow: bool = False


METHODS: dict[str, Case] = {
    "adalora": Case({"llama": ("adalora",)}, identity=True, mergeable=True, peft_type="ADALORA"),
    "adamss": Case(
        {
            "llama": ("adamss",),
            "bert-seq_cls": ("adamss", *BERT, "method.r=8"),
        },  # seq2seq (tiny:t5): tests/test_adamss.py's peft row
        identity=True,
        mergeable=True,
        peft_type="ADAMSS",  # peft stores each layer's frozen Vᵀ (adamss_newB) too: no peft_counts
    ),
    "adapter_fusion": Case({"llama": ("adapter_fusion",)}, identity=False, mergeable=False),
    "adaption_prompt": Case(
        {
            "llama": ("adaption_prompt",),
            "mistral": ("adaption_prompt", "model.name=tiny:mistral"),
            "gpt2": ("adaption_prompt", "model.name=tiny:gpt2"),
        },
        identity=True,
        mergeable=False,
        peft_type="ADAPTION_PROMPT",
        peft_counts=True,
    ),
    "bitfit": Case({"gpt2": ("bitfit",)}, identity=True, mergeable=True),
    "boft": Case(
        {
            "llama": ("boft",),
            "block_num-butterfly-3": (
                "boft",
                "method.boft_block_num=8",
                "method.boft_block_size=0",
                "method.boft_n_butterfly_factor=3",
            ),
            "bert-seq_cls": ("boft", *BERT),
            "t5-seq2seq": ("boft", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="BOFT",
        peft_counts=True,
    ),
    "c3a": Case(
        {
            "llama": ("c3a",),
            "zero-init-pattern": (
                "c3a",
                "method.init_weights=true",
                "method.block_size=32",
                "method.block_size_pattern={down_proj: 64}",
            ),
            "bert-seq_cls": ("c3a", *BERT),
            "t5-seq2seq": ("c3a", *T5),
        },
        identity=False,
        mergeable=True,
        peft_type="C3A",
        peft_counts=True,
    ),
    "cartridge": Case(
        {
            "llama": ("cartridge",),
            "random-init-no-sink": ("cartridge", "method.init=random", "method.num_frozen_tokens=0"),
            "t5-seq2seq": ("cartridge", *T5, "method.init=random", "method.num_frozen_tokens=2"),
        },
        identity=False,
        mergeable=False,
        peft_type="CARTRIDGE",
    ),
    "cpt": Case({"llama": ("cpt",)}, identity=False, mergeable=False, peft_type="CPT"),
    "delora": Case(
        {"llama": ("delora",), "bert-seq_cls": ("delora", *BERT), "t5-seq2seq": ("delora", *T5)},
        identity=True,
        mergeable=True,
        peft_type="DELORA",  # peft stores each layer's W0 column norms too: no peft_counts
    ),
    "beft": Case(
        {
            "qwen2": ("beft",),
            "qwen2-q-v": ("beft", "method.target_modules=[q_proj,v_proj]"),
            "bert-seq_cls": ("beft", *BERT),
            "bart-seq2seq": ("beft", "model.name=tiny:bart", "model.task=seq2seq"),
        },
        identity=True,
        mergeable=True,
        peft_type="BEFT",
        peft_counts=True,
    ),
    "deft": Case(
        {
            "llama": ("deft",),
            "llama-qr-alpha": ("deft", "method.decomposition_method=qr", "method.alpha=16"),
            "gpt2": ("deft", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("deft", *BERT),
            "bart-seq2seq": ("deft", "model.name=tiny:bart", "model.task=seq2seq"),
        },
        identity=True,
        mergeable=True,
        peft_type="DEFT",
        peft_counts=True,
    ),
    "fourierft": Case(
        {
            "llama": ("fourierft",),
            "gpt2": ("fourierft", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("fourierft", *BERT),
        },
        identity=False,
        mergeable=True,
        peft_type="FOURIERFT",
        peft_counts=True,
    ),
    "frod": Case(
        {
            "llama": ("frod",),
            "gpt2": ("frod", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("frod", *BERT),
        },
        identity=True,
        mergeable=True,
        peft_type="FROD",  # peft stores V and the sparse positions per category too: no peft_counts
        slow=True,  # tests/test_frod.py keeps the fast rows
    ),
    "gralora": Case(
        {
            "llama": ("gralora",),
            "k4-hybrid": ("gralora", "method.gralora_k=4", "method.hybrid_r=2"),
            "gpt2": ("gralora", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("gralora", *BERT),
            "t5-seq2seq": ("gralora", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="GRALORA",
        peft_counts=True,
    ),
    "hira": Case(
        {
            "llama": ("hira",),
            "gpt2": ("hira", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("hira", *BERT),
            "t5-seq2seq": ("hira", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="HIRA",
        peft_counts=True,
    ),
    "houlsby_adapter": Case({"llama": ("houlsby_adapter",)}, identity=True, mergeable=False),
    "glora": Case(
        {
            "qwen2": ("glora",),
            "qwen2-vector-constant": ("glora", "method.config_A_B=vector", "method.config_D_E=constant"),
            "llama": ("glora", "model.name=tiny:llama"),
            "bert-seq_cls": ("glora", *BERT),
            "t5-seq2seq": ("glora", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="GLORA",
    ),
    "hra": Case(
        {
            "llama": ("hra",),
            "bert-seq_cls": ("hra", *BERT),
        },
        identity=True,
        mergeable=True,
        peft_type="HRA",
        peft_counts=True,
    ),
    "ia3": Case({"llama": ("ia3",)}, identity=True, mergeable=True, peft_type="IA3", peft_counts=True),
    "ladder_side_tuning": Case({"llama": ("ladder_side_tuning",)}, identity=True, mergeable=False),
    "lily": Case(
        {
            "llama": ("lily",),
            "names-stride-1-num_B-4": (
                "lily",
                "method.target_modules=[q_proj,v_proj]",
                "method.stride_A=1",
                "method.num_B=4",
            ),
            "bert-seq_cls": ("lily", *BERT),
            "t5-seq2seq": ("lily", *T5),
        },
        identity=True,
        mergeable=False,
        peft_type="LILY",  # peft repeats each shared A and B under every module: no peft_counts
        slow=True,  # tests/test_lily.py's fast rows cover it in the fast tier (its budget: 1 s)
    ),
    "ln_tuning": Case(
        {"llama": ("ln_tuning",), "bert-seq_cls": ("ln_tuning", *BERT), "t5-seq2seq": ("ln_tuning", *T5)},
        identity=True,
        mergeable=True,
        peft_type="LN_TUNING",
        peft_counts=True,
    ),
    "loha": Case(
        {"llama": ("loha",), "bert-seq_cls": ("loha", *BERT), "t5-seq2seq": ("loha", *T5)},
        identity=True,
        mergeable=True,
        peft_type="LOHA",
        peft_counts=True,
    ),
    "lokr": Case(
        {
            "llama": ("lokr",),
            "decompose_both": ("lokr", "method.r=2", "method.decompose_both=true"),
            "bert-seq_cls": ("lokr", *BERT),
            "t5-seq2seq": ("lokr", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="LOKR",
        peft_counts=True,
    ),
    "lora": Case(
        {
            "llama": ("lora",),
            "dora": ("dora",),
            "rslora": ("rslora",),
            "bert-seq_cls": ("lora", *BERT),
            "t5-seq2seq": ("lora", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="LORA",
        peft_counts=True,
    ),
    "mam_adapter": Case({"llama": ("mam_adapter",)}, identity=False, mergeable=False),
    "miss": Case(
        {
            "llama": ("miss",),
            "bat": ("miss", "method.init_weights=bat"),
            "mini": ("miss", "method.init_weights=mini", "method.mini_r=8"),
            "bert-seq_cls": ("miss", *BERT),
            "t5-seq2seq": ("miss", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="MISS",
        peft_counts=True,
    ),
    "multitask_prompt_tuning": Case(
        {
            "llama": ("multitask_prompt_tuning",),
            "bert-seq_cls": ("multitask_prompt_tuning", *BERT),
        },
        identity=False,
        mergeable=False,
        peft_type="MULTITASK_PROMPT_TUNING",
    ),
    "oft": Case(
        {
            "llama": ("oft",),
            "r-exact-cayley": (
                "oft",
                "method.r=4",
                "method.oft_block_size=0",
                "method.use_cayley_neumann=false",
            ),
            "block_share": ("oft", "method.block_share=true"),
            "bert-seq_cls": ("oft", *BERT),
            "t5-seq2seq": ("oft", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="OFT",
        peft_counts=True,
    ),
    "osf": Case(
        {
            "llama": ("osf",),
            "llama-fraction": ("osf", "method.effective_rank=0.25"),
            "bert-seq_cls": ("osf", *BERT),
            "bart-seq2seq": ("osf", "model.name=tiny:bart", "model.task=seq2seq"),
        },
        identity=True,
        mergeable=True,
        peft_type="OSF",
        peft_counts=True,
    ),
    "p_tuning": Case({"llama": ("p_tuning",)}, identity=False, mergeable=False, peft_type="P_TUNING"),
    "p_tuning_v2": Case(
        {"llama": ("p_tuning_v2",)}, identity=False, mergeable=False, peft_type="PREFIX_TUNING"
    ),
    "parallel_adapter": Case({"llama": ("parallel_adapter",)}, identity=True, mergeable=False),
    "peanut": Case(
        {
            "llama": ("peanut",),
            "depth-2-gelu": ("peanut", "method.depth=2", "method.act_fn=gelu", "method.scaling=0.5"),
            "bert-seq_cls": ("peanut", *BERT),
            "t5-seq2seq": ("peanut", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="PEANUT",
        peft_counts=True,
    ),
    "poly": Case(
        {
            "llama": ("poly",),
            "bert-seq_cls": ("poly", *BERT, "method.target_modules=[query,value]"),
            "t5-seq2seq": ("poly", *T5, "method.target_modules=[q,v]"),
        },
        identity=True,
        mergeable=False,
        peft_type="POLY",
        peft_counts=True,
    ),
    "prefix_tuning": Case(
        {"llama": ("prefix_tuning",), "t5-seq2seq": ("prefix_tuning_t5",)},
        identity=False,
        mergeable=False,
        peft_type="PREFIX_TUNING",
        beyond_peft={"t5-seq2seq": "encoder_prefix: true has no peft format (tests/test_encoder_prefix.py)"},
    ),
    "prompt_tuning": Case(
        {"llama": ("prompt_tuning",)}, identity=False, mergeable=False, peft_type="PROMPT_TUNING"
    ),
    "randlora": Case(
        {
            "llama": ("randlora",),
            "no-saved-projection-sparse": (
                "randlora",
                "method.save_projection=false",
                "method.sparse=true",
                "method.projection_prng_key=7",
            ),
            "gpt2": ("randlora", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("randlora", *BERT),
            "t5-seq2seq": ("randlora", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="RANDLORA",
    ),
    "road": Case(
        {
            "llama": ("road",),
            "road_2": ("road", "method.variant=road_2", "method.group_size=32"),
            "road_4": ("road", "method.variant=road_4", "method.group_size=8"),
            "bert-seq_cls": ("road", *BERT),
            "t5-seq2seq": ("road", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="ROAD",
        peft_counts=True,
    ),
    "shadow": Case(
        {
            "llama": ("shadow",),
            "llama-seq_cls": ("shadow", "model.task=seq_cls", "data.format=classification"),
        },
        identity=True,
        mergeable=False,
        peft_type="SHADOW",  # peft stores the exit block's update, which never trains: no peft_counts
    ),
    "shira": Case(
        {
            "llama": ("shira",),
            "weight_magnitude": ("shira", "method.mask_type=weight_magnitude", "method.r=2"),
            "bert-seq_cls": ("shira", *BERT),
            "t5-seq2seq": ("shira", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="SHIRA",
    ),
    "trainable_tokens": Case(
        {
            "llama": ("trainable_tokens",),
            "gpt2-tied": ("trainable_tokens", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("trainable_tokens", *BERT),
            "t5-seq2seq": ("trainable_tokens", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="TRAINABLE_TOKENS",
        peft_counts=False,  # a tied head's rows are written twice (peft's file), trained once
    ),
    "supertuning": Case(
        {
            "llama": ("supertuning",),
            "supra-bottom": ("supertuning", "method.r=4", "method.select_top=false"),
            "bert-seq_cls": ("supertuning", *BERT),
            "t5-seq2seq": ("supertuning", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="SUPERTUNING",
    ),
    "pvera": Case(
        {
            "llama": ("pvera",),
            "no-saved-projection": ("pvera", "method.save_projection=false", "method.projection_prng_key=7"),
            "gpt2": ("pvera", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("pvera", *BERT),
            "t5-seq2seq": ("pvera", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="PVERA",
    ),
    "tinylora": Case(
        {
            "llama": ("tinylora",),
            "tied-no-projection": (
                "tinylora",
                "method.weight_tying=1.0",
                "method.save_projection=false",
                "method.projection_seed=7",
            ),
            "gpt2": ("tinylora", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("tinylora", *BERT),
            "t5-seq2seq": ("tinylora", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="TINYLORA",  # peft stores the frozen SVD factors (and P) too: no peft_counts
    ),
    "unilora": Case(
        {
            "llama": ("unilora",),
            "gpt2": ("unilora", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("unilora", *BERT),
            "t5-seq2seq": ("unilora", *T5),
        },
        identity=False,
        mergeable=True,
        peft_type="UNILORA",
        peft_counts=True,
    ),
    "psoft": Case(
        {
            "llama": ("psoft",),
            "llama-free-pissa": ("psoft", "method.psoft_orth=false", "method.ab_svd_init=pissa_init"),
            "bert-seq_cls": ("psoft", *BERT),
            "t5-seq2seq": ("psoft", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="PSOFT",
        peft_counts=True,
    ),
    "unipelt": Case({"llama": ("unipelt",)}, identity=False, mergeable=False),
    "vblora": Case(
        {
            "llama": ("vblora",),
            "gpt2": ("vblora", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("vblora", *BERT),
            "t5-seq2seq": ("vblora", *T5),
        },
        identity=False,
        mergeable=True,
        peft_type="VBLORA",
        peft_counts=True,
    ),
    "vera": Case(
        {
            "llama": ("vera",),
            "no-saved-projection": ("vera", "method.save_projection=false", "method.projection_prng_key=7"),
            "gpt2": ("vera", "model.name=tiny:gpt2"),
            "bert-seq_cls": ("vera", *BERT),
            "t5-seq2seq": ("vera", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="VERA",
    ),
    "waveft": Case(
        {
            "llama": ("waveft",),
            "gpt2-db2": ("waveft", "model.name=tiny:gpt2", "method.wavelet_family=db2"),
            "bert-seq_cls": ("waveft", *BERT),
            "t5-seq2seq": ("waveft", *T5),
        },
        identity=True,
        mergeable=True,
        peft_type="WAVEFT",
        peft_counts=True,
    ),
    # peft 0.21 drops classifier tensors named like an expert ("layers.0") when saving: no peft_counts
    "xlora": Case({"llama": ("xlora",)}, identity=False, mergeable=False, peft_type="XLORA"),
}


# The fast tier runs each row's first run, and every run of these rows: together they take each task
# (causal_lm, seq_cls, seq2seq) and family the table uses through the kit, export and merge. The full
# suite runs every run of every row.
EVERY_RUN_FAST = {"lora", "ia3", "prefix_tuning"}


def runs(where=lambda case: True) -> list:
    """pytest params (method, run) over every row whose case passes ``where``."""
    return [
        pytest.param(name, run, id=f"{name}-{run}", marks=pytest.mark.slow if slow else ())
        for name, case in METHODS.items()
        if where(case)
        for i, run in enumerate(case.runs)
        for slow in [case.slow or (i > 0 and name not in EVERY_RUN_FAST)]
    ]


def peft_runs() -> list:
    """(method, run) for every run peft can load: the method is in peft, the run's options too."""
    return [
        pytest.param(name, run, id=f"{name}-{run}")
        for name, case in METHODS.items()
        if case.peft_type is not None
        for run in case.runs
        if run not in case.beyond_peft
    ]


def build(name: str, run: str, tmp_path) -> kit.Built:
    recipe_name, *overrides = METHODS[name].runs[run]
    built = kit.build(recipe_name, tmp_path, list(overrides))
    assert built.recipe.method.name == name, f"run {run} builds {built.recipe.method.name}, not {name}"
    return built


def probe(built: kit.Built) -> dict[str, torch.Tensor]:
    """2 rows of 10, the second right-padded after 7; seq2seq targets of 6; task ids 0 and 1 where the
    recipe has them (data.task_id_column)."""
    batch = kit.batch(built.task, built.model.config.vocab_size, lengths=(10, 7), label_length=6)
    if built.recipe.data.task_id_column:
        tasks = getattr(built.recipe.method, "num_tasks", None) or built.recipe.method.n_tasks
        batch["task_ids"] = torch.arange(2) % tasks
    return batch


def plain_base(built: kit.Built):
    return kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)


def stepped(built: kit.Built, batch) -> None:
    """One step of the loop's own Stepper with the recipe's optimizer (moves off init: checks not trivial)."""
    kit.train_step(built.model, built.method, batch, recipe=built.recipe)


# -- the table itself ---------------------------------------------------------------------------------


def test_every_registered_method_has_a_row_and_every_row_a_method():
    registered = {cls.name for cls in list_methods()}
    missing, unknown = sorted(registered - set(METHODS)), sorted(set(METHODS) - registered)
    assert not missing, f"registered methods without a row in tests/test_methods.py METHODS: {missing}"
    assert not unknown, f"rows in METHODS for methods that are not registered: {unknown}"


@pytest.mark.parametrize("name", list(METHODS))
def test_row_states_what_the_method_promises(name):
    cls, case = get_method_class(name), METHODS[name]
    assert (cls.identity_at_init, cls.mergeable) == (case.identity, case.mergeable)
    assert getattr(cls, "peft_type", None) == case.peft_type


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_its_smoke_recipe_and_every_run_a_recipe(name):
    case = METHODS[name]
    assert (kit.TINY / f"{name}.yaml").exists(), f"{name} has no recipes/tiny/{name}.yaml"
    for run, (recipe_name, *_) in case.runs.items():
        assert (kit.TINY / f"{recipe_name}.yaml").exists(), f"run {run}: no recipes/tiny/{recipe_name}.yaml"
    assert set(case.beyond_peft) <= set(case.runs), "beyond_peft names a run the row does not have"


# -- the promises -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,run", runs(lambda case: case.identity))
def test_identity_at_init(name, run, tmp_path):
    built = build(name, run, tmp_path)
    base = plain_base(built)
    if built.task == "seq_cls":  # the head is new and random: give both the same head
        head = {k: v for k, v in built.model.state_dict().items() if k.startswith(("classifier", "score"))}
        base.load_state_dict(head, strict=False)
    batch = probe(built)
    assert (
        kit.max_diff(kit.logits(built.model, batch, built.task), kit.logits(base, batch, built.task)) <= 1e-6
    )


@pytest.mark.parametrize("name,run", runs())
def test_trainable_parameters_match_formula_and_no_base_weight_trains(name, run, tmp_path):
    built = build(name, run, tmp_path)
    model, method = built.model, built.method
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "a method must train something"
    assert sum(p.numel() for p in trainable.values()) == method.expected_trainable_parameters(model)
    base_weight_names = {n for n, _ in plain_base(built).named_parameters() if not n.endswith("bias")}
    assert base_weight_names
    # Base weights may train only as whole-module copies the method declares (modules_to_save).
    saved = tuple(f"{m}." for m in method.saved_modules)
    for n in trainable:
        # Methods that wrap the model (soft prompts) hold it as `base_model`: compare in base naming.
        plain = n.replace(".base_layer.", ".")
        if plain.removeprefix("base_model.") in base_weight_names:
            plain = plain.removeprefix("base_model.")
        assert plain not in base_weight_names or plain.startswith(saved), f"base weight {n} is trainable"


@pytest.mark.parametrize("name,run", runs())
def test_loop_step_moves_adapter_and_leaves_base_bit_identical(name, run, tmp_path):
    built = build(name, run, tmp_path)
    params = dict(built.model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    stepped(built, probe(built))
    params = dict(built.model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen {n} changed"
    moved = [n for n, before in trained.items() if not torch.equal(params[n], before)]
    assert moved, "no trainable parameter moved after a step"


@pytest.mark.parametrize("name,run", runs())
def test_save_then_load_gives_equal_logits(name, run, tmp_path):
    built = build(name, run, tmp_path)
    batch = probe(built)
    stepped(built, batch)
    ours = kit.logits(built.model, batch, built.task)
    kit.save(
        tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe, built.labels
    )
    loaded = load_adapter(tmp_path / "adapter")
    assert kit.max_diff(ours, kit.logits(loaded.model, batch, built.task)) <= 1e-6


@pytest.mark.parametrize("name,run", runs(lambda case: case.mergeable))
def test_merge_gives_equal_logits(name, run, tmp_path):
    built = build(name, run, tmp_path)
    batch = probe(built)
    stepped(built, batch)
    ours = kit.logits(built.model, batch, built.task)
    with torch.no_grad():
        merged = built.method.merge(built.model)
    assert not any(p.requires_grad for p in merged.parameters())
    assert kit.max_diff(ours, kit.logits(merged, batch, built.task)) <= 1e-4


def peft_auto_class(task: str):
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[task]


@pytest.mark.slow
@pytest.mark.parametrize("name,run", peft_runs())
def test_peft_loads_our_adapter_with_our_logits(name, run, tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model_state_dict

    built = build(name, run, tmp_path)
    batch = probe(built)
    stepped(built, batch)
    ours = kit.logits(built.model, batch, built.task)
    assert kit.max_diff(ours, kit.logits(plain_base(built), batch, built.task)) > 1e-4  # moved off the base
    adapter = kit.save(
        tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe, built.labels
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == METHODS[name].peft_type
    extra = {"num_labels": len(built.labels)} if built.labels else {}
    theirs = kit.load_in_peft(adapter, built.base_path, peft_auto_class(built.task), **extra)
    assert kit.max_diff(ours, kit.peft_logits(theirs, batch, built.task)) <= 1e-5
    if METHODS[name].peft_counts:
        stored = sum(t.numel() for t in get_peft_model_state_dict(theirs).values())
        assert stored == built.method.expected_trainable_parameters(built.model)
