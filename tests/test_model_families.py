"""The architecture matrix: every model family × LoRA, (IA)3 and prefix tuning, with their defaults.

Each family is built tiny from its transformers config (``tiny:<family>``: 64 wide, 2 layers, byte
tokenizer; causal LM for decoders, seq2seq for T5/BART, sequence classification for the encoders). Each
case trains 3 steps through the CLI (``peftcli train``, run in-process by Typer's runner) on 10 rows,
then checks the adapter against two references on the real (unpadded) tokens of a fixed batch:

- peft 0.21.2 loads it (``PeftModel.from_pretrained`` on the original base) and gives our logits,
  fp32 on the CPU, to 1e-5;
- ``peftcli merge`` writes a plain transformers model that gives our logits to 1e-4 (mergeable
  methods: LoRA and (IA)3; prefix tuning has nothing to fold).

A method that cannot serve a family must refuse it at start: one line, exit code 2. The test asserts
the exact set of refusals in :data:`REFUSALS`, so a new refusal and a silent pass both fail it; the
family table of docs/methods.md is rendered from the same set (``test_docs_family_table``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kit import ROOT
from torch import nn

from peftcli.inject import is_linear, match_targets, name_matches
from peftcli.methods.adalora import SVDLinear
from peftcli.methods.ia3 import IA3, IA3Config, IA3Linear, default_targets
from peftcli.methods.lora import LoRALinear
from peftcli.methods.unipelt import GatedLoRA
from peftcli.tiny import TINY_ARCHS, ensure_tiny

peft = pytest.importorskip("peft", reason="peft is the oracle of the matrix (pip install -e '.[dev]')")
IA3_TARGETS = peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
IA3_FEEDFORWARD = peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

FAMILIES = list(TINY_ARCHS)
METHODS = ["lora", "ia3", "prefix_tuning"]

# (family, method) -> the reason the method refuses the family at start (a fragment of its one line).
REFUSALS: dict[tuple[str, str], str] = {
    ("deberta-v2", "prefix_tuning"): "DebertaV2Model reads none",
    ("modernbert", "prefix_tuning"): "ModernBertModel reads none",
}
# Cases where peft itself refuses our (trained, saved) adapter, with its message: peft < 0.22 looks for
# ``past_key_values`` in the backbone's forward, which transformers 5.24 renamed ``cache``, so it holds
# BERT/RoBERTa to be models without past key values (tests/test_soft_prompts.py proves our BERT prefixes
# against attention written out).
PEFT_REFUSES: dict[tuple[str, str], str] = {
    ("bert", "prefix_tuning"): "does not support past key values",
    ("roberta", "prefix_tuning"): "does not support past key values",
}


def peft_refuses(family: str, method: str) -> str | None:
    """The message peft refuses this case with, on the installed releases (None: it must load it)."""
    from importlib.metadata import version

    from packaging.version import Version

    renamed = Version(version("transformers")) >= Version("5.24") and Version(version("peft")) < Version(
        "0.22"
    )
    return PEFT_REFUSES.get((family, method)) if renamed else None


MOVED = 1e-4  # the trained adapter changes the logits by more than this (it is not at its init)

PEFT_TOLERANCE = 1e-5
MERGE_TOLERANCE = 1e-4
TEXTS = ["reverse apple =", "reverse a ="]  # different lengths: the second row is padded


def case_recipe(family: str, method: str, tmp_path: Path) -> Path:
    """A recipe that trains ``tiny:<family>`` with ``method``'s defaults for 3 steps on 10 rows."""
    task = TINY_ARCHS[family]["task"]
    if task == "seq_cls":
        data = f"{{train: {ROOT}/recipes/data/tiny_cls_train.jsonl, format: classification"
    else:
        data = f"{{train: {ROOT}/recipes/data/tiny_train.jsonl, format: completion"
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{name: 'tiny:{family}', task: {task}}}\n"
        f"data: {data}, max_length: 32, max_train_examples: 10}}\n"
        f"method: {{name: {method}}}\n"
        "train: {max_steps: 3, batch_size: 4, lr: 1.0e-2, scheduler: constant, seed: 0}\n"
        "eval: {generate: false}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    return path


def train_through_cli(recipe: Path):
    from typer.testing import CliRunner

    from peftcli.cli import app

    return CliRunner().invoke(app, ["train", str(recipe), "-q"])


def probe_logits(model, tokenizer, task: str) -> torch.Tensor:
    """Logits on the real tokens of :data:`TEXTS` (right-padded): (real tokens, V) or (B, labels)."""
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "seq2seq":  # the decoder reads the first few target tokens of each row
        decoder = tokenizer([" elppa", " a"], return_tensors="pt", padding=True)
        inputs["decoder_input_ids"] = decoder["input_ids"]
        inputs["decoder_attention_mask"] = decoder["attention_mask"]
    with torch.no_grad():
        logits = model(**inputs).logits
    if task == "seq_cls":
        return logits
    mask = inputs.get("decoder_attention_mask", inputs["attention_mask"])
    return logits[mask.bool()]


def auto_class(task: str):
    import transformers

    from peftcli.models import TASK_AUTO

    return getattr(transformers, TASK_AUTO[task])


def run_case(family: str, method: str, tmp_path: Path) -> dict:
    """Train one case through the CLI; return its outcome ("refused" with the line, or the logit gaps)."""
    import peftcli
    from peftcli.methods.catalog import get_method_class

    task = TINY_ARCHS[family]["task"]
    result = train_through_cli(case_recipe(family, method, tmp_path))
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return {"outcome": "refused", "lines": lines}
    if result.exit_code != 0:
        return {"outcome": "crashed", "error": repr(result.exception), "output": result.output[-2000:]}
    adapter = tmp_path / "run" / "adapter"
    ours, tokenizer = peftcli.load(adapter)
    reference = probe_logits(ours.eval(), tokenizer, task)

    from peft import PeftModel

    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = auto_class(task).from_pretrained(base_dir, dtype=torch.float32).eval()
    # the adapter must have moved the logits, or "equal to peft" could mean "both at the base"
    outcome = {"outcome": "ok", "moved": (probe_logits(base, tokenizer, task) - reference).abs().max().item()}
    try:  # peft refuses some cases when it runs them, not when it loads them
        theirs = PeftModel.from_pretrained(base, adapter).eval()
        outcome["peft"] = (probe_logits(theirs, tokenizer, task) - reference).abs().max().item()
    except ValueError as err:
        outcome["peft_refused"] = str(err)
    if get_method_class(method).mergeable:
        merged_dir = tmp_path / "merged"
        peftcli.merge(adapter, merged_dir)
        merged = auto_class(task).from_pretrained(merged_dir, dtype=torch.float32).eval()
        outcome["merge"] = (probe_logits(merged, tokenizer, task) - reference).abs().max().item()
    return outcome


CASES = [(f, m) for f in FAMILIES for m in METHODS]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_family_method(family, method, tmp_path):
    outcome = run_case(family, method, tmp_path)
    expected = REFUSALS.get((family, method))
    if expected is not None:
        assert outcome["outcome"] == "refused", f"{family} × {method} should refuse ({expected}): {outcome}"
        assert len(outcome["lines"]) == 1 and expected in outcome["lines"][0], outcome["lines"]
        return
    assert outcome["outcome"] == "ok", outcome
    assert outcome["moved"] > MOVED, outcome
    refusal = peft_refuses(family, method)
    if refusal is not None:
        assert refusal in outcome["peft_refused"], outcome
    else:
        assert outcome["peft"] <= PEFT_TOLERANCE, outcome
    assert outcome.get("merge", 0.0) <= MERGE_TOLERANCE, outcome


# -- (IA)3's structural defaults against peft's per-family tables ------------------------------------

# Where our defaults depart from peft's IA3 tables, and why: {peft's name suffix: ours instead (None: not
# targeted)}. Every other family peft lists must match it exactly, targets and feed-forward set alike.
QUERIES_FOR_KEYS = {"q_proj": "k_proj"}  # peft scales the queries; the paper (and we) the keys
IA3_DEPARTURES: dict[str, dict[str, str | None]] = {
    "qwen2": QUERIES_FOR_KEYS,
    "qwen3": QUERIES_FOR_KEYS,
    "gemma": QUERIES_FOR_KEYS,
    "gemma2": QUERIES_FOR_KEYS,
    "gemma3": QUERIES_FOR_KEYS,
    "phi": QUERIES_FOR_KEYS,
    "bart": QUERIES_FOR_KEYS,
    "opt": {"q_proj": "v_proj"},  # peft: queries and keys; we: keys and values
    # peft's suffix "output.dense" also catches attention.output.dense (and scales its input as if it
    # were the FFN's); we scale the FFN's output.dense only
    "bert": {"attention.output.dense": None},
    "roberta": {"attention.output.dense": None},
    "deberta-v2": {"attention.output.dense": None},
}


def load_tiny(family: str):
    return auto_class(TINY_ARCHS[family]["task"]).from_pretrained(ensure_tiny(family), dtype=torch.float32)


def peft_names_as_ours(names: set[str], departures: dict[str, str | None]) -> set[str]:
    out = set()
    for name in names:
        suffix = next((s for s in departures if name_matches(name, s)), None)
        if suffix is None:
            out.add(name)
        elif departures[suffix] is not None:
            out.add(name[: -len(suffix)] + departures[suffix])
    return out


PEFT_LISTED = [f for f in FAMILIES if TINY_ARCHS[f]["model_type"] in IA3_TARGETS]


@pytest.mark.slow
@pytest.mark.parametrize("family", PEFT_LISTED)
def test_ia3_defaults_match_peft_tables(family):
    model = load_tiny(family)
    model_type = TINY_ARCHS[family]["model_type"]
    names = [n for n, _ in model.named_modules() if n]
    departures = IA3_DEPARTURES.get(family, {})
    peft_targets = {n for n in names if any(name_matches(n, t) for t in IA3_TARGETS[model_type])}
    peft_feedforward = {n for n in names if any(name_matches(n, t) for t in IA3_FEEDFORWARD[model_type])}
    targets, feedforward = default_targets(model)
    assert set(targets) == peft_names_as_ours(peft_targets, departures)
    assert set(feedforward) == peft_names_as_ours(peft_feedforward, departures)
    if departures:  # a departure that no longer departs must leave the table
        assert set(targets) != peft_targets


def test_ia3_defaults_fall_back_to_the_table_for_unread_structures():
    """DistilBERT names its projections k_lin/v_lin, which the structural reading does not know."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2)
    model = DistilBertForSequenceClassification(config)
    assert default_targets(model) is None
    method = IA3(IA3Config(name="ia3"), "seq_cls")
    method.attach(model)
    short = {n.split("layer.0.")[-1] for n in method.targets}
    assert short == {"attention.k_lin", "attention.v_lin", "ffn.lin2"}
    assert [n.split("layer.0.")[-1] for n in method.feedforward] == ["ffn.lin2"]


@pytest.mark.parametrize(
    ("targets", "feedforward"),
    [(["k_proj", "v_proj"], []), (["k_proj", "down_proj"], ["down_proj"])],
    ids=["attention-only", "with-down"],
)
def test_ia3_named_targets_take_the_down_projections_among_them_as_feedforward(targets, feedforward):
    method = IA3(IA3Config(name="ia3", target_modules=targets), "causal_lm")
    method.attach(load_tiny("llama"))
    assert {n.split(".")[-1] for n in method.targets} == set(targets)
    assert sorted({n.split(".")[-1] for n in method.feedforward}) == feedforward


# -- wrapped layers look like their base (T5 reads self.wo.weight.dtype); Falcon's Linear subclass -----


def wrappers_of(base: nn.Module) -> list[nn.Module]:
    return [
        LoRALinear(base, r=2, alpha=2.0, dropout=0.0, use_rslora=False),
        LoRALinear(base, r=2, alpha=2.0, dropout=0.0, use_rslora=False, use_dora=True),
        SVDLinear(base, r=2, alpha=2.0, dropout=0.0),
        IA3Linear(base, is_feedforward=True),
        GatedLoRA(LoRALinear(base, r=2, alpha=2.0, dropout=0.0, use_rslora=False)),
    ]


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_wrapped_layers_look_like_their_base(conv1d):
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(3, 5) if conv1d else nn.Linear(5, 3)
    for wrapper in wrappers_of(base):
        assert wrapper.weight is base.weight and wrapper.bias is base.bias, type(wrapper).__name__
        assert (wrapper.in_features, wrapper.out_features) == (5, 3)
        assert wrapper.fan_in_fan_out == conv1d
        assert not is_linear(wrapper)  # a wrapped layer is never wrapped again by all-linear


def test_all_linear_admits_linear_subclasses_but_not_the_head():
    class FalconLike(nn.Linear):  # FalconLinear subclasses nn.Linear
        pass

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = FalconLike(4, 4)
            self.lm_head = FalconLike(4, 8)

    assert match_targets(Tiny(), "all-linear") == ["body"]


# -- docs/methods.md's family table, rendered from the matrix's expectations --------------------------

NOTES: dict[tuple[str, str], str] = {
    ("mixtral", "lora"): "`all-linear` adapts attention; the experts through `target_parameters`",
    ("qwen3_moe", "lora"): "`all-linear` adapts attention; the experts through `target_parameters`",
    ("mixtral", "ia3"): "keys and values only: the experts are 3-D parameters, not layers",
    ("qwen3_moe", "ia3"): "keys and values only: the experts are 3-D parameters, not layers",
    ("falcon", "prefix_tuning"): "one key/value head (multi-query)",
}
REFUSAL_REASONS = {"prefix_tuning": "its attention reads no KV cache; use prompt_tuning or p_tuning"}


def family_table() -> str:
    """The family × method table of docs/methods.md (## Model families)."""
    lines = [
        "| family | built as | " + " | ".join(f"`{m}`" for m in METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for family in FAMILIES:
        spec = TINY_ARCHS[family]
        cells = []
        for method in METHODS:
            if (family, method) in REFUSALS:
                cells.append(f"refused: {REFUSAL_REASONS[method]}")
            elif (family, method) in PEFT_REFUSES:
                cells.append("yes; peft < 0.22 refuses to run it under transformers ≥ 5.24")
            else:
                note = NOTES.get((family, method))
                cells.append(f"yes ({note})" if note else "yes")
        built = f"`{spec['model_type']}`, {spec['task']}"
        lines.append(f"| `tiny:{family}` | {built} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_docs_family_table():
    """docs/methods.md shows exactly what the matrix asserts (regenerate: python tests/test_model_families.py --table)."""
    assert family_table() in (ROOT / "docs" / "methods.md").read_text()


if __name__ == "__main__":  # the outcomes: python tests/test_model_families.py [family ... | --table]
    import sys
    import tempfile

    if sys.argv[1:] == ["--table"]:
        print(family_table(), end="")
        sys.exit()
    for family in sys.argv[1:] or FAMILIES:
        for method in METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    outcome = run_case(family, method, Path(tmp))
                except Exception as err:  # the table records crashes outside training too
                    outcome = {"outcome": "crashed", "error": f"{type(err).__name__}: {str(err)[:200]}"}
            print(family, method, json.dumps(outcome)[:400], flush=True)
