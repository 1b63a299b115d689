"""Our bottleneck adapters against AdapterHub's ``adapters`` (the reference implementation), same weights.

Reference: ``last_hidden_state`` of a tiny BERT computed by ``adapters`` 1.3.0 (fp32, CPU, eval mode)
with random adapter weights; ours must match to ≤ 1e-5 after copying those weights in.

``adapters`` 1.3.0 requires ``transformers~=4.57.6`` and cannot be imported next to transformers 5.x, so
the reference runs in a separate Python named by ``PEFTCLI_ADAPTERHUB_PYTHON`` (a venv with
``pip install torch adapters``); without it these tests skip.

- ``houlsby`` ↔ ``DoubleSeqBnConfig`` (attn + FFN, swish);
- ``pfeiffer`` ↔ ``SeqBnConfig(original_ln_before=False)``: AdapterHub's default Pfeiffer also feeds the
  adapter ``LayerNorm(h + residual)`` instead of ``h`` (``original_ln_before=True``); our preset keeps
  Houlsby's placement for every family, so it equals AdapterHub's Pfeiffer with that flag off;
- ``parallel`` ↔ ``ParBnConfig(scaling=4)`` (reads the FFN input, adds before the LayerNorm).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from kit import ROOT
from safetensors.torch import load_file

from peftcli.methods.houlsby_adapter import HoulsbyAdapter, HoulsbyConfig
from peftcli.methods.parallel_adapter import ParallelAdapter, ParallelAdapterConfig

PYTHON = os.environ.get("PEFTCLI_ADAPTERHUB_PYTHON")

pytestmark = pytest.mark.skipif(
    not PYTHON or not Path(PYTHON).exists(),
    reason="adapters 1.3.0 pins transformers~=4.57.6 (incompatible with transformers 5.x in this env); "
    "set PEFTCLI_ADAPTERHUB_PYTHON to a Python with `adapters` installed to run the parity check",
)

CASES = {
    "houlsby": lambda: HoulsbyAdapter(
        HoulsbyConfig(name="houlsby_adapter", config="houlsby", train_layer_norms=False)
    ),
    "pfeiffer_houlsby_placement": lambda: HoulsbyAdapter(
        HoulsbyConfig(name="houlsby_adapter", config="pfeiffer")
    ),
    "parallel": lambda: ParallelAdapter(
        ParallelAdapterConfig(name="parallel_adapter", reduction_factor=16, scaling=4.0)
    ),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_forward_equals_adapterhub(kind, tmp_path):
    from transformers import BertModel

    subprocess.run(
        [PYTHON, str(ROOT / "tests" / "adapterhub_reference.py"), str(tmp_path), kind],
        check=True,
        capture_output=True,
        text=True,
    )
    ref = load_file(str(tmp_path / "reference.safetensors"))
    model = BertModel.from_pretrained(tmp_path / "base")
    model.eval()
    method = CASES[kind]()
    model = method.attach(model)
    ours = {}
    for (
        sub
    ) in method.sublayers:  # AdapterHub: <layer>.attention.output.adapters.a.* / <layer>.output.adapters.a.*
        owner = sub.output_module.removesuffix(".dense")
        block = model.get_submodule(sub.output_module).adapter.bottleneck
        ours[f"adapter.{owner}.adapters.a.adapter_down.0.weight"] = block.down.weight
        ours[f"adapter.{owner}.adapters.a.adapter_down.0.bias"] = block.down.bias
        ours[f"adapter.{owner}.adapters.a.adapter_up.weight"] = block.up.weight
        ours[f"adapter.{owner}.adapters.a.adapter_up.bias"] = block.up.bias
    assert set(ours) == {k for k in ref if k.startswith("adapter.")}  # same adapters in the same places
    with torch.no_grad():
        for key, param in ours.items():
            param.copy_(ref[key])
        hidden = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
        base = BertModel.from_pretrained(tmp_path / "base").eval()
        plain = base(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    assert (plain - ref["last_hidden_state"]).abs().max().item() > 1e-2  # the adapters do change the output
    assert (hidden - ref["last_hidden_state"]).abs().max().item() <= 1e-5
