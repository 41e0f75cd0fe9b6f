"""The NLL of held-out responses, through sstoken's head (no batch × length × vocabulary logits)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def held_out_nll(model, rows: Sequence[dict], batch_size: int = 8) -> list[float]:
    """Mean NLL (nats per token) of each row's trained tokens; ``rows`` are encoded (input_ids + labels).

    Through sstoken's head where the model allows it (:mod:`sstoken.selection.lm_head`): only response positions are
    projected, never the full batch × length × vocabulary logits (2 GB for 8 rows of 256 tokens at Gemma's 262k).
    """
    from sstoken.selection.lm_head import rows_token_nll, use_sstoken_head
    from sstoken.selection.scoring import response_mask_from_labels

    fused = use_sstoken_head(model, "held-out NLL") is None
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    means = [math.nan] * len(rows)
    for start in range(0, len(order), batch_size):
        nll, labels = rows_token_nll(model, [rows[i] for i in order[start:start + batch_size]], pad, fused)
        trained = response_mask_from_labels(labels)
        for j, index in enumerate(order[start:start + batch_size]):
            count = int(trained[j].sum())
            means[index] = float(nll[j].float()[trained[j]].sum()) / count if count else math.nan
    return means


def held_out_split(n_rows: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): disjoint sorted indices of ``n_rows`` rows, ``round(fraction * n_rows)``
    of them (at least one) held out, chosen by a permutation drawn with ``seed``. The same arguments give the
    same split on any machine (NumPy's PCG64 generator)."""
    import numpy as np

    n_held = max(1, round(fraction * n_rows))
    order = np.random.default_rng(seed).permutation(n_rows)
    return sorted(int(i) for i in order[n_held:]), sorted(int(i) for i in order[:n_held])


def rows_fingerprint(rows: Sequence[dict]) -> str:
    """SHA-256 of encoded rows (their token ids and labels, in order): equal only for the same rows, scored on
    the same tokens."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for row in rows:
        for key in ("input_ids", "labels"):
            values = np.asarray(row[key], dtype=np.int64)
            digest.update(len(values).to_bytes(8, "little") + values.tobytes())
    return digest.hexdigest()
