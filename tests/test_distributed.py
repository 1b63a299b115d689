"""Distributed training under torchrun (gloo on the CPU): N ranks compute what one process computes.

References and tolerances (fp32, CPU, fixed seeds, OMP_NUM_THREADS=1 per rank):
- 2 processes with micro-batch b vs 1 process with micro-batch 2b (the same global batch): every
  step's logged loss and every adapter tensor within 1e-5 (LoHa's tensors 5e-5: ADAPTER_TOLERANCE), for
  ddp and fsdp with LoRA, fsdp with LoHa, LoKr, VeRA, OFT, BOFT, MiSS (bat), C3A, RandLoRA, RoAd, SHiRA,
  PEANuT, Super-Tuning, DeLoRA and GraLoRA, and AdaLoRA, IA3 and prompt tuning under ddp. The data
  (13 examples, global batch 4, accumulation 2) makes the last micro-batch of each epoch
  a single example, so one rank runs a stand-in that scores nothing;
- the preference objectives under ddp (dpo with either reference, precomputed or not; orpo's
  token-weighted SFT term; kto, whose KL rows and estimate span the ranks; the reward model), on 13
  pairs (examples) batched the same way (a stand-in pair on one rank), with SGD: every logged loss and
  adapter tensor within 1e-5 of one process's;
- grpo under ddp (13 prompts, G = 4, a stand-in slice, loss_type grpo, scale_rewards batch, a KL term),
  SIGKILLed mid-rollout on 2 ranks and resumed: every logged loss, reward statistic and KL, and the
  adapter, within 1e-5 of one uninterrupted process's;
- a two-"node" localhost job (two launches, --nnodes 2) writes one adapter equal to the reference;
- a 2-process run SIGKILLed after a checkpoint and resumed ends with the uninterrupted 2-process
  run's adapter (≤ 1e-6; LoRA dropout 0.1, so every rank's RNG state must be restored);
- resuming it with another world size is refused; a rank that raises fails the whole job within 60 s
  with its error in the output; SIGTERM to the launcher writes one checkpoint and exits 143.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kit import EVAL, HELPERS, ROOT, TRAIN
from safetensors.torch import load_file

import peftcli
from peftcli.methods.catalog import get_method_class
from peftcli.recipe import RecipeError
from peftcli.training.distributed import Dist, LaunchOptions, check_method, init, launch, worker_args, wrap

METHODS = {
    "lora": "{name: lora, r: 4, alpha: 8, dropout: 0.0}",
    "adalora": "{name: adalora, init_r: 4, target_r: 2, alpha: 8, tinit: 1, tfinal: 1, deltaT: 1}",
    "ia3": "{name: ia3}",
    "prompt_tuning": "{name: prompt_tuning, num_virtual_tokens: 4}",
    "loha": "{name: loha, r: 4, alpha: 8}",
    "lokr": "{name: lokr, r: 2, alpha: 4, decompose_both: true}",
    "vera": "{name: vera, r: 16}",
    "oft": "{name: oft, oft_block_size: 16}",
    "boft": "{name: boft, boft_block_size: 8, boft_n_butterfly_factor: 2}",
    "miss": "{name: miss, r: 16, init_weights: bat}",
    "c3a": "{name: c3a, block_size: 16}",
    "randlora": "{name: randlora, r: 16, randlora_alpha: 32}",
    "road": "{name: road, group_size: 16}",
    "shira": "{name: shira, r: 2, random_seed: 0}",
    "peanut": "{name: peanut, r: 4, depth: 1, init_weights: false}",
    "supertuning": "{name: supertuning, sparsity: 0.9}",
    # the auxiliary loss on: it is normalised over the window's targets, as the task loss is
    "shadow": "{name: shadow, r: 4, shadow_dropout: 0.0, init_weights: false, auxiliary_loss_weight: 0.5}",
    "delora": "{name: delora, r: 4}",
    "gralora": "{name: gralora, r: 4, alpha: 8}",
}

# Adapter tolerance where 1e-5 is too tight for the arithmetic, not for the distribution: LoHa's W2b starts
# at zero, so W1a, W1b and W2a get near-zero gradients on their first steps, which Adam normalises to
# lr-sized moves; the rounding of a different batch split (2 ranks x 2 vs 1 x 4) then shows up as 2.2e-5
# on a 0.5 entry, the same under ddp and fsdp (the logged losses still agree within 1e-5).
# Shadow's mirror backbone starts at N(0, 0.02): its MLP weights get near-zero gradient entries that
# Adam turns into lr-sized moves, so the split shows as 7.7e-5 (0.8% of lr) on its down_proj; under SGD
# (lr 0.5, auxiliary loss on) the two adapters agree within 1.2e-7, so the gradients are the same.
ADAPTER_TOLERANCE = {"loha": 5e-5, "shadow": 1.5e-4}


def recipe_text(method: str, batch_size: int, extra: str = "") -> str:
    return f"""
model: {{name: "tiny:llama"}}
data: {{train: {TRAIN}, eval: {EVAL}, format: completion, max_train_examples: 13}}
method: {METHODS[method]}
train: {{max_steps: 4, batch_size: {batch_size}, grad_accum: 2, lr: 1.0e-2, log_every: 1, seed: 5,
         scheduler: cosine, warmup_steps: 1{extra}}}
eval: {{generate: false}}
"""


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def peftcli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftcli", *args]


def torchrun_cmd(nproc: int, script: Path, *args: str | Path) -> list[str]:
    """Plain torchrun around a test-side helper script (the helpers patch the library, then run the CLI)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*cmd, str(script), *map(str, args)]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def train_losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)  # AdaLoRA may prune a layer to rank 0
    return max((a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0 for k in a)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_run(tmp_path: Path, method: str, extra: str = "") -> Path:
    """The reference: one process, micro-batch 4 (= 2 ranks × 2)."""
    recipe = tmp_path / f"{method}-1.yaml"
    recipe.write_text(recipe_text(method, 4, extra))
    peftcli.train(recipe, output_dir=str(tmp_path / "one"))
    return tmp_path / "one"


def two_process_run(tmp_path: Path, method: str, extra: str = "", name: str = "two", text: str = "") -> Path:
    """``peftcli train --nproc-per-node 2`` with micro-batch 2."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text or recipe_text(method, 2, extra))
    run = tmp_path / name
    cmd = peftcli_cmd("train", str(recipe), "-o", str(run), "-q", "--nproc-per-node", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


# -- fast: the pieces --------------------------------------------------------------------------


def test_rank_slices_put_the_global_window_back_in_order():
    window = [[7, 3, 9, 1], [4, 0, 8], [5]]
    ranks = [Dist("ddp", rank, 2) for rank in range(2)]
    slices = [d.rank_slice(window) for d in ranks]
    assert slices[0] == [[7, 3], [4, 0], [5]] and slices[1] == [[9, 1], [8], [5]]
    flags = [d.padding_flags(window) for d in ranks]
    assert flags == [[False, False, False], [False, False, True]]  # rank 1's copy of [5] is a stand-in
    for i, batch in enumerate(window):  # the real slices, concatenated in rank order, are the batch
        assert [x for d, s, f in zip(ranks, slices, flags, strict=True) if not f[i] for x in s[i]] == batch
    three = [Dist("ddp", rank, 3).rank_slice([[1, 2, 3, 4, 5, 6, 7]]) for rank in range(3)]
    assert three == [[[1, 2, 3]], [[4, 5]], [[6, 7]]]
    assert Dist().rank_slice(window) is window


def test_stand_in_batches_score_nothing():
    micro = [{"labels": torch.tensor([[1, 2, -100]])}, {"labels": torch.tensor([[3, 4, 5]])}]
    Dist("ddp", 1, 2).mask_padding(micro, [False, True])
    assert micro[0]["labels"].tolist() == [[1, 2, -100]] and micro[1]["labels"].tolist() == [[-100] * 3]


def test_worker_args_drop_the_launcher_flags():
    argv = ["train", "r.yaml", "--nproc-per-node", "2", "--nnodes=2", "-o", "out", "--master-port", "29500"]
    assert worker_args(argv) == ["train", "r.yaml", "-o", "out"]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        (LaunchOptions(0), "--nproc-per-node"),
        (LaunchOptions(2, nnodes=2), "--nnodes"),
        (LaunchOptions(2, nnodes=2, node_rank=2, master_addr="h"), "--node-rank"),
        (LaunchOptions(2, master_addr="h", rdzv_endpoint="h:1"), "--rdzv-endpoint"),
    ],
)
def test_launcher_refuses_bad_flags(options, key):
    with pytest.raises(RecipeError) as err:
        launch(options, ["train", "r.yaml"])
    assert err.value.key == key


def test_fsdp_needs_several_processes_and_a_method_that_supports_it(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RecipeError, match="more than one process"):
        init("fsdp", "cpu")
    assert init("auto", "cpu") == (Dist(), "cpu")
    check_method(Dist("fsdp", 0, 2), get_method_class("lora"))
    with pytest.raises(RecipeError, match="adalora cannot run under fsdp") as err:
        check_method(Dist("fsdp", 0, 2), get_method_class("adalora"))
    assert err.value.key == "train.distributed"
    with pytest.raises(RecipeError, match="quantized"):
        check_method(Dist("fsdp", 0, 2), get_method_class("lora"), quantized=True)
    check_method(Dist("ddp", 0, 2), get_method_class("lora"), quantized=True)


def test_ddp_leaves_the_frozen_base_alone(tmp_path):
    import torch.distributed as dist

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model.register_buffer("scale", torch.ones(1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = wrap(Dist("ddp", 0, 1), model)
        assert wrapped.module is model
        assert wrapped.parameters_to_ignore == {"0.weight", "0.bias", "scale"}
        assert {id(p) for p in wrapped._module_parameters} == {id(model[1].weight), id(model[1].bias)}
    finally:
        dist.destroy_process_group()


# -- slow: real torchrun jobs ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "mode"),
    [
        ("lora", "ddp"),
        ("lora", "fsdp"),
        ("adalora", "ddp"),
        ("ia3", "ddp"),
        ("prompt_tuning", "ddp"),
        ("loha", "fsdp"),
        ("lokr", "fsdp"),
        ("vera", "fsdp"),
        ("oft", "fsdp"),
        ("boft", "fsdp"),
        ("miss", "fsdp"),
        ("c3a", "fsdp"),
        ("randlora", "fsdp"),
        ("road", "fsdp"),
        ("shira", "fsdp"),
        ("shadow", "ddp"),
        ("peanut", "fsdp"),
        ("supertuning", "fsdp"),
        ("delora", "fsdp"),
        ("gralora", "fsdp"),
    ],
)
def test_two_processes_compute_what_one_process_computes(tmp_path, method, mode):
    one = single_process_run(tmp_path, method)
    two = two_process_run(tmp_path, method, f", distributed: {mode}")
    assert len(train_losses(one)) == 4
    assert max(abs(a - b) for a, b in zip(train_losses(one), train_losses(two), strict=True)) <= 1e-5
    assert max_diff(adapter(one), adapter(two)) <= ADAPTER_TOLERANCE.get(method, 1e-5)
    assert not any(p.name.startswith(".") for p in (two / "checkpoints").iterdir())  # rank 0 wrote once
    if method == "adalora":  # the rank allocation (from the all-reduced gradients) is the same
        config = json.loads((one / "adapter" / "adapter_config.json").read_text())
        assert config == json.loads((two / "adapter" / "adapter_config.json").read_text())
        assert config["rank_pattern"]


DATA = ROOT / "recipes" / "data"


def preference_recipe(batch_size: int, objective: str, data: str = "", model: str = "") -> str:
    """Plain SGD: the adapters then show the gradients themselves equal (≤ 1e-7 measured). Under AdamW a
    few near-zero gradient entries (LoRA A in the first layer, while B is still ~lr) are normalised to
    lr-sized moves, so their rounding shows as ~1.5% of lr (3e-5 at lr 2e-3) though every logged loss
    agrees within 1e-6."""
    data = data or f"train: {DATA / 'tiny_pref_train.jsonl'}, format: preference"
    return f"""
model: {{name: "tiny:llama"{model}}}
data: {{{data}, max_train_examples: 13, max_length: 64}}
method: {METHODS["lora"]}
objective: {objective}
train: {{max_steps: 4, batch_size: {batch_size}, grad_accum: 2, lr: 1.0, optimizer: sgd, log_every: 1, seed: 5,
         scheduler: cosine, warmup_steps: 1, distributed: ddp}}
"""


KTO_DATA = f"train: {DATA / 'tiny_kto_train.jsonl'}, format: unpaired_preference"
GRPO_DATA = f"train: {DATA / 'tiny_grpo_train.jsonl'}, format: prompt"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "data", "model"),
    [
        ("{name: dpo, beta: 0.5}", "", ""),
        ("{name: dpo, beta: 0.5, reference: start, precompute_reference: true}", "", ""),
        ("{name: orpo, beta: 0.2}", "", ""),
        ("{name: kto, beta: 0.5, desirable_weight: 1.5}", KTO_DATA, ""),
        ("{name: reward}", "", ", task: seq_cls"),
    ],
    ids=["dpo", "dpo-start-precomputed", "orpo", "kto", "reward"],
)
def test_preference_objectives_under_ddp_compute_what_one_process_computes(tmp_path, objective, data, model):
    """13 pairs (KTO: examples), global micro-batch 4, accumulation 2: the last micro-batch of each epoch
    is one pair, so rank 1 runs a stand-in that counts for nothing (no pair, no chosen token, no KL row).
    KTO's KL rows cross the ranks' slices (each rank's first row takes the previous rank's last
    completion) and z is the mean over both ranks' rows: one process's z."""
    text = preference_recipe(4, objective, data, model)
    recipe = tmp_path / "one.yaml"
    recipe.write_text(text.replace(", distributed: ddp", ""))
    peftcli.train(recipe, output_dir=str(tmp_path / "one"))
    one = tmp_path / "one"
    two = two_process_run(tmp_path, "lora", text=preference_recipe(2, objective, data, model))
    losses = train_losses(one)
    assert len(losses) == 4 and len(set(losses)) == 4  # the adapter moves every step
    assert max(abs(a - b) for a, b in zip(losses, train_losses(two), strict=True)) <= 1e-5
    assert max_diff(adapter(one), adapter(two)) <= 1e-5


def grpo_recipe(batch_size: int, extra: str = "") -> str:
    """13 prompts, 2 per rank and micro-batch (4 per global one), G = 4 sampled completions each."""
    objective = (
        "{name: grpo, group_size: 4, max_new_tokens: 4, temperature: 1.0, kl_coef: 0.05, loss_type: grpo,"
        " scale_rewards: batch, rewards: [{contains: answer}, {regex: '^[0-9]', weight: 0.5}]}"
    )
    return preference_recipe(batch_size, objective, GRPO_DATA).replace("lr: 1.0,", f"lr: 0.5{extra},")


def train_events(run: Path) -> list[dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "train"]


@pytest.mark.slow
def test_grpo_under_ddp_computes_what_one_process_computes_and_resumes_after_sigkill(tmp_path):
    """GRPO on 2 ranks, killed (SIGKILL) in the rollout of step 4 after the step-2 checkpoint and resumed,
    ends where one uninterrupted process ends: every logged loss, reward, reward_std and KL within 1e-5,
    and the adapter. That takes samples seeded by their row in the whole window (not the rank), the
    window's std (scale_rewards: batch) and statistics over both ranks' completions, loss_type grpo's
    per-micro-batch completion count summed over ranks, the KL's token sums over ranks, and a stand-in
    slice (the 13th prompt alone in its micro-batch) that counts for nothing."""
    recipe = tmp_path / "one.yaml"
    recipe.write_text(grpo_recipe(4).replace(", distributed: ddp", ""))
    peftcli.train(recipe, output_dir=str(tmp_path / "one"))
    recipe = tmp_path / "two.yaml"
    recipe.write_text(grpo_recipe(2, ", save_every: 2"))
    run = tmp_path / "two"
    killer = torchrun_cmd(2, HELPERS / "kill_in_rollout.py", "4", "--", "train", recipe, "-o", run, "-q")
    proc = subprocess.run(killer, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode != 0 and not (run / "adapter").exists()
    assert (run / "checkpoints" / "step-2" / "complete").exists()
    cmd = peftcli_cmd("train", str(recipe), "-o", str(run), "-q", "--resume", "--nproc-per-node", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    keys = ("loss", "reward", "reward_std", "kl", "completion_length", "rewards/contains")
    one, two = train_events(tmp_path / "one"), train_events(run)
    assert [e["step"] for e in two] == [1, 2, 3, 4] and len({e["loss"] for e in one}) == 4
    assert one[0]["reward_std"] > 0 and one[-1]["kl"] > 0  # the advantages and the KL are not all 0
    for a, b in zip(one, two, strict=True):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], abs=1e-5)
    assert max_diff(adapter(tmp_path / "one"), adapter(run)) <= 1e-5


@pytest.mark.parametrize("name", ["dpo", "kto", "reward", "grpo"])
def test_preference_objectives_run_under_ddp_and_are_refused_under_fsdp(name):
    from peftcli.recipe_loader import load_recipe
    from peftcli.training.setup import check_objective

    recipe = load_recipe(ROOT / "recipes" / "objectives" / f"{name}.yaml")
    check_objective(recipe, Dist("ddp", 0, 2))
    why = "its rollout samples with the whole model" if name == "grpo" else "its reference swaps"
    with pytest.raises(RecipeError, match=f"{name} cannot run under fsdp with 2 processes: {why}") as err:
        check_objective(recipe, Dist("fsdp", 0, 2))
    assert err.value.key == "objective.name" and "\n" not in str(err.value)


@pytest.mark.slow
def test_two_nodes_on_localhost_write_one_adapter_equal_to_one_process(tmp_path):
    one = single_process_run(tmp_path, "lora")
    recipe = tmp_path / "two-nodes.yaml"
    recipe.write_text(recipe_text("lora", 2))
    run, port = tmp_path / "nodes", str(free_port())
    procs = [
        subprocess.Popen(
            peftcli_cmd(
                *("train", str(recipe), "-o", str(run), "-q", "--nproc-per-node", "1", "--nnodes", "2"),
                *("--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(),
            cwd=ROOT,
        )
        for node in (0, 1)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert max_diff(adapter(one), adapter(run)) <= 1e-5
    assert sum("adapter written to" in out for out in outputs) == 1  # only global rank 0 reports


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(tmp_path, mode):
    text = recipe_text("lora", 2, f", save_every: 2, distributed: {mode}").replace(
        "dropout: 0.0", "dropout: 0.1"
    )
    full = two_process_run(tmp_path, "lora", name="full", text=text)
    recipe = tmp_path / "killed.yaml"
    recipe.write_text(text)
    run = tmp_path / "killed"
    killer = torchrun_cmd(
        2, HELPERS / "kill_after_checkpoint.py", "2", "--", "train", recipe, "-o", run, "-q"
    )
    proc = subprocess.run(killer, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode != 0
    assert (run / "checkpoints" / "step-2" / "complete").exists() and not (run / "adapter").exists()
    state = json.loads((run / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2

    with pytest.raises(RecipeError) as err:  # another world size is refused (fsdp refuses 1 process first)
        peftcli.train(recipe, output_dir=str(run), resume=True)
    assert (err.value.key, "2 process(es); this run has 1" in str(err.value)) == (
        ("--resume", True) if mode == "ddp" else ("train.distributed", False)
    )

    cmd = peftcli_cmd("train", str(recipe), "-o", str(run), "-q", "--resume", "--nproc-per-node", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert max_diff(adapter(full), adapter(run)) <= 1e-6
    assert train_losses(run) == pytest.approx(train_losses(full), abs=1e-6)


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_whole_job_quickly_with_its_error(tmp_path):
    recipe = tmp_path / "raise.yaml"
    recipe.write_text(recipe_text("lora", 2, "").replace("max_steps: 4", "max_steps: 50"))
    cmd = torchrun_cmd(
        2, HELPERS / "raise_on_rank.py", "1", "2", "--", "train", recipe, "-o", tmp_path / "r", "-q"
    )
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode != 0
    assert time.monotonic() - started < 60 + 30  # + ~30 s of start-up on a loaded 2-core CI box
    assert "injected failure on rank 1 at step 2" in proc.stdout + proc.stderr
    assert not (tmp_path / "r" / "adapter").exists()


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_once_and_exits(tmp_path):
    recipe = tmp_path / "term.yaml"
    recipe.write_text(recipe_text("lora", 2, "").replace("max_steps: 4", "max_steps: 2000"))
    run = tmp_path / "term"
    cmd = peftcli_cmd("train", str(recipe), "-o", str(run), "-q", "--nproc-per-node", "2")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    saved = [p for p in (run / "checkpoints").iterdir() if (p / "complete").exists()]
    assert len(saved) == 1, out
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 2000 and state["world_size"] == 2
    assert out.count("--resume") == 1  # rank 0 alone says how to continue
