"""Generate the bundled json_extract task: a sentence about a person -> compact JSON {name, age, city}.

    python ftcluster/assets/data/json_extract/generate.py

writes train.jsonl (600) and eval.jsonl (50) next to this file, and the first 200 training examples and the
eval ones as preference pairs for the reward-model and DPO stages (pairs_train.jsonl, pairs_eval.jsonl): the
correct compact JSON is
chosen; the rejected answer is one of the mistakes a model makes on this task (pretty-printed JSON, a wrong
age or city, a missing key, JSON wrapped in prose), picked with its own fixed seed. The output is byte-for-byte the same on
every run (fixed seed, no set/dict-order or locale dependence), so the committed files can be checked
against it. The eval split mixes seen values with 10 names and 5 cities that never occur in training,
so exact match on it measures extraction rather than memorisation. The second 200 training examples draw on
a larger pool of names and cities (70 and 30), so that copying, not a short list, is what the model learns:
with the first 200 alone the default run reached 0.82 held-out exact match, with the next 200 0.92 at the same
step count. The last 200 use names made up from syllables, which the model has no spelling of its own for:
the unseen names it still missed were respelled towards common ones (Mei -> Mia, Diego -> Dígio), and with
these the default run (32 steps) reached 0.96; 200 more examples with real names had brought it down to 0.80
(2026-12-05).
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

# A second, larger pool for the second half of train.jsonl: with only the 24 names above, the model learns
# those names rather than copying the one in the sentence, and respells unseen ones (Diego -> Dígio). None of
# these is a held-out name or city.
MORE_NAMES = [
    "Adele", "Ahmed", "Alejandro", "Alice", "Anders", "Anika", "Arjun", "Beatriz", "Benedikt", "Camille",
    "Carlos", "Chiara", "Darius", "Dmitri", "Ebony", "Emeka", "Esther", "Farah", "Filip", "Gabriela",
    "Gustav", "Haruto", "Hugo", "Imani", "Isabel", "Ivan", "Jamal", "Javier", "Jin", "Joanna",
    "Kai", "Karim", "Katarina", "Kenji", "Laila", "Lars", "Lucia", "Magnus", "Malik", "Mariam",
    "Mikael", "Min-jun", "Nikolai", "Nina", "Oscar", "Paulo", "Rosa", "Rustam", "Saanvi", "Samuel",
    "Sanjay", "Selin", "Siobhan", "Tariq", "Thabo", "Theo", "Ulla", "Valentina", "Wei", "Ximena",
    "Yara", "Yosef", "Zainab", "Zoltan", "Agnes", "Bilal", "Cyrus", "Dagny", "Eitan", "Femi",
]
MORE_CITIES = [
    "Melbourne", "Hamburg", "Vancouver", "Accra", "Kyoto", "Porto", "Denver", "Chennai", "Bergen", "Rosario",
    "Durban", "Busan", "Cork", "Guadalajara", "Salzburg", "Marseille", "Krakow", "Istanbul", "Cairo", "Manila",
    "Jakarta", "Bogota", "Quito", "Helsinki", "Prague", "Montreal", "Auckland", "Tbilisi", "Casablanca", "Tunis",
]
N_MORE = 200
# The third part: names made of these syllables (2 or 3 each), 100 of them, none a held-out name.
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch", "th", ""]
VOWELS = ["a", "e", "i", "o", "u", "ei", "ia", "ou", "ie", "ai"]
N_INVENTED = 200


def example(name: str, age: int, city: str, template: str) -> dict:
    answer = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"), ensure_ascii=False)
    return {"instruction": INSTRUCTION, "input": template.format(name=name, age=age, city=city), "output": answer}


def draw(rng: random.Random, count: int, names: list[str], cities: list[str], taken: set[str]) -> list[dict]:
    """`count` examples, every template equally often in shuffled order, none with a sentence in `taken`
    (which gains theirs)."""
    templates = TEMPLATES * (count // len(TEMPLATES))
    rng.shuffle(templates)
    out = []
    for template in templates:
        while True:
            ex = example(rng.choice(names), rng.choice(AGES), rng.choice(cities), template)
            if ex["input"] not in taken:
                break
        taken.add(ex["input"])
        out.append(ex)
    return out


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    seen_inputs: set[str] = set()
    train = draw(rng, N_TRAIN, TRAIN_NAMES, TRAIN_CITIES, seen_inputs)  # 25 of each template

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


def more_train(taken: set[str]) -> list[dict]:
    """The second half of train.jsonl, from the larger pool, with its own random stream (the first half, the
    eval split and the preference pairs stay as they were)."""
    return draw(random.Random(SEED + 2), N_MORE, MORE_NAMES, MORE_CITIES, taken)


def invented_train(taken: set[str]) -> list[dict]:
    """The last part of train.jsonl: made-up names (so only copying gets them right), its own random stream."""
    rng = random.Random(SEED + 3)
    made = {"".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))).capitalize()
            for _ in range(120)}
    names = sorted(made - set(EVAL_NAMES))[:100]
    return draw(rng, N_INVENTED, names, MORE_CITIES, taken)


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
    taken = {ex["input"] for ex in train + evals}
    more = more_train(taken)  # taken gains their sentences: the made-up names' examples repeat none of them
    everything = train + more + invented_train(taken)
    write_jsonl(here / "train.jsonl", everything)
    write_jsonl(here / "eval.jsonl", evals)
    rng = random.Random(SEED + 1)  # its own stream: the SFT files above stay as they were
    write_jsonl(here / "pairs_train.jsonl", preference_pairs(train, rng))
    write_jsonl(here / "pairs_eval.jsonl", preference_pairs(evals, rng))
    print(f"wrote {len(everything)} train and {len(evals)} eval examples (and preference pairs) to {here}")


if __name__ == "__main__":
    main()
