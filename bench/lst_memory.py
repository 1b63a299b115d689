"""Training memory of ladder side-tuning vs LoRA on the same model and batch.

    python bench/lst_memory.py            # writes bench/results/lst_memory.{md,json}
    python bench/lst_memory.py --quick    # a smaller model, for a smoke check

Each method runs one training step (forward, loss, backward, AdamW step) in a fresh subprocess on the
same randomly initialised llama-architecture model (fp32) and the same batch, and we record:

- ``saved_activation_mb``: bytes autograd keeps for backward, summed over distinct storages
  (``torch.autograd.graph.saved_tensors_hooks``): the part of training memory that depends on the
  method, and the one LST is designed to remove;
- ``trainable_state_mb``: trainable parameters × 4 bytes × 4 (weights, gradients, AdamW's two moments);
- ``peak_rss_mb``: the subprocess's peak resident memory (``ru_maxrss``), which also counts the frozen
  weights, the allocator and the Python runtime;
- ``peak_cuda_mb``: ``torch.cuda.max_memory_allocated`` when a GPU is visible (else null).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 8192,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
QUICK_MODEL = {
    **MODEL,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
BATCH, SEQ = 8, 256
METHODS = {
    "lora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
    "ladder_side_tuning": {"name": "ladder_side_tuning", "reduction_factor": 8},
}


def measure(method_name: str, quick: bool) -> dict:
    """One training step of ``method_name``; runs in its own process so peak RSS is its own."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.methods.catalog import get_method_class
    from peftcli.methods.registry import count_parameters
    from peftcli.recipe import from_dict
    from peftcli.training.loop import token_loss_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(QUICK_MODEL if quick else MODEL))).to(device)
    method_cls = get_method_class(method_name)
    method = method_cls(from_dict(method_cls.config_cls, METHODS[method_name], "method"), "causal_lm")
    model = method.attach(model).to(device)
    model.train()
    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen).to(device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss_sum, n = token_loss_sum(logits, ids, "causal_lm")
        loss = loss_sum / n
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    frozen_params = {id(p) for p in model.parameters() if not p.requires_grad}
    frozen_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters() if id(p) in frozen_params)
    # frozen weights that autograd saves (e.g. a linear layer's weight) are not extra memory
    weight_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(nbytes for ptr, nbytes in storages.items() if ptr not in weight_ptrs)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {
        "method": method_name,
        "options": METHODS[method_name],
        "device": str(device),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "saved_activation_mb": round(saved / 2**20, 1),
        "trainable_state_mb": round(trainable * 4 * 4 / 2**20, 1),
        "frozen_weights_mb": round(frozen_bytes / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": None if peak_cuda is None else round(peak_cuda, 1),
        "step_s": round(step_s, 2),
    }


def markdown(report: dict) -> str:
    rows = report["results"]
    lora = next(r for r in rows if r["method"] == "lora")
    lines = [
        "# Ladder side-tuning vs LoRA: training memory",
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"Model: llama architecture, random init, fp32, {report['model']['num_hidden_layers']} layers, "
            f"hidden {report['model']['hidden_size']}, FFN {report['model']['intermediate_size']}, "
            f"vocab {report['model']['vocab_size']}; batch {report['batch']} × {report['seq']} tokens; "
            f"one forward + backward + AdamW step on {rows[0]['device']} ({report['machine']})."
        ),
        "",
        (
            "| method | trainable params | saved activations (MB) | trainable state (MB) | activations + state (MB) "
            "| peak RSS (MB) | peak CUDA (MB) | step (s) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        both = r["saved_activation_mb"] + r["trainable_state_mb"]
        lines.append(
            f"| {r['method']} | {r['trainable_parameters']:,} | {r['saved_activation_mb']} | "
            f"{r['trainable_state_mb']} | {both:.1f} | {r['peak_rss_mb']} | {r['peak_cuda_mb'] or '–'} | "
            f"{r['step_s']} |"
        )
    lst = next(r for r in rows if r["method"] == "ladder_side_tuning")
    ratio = lst["saved_activation_mb"] / max(lora["saved_activation_mb"], 1e-9)
    summary = (
        f"LST keeps {ratio:.1%} of LoRA's saved activations "
        f"({lst['saved_activation_mb']} MB vs {lora['saved_activation_mb']} MB); peak RSS "
        f"{lst['peak_rss_mb']} MB vs {lora['peak_rss_mb']} MB (RSS includes the "
        f"{lora['frozen_weights_mb']} MB of frozen weights and the runtime)."
    )
    lines += ["", summary, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.quick)))
        return
    results = []
    for name in METHODS:
        cmd = [sys.executable, __file__, "--one", name] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1])
    import torch
    import transformers

    report = {
        "command": "python bench/lst_memory.py" + (" --quick" if args.quick else ""),
        "model": QUICK_MODEL if args.quick else MODEL,
        "batch": BATCH,
        "seq": SEQ,
        "machine": f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "results": results,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "lst_memory_quick" if args.quick else "lst_memory"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
