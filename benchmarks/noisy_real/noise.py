"""Realistic noise injected into clean responses, with an exact record of what was injected.

A *catalogue* (a JSON file; ``catalogue.json`` beside this module is the default) names the noise kinds, the
fraction of rows each one spoils and its parameters. Every noisy row carries exactly one kind, so each noise
token belongs to one kind, and its :class:`NoiseRecord` lists the edits that turned the clean text into the
noisy one: :func:`restore` undoes them exactly. The kinds:

``disclaimer``  an AI disclaimer or refusal sentence mined from ShareGPT itself, opening (or closing) the answer;
``truncation``  the answer cut off mid-sentence: what is noise is the end of turn that follows the cut;
``offtopic``    consecutive sentences of another conversation's answer spliced in at a sentence boundary;
``corruption``  character-level typos (swap, drop, double or replace a letter) in a fraction of the words;
``repetition``  a sentence repeated several times in a row, as a looping model writes it;
``wrong_fact``  a number (or, failing that, a proper name) in a fact-bearing sentence replaced by another.

Token level: :func:`token_kinds` marks a trained token as noise when it overlaps an edit in a non-space
character (a token that is all whitespace counts when it lies inside an edit), and, for a cut-off answer, every
trained token after the answer's text (the end-of-turn marker).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from sstoken.errors import ConfigError, did_you_mean, shown

DEFAULT_CATALOGUE = Path(__file__).resolve().parent / "catalogue.json"

# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Edit:
    """Characters ``start:end`` of the noisy text were ``original`` in the clean text (``""``: inserted)."""

    start: int
    end: int
    original: str


@dataclass(frozen=True)
class NoiseRecord:
    kind: str | None  # None: the row is clean
    edits: tuple[Edit, ...] = ()
    ends_early: bool = False  # truncation: the end of turn after the text is the noise

    def as_dict(self) -> dict:
        return {"kind": self.kind, "edits": [[e.start, e.end, e.original] for e in self.edits],
                "ends_early": self.ends_early}


CLEAN = NoiseRecord(None)


def restore(noisy: str, record: NoiseRecord) -> str:
    """The clean text: every edit undone (edits are disjoint; applied from the back)."""
    text = noisy
    for edit in sorted(record.edits, key=lambda e: e.start, reverse=True):
        text = text[:edit.start] + edit.original + text[edit.end:]
    return text


# ------------------------------------------------------------------------------------------------ catalogue
# kind -> parameter -> (type, lowest, highest, default); rate is common to all kinds.
PARAMETERS: dict[str, dict[str, tuple[type, float, float, object]]] = {
    "disclaimer": {"at_start": (float, 0.0, 1.0, 0.8), "pool_size": (int, 1, 10_000, 40)},
    "truncation": {"keep_min": (float, 0.05, 0.95, 0.3), "keep_max": (float, 0.05, 0.95, 0.7)},
    "offtopic": {"sentences_min": (int, 1, 20, 1), "sentences_max": (int, 1, 20, 2)},
    "corruption": {"word_fraction": (float, 0.01, 1.0, 0.3)},
    "repetition": {"repeats_min": (int, 1, 50, 2), "repeats_max": (int, 1, 50, 5)},
    "wrong_fact": {},
}
KINDS = tuple(PARAMETERS)
_TOP_KEYS = ("name", "description", "seed", "kinds")


@dataclass(frozen=True)
class KindSpec:
    rate: float  # fraction of the rows that get this kind
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Catalogue:
    name: str
    description: str
    seed: int
    kinds: dict[str, KindSpec]

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "seed": self.seed,
                "kinds": {k: {"rate": s.rate, **s.params} for k, s in self.kinds.items()}}


def _number(value, kind_type: type, where: str, low: float, high: float):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind_type is int and not is_int or kind_type is float and not (is_int or isinstance(value, float)):
        raise ConfigError(f"{where} must be {'an integer' if kind_type is int else 'a number'}, got {shown(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where} must be in [{low}, {high}], got {shown(value)}")
    return kind_type(value)


def parse_catalogue(obj, where: str = "catalogue") -> Catalogue:
    """A :class:`Catalogue` from parsed JSON; ConfigError naming the key for anything that cannot work."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {shown(key)}{did_you_mean(key, _TOP_KEYS)}; "
                              f"expected {', '.join(_TOP_KEYS)}")
    kinds_obj = obj.get("kinds")
    if not isinstance(kinds_obj, dict) or not kinds_obj:
        raise ConfigError(f"{where}: 'kinds' must be a non-empty object of noise kinds ({', '.join(KINDS)})")
    kinds = {}
    for kind, spec in kinds_obj.items():
        if kind not in PARAMETERS:
            raise ConfigError(f"{where}: unknown noise kind {shown(kind)}{did_you_mean(kind, KINDS)}; "
                              f"known kinds: {', '.join(KINDS)}")
        here = f"{where}: kinds.{kind}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{here} must be an object with a 'rate', got {shown(spec)}")
        if "rate" not in spec:
            raise ConfigError(f"{here} needs a 'rate' (the fraction of rows it spoils)")
        rate = _number(spec["rate"], float, f"{here}.rate", 0.0, 1.0)
        allowed = PARAMETERS[kind]
        params = {name: default for name, (_, _, _, default) in allowed.items()}
        for name, value in spec.items():
            if name == "rate":
                continue
            if name not in allowed:
                choices = ("rate", *allowed)
                raise ConfigError(f"{here}: unknown parameter {shown(name)}{did_you_mean(name, choices)}; "
                                  f"{kind} takes {', '.join(choices)}")
            kind_type, low, high, _ = allowed[name]
            params[name] = _number(value, kind_type, f"{here}.{name}", low, high)
        for low_name in [n for n in params if n.endswith("_min")]:
            high_name = low_name[:-4] + "_max"
            if params[low_name] > params[high_name]:
                raise ConfigError(f"{here}: {low_name} ({params[low_name]}) is above {high_name} "
                                  f"({params[high_name]})")
        kinds[kind] = KindSpec(rate, params)
    total = sum(s.rate for s in kinds.values())
    if total > 1.0 + 1e-9:
        raise ConfigError(f"{where}: the rates add up to {total:.3g}; each noisy row carries one kind, so they "
                          f"must add up to at most 1")
    seed = obj.get("seed", 0)
    seed = _number(seed, int, f"{where}: seed", 0, 2**31 - 1)
    name = obj.get("name", "unnamed")
    description = obj.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ConfigError(f"{where}: 'name' and 'description' must be text")
    return Catalogue(name=name, description=description, seed=seed, kinds=kinds)


def load_catalogue(path: str | Path = DEFAULT_CATALOGUE) -> Catalogue:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read noise catalogue {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"noise catalogue {path} is not valid JSON: {exc}") from None
    return parse_catalogue(obj, str(path))


# ------------------------------------------------------------------------------------------------ text pieces
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n")
_WORD = re.compile(r"[A-Za-z]{3,}")
_NUMBER = re.compile(r"(?<![\w.,:/-])\d{1,6}(?![\w]|[.,:/-]\d)")
# a capitalised word after a lowercase word: a name inside a sentence, not its first word
_PROPER_NAME = re.compile(r"(?<=[a-z,] )[A-Z][a-z]{2,}(?![\w'])")
_NOT_NAMES = {"The", "This", "That", "These", "Those", "There", "They", "When", "What", "Which", "While", "Here",
              "However", "And", "But", "For", "With", "You", "Your", "Our", "Its", "His", "Her", "Their", "If",
              "In", "On", "At", "As", "It", "We", "He", "She", "To", "Of", "Is", "Are", "Be", "Or", "So", "Not",
              "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "English"}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line, whitespace trimmed; pieces without a letter are left out."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if any(c.isalpha() for c in text[s:e]):
            out.append((s, e))
    return out


@dataclass(frozen=True)
class Materials:
    """Text the injections draw from, mined from other conversations (never from the row being spoilt)."""

    disclaimers: tuple[str, ...]  # most frequent first
    donor_texts: tuple[str, ...]  # answers of other conversations (off-topic splices)
    names: tuple[str, ...]  # proper names seen in other answers (wrong facts without a number)


DISCLAIMER = re.compile(
    r"^(?:as an ai\b|as a (?:large )?language model|as an ai language model|i'm sorry, but|i am sorry, but|"
    r"i apologi[sz]e|unfortunately, as an ai|i'm an ai|i am an ai|i'm just an ai|i am not able to|"
    r"i'm not able to|i cannot|i can't (?:browse|access|provide|predict|generate|help))", re.IGNORECASE)


def mine_disclaimers(texts, min_chars: int = 25, max_chars: int = 220) -> list[str]:
    """Disclaimer and refusal sentences found in ``texts``: one sentence each, no quotes, most frequent first
    (ties: shorter first, then alphabetical), each once."""
    counts: dict[str, int] = {}
    for text in texts:
        for s, e in sentence_spans(text):
            sentence = text[s:e]
            if (DISCLAIMER.search(sentence) and min_chars <= len(sentence) <= max_chars
                    and sentence.endswith((".", "!")) and '"' not in sentence and "\n" not in sentence):
                counts[sentence] = counts.get(sentence, 0) + 1
    return sorted(counts, key=lambda s: (-counts[s], len(s), s))


def mine_names(texts) -> list[str]:
    found = {m.group(0) for text in texts for m in _PROPER_NAME.finditer(text)} - _NOT_NAMES
    return sorted(found)


# ------------------------------------------------------------------------------------------------ injections
def _insert(text: str, at: int, piece: str, kind: str) -> tuple[str, NoiseRecord]:
    return text[:at] + piece + text[at:], NoiseRecord(kind, (Edit(at, at + len(piece), ""),))


def _disclaimer(text, p, rng, materials):
    if not materials.disclaimers:
        return None
    sentence = rng.choice(materials.disclaimers[:p["pool_size"]])
    if rng.random() < p["at_start"]:
        return _insert(text, 0, sentence + " ", "disclaimer")
    return _insert(text, len(text), " " + sentence, "disclaimer")


def _cut_points(text: str, p) -> list[int]:
    """Ends of words inside [keep_min, keep_max] of the text that do not end a sentence."""
    low, high = int(len(text) * p["keep_min"]), int(len(text) * p["keep_max"])
    return [i for i in range(max(low, 1), min(high, len(text) - 1) + 1)
            if text[i].isspace() and text[i - 1].isalnum()]


def _truncation(text, p, rng, materials):
    points = _cut_points(text, p)
    if not points:
        return None
    cut = rng.choice(points)
    return text[:cut], NoiseRecord("truncation", (Edit(cut, cut, text[cut:]),), ends_early=True)


def _offtopic(text, p, rng, materials):
    donors = [d for d in materials.donor_texts if d != text and sentence_spans(d)]
    if not donors:
        return None
    donor = rng.choice(donors)
    spans = sentence_spans(donor)
    count = min(rng.randint(p["sentences_min"], p["sentences_max"]), len(spans))
    first = rng.randrange(len(spans) - count + 1)
    snippet = donor[spans[first][0]:spans[first + count - 1][1]]
    ends = [e for _, e in sentence_spans(text)]
    at = rng.choice(ends[:-1]) if len(ends) > 1 else len(text)  # between two sentences where there are two
    return _insert(text, at, " " + snippet, "offtopic")


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _typo(word: str, rng: random.Random) -> str:
    """One character-level change that alters the word: swap two neighbours, drop, double or replace a letter."""
    while True:
        i = rng.randrange(len(word))
        op = rng.choice(("swap", "drop", "double", "replace"))
        if op == "swap" and i + 1 < len(word):
            new = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif op == "drop":
            new = word[:i] + word[i + 1:]
        elif op == "double":
            new = word[:i] + word[i] + word[i:]
        else:
            new = word[:i] + rng.choice(_LETTERS.replace(word[i].lower(), "")) + word[i + 1:]
        if new != word:
            return new


def _corruption(text, p, rng, materials):
    words = list(_WORD.finditer(text))
    if not words:
        return None
    chosen = sorted(rng.sample(range(len(words)), max(1, round(p["word_fraction"] * len(words)))))
    pieces, edits, position, shift = [], [], 0, 0
    for index in chosen:
        match = words[index]
        typo = _typo(match.group(0), rng)
        pieces.append(text[position:match.start()])
        start = match.start() + shift
        edits.append(Edit(start, start + len(typo), match.group(0)))
        pieces.append(typo)
        shift += len(typo) - len(match.group(0))
        position = match.end()
    pieces.append(text[position:])
    return "".join(pieces), NoiseRecord("corruption", tuple(edits))


def _repetition(text, p, rng, materials):
    spans = [(s, e) for s, e in sentence_spans(text) if len(text[s:e].split()) >= 3]
    if not spans:
        return None
    s, e = rng.choice(spans)
    repeats = rng.randint(p["repeats_min"], p["repeats_max"])
    return _insert(text, e, (" " + text[s:e]) * repeats, "repetition")


def _other_number(value: str, rng: random.Random) -> str:
    n = int(value)
    while True:
        if 1000 <= n <= 2100:  # a year
            new = n + rng.choice((-1, 1)) * rng.randint(1, 30)
        elif n < 10:
            new = rng.randint(1, 9)
        else:
            new = round(n * rng.choice((rng.uniform(0.3, 0.8), rng.uniform(1.25, 3.0))))
        if new != n and new >= 0:
            return str(new)


def _facts(text: str) -> tuple[list[re.Match], list[re.Match]]:
    return list(_NUMBER.finditer(text)), [m for m in _PROPER_NAME.finditer(text) if m.group(0) not in _NOT_NAMES]


def _wrong_fact(text, p, rng, materials):
    numbers, names = _facts(text)
    if numbers:
        match = rng.choice(numbers)
        new = _other_number(match.group(0), rng)
    else:
        others = [n for n in materials.names if names and n not in {m.group(0) for m in names}]
        if not names or not others:
            return None
        match = rng.choice(names)
        new = rng.choice(others)
    noisy = text[:match.start()] + new + text[match.end():]
    return noisy, NoiseRecord("wrong_fact", (Edit(match.start(), match.start() + len(new), match.group(0)),))


_INJECT = {"disclaimer": _disclaimer, "truncation": _truncation, "offtopic": _offtopic, "corruption": _corruption,
           "repetition": _repetition, "wrong_fact": _wrong_fact}


def inject(kind: str, text: str, params: dict, rng: random.Random, materials: Materials):
    """(noisy text, record) with one ``kind`` of noise, or None when the text offers no place for it."""
    return _INJECT[kind](text, params, rng, materials)


def applicable(kind: str, text: str, params: dict, materials: Materials) -> bool:
    """Whether ``inject`` can put ``kind`` into ``text`` (decided without drawing)."""
    if kind == "truncation":
        return bool(_cut_points(text, params))
    if kind == "corruption":
        return bool(_WORD.search(text))
    if kind == "repetition":
        return any(len(text[s:e].split()) >= 3 for s, e in sentence_spans(text))
    if kind == "wrong_fact":
        numbers, names = _facts(text)
        return bool(numbers) or (bool(names) and bool(materials.names))
    if kind == "offtopic":
        return bool(sentence_spans(text)) and any(d != text for d in materials.donor_texts)
    return bool(materials.disclaimers)


def noisy_mix(texts: list[str], catalogue: Catalogue, materials: Materials) -> list[tuple[str, NoiseRecord]]:
    """Each text, spoilt by at most one kind: round(rate·n) rows per kind, drawn with the catalogue's seed among the
    rows the kind fits (the kinds that fit fewest rows choose first). ConfigError when too few rows fit a kind."""
    rng = random.Random(catalogue.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    wanted = {kind: round(spec.rate * len(texts)) for kind, spec in catalogue.kinds.items()}
    fits = {kind: [i for i in order if applicable(kind, texts[i], catalogue.kinds[kind].params, materials)]
            for kind in wanted}
    assigned: dict[int, str] = {}
    for kind in sorted(wanted, key=lambda k: (len(fits[k]), KINDS.index(k))):
        free = [i for i in fits[kind] if i not in assigned][:wanted[kind]]
        if len(free) < wanted[kind]:
            raise ConfigError(f"noise kind {kind}: rate {catalogue.kinds[kind].rate} needs {wanted[kind]} of "
                              f"{len(texts)} rows, but only {len(free)} free rows can take it")
        assigned.update({i: kind for i in free})
    out = []
    for i, text in enumerate(texts):
        kind = assigned.get(i)
        if kind is None:
            out.append((text, CLEAN))
            continue
        row_rng = random.Random(f"{catalogue.seed}:{i}:{kind}")  # each row's draw independent of the others
        out.append(inject(kind, text, catalogue.kinds[kind].params, row_rng, materials))
    return out


# ------------------------------------------------------------------------------------------------ tokens
def token_kinds(rendering: str, offsets: list[tuple[int, int]], labels: list[int], text_start: int,
                record: NoiseRecord, text_end: int, ignore_index: int = -100) -> list[str | None]:
    """The noise kind of each token of ``rendering`` (None: clean, or not trained), whose noisy response text
    occupies ``text_start:text_end``; ``offsets`` are the tokens' character spans in ``rendering``.

    A trained token is noise when it shares a non-space character with an edit, or is all whitespace and lies
    inside one; with ``ends_early`` every trained token after the text (the end of turn) is noise too."""
    edits = [(text_start + e.start, text_start + e.end) for e in record.edits]
    kinds: list[str | None] = []
    for (s, e), label in zip(offsets, labels):
        noise = False
        if label != ignore_index and record.kind is not None:
            noise = record.ends_early and s >= text_end
            for a, b in edits:
                low, high = max(s, a), min(e, b)
                if low < high and (rendering[low:high].strip() or (a <= s and e <= b)):
                    noise = True
        kinds.append(record.kind if noise else None)
    return kinds
