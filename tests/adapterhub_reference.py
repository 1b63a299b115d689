"""Reference outputs from AdapterHub's ``adapters`` package, for tests/test_adapterhub_parity.py.

Runs in a *separate* Python that has ``adapters`` installed: adapters 1.3.0 requires
``transformers~=4.57.6`` and cannot be imported next to peftcli's transformers 5.x. It builds a tiny
BERT (seed 0), saves the base, adds one bottleneck adapter with random weights, and saves the inputs,
the adapter tensors and ``last_hidden_state`` (eval mode) to ``OUT/reference.safetensors``.

    PYTHON_WITH_ADAPTERS tests/adapterhub_reference.py OUT {houlsby|pfeiffer_houlsby_placement|parallel}
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(out: Path, kind: str) -> None:
    import adapters
    from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=300,
            max_position_embeddings=64,
        )
    )
    model.save_pretrained(out / "base")
    adapters.init(model)
    config = {
        "houlsby": DoubleSeqBnConfig(reduction_factor=16),  # attn + ffn, swish
        # SeqBnConfig is AdapterHub's Pfeiffer; its default re-applies the LayerNorm before the adapter
        # (original_ln_before=True). With original_ln_before=False it is Houlsby's placement on the FFN only.
        "pfeiffer_houlsby_placement": SeqBnConfig(reduction_factor=16, original_ln_before=False),
        "parallel": ParBnConfig(reduction_factor=16, scaling=4.0),
    }[kind]
    model.add_adapter("a", config=config)
    model.set_active_adapters("a")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters.a." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    ids = torch.randint(5, 300, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    tensors = {
        f"adapter.{n}": p.detach().contiguous() for n, p in model.named_parameters() if ".adapters.a." in n
    }
    tensors.update(input_ids=ids, attention_mask=mask, last_hidden_state=hidden.contiguous())
    save_file(tensors, str(out / "reference.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
