"""Exceptions that the CLI turns into a one-line message instead of a traceback."""


class SSTokenError(Exception):
    """Base class: an error the user can fix (bad data, bad configuration, mismatched cache)."""


class DataError(SSTokenError):
    """A training file or row that cannot be used. The message names file, line and field."""


class ConfigError(SSTokenError):
    """A configuration value that cannot work, detected before training starts."""


class ReportError(SSTokenError):
    """A run directory or inspection input that cannot be reported on."""


# Messages quote values that come from users' files. They must stay one short line whatever the input: a YAML
# alias bomb expands to gigabytes when printed, an integer can have more digits than Python will convert, and a
# file name can hold terminal escape sequences.
MAX_SHOWN_CHARS = 200
MAX_MESSAGE_CHARS = 2000
_SIMILARITY_CUTOFF = 0.8  # below this, difflib's best match is usually a different word (input_ids -> input)


def shown(value) -> str:
    """``repr(value)`` bounded in length and cost, and with control characters escaped."""
    import reprlib

    limits = reprlib.Repr()
    limits.maxlevel, limits.maxlist, limits.maxtuple, limits.maxdict, limits.maxset = 3, 6, 6, 6, 6
    limits.maxstring = limits.maxother = limits.maxlong = MAX_SHOWN_CHARS
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * MAX_SHOWN_CHARS:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"  # repr() itself would refuse
    return escaped(limits.repr(value))[:MAX_SHOWN_CHARS]


def escaped(text: str) -> str:
    """``text`` with control characters (other than spaces) written as escapes, so a terminal shows them."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


def one_line(message: str) -> str:
    """A message as one escaped line of bounded length (for ``sstoken: error: ...``)."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    text = escaped(text[: 2 * MAX_MESSAGE_CHARS])  # cut first: escaping goes character by character
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def did_you_mean(word, choices) -> str:
    """`` (did you mean 'x'?)`` for a close spelling of ``word`` among ``choices``, else ``""``.

    Spellings are compared by their look-alike skeleton (:func:`lookalike_skeleton`), so a key typed with a Greek
    or Cyrillic letter, another case or a full-width form finds the key it imitates; the hint then names the
    characters that differ, which the terminal shows exactly like the Latin ones.
    """
    import difflib

    if not isinstance(word, str):
        return ""
    by_skeleton: dict[str, str] = {}
    for choice in choices:
        if isinstance(choice, str):
            by_skeleton.setdefault(lookalike_skeleton(choice), choice)
    skeleton = lookalike_skeleton(word)
    close = [by_skeleton[skeleton]] if skeleton in by_skeleton else [
        by_skeleton[s] for s in difflib.get_close_matches(skeleton, list(by_skeleton), n=1, cutoff=_SIMILARITY_CUTOFF)]
    if not close:
        return ""
    foreign = [ch for ch in dict.fromkeys(word) if not ch.isascii() and ch not in close[0]]
    note = ""
    if foreign:
        import unicodedata

        what = "a look-alike character" if len(foreign) == 1 else "look-alike characters"
        note = f" {shown(word)} has {what}: " + ", ".join(
            f"{ch} (U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')})" for ch in foreign[:3])
    return f" (did you mean {close[0]!r}?{note})"


# Greek and Cyrillic letters drawn like a Latin letter in common fonts (the letter-for-letter part of Unicode's
# confusables, UTS #39): a key typed on another keyboard layout, or pasted from a document, looks right and is not.
_LOOKALIKES = str.maketrans({
    # Greek
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P",
    "Τ": "T", "Υ": "Y", "Χ": "X", "α": "a", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "υ": "u", "χ": "x",
    "γ": "y", "ϲ": "c", "ϳ": "j",
    # Cyrillic
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X",
    "І": "I", "Ј": "J", "Ѕ": "S", "Ү": "Y", "Ԛ": "Q", "Ԝ": "W", "а": "a", "е": "e", "о": "o", "р": "p", "с": "c",
    "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ү": "y",
})


def lookalike_skeleton(text: str) -> str:
    """``text`` as it reads: compatibility forms folded (NFKC: full-width and mathematical letters, ligatures),
    Greek and Cyrillic look-alikes replaced by the Latin letter they imitate, and case folded."""
    import unicodedata

    return unicodedata.normalize("NFKC", text).translate(_LOOKALIKES).casefold()
