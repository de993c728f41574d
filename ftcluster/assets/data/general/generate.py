"""Generate the bundled general-English held-out set: short paragraphs of everyday prose, for measuring
forgetting (the perplexity of a model on text unlike its fine-tuning data, before and after tuning).

    python ftcluster/assets/data/general/generate.py

writes general.jsonl next to this file: one {"text": paragraph} record per line (the `text` data format),
300 sentences in 60 paragraphs of 5. The sentences are composed from hand-written parts (released with
this project under its licence; nothing is copied from elsewhere), so the set is public and needs no
download. Fixed seed, no set or dict ordering: the output is byte-for-byte the same on every run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 2024
PARAGRAPHS, SENTENCES = 60, 5

PEOPLE = ["The old fisherman", "A young teacher", "My grandmother", "The baker on the corner", "Our neighbour",
          "A tired traveller", "The village doctor", "A curious child", "The night porter", "An elderly painter",
          "The new librarian", "A quiet student", "The station master", "My older brother", "A retired sailor"]
ACTIONS = ["mended the fence behind the house", "wrote a long letter to an old friend",
           "walked slowly along the river", "planted a row of beans in the garden",
           "read the morning paper by the window", "baked bread before the sun came up",
           "counted the coins left in the drawer", "repaired the bicycle with borrowed tools",
           "carried a basket of apples up the hill", "swept the leaves from the front steps",
           "watched the boats return to the harbour", "tuned the piano in the front room",
           "fed the hens and collected the eggs", "lit a small fire against the cold",
           "copied a recipe from a worn notebook"]
TIMES = ["Early in the morning", "Late that evening", "On a grey Sunday", "After the long winter",
         "Just before noon", "During the summer holidays", "On the first day of spring", "Every Tuesday",
         "When the rain finally stopped", "Long after midnight"]
PLACES = ["the market square", "the edge of the forest", "the little harbour", "the top of the hill",
          "the old stone bridge", "the railway station", "the public library", "the village green",
          "the bakery on the main street", "the orchard behind the school"]
SCENES = ["the air smelled of rain and cut grass", "a thin mist lay over the fields",
          "the streets were almost empty", "the wind rattled the shutters",
          "the church bell rang twice", "the shops were opening one by one",
          "a dog barked somewhere in the distance", "the light turned gold over the rooftops",
          "children were already playing in the lane", "the kettle began to sing on the stove"]
FEELINGS = ["it felt good to be busy", "nobody seemed to be in a hurry", "the day promised to be warm",
            "there was still a great deal to do", "the work went faster than expected",
            "it was hard to remember a calmer day", "everyone agreed that the summer had been kind",
            "the task took far longer than anyone had planned"]
OBJECTS = ["a pair of brown boots", "a chipped blue cup", "a map of the county", "a jar of honey",
           "an umbrella with a broken spoke", "a box of old photographs", "a loaf of rye bread",
           "a wooden chair", "a bundle of firewood", "a letter without a stamp"]
REMARKS = ["said that the roads would be muddy for a week", "laughed and shook their head",
           "promised to come back before dark", "asked whether the train was on time",
           "wondered aloud who had left the gate open", "thought the price was fair",
           "remarked that the river was higher than last year", "hoped the weather would hold"]

SHAPES = [
    "{time}, {person_lc} {action}.",
    "At {place}, {scene}.",
    "{person} {action} while {scene}.",
    "Someone had left {object} near {place}.",
    "{person} {remark}.",
    "By the afternoon {feeling}.",
    "{time}, {scene}, and {feeling}.",
    "{person} found {object} at {place} and {remark}.",
]


def sentence(rng: random.Random, shape: str) -> str:
    person = rng.choice(PEOPLE)
    text = shape.format(person=person, person_lc=person[0].lower() + person[1:], action=rng.choice(ACTIONS),
                        time=rng.choice(TIMES), place=rng.choice(PLACES), scene=rng.choice(SCENES),
                        feeling=rng.choice(FEELINGS), object=rng.choice(OBJECTS), remark=rng.choice(REMARKS))
    return text[0].upper() + text[1:]


def build() -> list[dict]:
    rng = random.Random(SEED)
    # Five different shapes per paragraph, so no paragraph repeats itself.
    return [{"text": " ".join(sentence(rng, shape) for shape in rng.sample(SHAPES, SENTENCES))}
            for _ in range(PARAGRAPHS)]


def main() -> None:
    path = Path(__file__).resolve().parent / "general.jsonl"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in build():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {PARAGRAPHS} paragraphs ({PARAGRAPHS * SENTENCES} sentences) to {path}")


if __name__ == "__main__":
    main()
