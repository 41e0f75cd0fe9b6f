"""The on-disk cache of a model's per-token NLL (``sstoken cache``), and the fingerprints that guard it.

The cache stores, for every training sample, the model's per-token NLL aligned to the predicted token.
Samples are keyed by a hash of their token ids, so a lookup does not depend on data order, batch
composition, sharding across ranks or packing. The cache directory records fingerprints of the model, the
tokenizer and the data; a run whose fingerprints differ is refused with a message saying which one.
Every file is written to a temporary name and renamed, and carries a SHA-256 checksum that is verified on
load: a truncated or corrupted shard is reported (and rebuilt by ``sstoken cache``), never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sstoken import distributed
from sstoken.batch import unwrap_base_model
from sstoken.errors import ConfigError
from sstoken.io import atomic_path, atomic_write_json, file_sha256
from sstoken.selection.lm_head import rows_token_nll, use_sstoken_head

CACHE_FORMAT_VERSION = 1


INDEX_FILE = "index.json"


# ----------------------------------------------------------------------------------------------- fingerprints
def sample_key(token_ids: Sequence[int] | torch.Tensor) -> str:
    """Stable key of one tokenised sample: SHA-1 of its token ids as little-endian int64."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).cpu().contiguous()
    return hashlib.sha1(ids.numpy().tobytes()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's config and of a strided sample of its (base) weights; LoRA adapters are excluded.

    The weights are read as the model computes with them, whatever engine holds them: ZeRO-3 partitions and FSDP2
    shards are gathered one parameter at a time (every rank must call this, as the trainer does), and under
    ``cpu_ram_efficient_loading``, where only rank 0 has loaded the checkpoint (the others hold ``meta`` tensors),
    rank 0's hash is every rank's."""
    base = unwrap_base_model(model)
    digest = hashlib.sha256()
    config = getattr(base, "config", None)
    if config is not None:
        cfg = _without_volatile_keys(config.to_dict())
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    unloaded = None
    with torch.no_grad():
        for name, param in sorted(base.named_parameters(), key=lambda item: item[0]):
            if "lora_" in name or "modules_to_save" in name:
                continue
            with distributed.materialized(param) as full:
                if full is None:
                    unloaded = unloaded or name
                    continue
                flat = full.detach().reshape(-1)
                step = max(1, flat.numel() // 64)
                # A copy: numpy must not hold on to an engine's storage, which FSDP2 resizes when it reshards.
                sample = flat[::step][:64].to("cpu", torch.float32, copy=True)
            # PEFT renames wrapped weights (q_proj.weight -> q_proj.base_layer.weight); the base is the same.
            digest.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
            digest.update(sample.numpy().tobytes())
    # Every rank takes part in the broadcast before any of them raises, so that none is left waiting.
    fingerprint, unloaded = distributed.from_rank0((digest.hexdigest()[:16], unloaded))
    if unloaded is not None:
        raise ConfigError(f"cannot fingerprint the model: its weight {unloaded} is not loaded (a meta tensor) "
                          f"on rank 0; load the model's weights before building the trainer")
    return fingerprint


_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation", "use_cache", "dtype",
                         "torch_dtype", "quantization_config", "_attn_implementation_autoset")


def _without_volatile_keys(cfg):
    """The config minus what does not change the NLL: loading details, and the special-token ids (bos/eos/pad),
    which the Trainer rewrites to match the tokenizer when it is built, so a cache built before the trainer
    existed would otherwise look like another model's. The tokenizer fingerprint covers the special tokens."""
    if isinstance(cfg, dict):
        return {key: _without_volatile_keys(value) for key, value in cfg.items()
                if key not in _VOLATILE_CONFIG_KEYS and not (isinstance(key, str) and key.endswith("_token_id"))}
    if isinstance(cfg, list):
        return [_without_volatile_keys(value) for value in cfg]
    return cfg


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary, special tokens and chat template."""
    digest = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(keys: Iterable[str]) -> str:
    """Order-independent hash of the set of sample keys."""
    digest = hashlib.sha256()
    for key in sorted(set(keys)):
        digest.update(key.encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class CacheFingerprints:
    model: str
    tokenizer: str
    data: str
    max_seq_length: int

    def mismatches(self, other: "CacheFingerprints") -> list[str]:
        return [field for field in ("model", "tokenizer", "data", "max_seq_length")
                if getattr(self, field) != getattr(other, field)]


class NLLCache:
    """Per-sample per-token NLL of a fixed model, stored as checksummed safetensors shards.

    ``role`` is what the cache stands for in this run, "history cache" or "reference cache" (the config keys
    history_cache / reference_cache): every error names it, so a user knows which setting to fix."""

    def __init__(self, path: str | os.PathLike, fingerprints: CacheFingerprints, shard_keys: list[list[str]],
                 role: str = "history cache"):
        self.path = Path(path)
        self.fingerprints = fingerprints
        self.shard_keys = shard_keys
        self.role = role
        self._values: dict[str, torch.Tensor] = {}

    # -- layout
    def shard_path(self, index: int) -> Path:
        return self.path / f"shard-{index:05d}.safetensors"

    def _index(self) -> dict:
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprints": self.fingerprints.__dict__,
            "shards": [{"keys": keys, "sha256": None} for keys in self.shard_keys],
        }

    # -- writing (used by `sstoken cache`)
    @classmethod
    def create_or_resume(cls, path, fingerprints: CacheFingerprints, shard_keys: list[list[str]]) -> "NLLCache":
        """Open a cache for writing; shards already written with the same plan and a valid checksum are kept."""
        cache = cls(path, fingerprints, shard_keys)
        cache.path.mkdir(parents=True, exist_ok=True)
        index_file = cache.path / INDEX_FILE
        previous = None
        if index_file.exists():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                previous = json.loads(index_file.read_text())
        index = cache._index()
        if previous and previous.get("fingerprints") == index["fingerprints"] and \
                [s["keys"] for s in previous.get("shards", [])] == shard_keys:
            for shard, old in zip(index["shards"], previous["shards"]):
                shard["sha256"] = old.get("sha256")
        atomic_write_json(index_file, index, sort_keys=True)
        cache._index_data = index
        return cache

    def shard_done(self, index: int) -> bool:
        expected = self._index_data["shards"][index]["sha256"]
        path = self.shard_path(index)
        return bool(expected) and path.exists() and file_sha256(path) == expected

    def write_shard(self, index: int, values: dict[str, torch.Tensor]) -> None:
        missing = set(self.shard_keys[index]) - set(values)
        if missing:
            raise ValueError(f"shard {index} is missing {len(missing)} samples")
        path = self.shard_path(index)
        with atomic_path(path) as tmp:
            save_file({key: values[key].float().contiguous() for key in self.shard_keys[index]}, str(tmp))
        self._index_data["shards"][index]["sha256"] = file_sha256(path)
        atomic_write_json(self.path / INDEX_FILE, self._index_data, sort_keys=True)

    @property
    def complete(self) -> bool:
        return all(shard["sha256"] for shard in self._index_data["shards"])

    # -- reading (used by the trainer)
    @classmethod
    def open(cls, path, expected: CacheFingerprints | None = None, role: str = "history cache") -> "NLLCache":
        """Load a finished cache, verifying its checksums and (if given) its fingerprints."""
        path = Path(path)
        index_file = path / INDEX_FILE
        if not index_file.exists():
            raise ConfigError(f"{role} {path} does not exist or is incomplete (no {INDEX_FILE}); "
                              f"build it with `sstoken cache`")
        try:
            index = json.loads(index_file.read_text())
            fingerprints = CacheFingerprints(**index["fingerprints"])
            shard_keys = [shard["keys"] for shard in index["shards"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{role} {path}: unreadable {INDEX_FILE} ({exc}); rebuild it with `sstoken cache`") from exc
        if index.get("format_version") != CACHE_FORMAT_VERSION:
            raise ConfigError(f"{role} {path} has format {index.get('format_version')}, "
                              f"expected {CACHE_FORMAT_VERSION}; rebuild it with `sstoken cache`")
        if expected is not None:
            wrong = expected.mismatches(fingerprints)
            if wrong:
                raise ConfigError(
                    f"{role} {path} was built for a different {', '.join(wrong)} "
                    f"(cache: {', '.join(f'{w}={getattr(fingerprints, w)}' for w in wrong)}; "
                    f"this run: {', '.join(f'{w}={getattr(expected, w)}' for w in wrong)}). "
                    f"Rebuild it with `sstoken cache` or point {role.replace(' ', '_')} elsewhere."
                )
        cache = cls(path, fingerprints, shard_keys, role)
        cache._index_data = index
        for number, shard in enumerate(index["shards"]):
            shard_file = cache.shard_path(number)
            if not shard["sha256"] or not shard_file.exists():
                raise ConfigError(f"{role} {path} is incomplete (shard {number} missing); "
                                  f"run `sstoken cache` again to finish it")
            if file_sha256(shard_file) != shard["sha256"]:
                raise ConfigError(f"{role} {path}: shard {number} fails its checksum (truncated or corrupted); "
                                  f"run `sstoken cache` again to rebuild it")
            cache._values.update(load_file(str(shard_file)))
        return cache

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._values[key]
        except KeyError:
            raise ConfigError(
                f"{self.role} {self.path} has no entry for a training sample (key {key[:12]}…): the data or its "
                f"tokenisation changed since the cache was built; rebuild it with `sstoken cache`"
            ) from None

    def lookup(self, input_ids: torch.Tensor, valid_mask: torch.Tensor,
               segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """B×T NLL for a batch, gathering each sample's cached row into its (possibly padded/packed) slots."""
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        for row, positions, tokens in iter_samples(input_ids, valid_mask, segment_ids):
            if len(positions) < 2:
                # Nothing is predicted in a one-token sample (its NLL is 0). TRL's padding-free collator pads with
                # position_ids 0, so with pad_to_multiple_of each padding token looks like such a sample, and it
                # has no cache entry.
                continue
            values = self.get(sample_key(tokens))
            if values.numel() != len(positions):
                raise ConfigError(f"{self.role} {self.path}: stored length {values.numel()} differs from the "
                                  f"sample's {len(positions)} tokens; rebuild it with `sstoken cache`")
            out[row, positions] = values
        return out.to(input_ids.device)


def iter_samples(input_ids: torch.Tensor, valid_mask: torch.Tensor,
                 segment_ids: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (row, positions, token ids) for every sample of a padded or packed batch."""
    ids_cpu = input_ids.detach().cpu()
    valid_cpu = valid_mask.detach().cpu().bool()
    segments_cpu = None if segment_ids is None else segment_ids.detach().cpu()
    for row in range(ids_cpu.shape[0]):
        valid_positions = valid_cpu[row].nonzero().flatten()
        if valid_positions.numel() == 0:
            continue
        if segments_cpu is None:
            yield row, valid_positions, ids_cpu[row, valid_positions]
            continue
        row_segments = segments_cpu[row, valid_positions]
        for segment in torch.unique(row_segments):
            positions = valid_positions[row_segments == segment]
            yield row, positions, ids_cpu[row, positions]


# ----------------------------------------------------------------------------------------------- building
def plan_shards(rows: Sequence[dict], shard_size: int) -> list[list[str]]:
    """Unique sample keys in length order (length-bucketed batches waste little padding), cut into shards."""
    seen: dict[str, int] = {}
    for row in rows:
        seen.setdefault(sample_key(row["input_ids"]), len(row["input_ids"]))
    ordered = sorted(seen, key=lambda key: (seen[key], key))
    return [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)] or [[]]


@torch.no_grad()
def build_nll_cache(model, tokenizer, rows: Sequence[dict], path, max_seq_length: int, batch_size: int = 8,
                    shard_size: int = 1024, progress: bool = True, chunk_size: int = 1024) -> NLLCache:
    """Run ``model`` once over ``rows`` (dicts with input_ids, labels) and store per-token NLLs at ``path``.

    The NLL of the response tokens comes from sstoken's head (``model`` is patched with it, see
    :mod:`sstoken.selection.lm_head`), so the batch's full logits are never built and the prompt is never projected.

    Resumable: an interrupted build keeps the shards it finished (checksummed) and computes only the rest.
    """
    from tqdm.auto import tqdm

    by_key = {sample_key(row["input_ids"]): row for row in rows}
    shard_keys = plan_shards(rows, shard_size)
    fingerprints = CacheFingerprints(model=model_fingerprint(model), tokenizer=tokenizer_fingerprint(tokenizer),
                                     data=data_fingerprint(by_key), max_seq_length=int(max_seq_length))
    cache = NLLCache.create_or_resume(path, fingerprints, shard_keys)
    todo = [i for i in range(len(shard_keys)) if shard_keys[i] and not cache.shard_done(i)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    own_head = use_sstoken_head(model, "cache") is None
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(shard_keys[i]) for i in todo), desc="sstoken cache", unit="sample", disable=not progress)
    try:
        for shard in todo:
            values: dict[str, torch.Tensor] = {}
            keys = shard_keys[shard]
            for start in range(0, len(keys), batch_size):
                batch_keys = keys[start:start + batch_size]
                lengths = [len(by_key[k]["input_ids"]) for k in batch_keys]
                nll, _ = rows_token_nll(model, [by_key[k] for k in batch_keys], pad_id, own_head, chunk_size)
                for r, key in enumerate(batch_keys):
                    values[key] = nll[r, :lengths[r]].clone()
                bar.update(len(batch_keys))
            cache.write_shard(shard, values)
    finally:
        bar.close()
        model.train(was_training)
    return NLLCache.open(path, fingerprints)
