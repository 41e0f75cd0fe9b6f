"""A row → ``{"input_ids": [...], "labels": [...]}`` with Hugging Face's unshifted labels: ``labels[i] ==
input_ids[i]`` on trained (response) tokens and ``-100`` on context tokens.

* Conversations: :func:`sstoken.data.templates.encode_conversation`.
* Plain prompt/completion strings are tokenized separately and concatenated: prompt (plus BOS when the
  tokenizer adds one to plain text) is context, completion + EOS is trained. A ``text`` row is tokenized as TRL
  does (special tokens, EOS appended) and trained whole.
* Sequences are truncated from the right to ``max_seq_length``; a row with no trained token left at a position
  >= 1 (position 0 never carries loss after the shift) is skipped and counted, not an error.
* Loss weights: a row's ``weight`` times its assistant message's (1 where none is given) is each trained token's
  weight, kept in ``weights`` (None when all are 1); a weight of 0 leaves those tokens untrained (context), so a
  row of weight 0 is skipped like one truncated to nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sstoken.batch import IGNORE_INDEX, TOKEN_WEIGHTS
from sstoken.data.formats import RowError, parse_row
from sstoken.data.reading import json_type
from sstoken.data.templates import encode_conversation
from sstoken.errors import ConfigError, DataError


@dataclass
class EncodedRow:
    """One tokenized training row. ``labels`` is unshifted, ``-100`` on context tokens; ``weights`` is each token's
    loss weight (read on trained tokens only), None when every trained token weighs 1."""

    input_ids: list[int]
    labels: list[int]
    format: str = "messages"
    truncated: bool = False
    weights: list[float] | None = None

    @property
    def num_trained(self) -> int:
        """Trained tokens that can carry loss (position 0 never does: nothing precedes it)."""
        return sum(1 for lbl in self.labels[1:] if lbl != IGNORE_INDEX)

    def as_dict(self) -> dict[str, list]:
        row = {"input_ids": list(self.input_ids), "labels": list(self.labels)}
        if self.weights is not None:
            row[TOKEN_WEIGHTS] = list(self.weights)
        return row


def check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "the tokenizer must be a fast (Rust) tokenizer: label masking needs return_offsets_mapping"
        )


def check_max_seq_length(max_seq_length: Any) -> None:
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _encode_strings(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int], None]:
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if _adds_bos(tokenizer) and prompt_ids[:1] != [tokenizer.bos_token_id]:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and completion_ids[-1:] != [eos]:
        completion_ids.append(eos)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, None


def _encode_text(text: str, tokenizer: Any) -> tuple[list[int], list[int], None]:
    """A language-modelling row as TRL tokenizes it (special tokens the tokenizer adds, EOS appended unless the
    text ends with it): every token is trained, there is no context."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids[-1:] != [eos]:
        ids.append(eos)
    return ids, list(ids), None


def _encode_fields(row: Mapping[str, Any], tokenizer: Any, max_tokens: int):
    """(format, input_ids, labels, per-token weights or None); the row's own weight applied."""
    parsed = parse_row(row)
    if parsed.text is not None:
        input_ids, labels, weights = _encode_text(parsed.text, tokenizer)
    elif parsed.messages is None:
        input_ids, labels, weights = _encode_strings(parsed.prompt, parsed.completion, tokenizer)
    else:
        input_ids, labels, weights = encode_conversation(parsed.messages, parsed.names, parsed.first_trained,
                                                         tokenizer, max_tokens, parsed.tools, parsed.turn_weights)
    if parsed.weight == 0:
        labels = [IGNORE_INDEX] * len(labels)
    elif parsed.weight != 1:
        weights = [parsed.weight * w for w in (weights or [1.0] * len(input_ids))]
    return parsed.format, input_ids, labels, weights


def encode_row(
    row: Mapping[str, Any], tokenizer: Any, max_seq_length: int, *, where: str = "<row>"
) -> EncodedRow | None:
    """Validate and tokenize one row; ``None`` when no trained token survives truncation.

    ``where`` prefixes error messages (``load_training_rows`` passes ``"{path}:{line}"``). Raises
    :class:`DataError` for a malformed row and :class:`ConfigError` for an unusable tokenizer or
    ``max_seq_length``. The sequence is truncated from the right to ``max_seq_length`` tokens.
    """
    check_tokenizer(tokenizer)
    check_max_seq_length(max_seq_length)
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {json_type(row)}")
    try:
        fmt, input_ids, labels, weights = _encode_fields(row, tokenizer, max_seq_length)
    except RowError as exc:
        raise DataError(exc.render(where)) from None
    truncated = len(input_ids) > max_seq_length
    if truncated:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
        weights = None if weights is None else weights[:max_seq_length]
    encoded = EncodedRow(input_ids=input_ids, labels=labels, format=fmt, truncated=truncated, weights=weights)
    if encoded.num_trained == 0:
        return None
    return encoded


def token_features(weighted: bool = False) -> dict[str, Any]:
    """The ``datasets`` features of encoded rows: int64 ``input_ids`` and ``labels`` sequences, and with
    ``weighted`` the float32 ``token_weights`` sequence."""
    import datasets

    sequence = getattr(datasets, "List", None) or datasets.Sequence
    features = {"input_ids": sequence(datasets.Value("int64")), "labels": sequence(datasets.Value("int64"))}
    if weighted:
        features[TOKEN_WEIGHTS] = sequence(datasets.Value("float32"))
    return features


def to_hf_dataset(rows: list[Mapping[str, list]]):
    """A :class:`datasets.Dataset` with int64 ``input_ids`` and ``labels`` columns, plus ``token_weights`` when a
    row has them (an empty list for the rows without: they weigh 1)."""
    import datasets

    columns = {"input_ids": [list(r["input_ids"]) for r in rows], "labels": [list(r["labels"]) for r in rows]}
    weighted = any(r.get(TOKEN_WEIGHTS) for r in rows)
    if weighted:
        columns[TOKEN_WEIGHTS] = [list(r.get(TOKEN_WEIGHTS) or []) for r in rows]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(token_features(weighted)))
