"""Which attention path should packed rows take on this device? Four correct ways, timed.

    python bench/packed_attention.py --quick   # tiny sizes: proves the script works
    python bench/packed_attention.py           # llama hidden 256 × 4 layers, 32k vocab, 4 rows × 1,024

For one packed micro-batch of lognormal-length examples, forward + backward (LoRA-free: the base
weights train, which costs the same attention work; the loss is peftcli's fused linear
cross-entropy, as in the training loop) through:

    position_ids   attention_mask=None, position_ids restarting per example: transformers builds the
                   block-diagonal causal mask itself (what peftcli's packing uses)
    mask_4d        an explicit (R, 1, T, T) block-diagonal causal additive mask + position_ids
    per_example    one forward per example (batch 1, no mask, no padding)
    peftcli_sdpa   the packed rows through peftcli's attention (peftcli/training/attention.py): one causal
                   SDPA call per example inside each layer, no mask (what ``train.packing`` uses on the CPU)

Checks that the four losses agree (fp32, 1e-5), then reports the median seconds of ``--repeats``
interleaved runs. Writes bench/results/packed_attention.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from peftcli.training.attention import ATTENTION_NAME, register  # noqa: E402
from peftcli.training.loss import fused_linear_cross_entropy_sum  # noqa: E402

register()


def build(args):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.row_tokens,
        attn_implementation=args.attn,
    )
    return LlamaForCausalLM(config).train()


def packed_rows(args) -> list[list[torch.Tensor]]:
    rng = np.random.default_rng(0)
    rows, current, used = [], [], 0
    while len(rows) < args.rows:
        n = int(np.clip(rng.lognormal(args.length_mu, 0.9), 16, args.row_tokens))
        if used + n > args.row_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(torch.from_numpy(rng.integers(4, args.vocab, n)))
        used += n
    return rows


def flat(rows):
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, example in enumerate(row):
            n = len(example)
            ids[r, at : at + n], pos[r, at : at + n], seg[r, at : at + n] = example, torch.arange(n), k
            labels[r, at + 1 : at + n] = example[1:]
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding tail: a segment of its own
        seg[r, at:] = len(row)
    return ids, pos, seg, labels


def loss_of(model, ids, labels, **kwargs):
    """Summed loss as peftcli's loop computes it: the body's hidden states, then the fused linear
    cross-entropy over the positions with a target (no full logits), so the timing is the attention's
    and the body's, not that of materializing (tokens × vocab) logits."""
    hidden = model.model(input_ids=ids, **kwargs).last_hidden_state
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    scored = shifted != -100
    return fused_linear_cross_entropy_sum(hidden[scored], model.lm_head, shifted[scored])


def run(model, rows, path: str, attention: str) -> tuple[float, float]:
    """(seconds, summed loss) of one forward + backward on ``path``; ``attention`` is --attn."""
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation(ATTENTION_NAME if path == "peftcli_sdpa" else attention)
    start = time.perf_counter()
    if path == "per_example":
        total = 0.0
        for row in rows:
            for example in row:
                ids = example[None]
                loss = loss_of(model, ids, ids.clone(), use_cache=False)
                loss.backward()
                total += loss.item()
    else:
        ids, pos, seg, labels = flat(rows)
        kwargs = {"position_ids": pos, "use_cache": False}
        if path == "mask_4d":
            same = seg[:, :, None] == seg[:, None, :]
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
            allowed = (same & causal)[:, None]  # (R, 1, T, T)
            # additive float mask: eager reads it as a bias, sdpa as attn_mask (a boolean one is not eager's)
            kwargs["attention_mask"] = torch.zeros(allowed.shape).masked_fill(
                ~allowed, torch.finfo(torch.float32).min
            )
        loss = loss_of(model, ids, labels, **kwargs)
        loss.backward()
        total = loss.item()
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--rows", type=int, default=4, help="packed rows (4 × 1,024 = a batch_tokens of 4,096)"
    )
    parser.add_argument("--row-tokens", type=int, default=1024)
    parser.add_argument("--length-mu", type=float, default=4.5)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.row_tokens, args.length_mu, args.repeats = (
            64,
            2,
            1000,
            128,
            3.5,
            2,
        )
    model, rows = build(args), packed_rows(args)
    paths = ["position_ids", "mask_4d", "per_example", "peftcli_sdpa"]
    times: dict[str, list[float]] = {p: [] for p in paths}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for path in paths:
            seconds, losses[path] = run(model, rows, path, args.attn)
            times[path].append(seconds)
    agree = max(abs(losses[p] - losses["per_example"]) / abs(losses["per_example"]) for p in paths)
    results = {
        p: {"median_s": statistics.median(t), "all_s": t, "loss_sum": losses[p]} for p, t in times.items()
    }
    command = "python bench/packed_attention.py " + " ".join(sys.argv[1:])
    payload = {
        "command": command,
        "settings": vars(args),
        "torch": torch.__version__,
        "results": results,
        "max_relative_loss_difference": agree,
        "examples": sum(len(r) for r in rows),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed_attention.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [
        f"# Packed attention paths ({args.attn}, CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"{payload['examples']} examples in {args.rows} rows of ≤ {args.row_tokens} tokens; forward + backward; "
        f"median of {args.repeats} interleaved runs. Losses agree to {agree:.1e} (relative).",
        "",
        "| path | median s |",
        "|---|---|",
    ]
    md += [f"| {p} | {r['median_s']:.3f} |" for p, r in results.items()]
    (out / "packed_attention.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if agree > 1e-5:
        sys.exit(f"the attention paths disagree: {agree:.2e}")


if __name__ == "__main__":
    main()
