"""GGUF, GGUF-LoRA and Ollama export (peftcli/gguf.py).

References and tolerances:

- llama.cpp itself (llama-cpp-python 0.3.36, which builds llama.cpp from source when installed: 29
  minutes on a busy 2-core CPU, see docs/export.md) loads every exported file. Its tokens for the
  test prompts equal the transformers tokenizer's, exactly. Its logits equal the transformers model's:
  f32 and f16 within 2% of the largest |logit|; q8_0 with the same argmax on >= 90% of positions.
- ``--format gguf-lora`` applied by llama.cpp on the base's f32 GGUF (``lora_path``) gives the logits of
  the adapter merged by ``peftcli merge`` in transformers, within 2% of the largest |logit|.
- The Ollama Modelfile's TEMPLATE, rendered by a small Go text/template renderer of the subset we emit,
  equals the chat template rendered by jinja (transformers' ``apply_chat_template``).

The families are table-driven: one tiny model each (64 wide, 2 layers, random weights, seed 0; fitted for
60 steps to CORPUS for the logits tests, so next-token choices are not near ties) with a BPE tokenizer
trained here, byte-level with a pre-tokenizer llama.cpp names (Llama 3's regex, Qwen 2's, GPT-2's) so a
wrong pre-tokenizer name changes the tokens, or SentencePiece-style with byte fallback. Gemma 2/3 use an 8-token sliding window and prompts
longer than it, so the window and the layer pattern are checked too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'peftcli[gguf]'")

from peftcli.chat_templates import CHATML, LLAMA3  # noqa: E402
from peftcli.gguf import (  # noqa: E402
    _LLAMA3_REGEX,
    _QWEN2_REGEX,
    derive_chat_format,
    export_gguf,
    export_gguf_lora,
    export_ollama,
    read_vocabulary,
)
from peftcli.recipe import RecipeError  # noqa: E402

# Gemma's own template: no system role, "model" for the assistant, <end_of_turn> closing each turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]  # fmt: skip

# Llama 3.1's rope scaling, with a short original context so all three frequency bands occur at head_dim 16
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
# family -> (model_type, config changes, pre-tokenizer (or sentencepiece[-prefix]), ignore_merges, adds BOS, chat template)
FAMILIES = {
    "llama": ("llama", {}, "llama3", True, True, LLAMA3),
    "llama3.1": ("llama", {"head_dim": 16, "rope_parameters": LLAMA31_ROPE}, "llama3", True, True, LLAMA3),
    "mistral": ("mistral", {"sliding_window": None, "head_dim": 16}, "gpt2", False, True, CHATML),
    "mistral-spm": ("mistral", {"sliding_window": None}, "sentencepiece-prefix", False, True, CHATML),
    "qwen2": ("qwen2", {}, "qwen2", False, False, CHATML),
    "qwen3": ("qwen3", {"head_dim": 16}, "qwen2", False, False, CHATML),
    "gemma": ("gemma", {"head_dim": 16}, "llama3", False, True, GEMMA_TEMPLATE),
    "gemma-spm": ("gemma", {"head_dim": 16}, "sentencepiece", False, True, GEMMA_TEMPLATE),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}, "gpt2", False,
               True, GEMMA_TEMPLATE),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}, "qwen2",
               False, True, GEMMA_TEMPLATE),
    "phi3": ("phi3", {}, "llama3", True, False, CHATML),
}  # fmt: skip

PROMPTS = [
    "Hello world! I'm sure they'll say it's 12345 or 3.14159, aren't they?",
    "  leading spaces,\ttabs\n\nand   runs of   spaces \n",
    "naïve café — 中文字符 and emoji 🦙🚀 ... ?! Straße 5€",  # ß and € are in no vocabulary: bytes
    "<|im_start|>user\nReverse 'abc'.<|im_end|>\n<|im_start|>assistant\n",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm here, you're there, they'll come, we've gone.",
    "Numbers: 1 22 333 4444 55555 3.14159 2024-12-04 1,000,000 and 0x1F.",
    "def reverse(word):\n    return word[::-1]  # reversed\n\n\tindented\ttext",
    "Unicode: naïve café résumé — 中文字符 日本語 한국어 emoji 🦙🚀 ✅",
    "Hello world! Hello there. Reverse 'abc' to get 'cba'. Sure, it's easy!",
] * 20


def build_tokenizer(pre: str, ignore_merges: bool, add_bos: bool):
    """A byte-level BPE (vocab ~700) trained on CORPUS, pre-tokenized as llama.cpp's ``pre`` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre == "gpt2")
    if pre == "gpt2":
        tok.pre_tokenizer = byte_level
    else:
        regex = {"llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}[pre]
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )  # fmt: skip


def build_sentencepiece_tokenizer(prefix: bool, add_bos: bool):
    """A SentencePiece-style BPE as transformers converts one (Llama 2, Mistral, Gemma): spaces written as
    ▁ (and one put before the text when ``prefix``), byte fallback to <0xXX> tokens, and a merge for every
    way of cutting a token in two, ranked by the token's rank."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    space = [normalizers.Replace(" ", "▁")]
    normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else []) + space)
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    learnt = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    vocab = {text: i for i, text in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for text, _ in learnt:
        vocab.setdefault(text, len(vocab))
    merges = [
        (text[:i], text[i:])
        for text, _ in learnt
        for i in range(1, len(text))
        if text[:i] in vocab and text[i:] in vocab
    ]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )  # fmt: skip


def fit(model, tokenizer, steps: int = 60) -> None:
    """A few AdamW steps on CORPUS: a random model's next-token choices are near ties that any rounding
    flips; after fitting, its top logit stands out as a trained model's does, and q8_0's argmax test
    measures the export rather than noise."""
    batch = tokenizer(CORPUS[:5], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_family(family: str, path: Path, trained: bool = False) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, changes, pre, ignore_merges, add_bos, template = FAMILIES[family]
    if pre.startswith("sentencepiece"):
        tokenizer = build_sentencepiece_tokenizer(pre.endswith("prefix"), add_bos)
    else:
        tokenizer = build_tokenizer(pre, ignore_merges, add_bos)
    tokenizer.chat_template = template
    size = len(tokenizer)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=size + 5,  # rows no token uses, as real checkpoints pad their embeddings
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # peaked logits, so argmax agreement means something
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **changes,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their init value (1, or 0 for Gemma), so +1 shifts show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    if trained:
        fit(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # transformers would otherwise pick the family's own tokenizer class (and its own pre-tokenizer)
    config_file = path / "tokenizer_config.json"
    config_json = json.loads(config_file.read_text())
    config_json["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config_json))
    return path


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    built: dict[tuple[str, bool], Path] = {}

    def get(family: str, trained: bool = False) -> Path:
        if (family, trained) not in built:
            built[family, trained] = build_family(family, tmp_path_factory.mktemp(family), trained)
        return built[family, trained]

    return get


def hf_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------------------
# fast: the file's metadata, refusals, the Ollama template


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_metadata_round_trips_through_the_gguf_reader(family, family_dir, tmp_path):
    model_dir = family_dir(family)
    out = tmp_path / "m.gguf"
    result = export_gguf(model_dir, out, "f16")
    reader = gguf.GGUFReader(out)
    fields = {name: f for name, f in reader.fields.items()}

    def value(key):
        return fields[key].contents()

    tokenizer = hf_tokenizer(model_dir)
    vocab = tokenizer.get_vocab()
    tokens = value("tokenizer.ggml.tokens")
    assert all(tokens[i] == text for text, i in vocab.items())
    pre = {"llama3": "llama-bpe", "qwen2": "qwen2", "gpt2": "gpt-2"}[FAMILIES[family][2]]
    assert value("tokenizer.ggml.pre") == pre
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.ggml.add_bos_token") == FAMILIES[family][4]
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    assert result["tensors"] == len(reader.tensors)
    end_of_turn = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "gemma2": "<end_of_turn>"}[family]
    assert value("tokenizer.ggml.eot_token_id") == vocab[end_of_turn]
    assert result["stops"] == ["</s>", end_of_turn]


def test_unknown_family_is_one_line_naming_the_supported(tmp_path):
    from typer.testing import CliRunner

    from peftcli.cli import app

    out = tmp_path / "x.gguf"
    result = CliRunner().invoke(app, ["export", "tiny:gpt2", "--format", "gguf", "--output", str(out)])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert (
        "'gpt2'" in lines[0] and "gemma, gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3" in lines[0]
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("regex", "none of llama.cpp's named ones"),
        ("prefix_space", "adds a space before the text"),
        ("byte_fallback", "byte-fallback BPE splits or normalizes text"),
        ("sentencepiece_merge", "with no merge for it"),
    ],
)
def test_unrepresentable_tokenizers_are_refused_with_the_reason(change, why):
    from tokenizers import Regex, pre_tokenizers

    tokenizer = build_tokenizer("qwen2", False, False)
    backend = tokenizer.backend_tokenizer
    if change == "sentencepiece_merge":  # one way of cutting a token is no merge: llama.cpp would use it
        from tokenizers import Tokenizer

        tokenizer = build_sentencepiece_tokenizer(prefix=False, add_bos=False)
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        merges = spec["model"]["merges"]
        cut = next(
            i for i, m in enumerate(merges) if any(n[0] + n[1] == m[0] + m[1] for n in merges[i + 1 :])
        )
        del merges[cut]
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    elif change == "regex":  # Qwen's regex with digits in pairs: a split llama.cpp has no name for
        regex = _QWEN2_REGEX.replace(r"\p{N}|", r"\p{N}{1,2}|", 1)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif change == "prefix_space":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        spec = json.loads(backend.to_str())
        spec["model"]["byte_fallback"] = True
        from tokenizers import Tokenizer

        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(RecipeError, match=why) as err:
        read_vocabulary(tokenizer, len(tokenizer) + 5)
    assert "\n" not in str(err.value)


GO_ACTION = re.compile(r'{{-?\s*((?:"(?:[^"\\]|\\.)*"|[^"}])*?)\s*-?}}')


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """Go text/template, the subset ``ollama_template`` emits: quoted string constants, ``.Content``,
    ``range .Messages``, ``if`` / ``else if eq .Role "x"``, ``end``, and the ``{{-`` / ``-}}`` trims."""
    tokens: list[tuple[str, str]] = []  # ("text", s) or ("action", s), trims applied
    position, trim_next = 0, False
    for match in GO_ACTION.finditer(template):
        text = template[position : match.start()]
        text = text.lstrip() if trim_next else text
        tokens.append(("text", text.rstrip() if match.group(0).startswith("{{-") else text))
        tokens.append(("action", match.group(1)))
        position, trim_next = match.end(), match.group(0).endswith("-}}")
    tail = template[position:]
    tokens.append(("text", tail.lstrip() if trim_next else tail))

    def parse(i: int, stop: tuple[str, ...]) -> tuple[list, int]:
        """Nodes until an action starting with one of ``stop``; returns them and that action's index."""
        nodes: list = []
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "action" and value.startswith(stop):
                return nodes, i
            if kind == "text" or value == ".Content" or value.startswith('"'):
                nodes.append((kind, value))
                i += 1
            elif value == "range .Messages":
                body, i = parse(i + 1, ("end",))
                nodes.append(("range", body))
                i += 1
            elif value.startswith("if eq .Role "):
                branches, condition = [], value
                while True:
                    body, i = parse(i + 1, ("else", "end"))
                    branches.append((json.loads(condition.rsplit(" ", 1)[1]), body))
                    condition = tokens[i][1]
                    if condition == "end":
                        break
                    assert condition.startswith("else if eq .Role "), condition
                nodes.append(("if", branches))
                i += 1
            else:
                raise AssertionError(f"template action outside the subset: {value}")
        return nodes, i

    def run(nodes: list, message: dict[str, str] | None) -> str:
        out = []
        for kind, value in nodes:
            if kind == "text":
                out.append(value)
            elif kind == "action" and value == ".Content":
                out.append(message["content"])
            elif kind == "action":
                out.append(json.loads(value))
            elif kind == "range":
                out.extend(run(value, m) for m in messages)
            else:  # the first branch whose role matches
                for role, body in value:
                    if message["role"] == role:
                        out.append(run(body, message))
                        break
        return "".join(out)

    tree, _ = parse(0, ())
    return run(tree, None)


def test_the_go_renderer_follows_go_semantics():
    template = (
        '{{ "A" }}  \n{{- range .Messages }}\n  {{- if eq .Role "user" }}u:{{ .Content }}'
        '{{- else if eq .Role "assistant" }} a:{{ .Content }} {{- end }}{{ end -}}  \n Z'
    )
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
        {"role": "tool", "content": "t"},
    ]
    assert render_go_template(template, messages) == "Au:x a:yZ"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_ollama_template_renders_as_the_chat_template(family, family_dir, tmp_path):
    model_dir = family_dir(family)
    system = None if family == "gemma" else "You reverse words."
    result = export_ollama(model_dir, tmp_path / "ollama", "q8_0", system=system)
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    tokenizer = hf_tokenizer(model_dir)
    conversation = [
        {"role": "user", "content": "Reverse 'abc'."},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "Now reverse 'hello world'."},
    ]
    if system:
        conversation.insert(0, {"role": "system", "content": system})
    jinja = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # llama.cpp adds BOS itself when it tokenizes the prompt, so the TEMPLATE leaves it out
    bos = tokenizer.bos_token if result["add_bos"] and jinja.startswith(tokenizer.bos_token) else ""
    assert bos + render_go_template(template, conversation) == jinja
    assert modelfile.startswith("FROM ./model.gguf\n")
    stops = re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)
    end_of_turn = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "gemma": "<end_of_turn>"}[family]
    assert stops == ["</s>", end_of_turn]
    assert (f'SYSTEM """{system}"""' in modelfile) == bool(system)
    assert (tmp_path / "ollama" / "model.gguf").stat().st_size == result["bytes"]


def test_a_template_with_no_system_turn_refuses_system(family_dir, tmp_path):
    with pytest.raises(RecipeError, match="no system turn"):
        export_ollama(family_dir("gemma"), tmp_path / "o", "f16", system="Be brief.")
    assert not (tmp_path / "o").exists()


def test_chat_format_of_the_builtin_templates():
    tokenizer = build_tokenizer("qwen2", False, False)
    tokenizer.chat_template = CHATML
    fmt = derive_chat_format(tokenizer)
    assert fmt.prefix == {"user": "<|im_start|>user\n", "assistant": "<|im_start|>assistant\n",
                          "system": "<|im_start|>system\n"}  # fmt: skip
    assert fmt.suffix["assistant"] == "<|im_end|>\n" and fmt.generation == "<|im_start|>assistant\n"
    tokenizer.chat_template = "{% for m in messages %}{% if loop.first %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert derive_chat_format(tokenizer) is None  # the first turn differs from the others: no TEMPLATE


# ------------------------------------------------------------------------------------------------
# slow: llama.cpp loads the files


def load_llama(path: Path, lora: Path | None = None):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36 builds llama.cpp "
        "from source: 29 min on a busy 2-core CPU)",
    )
    kwargs = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False, seed=0, **kwargs
    )


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_tokenizes_and_predicts_as_transformers(family, family_dir, tmp_path):
    model_dir = family_dir(family, trained=True)
    tokenizer = hf_tokenizer(model_dir)
    # text the model was fitted on, so its predictions are confident; longer than Gemma's 8-token window
    ids = tokenizer(CORPUS[0] + " " + CORPUS[3])["input_ids"]
    reference = hf_logits(model_dir, ids)
    for quant in ("f32", "f16", "q8_0"):
        out = tmp_path / f"{quant}.gguf"
        export_gguf(model_dir, out, quant)
        llm = load_llama(out)
        for prompt in PROMPTS:
            ours = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            assert ours == tokenizer(prompt)["input_ids"], (family, quant, prompt)
        got = llama_logits(llm, ids)[:, : reference.shape[1]]
        if quant == "q8_0":
            agree = int((got.argmax(-1) == reference.argmax(-1)).sum())
            assert 10 * agree >= 9 * len(ids), (family, quant, f"{agree}/{len(ids)}")  # counts: 36/40 is 90%
        else:
            worst = (got - reference).abs().max().item()
            assert worst <= 0.02 * reference.abs().max().item(), (family, quant, worst)
        del llm


def make_lora_adapter(model_dir: Path, out: Path, rank_pattern: dict[str, int], **options) -> Path:
    from transformers import AutoModelForCausalLM

    from peftcli.export import save_adapter
    from peftcli.methods.lora import LoRA, LoraConfig
    from peftcli.recipe import ModelConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern=rank_pattern, **options)
    method = LoRA(cfg, "causal_lm")
    torch.manual_seed(1)
    model = method.attach(model)
    with torch.no_grad():  # B = 0 at init: move it, so the adapter changes the logits
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.2)
    tokenizer = hf_tokenizer(model_dir)
    return save_adapter(out, model, method, tokenizer, str(model_dir), ModelConfig(name=str(model_dir)))


def test_gguf_lora_refuses_what_llama_cpp_adapters_cannot_hold(family_dir, tmp_path):
    adapter = make_lora_adapter(family_dir("qwen2"), tmp_path / "dora", {}, use_dora=True)
    with pytest.raises(RecipeError, match="Dora, not plain LoRA.*--format gguf"):
        export_gguf_lora(adapter, tmp_path / "x.gguf")
    with pytest.raises(RecipeError, match="not an adapter directory"):
        export_gguf_lora(family_dir("qwen2"), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("family", "rank_pattern"), [("llama", {}), ("phi3", {"down_proj": 2})])
def test_gguf_lora_on_the_base_gguf_predicts_as_the_merged_model(family, rank_pattern, family_dir, tmp_path):
    from peftcli.export import merge_adapter

    model_dir = family_dir(family)
    adapter = make_lora_adapter(model_dir, tmp_path / "adapter", rank_pattern)
    merge_adapter(adapter, tmp_path / "merged")
    export_gguf(model_dir, tmp_path / "base.gguf", "f32")
    result = export_gguf_lora(adapter, tmp_path / "lora.gguf")
    assert result["scaling_folded_into_b"] == bool(rank_pattern)
    ids = hf_tokenizer(model_dir)(PROMPTS[0])["input_ids"]
    reference = hf_logits(tmp_path / "merged", ids)
    base = hf_logits(model_dir, ids)
    assert (reference - base).abs().max() > 0.1 * reference.abs().max()  # the adapter matters
    got = llama_logits(load_llama(tmp_path / "base.gguf", lora=tmp_path / "lora.gguf"), ids)
    worst = (got[:, : reference.shape[1]] - reference).abs().max().item()
    assert worst <= 0.02 * reference.abs().max().item(), worst
    # the merged GGUF straight from the adapter directory agrees as well
    export_gguf(adapter, tmp_path / "merged.gguf", "f32")
    got = llama_logits(load_llama(tmp_path / "merged.gguf"), ids)
    assert (
        got[:, : reference.shape[1]] - reference
    ).abs().max().item() <= 0.02 * reference.abs().max().item()
