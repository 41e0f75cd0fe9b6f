"""The ``token_weights`` column (the data's ``weight`` fields) through TRL's batching: its collator and its packing.

TRL's ``DataCollatorForLanguageModeling`` and ``pack_dataset`` carry ``input_ids`` and ``labels`` only. Weighted
data needs its weights laid out exactly as the labels are: :class:`TokenWeightsCollator` wraps TRL's collator and
adds them (right-padded with 0, or concatenated into one row when padding-free), and :func:`pack_with_weights`
packs them with the ids and labels in the steps and order of TRL's own packing.
"""

from __future__ import annotations

from typing import Any

from sstoken.batch import TOKEN_WEIGHTS, padded_weights, row_weights


class TokenWeightsCollator:
    """``collator`` (TRL's) plus a B×T float ``token_weights`` tensor laid out like its ``labels``."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.padding_free = bool(getattr(collator, "padding_free", False))

    def __call__(self, examples: list[dict]) -> dict:
        if not examples or TOKEN_WEIGHTS not in examples[0]:
            return self.collator(examples)
        weights = [row_weights(example) for example in examples]
        # Without the column: TRL's collator reads only the keys it knows today, but a ragged list it did not expect
        # would break one that pads every key it is given.
        batch = self.collator([{k: v for k, v in example.items() if k != TOKEN_WEIGHTS} for example in examples])
        if self.padding_free:
            weights = [[w for row in weights for w in row]]
        batch[TOKEN_WEIGHTS] = padded_weights(weights, tuple(batch["labels"].shape))
        return batch

    def __getattr__(self, name: str):
        # Attributes of the wrapped collator (pad_token_id, ...) stay readable, as callers expect. ``collator``
        # itself is looked up here only while unpickling (dataloader workers), before it is set.
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def _with_full_weights(row: dict) -> dict:
    return {TOKEN_WEIGHTS: row_weights(row)}


def pack_with_weights(dataset, args, dataset_name: str):
    """Pack an encoded dataset with its ``token_weights`` as TRL packs ``input_ids`` and ``labels``: the same
    columns kept, the same shuffles (``shuffle_dataset``, ``seed``) before and after, the same ``pack_dataset``.
    Rows stored with an empty weight list (all 1) get their 1s first: packing needs one weight per token."""
    from datasets import Dataset
    from trl import pack_dataset

    def map_kwargs(desc: str) -> dict:  # a stream's map takes neither processes nor a progress description
        return {"num_proc": args.dataset_num_proc, "desc": desc} if isinstance(dataset, Dataset) else {}

    dataset = dataset.map(_with_full_weights, **map_kwargs(f"Token weights of the {dataset_name} dataset"))
    dataset = dataset.select_columns(["input_ids", "labels", TOKEN_WEIGHTS])
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    dataset = pack_dataset(dataset, args.max_length, args.packing_strategy,
                           map_kwargs(f"Packing {dataset_name} dataset"))
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset
