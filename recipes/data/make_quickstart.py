"""Generate the quickstart data set: reverse a short random lowercase word.

    python recipes/data/make_quickstart.py      # rewrites quickstart_train.jsonl / quickstart_eval.jsonl here

Each line is completion-format JSON:  {"prompt": "kqzt=\n", "completion": "tzqk"}
The words are random letter strings (3-5 letters), so the model cannot memorise answers: the
held-out eval words never occur in train (nor do their reversals), and getting them right means
the model learned the reversing procedure itself. Standard library only; the output is identical
on every machine and Python version (fixed seed, random.Random's documented algorithm).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

SEED = 1234  # change it and you get another, equally valid, data set
N_TRAIN = 2000  # enough distinct words that the model generalises instead of memorising
N_EVAL = 100  # held-out words for the before/after exact-match eval
MIN_LEN, MAX_LEN = 3, 5
# The answer follows "=\n"; the trainer appends EOS to it. Keep the prompt this short: on the random
# tiny llama a long constant prefix ("reverse: kqzt\n") made reversal far harder to learn with LoRA
# (7% exact match after 1000 steps instead of 100%).
PROMPT = "{word}=\n"

HERE = Path(__file__).resolve().parent


def random_word(rng: random.Random) -> str:
    n = rng.randint(MIN_LEN, MAX_LEN)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def main() -> None:
    rng = random.Random(SEED)
    # Draw distinct non-palindromic words: a palindrome's answer equals its input, too easy to count.
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < N_TRAIN + N_EVAL:
        w = random_word(rng)
        if w in seen or w == w[::-1]:
            continue
        seen.add(w)
        words.append(w)
    train = words[:N_TRAIN]
    # Eval: the next draws whose reversal is not a train word either (no answer seen in training).
    train_set = set(train)
    evals = [w for w in words[N_TRAIN:] if w[::-1] not in train_set]
    while len(evals) < N_EVAL:  # top up if the filter dropped any
        w = random_word(rng)
        if w not in seen and w != w[::-1] and w[::-1] not in train_set:
            seen.add(w)
            evals.append(w)
    evals = evals[:N_EVAL]

    for name, items in (("quickstart_train.jsonl", train), ("quickstart_eval.jsonl", evals)):
        with open(HERE / name, "w", encoding="utf-8", newline="\n") as f:
            for w in items:
                f.write(json.dumps({"prompt": PROMPT.format(word=w), "completion": w[::-1]}) + "\n")
        print(f"wrote {len(items)} lines to {HERE / name}")


if __name__ == "__main__":
    main()
