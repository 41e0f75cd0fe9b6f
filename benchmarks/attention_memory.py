"""Memory of the attention share itself against eager attention maps, for one layer, at growing lengths.

``share``: :func:`sstoken.selection.attention.context_share_from_qk` on random post-RoPE query/key tensors of
SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64). It works ``chunk_size`` query rows at a time, so
its temporaries are O(H·chunk·T): linear in T.

``eager``: what eager attention with ``output_attentions=True`` builds for the same layer, following
``eager_attention_forward`` in transformers: K repeated to every query head, Q·Kᵀ·scale plus the additive
B×1×T×T causal mask, softmax in float32; the B×H×T×T map is kept (it is the returned attention). O(T²).

Each measurement runs in its own fresh process; the number is the peak above the memory held once the inputs
exist (RSS high-water after a reset on CPU, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import traceback

import common

HEADS, KV_HEADS, HEAD_DIM, CHUNK = 9, 3, 64, 256


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


def _measure_main(conn, method: str, seq_len: int, device: str) -> None:
    try:
        import torch

        from sstoken.selection.attention import context_share_from_qk

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
