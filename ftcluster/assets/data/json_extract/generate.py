"""Generate the bundled json_extract task: a sentence about a person -> compact JSON {name, age, city}.

    python ftcluster/assets/data/json_extract/generate.py

writes train.jsonl (200) and eval.jsonl (50) next to this file, and the same examples as preference pairs
for the reward-model and DPO stages (pairs_train.jsonl, pairs_eval.jsonl): the correct compact JSON is
chosen; the rejected answer is one of the mistakes a model makes on this task (pretty-printed JSON, a wrong
age or city, a missing key, JSON wrapped in prose), picked with its own fixed seed. The output is byte-for-byte the same on
every run (fixed seed, no set/dict-order or locale dependence), so the committed files can be checked
against it. The eval split mixes seen values with 10 names and 5 cities that never occur in training,
so exact match on it measures extraction rather than memorisation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN, N_EVAL = 200, 50

INSTRUCTION = "Extract the person's name, age and city from the sentence as compact JSON with keys name, age, city."

# Varied shapes: value order, punctuation, multi-word cities and distractor words all change.
TEMPLATES = [
    "{name} ({age}) has a home in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Meet {name}: {age} years old and based in {city}.",
    "In {city} lives {name}, who is {age}.",
    "{name} is a {age}-year-old from {city}.",
    "At {age}, {name} moved to {city} for work.",
    "Our new colleague {name} is {age} and works out of {city}.",
    "City: {city}. Name: {name}. Age: {age}.",
]

TRAIN_NAMES = [
    "Irene", "Marco", "Aisha", "Tomas", "Yuki", "Oliver", "Priya", "Lukas", "Sofia", "Daniel",
    "Chen", "Fatima", "Jonas", "Elena", "Kwame", "Hannah", "Mateo", "Ingrid", "Ravi", "Clara",
    "Omar", "Nadia", "Pedro", "Greta",
]
TRAIN_CITIES = [
    "Sydney", "Berlin", "Toronto", "Lagos", "Osaka", "Lisbon", "Chicago", "Mumbai", "Oslo",
    "Buenos Aires", "Cape Town", "Seoul", "Dublin", "Mexico City", "Vienna",
]
# Held out: never used in train.jsonl.
EVAL_NAMES = ["Bruno", "Leila", "Viktor", "Amara", "Felix", "Noor", "Stefan", "Mei", "Diego", "Astrid"]
EVAL_CITIES = ["Nairobi", "Lima", "Santiago", "Hanoi", "Reykjavik"]

AGES = range(18, 81)


def example(name: str, age: int, city: str, template: str) -> dict:
    answer = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"), ensure_ascii=False)
    return {"instruction": INSTRUCTION, "input": template.format(name=name, age=age, city=city), "output": answer}


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    train, seen_inputs = [], set()
    # Every template appears equally often in training (25 each), in shuffled order.
    templates = TEMPLATES * (N_TRAIN // len(TEMPLATES))
    rng.shuffle(templates)
    for template in templates:
        while True:
            ex = example(rng.choice(TRAIN_NAMES), rng.choice(AGES), rng.choice(TRAIN_CITIES), template)
            if ex["input"] not in seen_inputs:
                break
        seen_inputs.add(ex["input"])
        train.append(ex)

    evals, unseen_names, unseen_cities = [], 0, 0
    for i in range(N_EVAL):
        # 3 in 5 use an unseen name, 1 in 2 an unseen city; cycling through each held-out list with its own
        # counter guarantees every held-out value appears (3 times per name, 5 per city).
        if i % 5 < 3:
            name, unseen_names = EVAL_NAMES[unseen_names % len(EVAL_NAMES)], unseen_names + 1
        else:
            name = rng.choice(TRAIN_NAMES)
        if i % 2 == 0:
            city, unseen_cities = EVAL_CITIES[unseen_cities % len(EVAL_CITIES)], unseen_cities + 1
        else:
            city = rng.choice(TRAIN_CITIES)
        while True:
            ex = example(name, rng.choice(AGES), city, TEMPLATES[i % len(TEMPLATES)])
            if ex["input"] not in seen_inputs:
                break
        seen_inputs.add(ex["input"])
        evals.append(ex)
    rng.shuffle(evals)
    return train, evals


def rejected_answer(ex: dict, rng: random.Random) -> str:
    person = json.loads(ex["output"])
    mistake = rng.randrange(5)
    if mistake == 0:  # what the base model does: pretty-printed
        return json.dumps(person, indent=2, ensure_ascii=False)
    if mistake == 1:
        person["age"] += rng.choice([-11, -3, -1, 1, 2, 10])
    elif mistake == 2:
        person["city"] = rng.choice([c for c in TRAIN_CITIES if c != person["city"]])
    elif mistake == 3:
        del person["city"]
    compact = json.dumps(person, separators=(",", ":"), ensure_ascii=False)
    return f"Here is the JSON: {compact}" if mistake == 4 else compact


def preference_pairs(examples: list[dict], rng: random.Random) -> list[dict]:
    return [{"prompt": f"{ex['instruction']}\n\n{ex['input']}", "chosen": ex["output"],
             "rejected": rejected_answer(ex, rng)} for ex in examples]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # newline="\n" and ensure_ascii=False: identical bytes on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    here = Path(__file__).resolve().parent
    train, evals = build()
    write_jsonl(here / "train.jsonl", train)
    write_jsonl(here / "eval.jsonl", evals)
    rng = random.Random(SEED + 1)  # its own stream: the SFT files above stay as they were
    write_jsonl(here / "pairs_train.jsonl", preference_pairs(train, rng))
    write_jsonl(here / "pairs_eval.jsonl", preference_pairs(evals, rng))
    print(f"wrote {len(train)} train and {len(evals)} eval examples (and as preference pairs) to {here}")


if __name__ == "__main__":
    main()
