"""Batches and models as the rest of sstoken handles them: the label of untrained tokens, padding rows into a
batch, and reaching the model inside its wrappers. Cheap to import (torch only inside the functions)."""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (Hugging Face convention)."""

TOKEN_WEIGHTS = "token_weights"
"""Column (and batch key) of per-token loss weights, float, aligned like ``labels``; only data with ``weight``
fields has it (see docs/data.md). In a dataset, an empty list is a row whose tokens all weigh 1 (it keeps the
column small for the unweighted rows of weighted data); in a batch it is a B×T float tensor."""


def pad_rows(rows: Sequence[dict], pad_id: int):
    """(input_ids, labels, attention_mask), each len(rows) × longest row; labels are -100 on padding."""
    import torch

    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
    return ids, labels, attention


def row_weights(row: dict) -> list[float]:
    """The token weights of one encoded row, one per token: its ``token_weights``, or 1s when it has none."""
    weights = row.get(TOKEN_WEIGHTS) or [1.0] * len(row["input_ids"])
    if len(weights) != len(row["input_ids"]):
        from sstoken.errors import DataError

        raise DataError(f"a row has {len(weights)} token_weights for {len(row['input_ids'])} input_ids; they must "
                        "be as long (or empty: every token weighs 1)")
    return list(weights)


def padded_weights(weight_rows: Sequence[Sequence[float]], shape: tuple[int, int]):
    """Rows of token weights in a float32 tensor of ``shape``, each row from the left, 0 on the padding."""
    import torch

    out = torch.zeros(shape, dtype=torch.float32)
    for i, row in enumerate(weight_rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out


def unwrap_model(model):
    """The model inside DDP / accelerate wrappers (each keeps the wrapped model as ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def unwrap_base_model(model):
    """The transformers model inside DDP-style wrappers and a PEFT model (the adapter's host)."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
