"""Fetch, here, the wheels bench/gpu.py needs on the GPU machine, which has no network.

    python bench/gpu_wheels.py            # writes .whl/ (git-ignored; ~22 MiB), then prints the command

The GPU machine's image has torch (2.11, CUDA 13), accelerate, tokenizers, safetensors, pyarrow, typer,
rich and peft, but transformers 5.17 (peftcli needs ≥ 5.24) and no datasets, bitsandbytes, trl or
liger-kernel (docs/gpu.md). These travel with the working tree, which is capped at 64 MiB: the
bitsandbytes wheel (43 MiB) is rewritten without the libraries for other CUDA versions and ROCm (the
machine's torch is built for CUDA 13). flash-attn has no wheel for that torch on PyPI: the packed check
and the throughput rows record it as absent.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".whl"
# The versions the tests here ran with where installed; else these pins.
PINS = {
    "transformers": "5.24.0",
    "datasets": "5.2.0",
    "dill": "0.4.1",
    "multiprocess": "0.70.19",
    "peft": "0.21.2",
    "bitsandbytes": "0.50.2",
    "regex": "2026.11.19",  # transformers checks regex ≥ 2025.10.22 at import
    "trl": "1.16.0",
    "liger-kernel": "0.8.5",
}
KEEP_LIBRARIES = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]
COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    ".whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
    "PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT/gpu --work /tmp/gpu-work"
)


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return PINS[name]


def slim(wheel: Path) -> None:
    """Rewrite ``wheel`` without the shared libraries the GPU machine cannot use (and their RECORD lines)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = Path(item.filename).name
            if name.startswith("libbitsandbytes_") and name not in KEEP_LIBRARIES:
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                kept = [
                    line
                    for line in lines
                    if not (
                        Path(line.split(",")[0]).name.startswith("libbitsandbytes_")
                        and Path(line.split(",")[0]).name not in KEEP_LIBRARIES
                    )
                ]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(item, data)
    tmp.replace(wheel)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.whl"):
        old.unlink()
    specs = [f"{name}=={version(name)}" for name in PINS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"),
            *("--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(OUT), *specs),
        ],
        check=True,
    )
    for wheel in OUT.glob("bitsandbytes-*.whl"):
        slim(wheel)
    total = sum(w.stat().st_size for w in OUT.glob("*.whl"))
    print("\n".join(sorted(w.name for w in OUT.glob("*.whl"))))
    print(f"{total / 2**20:.1f} MiB in {OUT}; on the GPU machine (carry .whl):\n{COMMAND}")


if __name__ == "__main__":
    main()
