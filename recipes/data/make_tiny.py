"""Generate the small data files used by recipes/tiny/*.yaml (deterministic, stdlib only).

    python recipes/data/make_tiny.py

- tiny_train.jsonl / tiny_eval.jsonl: completion pairs "reverse <word> =" -> " <drow>" over a fixed
  word list (the eval words are a subset of the train words: smoke runs check that loss falls,
  not generalisation).
- tiny_cls_train.jsonl / tiny_cls_eval.jsonl: two-class "sentiment" sentences built from
  positive/negative word lists, for seq_cls recipes.
- tiny_pref_train.jsonl / tiny_pref_eval.jsonl: preference pairs {prompt, chosen, rejected} for
  recipes/objectives/*.yaml: "the <noun> was <word>. feeling:" prefers " happy" or " sad" as the word
  is positive or negative; the eval pairs use (noun, word) combinations the training pairs do not
  (two of each word's eight nouns).
- tiny_multitask_train.jsonl / tiny_multitask_eval.jsonl: completion pairs "<word> =" with a
  ``task_id``: task 0 reverses the word, task 1 upper-cases it; the prompt alone does not say which, so
  only the task id does (multitask prompt tuning, recipes/tiny/multitask_prompt_tuning.yaml).
- tiny_cpt_context.jsonl: four solved reversals {input, output}, the in-context examples CPT lays out as
  its prompt (recipes/tiny/cpt.yaml: "reverse <word> = <drow>" per line, as tiny_train's rows read).
- tasks/tiny_reverse_choice.jsonl: a four-way multiple-choice version of the reversal task for
  lm-evaluation-harness (tasks/tiny_reverse_choice.yaml; `peftcli eval --tasks`, docs/use.md).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "light",
    "table",
    "music",
    "ocean",
    "tiger",
    "house",
    "bread",
    "chair",
    "dream",
    "earth",
    "flame",
    "grape",
    "heart",
    "lemon",
    "night",
]
POSITIVE = ["good", "great", "lovely", "happy", "bright", "superb", "fine", "nice"]
NEGATIVE = ["bad", "awful", "sad", "dull", "poor", "grim", "nasty", "ugly"]
NOUNS = ["movie", "meal", "day", "song", "book", "trip", "game", "show"]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(0)
    pairs = [{"prompt": f"reverse {w} =", "completion": f" {w[::-1]}"} for w in WORDS]
    write(HERE / "tiny_train.jsonl", [rng.choice(pairs) for _ in range(256)])
    write(HERE / "tiny_eval.jsonl", pairs[:16])
    rows = []
    for _ in range(320):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        rows.append({"text": f"the {rng.choice(NOUNS)} was {word}", "label": label})
    write(HERE / "tiny_cls_train.jsonl", rows[:256])
    write(HERE / "tiny_cls_eval.jsonl", rows[256:])
    write(HERE / "tasks" / "tiny_reverse_choice.jsonl", reverse_choices(random.Random(1)))
    train, held_out = preference_pairs(random.Random(2))
    write(HERE / "tiny_pref_train.jsonl", train)
    write(HERE / "tiny_pref_eval.jsonl", held_out)
    multitask = multitask_pairs()
    picks = random.Random(3)
    write(HERE / "tiny_multitask_train.jsonl", [picks.choice(multitask) for _ in range(256)])
    write(HERE / "tiny_multitask_eval.jsonl", multitask[:8] + multitask[20:28])
    write(HERE / "tiny_cpt_context.jsonl", [{"input": w, "output": w[::-1]} for w in WORDS[16:20]])


def multitask_pairs() -> list[dict]:
    """Every word under task 0 (reverse) and then under task 1 (upper-case), one prompt for both."""
    tasks = [lambda w: w[::-1], lambda w: w.upper()]
    return [
        {"prompt": f"{w} =", "completion": f" {task(w)}", "task_id": task_id}
        for task_id, task in enumerate(tasks)
        for w in WORDS
    ]


def preference_pairs(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, eval) pairs: the feeling that matches the sentence's word is chosen. For every word, two
    of its eight nouns are held out for eval, so each word is seen in training with six other nouns."""
    train, held_out = [], []
    for word in POSITIVE + NEGATIVE:
        good, bad = (" happy", " sad") if word in POSITIVE else (" sad", " happy")
        nouns = rng.sample(NOUNS, len(NOUNS))
        for i, noun in enumerate(nouns):
            row = {"prompt": f"the {noun} was {word}. feeling:", "chosen": good, "rejected": bad}
            (held_out if i < 2 else train).append(row)
    rng.shuffle(train)
    return train, held_out


def reverse_choices(rng: random.Random) -> list[dict]:
    """Each word's reversal among three distractors: the word itself, another word reversed, a rotation."""
    rows = []
    for i, word in enumerate(WORDS):
        other = WORDS[(i + 7) % len(WORDS)]
        choices = [f" {word[::-1]}", f" {word}", f" {other[::-1]}", f" {word[2:] + word[:2]}"]
        rng.shuffle(choices)
        rows.append(
            {"question": f"reverse {word} =", "choices": choices, "answer": choices.index(f" {word[::-1]}")}
        )
    return rows


if __name__ == "__main__":
    main()
