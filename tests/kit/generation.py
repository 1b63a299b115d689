"""Cached generation checked against decoding that recomputes the whole sequence at every step."""

import torch


def assert_seq2seq_generate_matches_recompute(model) -> None:
    """Reference: greedy decoding that reruns the whole model on each unpadded row at every step
    (no cache), so prompts cannot be inserted twice or lost."""
    ids = torch.tensor([[40, 41, 42, 43, 1], [50, 51, 1, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)
    for row in range(2):
        tokens = [model.config.decoder_start_token_id]
        for _ in range(5):
            with torch.no_grad():
                logits = model(
                    input_ids=ids[row : row + 1, : int(mask[row].sum())],
                    decoder_input_ids=torch.tensor([tokens]),
                ).logits
            tokens.append(int(logits[0, -1].argmax()))
        assert out[row].tolist()[: len(tokens)] == tokens[: out.shape[1]]
