"""Generate the demo training set ``src/sstoken/demo/demo.jsonl`` (deterministic: same seed, same bytes).

Short reading-comprehension rows about invented people and places: a passage of 2-4 sentences, one
question, and a one-sentence answer taken from the passage. About 80% of the rows use the ``messages``
format (some with a system prompt, a few with two assistant turns), 10% ``prompt``/``completion`` (strings,
and a few conversational) and 10% alpaca.

    python examples/make_demo_data.py                 # rewrite src/sstoken/demo/demo.jsonl
    python examples/make_demo_data.py --out x.jsonl --rows 50 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "sstoken" / "demo" / "demo.jsonl"
DEFAULT_ROWS = 300
DEFAULT_SEED = 1234
MAX_CHARS = 700  # keeps a row under ~200 SmolLM2 tokens

FIRST_NAMES = [
    "Alira", "Bexley", "Corvin", "Dessa", "Elvar", "Fenna", "Gorim", "Halden", "Ilsa", "Jorun",
    "Kestra", "Lio", "Marvek", "Nerys", "Oskel", "Pellam", "Quenna", "Rurik", "Sabeth", "Tamsin",
    "Ulvar", "Vesna", "Wendel", "Yarrow", "Zorina",
]
LAST_NAMES = [
    "Abernathy", "Brightwater", "Caskell", "Dunmore", "Everhart", "Falkirk", "Greaves", "Holloway",
    "Ingram", "Jessup", "Kettleby", "Larkspur", "Morrow", "Nettlefield", "Orwin", "Pendry",
]
TOWNS = [
    "Millbrook", "Harrowgate", "Ostmere", "Quillford", "Brackenridge", "Saltcombe", "Tiverholm",
    "Velmora", "Ashgrove", "Dunhollow", "Eastwick Falls", "Korrin Bay", "Lindqvist", "Pemberly Cross",
    "Rookhaven", "Stonecrest",
]
JOBS = [
    "clockmaker", "lighthouse keeper", "beekeeper", "cartographer", "glassblower", "ferry captain",
    "botanist", "violin maker", "baker", "librarian", "stonemason", "weather observer",
]
PETS = ["cat", "dog", "parrot", "tortoise", "goat", "rabbit", "ferret", "pony"]
PET_NAMES = ["Biscuit", "Mortimer", "Pip", "Juniper", "Captain", "Soot", "Waffles", "Hazel", "Turnip", "Ziggy"]
COLORS = ["green", "amber", "violet", "scarlet", "teal", "silver", "ochre", "indigo"]
HOBBIES = [
    "collecting old maps", "growing giant pumpkins", "playing the accordion", "carving wooden birds",
    "rowing on the lake", "writing letters in code", "restoring bicycles", "painting lighthouses",
]
RIVERS = ["Wend", "Oster", "Callow", "Brinn", "Saffa", "Thole", "Marren", "Iddle"]
SPECIALTIES = [
    "blue cheese", "copper kettles", "wool blankets", "plum jam", "wind chimes", "oak barrels",
    "paper lanterns", "smoked trout",
]
FESTIVALS = ["Lantern Night", "the Harvest Race", "Kite Week", "the Cheese Parade", "the Bell Festival"]
SYSTEM_PROMPTS = [
    "Answer the question using only the passage.",
    "You are a careful reading assistant. Answer in one sentence.",
    "You answer questions about short texts. Quote the facts from the text.",
]
USER_LAYOUTS = [
    "Passage: {passage}\n\nQuestion: {question}",
    "{passage}\n\n{question}",
    "Read the text and answer the question.\n\n{passage}\n\nQuestion: {question}",
]
ALPACA_INSTRUCTIONS = [
    "Answer the question using the passage.",
    "Read the passage and answer the question in one sentence.",
]


def _person(rng: random.Random) -> tuple[list[tuple[str, str, str | None]], tuple[str, int, str], int]:
    """Facts about an invented person as (sentence, question, answer) triples, the first introducing them;
    the answer of the fourth depends on which question was drawn and is filled in by the caller."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    first = name.split()[0]
    she, her = rng.choice([("She", "her"), ("He", "his")])
    town, year, job = rng.choice(TOWNS), rng.randint(1921, 2004), rng.choice(JOBS)
    pet, pet_name, color = rng.choice(PETS), rng.choice(PET_NAMES), rng.choice(COLORS)
    siblings, hobby = rng.randint(2, 7), rng.choice(HOBBIES)
    article = "an" if job[0] in "aeiou" else "a"
    return [
        (
            f"{name} was born in {town} in {year}.",
            rng.choice([f"Where was {first} born?", f"In which town was {name} born?"]),
            f"{first} was born in {town}.",
        ),
        (
            f"{she} works as {article} {job}.",
            f"What does {first} do for a living?",
            f"{first} works as {article} {job}.",
        ),
        (
            f"{she} owns a {pet} called {pet_name}.",
            f"What is the name of {first}'s {pet}?",
            f"{first}'s {pet} is called {pet_name}.",
        ),
        (
            f"{she} has {siblings} siblings and {her} favourite colour is {color}.",
            rng.choice([f"How many siblings does {first} have?", f"What is {first}'s favourite colour?"]),
            None,  # filled below: depends on the question
        ),
        (
            f"In {her} free time {she.lower()} enjoys {hobby}.",
            f"What does {first} enjoy in {her} free time?",
            f"{first} enjoys {hobby}.",
        ),
    ], (first, siblings, color), year


def _place(rng: random.Random) -> tuple[list[tuple[str, str, str | None]], tuple[str, int, str]]:
    """Facts about an invented town, like :func:`_person` (the second answer is filled in by the caller)."""
    place = rng.choice(TOWNS)
    river, founded = rng.choice(RIVERS), rng.randint(1120, 1890)
    founder = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    people, specialty, festival = rng.randrange(800, 48000, 50), rng.choice(SPECIALTIES), rng.choice(FESTIVALS)
    month = rng.choice(["March", "May", "July", "September", "November"])
    return [
        (
            f"{place} is a small town on the {river} River.",
            f"On which river is {place}?",
            f"{place} is on the {river} River.",
        ),
        (
            f"It was founded in {founded} by {founder}.",
            rng.choice([f"Who founded {place}?", f"When was {place} founded?"]),
            None,
        ),
        (
            f"About {people:,} people live there today.",
            f"How many people live in {place}?",
            f"About {people:,} people live in {place}.",
        ),
        (
            f"The town is famous for its {specialty}.",
            f"What is {place} famous for?",
            f"{place} is famous for its {specialty}.",
        ),
        (
            f"Every {month} it holds {festival}.",
            f"Which festival does {place} hold every {month}?",
            f"{place} holds {festival} every {month}.",
        ),
    ], (place, founded, founder)


def _qa(rng: random.Random, n_questions: int) -> tuple[str, list[tuple[str, str]]]:
    """A passage of 2-4 sentences and ``n_questions`` distinct (question, answer) pairs about it."""
    if rng.random() < 0.6:
        facts, (first, siblings, color), _ = _person(rng)
        q3 = facts[3][1]
        a3 = (
            f"{first} has {siblings} siblings."
            if q3.startswith("How many")
            else f"{first}'s favourite colour is {color}."
        )
        facts[3] = (facts[3][0], q3, a3)
    else:
        facts, (place, founded, founder) = _place(rng)
        q1 = facts[1][1]
        a1 = f"{place} was founded by {founder}." if q1.startswith("Who") else f"{place} was founded in {founded}."
        facts[1] = (facts[1][0], q1, a1)
    n_sentences = rng.randint(max(2, n_questions), 4)
    chosen = [facts[0]] + rng.sample(facts[1:], n_sentences - 1)
    passage = " ".join(sentence for sentence, _, _ in chosen)
    asked = rng.sample(chosen, n_questions)
    return passage, [(q, a) for _, q, a in asked]


def _row(rng: random.Random, fmt: str, index: int) -> dict:
    row: dict = {"id": f"demo-{index:04d}"}
    if fmt == "multi_turn":
        passage, [(q1, a1), (q2, a2)] = _qa(rng, 2)
        user = rng.choice(USER_LAYOUTS).format(passage=passage, question=q1)
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": rng.choice(["And: ", "Another question: ", ""]) + q2},
            {"role": "assistant", "content": a2},
        ]
        row["messages"] = messages
        return row
    passage, [(question, answer)] = _qa(rng, 1)
    if fmt == "messages":
        user = rng.choice(USER_LAYOUTS).format(passage=passage, question=question)
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.4 else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        row["messages"] = messages
    elif fmt == "prompt_completion":
        if rng.random() < 0.3:  # conversational prompt/completion
            user = rng.choice(USER_LAYOUTS).format(passage=passage, question=question)
            row["prompt"] = [{"role": "user", "content": user}]
            row["completion"] = [{"role": "assistant", "content": answer}]
        else:
            row["prompt"] = f"Passage: {passage}\nQuestion: {question}\nAnswer:"
            row["completion"] = " " + answer
    elif fmt == "alpaca":
        if rng.random() < 0.7:
            row["instruction"] = rng.choice(ALPACA_INSTRUCTIONS)
            row["input"] = f"Passage: {passage}\nQuestion: {question}"
        else:
            row["instruction"] = f"{passage}\n\n{question}"
            row["input"] = ""
        row["output"] = answer
    else:
        raise ValueError(fmt)
    return row


def generate(rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> list[dict]:
    """The demo rows: 80% messages (about 4% of all rows with two assistant turns), 10% prompt/completion,
    10% alpaca, in a seeded shuffled order."""
    rng = random.Random(seed)
    n_pc = n_alpaca = rows // 10
    n_multi = max(1, rows // 25)
    n_messages = rows - n_pc - n_alpaca - n_multi
    formats = (
        ["messages"] * n_messages
        + ["multi_turn"] * n_multi
        + ["prompt_completion"] * n_pc
        + ["alpaca"] * n_alpaca
    )
    rng.shuffle(formats)
    out = []
    for index, fmt in enumerate(formats, start=1):
        row = _row(rng, fmt, index)
        size = len(json.dumps(row, ensure_ascii=False))
        if size > MAX_CHARS:
            raise AssertionError(f"row {index} has {size} characters (> {MAX_CHARS})")
        out.append(row)
    return out


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    rows = generate(args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_jsonl(rows), encoding="utf-8", newline="\n")
    print(f"wrote {len(rows)} rows ({args.out.stat().st_size} bytes) to {args.out}")


if __name__ == "__main__":
    main()
