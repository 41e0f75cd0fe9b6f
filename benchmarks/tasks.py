"""Deterministic task generators for the quality benchmark, with a per-character noise record.

Two tasks with checkable answers, in natural-language style:

* ``rc`` (reading comprehension): a passage about an invented person (name, city, birth year, job); the
  question asks one of the facts; the answer is copied from the passage.
* ``arith`` (a computed answer): a short word problem with small numbers (one addition or subtraction).

Each example is generated clean; training responses then receive noise, each kind with its own rate:

* ``boilerplate``: a filler sentence put in front of the answer ("Sure, let me help with that.").
* ``wrong_fact``: the answer entity replaced by a plausible wrong one (another city / year / job that is
  *not* in the passage, or a number off by a little), so it cannot be learned from the prompt.
* ``corrupt``: a fraction of the response's words replaced by random letter strings.

Every noisy character is recorded as a span, so the benchmark can tell, per token, whether a selector
kept noise or clean text. Everything is a pure function of the seed (``random.Random``), so two runs
generate the same data.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field

FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca",
         "Mira", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tara", "Ugo", "Vera", "Wim", "Yara", "Zane"]
LAST = ["Berg", "Corvin", "Dale", "Ekman", "Falk", "Grove", "Holm", "Ivers", "Janko", "Kessel", "Lund", "Marsh",
        "Novak", "Orlov", "Pike", "Quist", "Rowe", "Sand", "Toft", "Ulm", "Voss", "Wren"]
CITIES = ["Oslo", "Lima", "Cairo", "Quito", "Porto", "Riga", "Turin", "Leeds", "Perth", "Dakar", "Hanoi", "Bern",
          "Split", "Cork", "Graz", "Malmo", "Nantes", "Pisa", "Tartu", "Varna"]
JOBS = ["baker", "pilot", "nurse", "farmer", "lawyer", "painter", "teacher", "plumber", "chemist", "tailor",
        "dentist", "sailor", "librarian", "carpenter", "jeweler", "architect"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "shells", "marbles", "cards", "eggs", "flowers"]
FILLERS = [
    "Sure, I can help with that.",
    "Thank you for your question.",
    "Great question, let me check.",
    "As an AI assistant, I am happy to help.",
    "Here is the answer you asked for.",
    "Let me think about this carefully.",
]
SYSTEM = "Answer the question in one short sentence."


@dataclass
class Example:
    """One conversation: ``prompt`` (user turn), ``response`` (assistant turn), the answer, and noise spans."""

    task: str
    prompt: str
    response: str
    answer: str
    clean_response: str
    noise_spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, kind) in response
    # (start, end) of the correct answer in the response; None when a wrong fact replaced it
    answer_span: tuple[int, int] | None = None

    def messages(self, response: str | None = None) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.response if response is None else response}]

    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages()[:2]


@dataclass(frozen=True)
class NoiseLevels:
    """Per-response probabilities of each noise kind (independent), and the corrupted-word fraction."""

    boilerplate: float = 0.5
    wrong_fact: float = 0.3
    corrupt: float = 0.4
    corrupt_words: float = 0.4

    def as_dict(self) -> dict[str, float]:
        return {"boilerplate": self.boilerplate, "wrong_fact": self.wrong_fact, "corrupt": self.corrupt,
                "corrupt_words": self.corrupt_words}


# ------------------------------------------------------------------------------------------- clean tasks
def _people(rng: random.Random, k: int = 3) -> list[dict]:
    firsts, lasts = rng.sample(FIRST, k), rng.sample(LAST, k)
    cities, jobs = rng.sample(CITIES, k), rng.sample(JOBS, k)
    years = rng.sample(range(1940, 2006), k)
    return [{"name": f"{f} {l}", "city": c, "year": str(y), "job": j}
            for f, l, c, j, y in zip(firsts, lasts, cities, jobs, years)]


def reading_comprehension(rng: random.Random, n_people: int = 1) -> tuple[Example, dict]:
    # One person by default: the benchmark's small default model (2 layers) cannot learn to pick the right
    # person out of three in a 40-step SFT run (10% answer accuracy with clean data when tried), which
    # would leave no room to tell methods apart. The passage still holds three facts, one of them asked.
    people = _people(rng, n_people)
    passage = " ".join(f"{p['name']} was born in {p['city']} in {p['year']} and works as a {p['job']}."
                       for p in people)
    who = rng.choice(people)
    kind = rng.choice(["city", "year", "job"])
    question = {"city": f"In which city was {who['name']} born?",
                "year": f"In which year was {who['name']} born?",
                "job": f"What is the job of {who['name']}?"}[kind]
    template = {"city": "{name} was born in {ans}.", "year": "{name} was born in {ans}.",
                "job": "{name} works as a {ans}."}[kind]
    answer = who[kind]
    # distractors are never in the passage, so a wrong fact cannot be copied from the prompt
    present = {p[kind] for p in people}
    pool = {"city": CITIES, "job": JOBS, "year": [str(y) for y in range(1940, 2006)]}[kind]
    wrong = rng.choice([v for v in pool if v not in present])
    example = Example("rc", f"{passage}\n{question}", "", answer, "")
    return example, {"template": template, "name": who["name"], "answer": answer, "wrong": wrong}


def arithmetic(rng: random.Random) -> tuple[Example, dict]:
    name = rng.choice(FIRST)
    item = rng.choice(ITEMS)
    a = rng.randint(3, 12)
    b = rng.randint(1, 9)
    if rng.random() < 0.5:
        text = f"{name} has {a} {item}. A friend gives {name} {b} more {item}."
        result = a + b
    else:
        a = max(a, b + 1)
        text = f"{name} has {a} {item}. {name} gives away {b} of them."
        result = a - b
    question = f"{text}\nHow many {item} does {name} have now?"
    wrong = result + rng.choice([-2, -1, 1, 2])
    example = Example("arith", question, "", str(result), "")
    return example, {"template": "{name} has {ans} " + item + " now.", "name": name, "answer": str(result),
                     "wrong": str(max(0, wrong) if wrong != result else result + 1)}


TASKS = {"rc": reading_comprehension, "arith": arithmetic}


# ------------------------------------------------------------------------------------------- noise
def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def _build_response(spec: dict, rng: random.Random, levels: NoiseLevels | None) -> tuple[str, list, tuple | None]:
    """The response text, its noise spans and the span of the correct answer (None if a wrong fact replaced
    it); ``levels=None`` gives the clean response."""
    pieces: list[tuple[str, str | None]] = []  # (text, noise kind or None)
    noisy = levels is not None
    if noisy and rng.random() < levels.boilerplate:
        pieces.append((rng.choice(FILLERS), "boilerplate"))
        pieces.append((" ", None))
    wrong = noisy and rng.random() < levels.wrong_fact
    corrupt = noisy and rng.random() < levels.corrupt
    before, after = spec["template"].split("{ans}")
    before = before.format(name=spec["name"])
    # words of the sentence around the answer; corruption replaces whole words, never the answer itself
    # (a corrupted answer would be a wrong fact; that kind has its own rate)
    for chunk, is_answer in ((before, False), (spec["wrong"] if wrong else spec["answer"], True), (after, False)):
        if is_answer:
            answer_index = len(pieces)
            pieces.append((chunk, "wrong_fact" if wrong else None))
            continue
        for token in re.split(r"(\s+)", chunk):
            if not token:
                continue
            if corrupt and not token.isspace() and token not in ".," and rng.random() < levels.corrupt_words:
                trail = token[-1] if token[-1] in ".," else ""
                pieces.append((_random_word(rng), "corrupt"))
                if trail:
                    pieces.append((trail, None))
            else:
                pieces.append((token, None))
    text, spans, answer_span = "", [], None
    for index, (chunk, kind) in enumerate(pieces):
        if kind is not None:
            spans.append((len(text), len(text) + len(chunk), kind))
        elif index == answer_index:
            answer_span = (len(text), len(text) + len(chunk))
        text += chunk
    return text, spans, answer_span


def generate(task: str, n: int, seed: int, levels: NoiseLevels | None = None) -> list[Example]:
    """``n`` examples of ``task``; with ``levels``, responses are noisy (clean ones kept in clean_response)."""
    rng = random.Random(f"{task}:{seed}")
    noise_rng = random.Random(f"{task}:{seed}:noise")
    out = []
    for _ in range(n):
        example, spec = TASKS[task](rng)
        clean, _, clean_answer = _build_response(spec, noise_rng, None)
        response, spans, answer_span = (_build_response(spec, noise_rng, levels) if levels is not None
                                        else (clean, [], clean_answer))
        example.response, example.clean_response, example.noise_spans = response, clean, spans
        example.answer_span = answer_span
        out.append(example)
    return out


def make_splits(n_train: int, n_test: int, seed: int, levels: NoiseLevels) -> dict[str, list[Example]]:
    """Train (noisy responses + clean twins) and a clean test set; half of each split is rc, half arith.

    The test set uses a different generator stream from training, and any test prompt that also occurs in
    training is dropped (with invented facts a collision is possible but rare).
    """
    train = []
    for task in TASKS:
        train += generate(task, n_train // len(TASKS), seed, levels)
    random.Random(f"shuffle:{seed}").shuffle(train)
    seen = {e.prompt for e in train}
    test = []
    for task in TASKS:
        test += [e for e in generate(task, n_test // len(TASKS), seed + 10_000) if e.prompt not in seen]
    return {"train": train, "test": test}


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: the exact-match comparison form."""
    text = text.lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def answer_correct(generated: str, example: Example) -> bool:
    """The gold answer appears as a whole word in the output (format ignored: boilerplate is not penalised)."""
    return f" {normalise(example.answer)} " in f" {normalise(generated)} "


def exact_match(generated: str, example: Example) -> bool:
    return normalise(generated) == normalise(example.clean_response)


# ------------------------------------------------------------------------------------------- pretraining text
def pretraining_document(rng: random.Random) -> str:
    """Plain text (no chat turns) of the same world: a passage and one restated fact, or a short story sum.

    A small model pretrained on this knows the names, cities and the copy / add / subtract patterns, but
    has never seen the question-answer chat format, the filler sentences or the corrupted words: SFT then
    teaches the format, as instruction tuning does for a pretrained LM.
    """
    if rng.random() < 0.5:
        people = _people(rng)
        passage = " ".join(f"{p['name']} was born in {p['city']} in {p['year']} and works as a {p['job']}."
                           for p in people)
        who = rng.choice(people)
        fact = rng.choice([f"{who['name']} was born in {who['city']}.", f"{who['name']} was born in {who['year']}.",
                           f"{who['name']} works as a {who['job']}."])
        return f"{passage} Indeed, {fact}"
    name, item = rng.choice(FIRST), rng.choice(ITEMS)
    a, b = rng.randint(3, 12), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"{name} has {a} {item}. A friend gives {name} {b} more {item}. So {name} has {a + b} {item} now."
    a = max(a, b + 1)
    return f"{name} has {a} {item}. {name} gives away {b} of them. So {name} has {a - b} {item} now."


def tokenizer_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Texts to train the benchmark's small BPE tokenizer on (pretraining text, fillers, questions)."""
    rng = random.Random(f"tokenizer:{seed}")
    texts = [pretraining_document(rng) for _ in range(n)]
    texts += FILLERS * 20 + [SYSTEM] * 20
    texts += [f"In which city was {f} {l} born? In which year was {f} {l} born? What is the job of {f} {l}?"
              for f in FIRST for l in LAST[:3]]
    texts += [f"How many {item} does {f} have now?" for f in FIRST for item in ITEMS]
    return texts
