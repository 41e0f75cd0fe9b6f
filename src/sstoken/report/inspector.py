"""Per-token inspection: a few samples scored the way the trainer scores them (one forward pass with the
context-share probe, per-token NLL, REL against the history model, the chosen selector), as the data behind
the page of :mod:`sstoken.report.page` and its JSON.
"""

from __future__ import annotations

from sstoken.batch import TOKEN_WEIGHTS, pad_rows, padded_weights, row_weights
from sstoken.errors import ConfigError

INSPECT_METHODS = ("sstoken", "rel", "attn", "random", "full")


# ============================================================================================ pure helpers
def token_pieces(token_ids: list[int], decode) -> list[str]:
    """The text each token adds when the sequence is decoded, so that the pieces join to the decoded text.

    ``decode(ids) -> str``. Decoding tokens one at a time loses what depends on neighbours (SentencePiece's
    leading-space marker, a character split over several byte tokens), so each piece is the difference
    between decoding a short run of tokens with and without it, the run starting at the last token that
    ended on a whole character. Tokens holding only the leading bytes of a character get ``""`` and the token
    that completes it gets the whole character.
    """
    pieces = []
    prefix_start = read_start = 0  # decode from prefix_start; text up to read_start is already handed out
    for i in range(len(token_ids)):
        prefix = decode(token_ids[prefix_start:read_start])
        text = decode(token_ids[prefix_start:i + 1])
        last = i == len(token_ids) - 1
        if not text.startswith(prefix):  # the decoder rewrote earlier text (clean-up rules)
            pieces.append(decode(token_ids[i:i + 1]))
            prefix_start = read_start = i + 1
        elif text.endswith("\ufffd") and not last:
            pieces.append("")  # an incomplete character: wait for the token that completes it
        else:
            pieces.append(text[len(prefix):])
            prefix_start, read_start = read_start, i + 1
    return pieces


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sample_summary(tokens: list[dict]) -> dict:
    """Counts and mean signals over one sample's response tokens (the numbers in the page header)."""
    response = [t for t in tokens if t["role"] == "response"]
    return {
        "n_tokens": len(tokens),
        "n_response": len(response),
        "n_kept": sum(1 for t in response if t["kept"]),
        "mean_rel": mean_or_none([t["rel"] for t in response]),
        "mean_attention_share": mean_or_none([t["attention_share"] for t in response]),
        "mean_score": mean_or_none([t["score"] for t in response]),
        "mean_nll": mean_or_none([t["nll"] for t in response]),
        "mean_weight": mean_or_none([t["weight"] for t in response]),
    }


def score_gamma(method: str, gamma: float) -> float:
    """The γ of the score a method ranks by: REL alone is γ=1, attention alone γ=0.

    ``random`` and ``full`` rank by nothing; their page shows the ssToken score with the given γ for reference.
    """
    return {"rel": 1.0, "attn": 0.0}.get(method, gamma)


# ============================================================================================ inspect
def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def score_batch(model, rows: list[dict], selector, gamma: float, probe, has_history_model: bool, pad_id: int,
                sstoken_head: bool, dft: bool = False):
    """Signals, keep mask and token weights of a batch of encoded rows, through the trainer's pipeline; tensors
    are B×T.

    :func:`sstoken.selection.signals.select_tokens`, as in training: one forward pass of the current model captures the
    attention share; with ``has_history_model`` (a PEFT adapter) the base weights give the history NLL,
    otherwise history == current and REL is 0. ``sstoken_head``: the model runs sstoken's head
    (:func:`sstoken.selection.lm_head.use_sstoken_head`), else the full logits. A token's weight is its loss
    weight in training: the rows' ``token_weights`` (the data's ``weight`` fields), times DFT's with ``dft``.
    """
    import torch

    from sstoken.selection import scoring
    from sstoken.selection.signals import (
        BaseModelHistory,
        CurrentModelHistory,
        SignalSources,
        select_tokens,
    )

    ids, labels, attention = pad_rows(rows, pad_id)
    inputs = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    if any(row.get(TOKEN_WEIGHTS) for row in rows):
        inputs[TOKEN_WEIGHTS] = padded_weights([row_weights(row) for row in rows], tuple(ids.shape))
    sources = SignalSources(history=BaseModelHistory() if has_history_model else CurrentModelHistory(),
                            probe=probe, sstoken_head=sstoken_head)
    with torch.no_grad():
        selection = select_tokens(model, inputs, selector, sources, progress=1.0, dft=dft)
    signals, response = selection.signals, selection.layout.response
    nll, history, share = signals.current_nll, signals.history_nll, signals.context_share
    rel = scoring.retrospective_excess_loss(history, nll)
    weights = selection.weights if selection.weights is not None else torch.ones_like(nll)
    return {"ids": ids, "valid": selection.layout.valid, "response": response, "nll": nll, "history": history,
            "rel": rel, "rel_norm": scoring.minmax_normalize(rel, response), "share": share,
            "score": scoring.sstoken_scores(history, nll, share, response, gamma), "keep": selection.keep,
            "weight": weights}


def sample_records(batch: dict, row: int, pieces: list[str], special: set[int]) -> list[dict]:
    """Per-token dicts of one row of :func:`score_batch`; signals are ``None`` on context tokens."""
    tokens = []
    n = int(batch["valid"][row].sum().item())
    for pos in range(n):
        token_id = int(batch["ids"][row, pos].item())
        is_response = bool(batch["response"][row, pos].item())

        def value(name):
            return float(batch[name][row, pos].item()) if is_response else None

        tokens.append({
            "position": pos,
            "id": token_id,
            "text": pieces[pos],
            "special": token_id in special,
            "role": "response" if is_response else "context",
            "nll": value("nll"),
            "history_nll": value("history"),
            "rel": value("rel"),
            "rel_norm": value("rel_norm"),
            "attention_share": value("share"),
            "score": value("score"),
            "weight": value("weight"),
            "kept": bool(batch["keep"][row, pos].item()),
        })
    return tokens


def inspect_samples(model, tokenizer, rows: list[dict], *, method: str = "sstoken", rho: float = 0.6,
                    gamma: float = 0.5, layer: int = -1, has_history_model: bool = False, batch_size: int = 4,
                    seed: int = 0, loss_type: str = "nll", settings: dict | None = None) -> dict:
    """Score ``rows`` (encoded ``input_ids`` / ``labels``, and ``token_weights`` where the data has weights) and
    return the page/JSON data. ``loss_type`` ``"dft"`` shows DFT's weights in each token's loss weight."""
    from sstoken.selection.attention import ContextShareProbe
    from sstoken.selection.lm_head import use_sstoken_head
    from sstoken.selection.selectors import make_selector

    if method not in INSPECT_METHODS:
        raise ConfigError(f"unknown inspect method {method!r}; choose one of {', '.join(INSPECT_METHODS)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if loss_type not in ("nll", "dft"):
        raise ConfigError(f"loss type must be nll or dft, got {loss_type!r}")
    selector = make_selector(method, rho=rho, gamma=gamma, seed=seed)
    effective_gamma = score_gamma(method, gamma)
    model.eval()
    probe = ContextShareProbe(model, layer=layer)
    sstoken_head = use_sstoken_head(model, "inspect") is None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = _special_ids(tokenizer)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    samples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = score_batch(model, chunk, selector, effective_gamma, probe, has_history_model, pad_id, sstoken_head,
                            dft=loss_type == "dft")
        for row, encoded in enumerate(chunk):
            tokens = sample_records(batch, row, token_pieces(list(encoded["input_ids"]), decode), special)
            samples.append({"index": start + row, "tokens": tokens, "summary": sample_summary(tokens)})

    notes = []
    if not has_history_model:
        notes.append("No adapter given: the current model is the base model, so the history NLL equals the "
                     "current NLL and REL is 0 for every token. The score reduces to (1−γ)·attention share. "
                     "Pass --adapter with a trained LoRA adapter to see REL.")
        if method == "rel":
            notes.append("With REL = 0 everywhere the 'rel' selector has nothing to rank by: it keeps the "
                         "earliest tokens (ties break by position).")
    if method in ("random", "full"):
        notes.append(f"The '{method}' selector does not rank by score; the shading shows the ssToken score "
                     f"with γ={gamma} for comparison.")
    merged = {"method": method, "loss_type": loss_type, "rho": 1.0 if method == "full" else rho, "gamma": gamma,
              "score_gamma": effective_gamma, "layer": probe.layer_index, "samples": len(samples),
              "history": "base model (adapter disabled)" if has_history_model else "none (current model = base)",
              "default_mode": {"rel": "rel", "attn": "attn"}.get(method, "score")}
    merged.update(settings or {})
    return {"settings": merged, "notes": notes, "samples": samples}
