"""Memory that sstoken's attention share and LM head add, one layer / the head alone, at growing lengths.

    PYTHONPATH=src nice -n 10 python benchmarks/attention_memory.py --lengths 2048 4096 8192 16384 32768

``share``: :func:`sstoken.selection.attention.context_share_from_qk` on random post-RoPE query/key tensors of
SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64). It works ``chunk_size`` query rows at a time, so
its temporaries are O(H·chunk·T): linear in T.

``eager``: what eager attention with ``output_attentions=True`` builds for the same layer, following
``eager_attention_forward`` in transformers: K repeated to every query head, Q·Kᵀ·scale plus the additive
B×1×T×T causal mask, softmax in float32; the B×H×T×T map is kept (it is the returned attention). O(T²).

``head``: sstoken's LM head (:func:`sstoken.selection.lm_head.head_outputs`) on one row of T hidden states with
SmolLM2-135M's head (hidden 576, vocabulary 49152, frozen, as under LoRA): the no-grad NLL of the response
tokens, ρ = 0.6 of them kept, and the kept tokens' backward. Its logits never exceed one chunk (128 MiB on a CPU);
what grows with T is a few float32 values per token and the hidden states' gradient (T×576).

``full-logits``: the same loss from the model's own head (B×T×V logits, the NLL from them, the kept tokens'
cross-entropy and its backward), for comparison: O(T·V).

The conversation is alternating 96-token prompt and 160-token response blocks. Each measurement runs in its own
fresh process; the number is the peak above the memory held once the inputs exist (RSS high-water after a reset
on CPU, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import traceback

import common

HEADS, KV_HEADS, HEAD_DIM, CHUNK = 9, 3, 64, 256
HIDDEN, VOCAB, RHO = 576, 49152, 0.6  # SmolLM2-135M's head
METHODS = ("share", "eager", "head", "full-logits")


def _inputs(seq_len: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=generator).to(device)
    key = torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=generator).to(device)
    # Alternating 96-token prompt and 160-token response blocks, like a multi-turn conversation.
    positions = torch.arange(seq_len, device=device)
    context = ((positions % 256) < 96).unsqueeze(0)
    valid = torch.ones(1, seq_len, dtype=torch.bool, device=device)
    return query, key, context, valid


def eager_attention_map(query, key):
    """B×H×T×T float32 attention probabilities, built the way transformers' eager attention builds them."""
    import torch

    seq_len = query.shape[2]
    key = key.repeat_interleave(HEADS // KV_HEADS, dim=1)  # repeat_kv
    causal = torch.full((seq_len, seq_len), torch.finfo(torch.float32).min, device=query.device).triu(1)
    mask = causal[None, None]  # the 4-D additive mask eager attention receives
    weights = torch.matmul(query, key.transpose(2, 3)) * HEAD_DIM**-0.5
    weights = weights + mask
    return torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32)


def _head_inputs(seq_len: int, device: str):
    """(hidden 1×T×d with gradient, frozen head, labels, response mask, keep mask) for one row."""
    import torch

    from sstoken.selection import scoring

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, seq_len, HIDDEN, generator=generator).to(device).requires_grad_()
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(device).requires_grad_(False)
    labels = torch.randint(0, VOCAB, (1, seq_len), generator=generator).to(device)
    positions = torch.arange(seq_len, device=device)
    labels[:, (positions % 256) < 96] = scoring.IGNORE_INDEX
    response = scoring.response_mask_from_labels(labels)
    keep = scoring.random_mask(response.cpu(), RHO, torch.Generator().manual_seed(1)).to(device)
    return hidden, head, labels, response, keep


def _head_loss(method: str, hidden, head, labels, response, keep):
    import torch.nn.functional as F

    from sstoken.selection import lm_head, scoring

    if method == "head":
        request = lm_head.HeadRequest(labels=labels, score_mask=response, select=lambda nll: (keep, None))
        return lm_head.head_outputs(hidden, head, None, request).kept_nll_sum
    logits = head(hidden)
    scoring.token_nll(logits.detach(), labels)
    rows, cols = keep.nonzero(as_tuple=True)
    return F.cross_entropy(logits[rows, cols - 1].float(), labels[rows, cols], reduction="sum")


def _measure_main(conn, method: str, seq_len: int, device: str) -> None:
    try:
        import torch

        from sstoken.selection.attention import context_share_from_qk

        if method in ("head", "full-logits"):
            inputs = _head_inputs(seq_len, device)
            memory = common.PeakMemory(device)
            memory.start()
            _head_loss(method, *inputs).backward()
            out = inputs[0].grad
        else:
            query, key, context, valid = _inputs(seq_len, device)
            memory = common.PeakMemory(device)
            memory.start()
            with torch.no_grad():
                if method == "share":
                    out = context_share_from_qk(query, key, HEAD_DIM**-0.5, context, valid, chunk_size=CHUNK)
                else:
                    out = eager_attention_map(query, key)
        peak = memory.peak()
        conn.send(("ok", {"extra_bytes": peak - memory.baseline, "output_bytes": out.numel() * out.element_size()}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def measure(method: str, seq_len: int, device: str) -> dict:
    return common.run_in_worker(_measure_main, (method, seq_len, device),
                                f"attention-memory ({method}, {seq_len})", 1800)


def run(lengths, device: str = "cpu") -> dict:
    rows = []
    for seq_len in lengths:
        share = measure("share", seq_len, device)
        eager = measure("eager", seq_len, device)
        rows.append({
            "seq_len": seq_len,
            "share_extra_bytes": share["extra_bytes"],
            "eager_extra_bytes": eager["extra_bytes"],
            "eager_map_bytes": eager["output_bytes"],
        })
        print(f"[bench] attention memory at {seq_len}: share {share['extra_bytes'] / 2**20:.0f} MiB, "
              f"eager {eager['extra_bytes'] / 2**20:.0f} MiB", flush=True)
    return {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "chunk_size": CHUNK, "rows": rows}


def curve(lengths, methods, device: str = "cpu", max_quadratic_len: int = 8192) -> dict:
    """Extra bytes of each method at each length; ``eager`` and ``full-logits`` (O(T²), O(T·V)) only up to
    ``max_quadratic_len``, where they still fit in this machine's memory."""
    rows = []
    for seq_len in lengths:
        row = {"seq_len": seq_len}
        for method in methods:
            if method in ("eager", "full-logits") and seq_len > max_quadratic_len:
                continue
            row[f"{method}_extra_bytes"] = measure(method, seq_len, device)["extra_bytes"]
            print(f"[bench] {method} at {seq_len}: {row[f'{method}_extra_bytes'] / 2**20:.0f} MiB", flush=True)
        rows.append(row)
    return {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "chunk_size": CHUNK, "hidden": HIDDEN,
            "vocab": VOCAB, "rho": RHO, "device": device, "rows": rows}


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-quadratic-len", type=int, default=8192,
                        help="longest row for eager and full-logits (default 8192)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="JSON file for the results (default: print only)")
    args = parser.parse_args()
    result = curve(args.lengths, args.methods, args.device, args.max_quadratic_len)
    result.update(date=common.now_utc(), machine=common.machine_info(args.device),
                  command="python benchmarks/attention_memory.py " + " ".join(
                      f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in vars(args).items() if v is not None and k != "out"))
    print(json.dumps(result, indent=1))
    if args.out:
        common.write_json(args.out, result)


if __name__ == "__main__":
    main()
