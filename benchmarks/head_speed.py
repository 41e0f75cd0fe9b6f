"""CPU and wall seconds of the LM head alone, forward + backward, for one T-token row.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python benchmarks/head_speed.py --vocab 49152 --hidden 576 --repeats 2
    PYTHONPATH=src nice -n 10 python benchmarks/head_speed.py --vocab 49152 --hidden 576 --seq-len 129 \
        --prompt-fraction 0 --rho 1 --autocast bf16 --threads 2 --variants trl-fused sstoken --repeats 5

What each variant does with the backbone's hidden states H (1×T×d, with gradient) and a frozen head W (V×d, as
under LoRA), the first 25% of the row being prompt and ρ = 0.6 of the response kept (random, fixed seed):

* ``full``: sstoken before it had its own LM head, the model's own head: logits = H·Wᵀ for every position, the per-token NLL
  without gradient from them (``scoring.token_nll``), cross-entropy of the kept rows with gradient;
* ``trl-fused``: TRL's fused head as called on a CPU (``add_fused_lm_head``: every position scored, labels
  outside the response −100), current NLL = −log_probs, loss = −Σ kept log_probs;
* ``sstoken``: :func:`sstoken.selection.lm_head.head_outputs` (response rows no-grad, kept rows' backward).

``--autocast bf16`` (or fp16) runs every variant's forward under CPU autocast, the frozen weight staying float32,
as a mixed-precision LoRA step does; the backward runs outside it, as in a trainer. ``--prompt-fraction 0 --rho 1``
makes every row after the first one a kept response row (``--seq-len 129``: 128 rows in each variant).

Each variant runs once untimed, then ``--repeats`` times; prints one JSON line with the median CPU seconds and the
median wall seconds (``wall_s``; with ``--threads`` above 1 the CPU seconds add up the threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rho", type=float, default=0.6)
    parser.add_argument("--prompt-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["full", "trl-fused", "sstoken"])
    parser.add_argument("--autocast", choices=("bf16", "fp16"), help="forward under CPU autocast in this dtype")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    from sstoken.selection import lm_head, scoring

    torch.set_num_threads(args.threads)
    autocast = dict(device_type="cpu", enabled=args.autocast is not None,
                    dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast, torch.bfloat16))
    gen = torch.Generator().manual_seed(0)
    length = args.seq_len
    hidden = torch.randn(1, length, args.hidden, generator=gen).requires_grad_()
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(args.vocab, args.hidden, generator=gen) * 0.02)
    head.weight.requires_grad_(False)
    labels = torch.randint(0, args.vocab, (1, length), generator=gen)
    labels[:, : int(args.prompt_fraction * length)] = scoring.IGNORE_INDEX
    response = scoring.response_mask_from_labels(labels)
    keep = scoring.random_mask(response, args.rho, torch.Generator().manual_seed(1))

    def full():
        with torch.autocast(**autocast):
            logits = head(hidden)
            scoring.token_nll(logits.detach(), labels)
            rows, cols = keep.nonzero(as_tuple=True)
            loss = F.cross_entropy(logits[rows, cols - 1].float(), labels[rows, cols], reduction="sum")
        loss.backward()

    def trl_fused():
        with torch.autocast(**autocast):
            shifted = torch.where(response, labels, scoring.IGNORE_INDEX)[:, 1:]
            mask = shifted != scoring.IGNORE_INDEX
            log_probs = _ChunkedLogProbFunction.apply(
                hidden[:, :-1].reshape(-1, args.hidden), head.weight, None, shifted.clamp(min=0).reshape(-1), 1.0,
                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0].view(mask.shape).masked_fill(~mask, 0)
            token_nll = F.pad(-log_probs, (1, 0))
            token_nll.detach()
            loss = token_nll[keep].sum()
        loss.backward()

    def sstoken():
        request = lm_head.HeadRequest(labels=labels, score_mask=response, select=lambda nll: (keep, None))
        with torch.autocast(**autocast):
            loss = lm_head.head_outputs(hidden, head, None, request).kept_nll_sum
        loss.backward()

    variants = {"full": full, "trl-fused": trl_fused, "sstoken": sstoken}
    result = {"vocab": args.vocab, "hidden": args.hidden, "seq_len": length, "rho": args.rho,
              "prompt_fraction": args.prompt_fraction, "kept": int(keep.sum()), "response": int(response.sum()),
              "repeats": args.repeats, "autocast": args.autocast, "threads": args.threads, "cpu_s": {}, "wall_s": {}}
    for name in args.variants:
        variants[name]()  # untimed
        times, walls = [], []
        for _ in range(args.repeats):
            hidden.grad = None
            start, start_wall = time.process_time(), time.perf_counter()
            variants[name]()
            times.append(time.process_time() - start)
            walls.append(time.perf_counter() - start_wall)
        result["cpu_s"][name] = round(statistics.median(times), 3)
        result["wall_s"][name] = round(statistics.median(walls), 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
