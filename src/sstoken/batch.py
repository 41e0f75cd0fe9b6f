"""Turning encoded rows (input_ids + labels) into a right-padded batch."""

from __future__ import annotations

from collections.abc import Sequence


def pad_rows(rows: Sequence[dict], pad_id: int):
    """(input_ids, labels, attention_mask), each len(rows) × longest row; labels are -100 on padding."""
    import torch

    from sstoken.scoring import IGNORE_INDEX

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
