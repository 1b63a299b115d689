"""The loss of one micro-batch: plain, chunked, or Liger's fused linear cross-entropy.

The plain path runs the model and takes the cross-entropy of its logits, so for a causal LM a
(tokens × vocabulary) fp32 tensor exists at once: 4 GiB for 8 × 1,024 tokens of a 128k vocabulary.
The chunked paths run the model's body for the final hidden states, keep only the positions that
carry a target, and apply the output head and the cross-entropy one chunk of positions at a time, so
at most one (chunk × vocabulary) block is alive:

* **fused** (a plain ``nn.Linear`` head, the usual case): :class:`FusedLinearCrossEntropy` computes
  each chunk's loss *and* its gradients (softmax − one-hot, times the head weight) in the forward
  and keeps only the (tokens × hidden) gradient for backward. No logits are recomputed, so it costs
  the plain path's two matmuls, not three.
* **chunked** (any other head: LoRA on ``lm_head``, ``modules_to_save: [lm_head]``): each chunk runs
  under ``torch.utils.checkpoint`` and backward recomputes its logits; the head is called as a
  module, so whatever wraps it takes part.

Both give the plain path's loss and gradients (fp32, ≤ 1e-5; tests/test_loss.py), tied embeddings
included. On CUDA with ``liger-kernel`` installed and a plain linear head, Liger's fused linear
cross-entropy (a Triton kernel) replaces the torch one.

``train.loss`` picks one: ``auto`` (liger → fused/chunked → plain, whichever applies), ``plain``,
``chunked`` (fused or chunked, never liger). Methods whose forward wraps the model (soft prompts,
prefix tuning) and models whose forward post-processes the logits (soft-capping, logit scales) take
the plain path; :func:`choose_loss_path` says which ran, and the start-up summary prints it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftcli.data.collate import model_extras

IGNORE_INDEX = -100
PLAIN, CHUNKED, FUSED, LIGER = "plain", "chunked (torch)", "fused (torch)", "liger fused"
CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MiB in fp32): 256 tokens of a 128k vocabulary
# config attributes with which a model's forward changes the logits after the head
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy and the number of scored targets (tokens, or examples for seq_cls)."""
    if task == "seq_cls":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    if task == "causal_lm":
        labels = shift_labels(labels)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1. Shifting the labels (not the logits) keeps the logits a view:
    slicing them would copy a (B, T, vocab) tensor every step."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    labels = batch["labels"]
    if task == "seq_cls":
        return int((labels != IGNORE_INDEX).sum())  # -100: a distributed stand-in (see Dist.rank_slice)
    if task == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


# -- choosing a path ---------------------------------------------------------------------------


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The module that returns the final hidden states and the output head, when the model's forward is
    exactly ``head(body(...).last_hidden_state)``; None otherwise (wrapped forwards, logit post-processing)."""
    prefix = getattr(model, "base_model_prefix", "")
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not prefix or config is None or get_head is None or not hasattr(model, "generation_config"):
        return None  # not a transformers causal LM (e.g. a soft-prompt wrapper)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_POSTPROCESSING):
        return None
    body, head = getattr(model, prefix, None), get_head()
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module):
        return None
    return body, head


def liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def choose_loss_path(model: nn.Module, task: str, mode: str, device: torch.device) -> tuple[str, str]:
    """(path, why) for ``train.loss`` = ``mode``: one of PLAIN, FUSED, CHUNKED, LIGER."""
    if mode == "plain":
        return PLAIN, "train.loss: plain"
    if task != "causal_lm":
        return PLAIN, f"{task} has no vocabulary-sized logits"
    split = body_and_head(model)
    if split is None:
        return PLAIN, f"{type(model).__name__}'s forward is not body → head"
    head = split[1]
    # The fused path reads the head's weight directly, so the head must be exactly a linear layer with
    # no hooks (QLoRA's bf16 head casts its fp32 input in a pre-hook): anything else is called as a module.
    linear_head = type(head) is nn.Linear and not head._forward_pre_hooks and not head._forward_hooks
    if mode == "auto" and liger_available(device) and linear_head:
        return LIGER, "CUDA, liger-kernel installed, plain linear head"
    if linear_head:
        return FUSED, "linear head: loss and gradients per chunk of hidden states, no logits kept"
    return (
        CHUNKED,
        f"{type(head).__name__} head: per chunk of hidden states, logits recomputed in backward",
    )


# -- the forward + loss of one micro-batch -----------------------------------------------------


def micro_batch_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], task: str, path: str, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Summed loss of one collated micro-batch on ``path``. A batch with ``position_ids`` is packed: its
    attention mask only marks real tokens, and transformers derives block-diagonal attention from the
    position ids (each example restarts at 0)."""
    inputs = {"input_ids": batch["input_ids"], **model_extras(batch)}
    if "position_ids" in batch:  # no KV cache either: transformers only detects packing without one
        inputs.update(position_ids=batch["position_ids"], use_cache=False)
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if path == PLAIN:
        if task == "seq2seq":
            inputs["labels"] = batch["labels"]
        return token_loss_sum(model(**inputs).logits, batch["labels"], task)[0]
    body, head = body_and_head(model)
    hidden = body(**inputs).last_hidden_state  # (B, T, d)
    labels = shift_labels(batch["labels"]).to(hidden.device)  # (B, T)
    scored = labels != IGNORE_INDEX
    hidden, labels = hidden[scored], labels[scored]  # (N, d), (N,): positions with a target only
    if path == LIGER:
        return liger_linear_cross_entropy_sum(hidden, head, labels)
    if path == FUSED:
        return fused_linear_cross_entropy_sum(hidden, head, labels, chunk_tokens)
    return chunked_linear_cross_entropy_sum(hidden, head, labels, chunk_tokens)


def default_chunk_tokens(head: nn.Module) -> int:
    vocab = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None) or 32768
    return max(64, CHUNK_ELEMENTS // vocab)


def fused_linear_cross_entropy_sum(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """sum_i CE(head(hidden_i), labels_i) for a plain linear head, gradients computed in the forward."""
    chunk_tokens = chunk_tokens or default_chunk_tokens(head)
    return FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, chunk_tokens)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, one chunk of rows at a time.

    The forward computes, per chunk, the logits in fp32, their log-sum-exp and the loss, then turns the
    logits in place into d loss / d logits = softmax − one-hot (zero on ignored rows) and takes the
    gradients of ``hidden`` (and of ``weight`` and ``bias`` when they train) from it. Backward only
    scales those by the incoming gradient. Peak extra memory: one (chunk × vocab) fp32 block, plus the
    (rows × hidden) gradient, the same size as the hidden states the chunked path keeps.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens):
        train_weight = weight.requires_grad
        train_bias = bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if train_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if train_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            logits = F.linear(h, weight, bias).float()  # (chunk, vocab)
            scored = y != IGNORE_INDEX
            target = y.clamp_min(0).unsqueeze(1)
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (chunk, 1)
            total += ((log_norm.squeeze(1) - logits.gather(1, target).squeeze(1)) * scored).sum()
            grad_logits = logits.sub_(log_norm).exp_()  # softmax, in place
            grad_logits.scatter_add_(1, target, torch.full_like(log_norm, -1.0))
            grad_logits.mul_(scored.unsqueeze(1))
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_tokens] = grad_logits @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.float()
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None,
            None,
        )


def chunked_linear_cross_entropy_sum(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """sum_i CE(head(hidden_i), labels_i) over (N, d) hidden states, ``chunk_tokens`` rows at a time; each
    chunk's logits are recomputed in backward instead of kept (one (chunk × vocab) block alive at once)."""
    chunk_tokens = chunk_tokens or default_chunk_tokens(head)
    total = hidden.sum().float() * 0.0  # keeps the graph when no position has a target
    for start in range(0, hidden.size(0), chunk_tokens):
        total = total + checkpoint(
            _chunk_loss,
            head,
            hidden[start : start + chunk_tokens],
            labels[start : start + chunk_tokens],
            use_reentrant=False,
        )
    return total


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)  # (chunk, vocab)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def liger_linear_cross_entropy_sum(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor
) -> torch.Tensor:
    """Liger Kernel's fused linear cross-entropy (CUDA, Triton). Untested here: this machine has no GPU."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", ignore_index=IGNORE_INDEX)
    return loss(head.weight, hidden, labels, head.bias)
