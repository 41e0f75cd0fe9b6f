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
    """`` (did you mean 'x'?)`` for a close spelling of ``word`` among ``choices``, else ``""``."""
    import difflib

    if not isinstance(word, str):
        return ""
    choices = [c for c in choices if isinstance(c, str)]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=_SIMILARITY_CUTOFF)
    close = close or [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""
