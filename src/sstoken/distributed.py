"""Parameters as a distributed engine holds them, and values every rank must agree on.

Outside the engine's own forward, a weight may not be the tensor it looks like:

* DeepSpeed ZeRO-3 keeps each parameter object but empties its data into partitions (``ds_id``, ``ds_shape``,
  ``ds_status``): the tensor is a 0-element placeholder until ``deepspeed.zero.GatheredParameters`` (or the
  engine's forward) gathers it;
* FSDP2 (``fully_shard``) replaces each parameter by a ``DTensor`` shard; ``full_tensor()`` all-gathers it;
* accelerate's FSDP ``cpu_ram_efficient_loading`` loads the checkpoint on rank 0 only: the other ranks hold
  ``meta`` tensors (shapes, no values) until the engine broadcasts rank 0's weights into their shards.

Every function that gathers is a collective: all ranks call it, in the same order. Cheap to import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def world_size() -> int:
    """Processes in the default process group (1 when torch.distributed is not set up)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def first_non_none_across_ranks(value: Any) -> Any:
    """The first non-None of every rank's ``value``, in rank order (None if all are None), the same on every rank.
    One all-gather of small Python objects; without a process group, ``value`` itself."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return next((v for v in values if v is not None), None)


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (one broadcast); without a process group, ``value`` itself."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_zero3_partitioned(tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (whether or not it is gathered right now)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def logical_shape(tensor) -> tuple[int, ...]:
    """The shape the model sees: a ZeRO-3 placeholder's gathered shape, a DTensor's global shape."""
    if is_zero3_partitioned(tensor):
        return tuple(tensor.ds_shape)
    return tuple(tensor.shape)


@contextlib.contextmanager
def materialized(tensor) -> Iterator[Any]:
    """``tensor``'s full values as a plain local tensor, gathered the engine's way (a collective for ZeRO-3 and
    DTensor parameters: every rank enters it, for the same parameters in the same order); None for a ``meta``
    tensor, whose values this rank does not have."""
    if is_zero3_partitioned(tensor):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if tensor.ds_status == ZeroParamStatus.AVAILABLE:
            # Gathered already (a persistent small parameter, or inside its module's forward): partitioning it on
            # the way out would pull it from under its module.
            yield tensor.data
        else:
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                yield tensor.data
    elif is_dtensor(tensor):
        yield tensor.full_tensor()
    elif tensor.is_meta:
        yield None
    else:
        yield tensor
