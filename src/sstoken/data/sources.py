"""Loading a data spec (:mod:`sstoken.data.spec`): local files and folders, saved datasets, Hub datasets, and
mixtures of them, encoded into a cache.

JSONL files are read by :func:`sstoken.data.reading.read_jsonl` (errors name ``path:line``); everything else by
``datasets`` (errors name ``path, row i``, 0-based as in ``dataset[i]``). Rows are encoded by ``Dataset.map``
into a cache file whose name hashes the source (a JSONL file's bytes), the tokenizer (its full definition and chat
template), ``max_seq_length`` and sstoken's encoding code, so that a second run on the same data reuses the
encoding and any change to one of those encodes again. :func:`load_rows` is the one loader of every command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sstoken.batch import TOKEN_WEIGHTS
from sstoken.data.encoding import (
    check_max_seq_length,
    check_tokenizer,
    encode_row,
    token_features,
)
from sstoken.data.formats import KNOWN_KEYS, TEXT_KEY
from sstoken.data.reading import MAX_LINE_BYTES, read_jsonl
from sstoken.data.spec import (
    BUILDER_OF_SUFFIX,
    BUILDERS,
    COMPRESSION_SUFFIXES,
    SourceSpec,
    data_suffix,
    is_builder_source,
    looks_local,
    parse_data_spec,
)
from sstoken.errors import ConfigError, DataError, did_you_mean, escaped, shown
from sstoken.io import file_sha256

logger = logging.getLogger("sstoken")

_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


_COMPRESSIBLE_BUILDERS = ("json", "csv")  # Parquet and Arrow files compress inside; fsspec cannot seek in a .gz


_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes


_MESSAGE_LIST_KEYS = ("messages", "prompt", "completion", "conversations")


_ENCODED_COLUMNS = ("input_ids", "labels")
_WEIGHTED_COLUMNS = (*_ENCODED_COLUMNS, TOKEN_WEIGHTS)  # data with weight fields


@dataclass
class _Part:
    """A run of raw rows from one file, saved dataset or Hub split; ``label`` names it in error messages."""

    label: str
    rows: list[tuple[int, dict]] | None = None  # JSONL: (line number, row)
    dataset: Any = None  # anything else: a datasets.Dataset
    fingerprint: str = ""  # JSONL: what identifies the file's content (the rows taken are added when encoding)
    ignored: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)

    def head(self, n: int) -> _Part:
        if n >= len(self):
            return self
        if self.rows is not None:
            return _Part(self.label, rows=self.rows[:n], fingerprint=self.fingerprint, ignored=self.ignored)
        return _Part(self.label, dataset=self.dataset.select(range(n)), ignored=self.ignored)


def _load_source(spec: SourceSpec, what: str, max_line_bytes: int) -> list[_Part]:
    path = Path(spec.path)
    if is_builder_source(spec):
        files = _resolve_files(Path("."), spec, what)
    elif path.is_file():
        if spec.split != "train" or spec.data_files is not None:
            raise ConfigError(f"{what}: {spec.path} is one file, which is the train split; for other splits point "
                              f"path at the folder or use data_files: {{split: file}}")
        files = [str(path)]
    elif path.is_dir() and any((path / m).is_file() for m in _SAVED_DATASET_MARKERS):
        return [_saved_dataset_part(spec, what)]
    elif path.is_dir():
        files = _resolve_files(path / spec.data_dir if spec.data_dir else path, spec, what)
    elif path.exists():  # a pipe (`--data <(zcat rows.jsonl.gz)`), a named pipe, /dev/stdin
        if spec.split != "train" or spec.data_files is not None:
            raise ConfigError(f"{what}: {spec.path} is one stream, which is the train split; it has no other "
                              f"splits or data_files")
        return [_stream_part(path, spec.columns, max_line_bytes)]
    elif looks_local(spec.path):
        raise ConfigError(f"{what} {spec.path} does not exist")
    else:
        return [_hub_part(spec, what)]
    builder = spec.path if is_builder_source(spec) else None
    return [_file_part(Path(f), builder, spec.columns, max_line_bytes) for f in files]


def _resolve_files(base: Path, spec: SourceSpec, what: str) -> list[str]:
    """The data files of ``spec.split`` under ``base``, found as ``load_dataset(folder)`` finds them (a
    ``test.jsonl`` or ``data/test-*.parquet`` is the test split; files without a split name are train)."""
    from datasets.data_files import (
        DataFilesDict,
        EmptyDatasetError,
        get_data_patterns,
        sanitize_patterns,
    )

    try:
        patterns = (sanitize_patterns(spec.data_files) if spec.data_files is not None
                    else get_data_patterns(str(base)))
        splits = DataFilesDict.from_local_or_remote(patterns, base_path=str(base))
    except (EmptyDatasetError, FileNotFoundError) as exc:
        raise ConfigError(f"{what} {spec.path}: no data files found ({_first_line(exc)})") from None
    splits = {str(name): files for name, files in splits.items()}
    if spec.split not in splits:
        raise ConfigError(f"{what} {spec.path}: no split {spec.split!r}{did_you_mean(spec.split, splits)}; it has "
                          f"{', '.join(sorted(splits))}")
    if spec.path in BUILDERS:
        files = list(splits[spec.split])
    else:
        files = [f for f in splits[spec.split] if data_suffix(Path(f))[0] in BUILDER_OF_SUFFIX]
        skipped = [f for f in splits[spec.split] if f not in files and not Path(f).name.lower().startswith("readme")]
        if skipped:
            logger.warning("%s %s: skipping %d file(s) of the %s split that are not data files (%s): %s", what,
                           spec.path, len(skipped), spec.split, _DATA_SUFFIXES_TEXT,
                           ", ".join(escaped(Path(f).name) for f in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    if not files:
        raise ConfigError(f"{what} {spec.path}: no data files ({_DATA_SUFFIXES_TEXT}) in the {spec.split} split")
    return files  # in datasets' order: sorted for a pattern, as written for a list (a mixture takes the first rows)


_DATA_SUFFIXES_TEXT = (", ".join(sorted(BUILDER_OF_SUFFIX)) + "; text formats also as "
                       + "/".join(COMPRESSION_SUFFIXES))


def _is_json_lines(path: Path, suffix: str, compression: str) -> bool:
    if not compression:
        return not (suffix == ".json" and _starts_with_array(path))
    return compression in (".gz", ".bz2", ".xz") and suffix != ".json"


def _file_part(path: Path, builder: str | None, columns, max_line_bytes: int) -> _Part:
    suffix, compression = data_suffix(path)
    builder = builder or BUILDER_OF_SUFFIX.get(suffix, "json")
    if compression:
        if builder not in _COMPRESSIBLE_BUILDERS:
            raise ConfigError(f"{path}: a compressed {builder} file cannot be read; decompress it (Parquet and Arrow "
                              f"compress inside the file)")
        if compression == ".zst" and not _has_module("zstandard"):
            raise ConfigError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard), "
                              f"or decompress the file")
    # JSON Lines, compressed or not (but .zst, which needs a package), go through sstoken's strict reader: errors
    # name path:line, and a null is what was written. A .json file holding one array (and any compressed .json)
    # is left to datasets, like every other format.
    if builder == "json" and _is_json_lines(path, suffix, compression):
        rows = list(read_jsonl(path, max_line_bytes=max_line_bytes))
        return _jsonl_part(path, rows, columns, _hash(["jsonl", file_sha256(path)]))
    import datasets

    options = {"sep": "\t"} if suffix == ".tsv" else {}
    # datasets keys its cache of a local file on the modification time only: the content hash as the config name
    # makes an edit that keeps it (cp -p, rsync -t) load (and encode) again.
    try:
        dataset = datasets.load_dataset(builder, name=f"sstoken-{file_sha256(path)[:32]}", data_files=str(path),
                                        split="train", **options)
    except Exception as exc:  # noqa: BLE001 - pyarrow, pandas and datasets raise many types for a bad file
        raise DataError(f"{path}: cannot read as {builder}: {_first_line(exc)}") from None
    return _dataset_part(str(path), dataset, columns)


def is_stream(path: str | Path) -> bool:
    """Whether ``path`` exists and is neither a file nor a folder: a pipe, a named pipe (FIFO), /dev/stdin, which
    can be read only once, from the start."""
    path = Path(path)
    return path.exists() and not path.is_file() and not path.is_dir()


class _HashingReader:
    """A binary stream whose bytes are hashed as they are read: a pipe's content key (the SHA-256 that a file
    gets from a first pass over it, which a pipe cannot give before it is read)."""

    def __init__(self, raw):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self.raw.readline(size)
        self.sha256.update(data)
        return data


def _stream_part(path: Path, columns, max_line_bytes: int) -> _Part:
    """A pipe read once, as JSON Lines (plain, or .gz/.bz2/.xz by its name) through the strict reader. Every
    other format is read by ``datasets``, which opens a file more than once (it is hashed first, then loaded), so
    a pipe would be empty the second time: that is refused before anything is read."""
    suffix, compression = data_suffix(path)
    builder = BUILDER_OF_SUFFIX.get(suffix, "json")
    if builder != "json" or compression not in ("", ".gz", ".bz2", ".xz") or (suffix == ".json" and compression):
        kind = f"{builder} data" if builder != "json" else f"a {suffix}{compression} file"
        raise ConfigError(f"{path} is a pipe, which can be read only once; {kind} is read by the datasets "
                          f"library, which opens a file twice (to hash it, then to load it): write it to a file "
                          f"first (a pipe of JSON Lines, plain or .gz/.bz2/.xz, is read as it comes)")
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise DataError(f"{path}: cannot open the pipe: {exc.strerror or exc}") from None
    with raw:
        if suffix == ".json" and _is_array_start(raw.peek(4096)):
            raise ConfigError(f"{path} is a pipe holding one JSON array, which is read by the datasets library "
                              f"from a file only: write it to a file first, or send JSON Lines (one object a line)")
        reader = _HashingReader(raw)
        rows = list(read_jsonl(path, max_line_bytes=max_line_bytes, stream=reader))
    return _jsonl_part(path, rows, columns, _hash(["jsonl", reader.sha256.hexdigest()]))


def _jsonl_part(path: Path, rows: list[tuple[int, dict]], columns, fingerprint: str) -> _Part:
    keys = list(dict.fromkeys(key for _, row in rows for key in row))
    if rows:
        _check_columns(str(path), keys, columns)
    ignored = {key for _, row in rows for key in _renamed_keys(row, columns)} - KNOWN_KEYS
    return _Part(str(path), rows=rows, fingerprint=fingerprint, ignored=ignored)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _is_array_start(head: bytes) -> bool:
    """Whether data beginning with ``head`` is one JSON array (after a byte-order mark and whitespace)."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        return _is_array_start(handle.read(4096))


def _saved_dataset_part(spec: SourceSpec, what: str) -> _Part:
    import datasets

    try:
        loaded = datasets.load_from_disk(spec.path)
    except Exception as exc:  # noqa: BLE001 - a damaged folder raises whatever pyarrow or json raise
        raise DataError(f"{spec.path}: cannot load the saved dataset: {_first_line(exc)}") from None
    unused = [key for key in ("config", "data_files", "data_dir") if getattr(spec, key) is not None]
    if unused:
        raise ConfigError(f"{what}: {spec.path} is a saved dataset (Dataset.save_to_disk); {unused[0]} does not "
                          f"apply to it")
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise ConfigError(f"{what} {spec.path}: no split {spec.split!r}{did_you_mean(spec.split, list(loaded))}; "
                              f"it has {', '.join(loaded)}")
        return _dataset_part(f"{spec.path}[{spec.split}]", loaded[spec.split], spec.columns)
    if spec.split != "train":
        raise ConfigError(f"{what}: {spec.path} is one saved Dataset, which is the train split; for other splits "
                          f"save a DatasetDict ({{'train': ..., {spec.split!r}: ...}}) or point at another folder")
    return _dataset_part(spec.path, loaded, spec.columns)


def _hub_part(spec: SourceSpec, what: str) -> _Part:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.path, name=spec.config, split=spec.split, data_files=spec.data_files,
                                        data_dir=spec.data_dir)
    except Exception as exc:  # noqa: BLE001 - network, authentication, missing config or split: all fixable
        config = f" (config {spec.config!r})" if spec.config else ""
        # Only a path that exists nowhere locally gets here, so "data/train" may be a mistyped folder too.
        raise ConfigError(f"{what}: cannot load the Hub dataset {spec.path!r}{config}, split {spec.split!r} (and no "
                          f"local file or folder has that name): {_first_line(exc)}") from None
    return _dataset_part(f"{spec.path}[{spec.split}]", dataset, spec.columns)


def _check_columns(label: str, names: list[str], columns) -> None:
    """Every column that ``columns`` renames or keeps must be one of ``names`` (for JSONL: in some row)."""
    wanted = list(columns) if columns is not None else []
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ConfigError(f"{label}: columns: {missing[0]!r} is not a column{did_you_mean(missing[0], names)}; it "
                          f"has {', '.join(names)}")


def _dataset_part(label: str, dataset, columns) -> _Part:
    names = list(dataset.column_names)
    _check_columns(label, names, columns)
    ignored = set(_renamed_keys(dict.fromkeys(names), columns)) - KNOWN_KEYS
    return _Part(label, dataset=dataset.with_format(None), ignored=ignored)


def _renamed_keys(row: Mapping[str, Any], columns) -> list[str]:
    if columns is None:
        return list(row)
    if isinstance(columns, list):
        return [k for k in row if k in columns]
    return [columns.get(k, k) for k in row]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _hash(value: Any) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash(value)


def _mixture_heads(sources: list[list[_Part]], fractions: list[float]) -> list[list[_Part]]:
    """TRL's ``get_dataset`` rule: shares ``fraction / sum(fractions)``, the largest mixture that repeats no row,
    and the first ``round(share * total)`` rows of each source."""
    sizes = [sum(len(p) for p in parts) for parts in sources]
    shares = [f / sum(fractions) for f in fractions]
    total = min(size / share for size, share in zip(sizes, shares))
    out = []
    for parts, share in zip(sources, shares):
        remaining, taken = round(share * total), []
        for part in parts:
            if remaining <= 0:
                break
            taken.append(part.head(remaining))
            remaining -= len(taken[-1])
        out.append(taken)
    return out


def _code_fingerprint() -> str:
    """The encoding rules are code: a cache written by another sstoken version must not be reused."""
    return _hash([path.read_bytes() for path in sorted(Path(__file__).parent.glob("*.py"))])


def encoding_fingerprint(tokenizer: Any, max_seq_length: int) -> str:
    """Hash of everything besides the rows that decides their encoding: the tokenizer's full definition
    (vocabulary, merges, normalizer, added and special tokens), its chat template, ``max_seq_length``,
    sstoken's encoding code and the transformers and Jinja versions that render the template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    import jinja2
    import transformers

    # transformers renders the template (and, across versions, aliases message keys such as reasoning_content).
    return _hash({"tokenizer": [type(tokenizer).__name__, definition, special],
                  "chat_template": getattr(tokenizer, "chat_template", None),
                  "max_seq_length": max_seq_length, "code": _code_fingerprint(),
                  "renderer": [transformers.__version__, jinja2.__version__]})


def encoding_cache_dir() -> Path:
    """Where encoded rows are cached: ``$HF_DATASETS_CACHE/sstoken``, beside the datasets they come from."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "sstoken"


def _encoded_features():
    import datasets

    # token_weights: [] for a row whose tokens all weigh 1, so that unweighted data stores nothing more
    return datasets.Features({**token_features(weighted=True), "format": datasets.Value("string"),
                              "truncated": datasets.Value("bool"), "trained": datasets.Value("int64"),
                              "weighted": datasets.Value("bool")})


def _without_nulls(row: Mapping[str, Any]) -> dict[str, Any]:
    """An Arrow row as the row that was meant: Arrow gives every row every column, and every message every key
    any message has, with null where the data had nothing. (In JSONL, a null is what was written, and checked.)"""
    out = {}
    for key, value in row.items():
        if value is None:
            continue
        if key in _MESSAGE_LIST_KEYS and isinstance(value, list):
            value = [_turn_without_nulls(m) if isinstance(m, dict) else m for m in value]
        elif key == "tools":
            value = _nested_without_nulls(value)
        out[key] = value
    return out


def _turn_without_nulls(turn: Mapping[str, Any]) -> dict[str, Any]:
    """One message or ShareGPT turn. ``role``/``content`` stay even when null (an assistant turn with tool calls may
    have ``content: null``; a null role gets its own error), unless the turn is written ``from``/``value``: a file
    whose turns mix the two shapes gives every turn all four keys."""
    sharegpt = turn.get("from") is not None or turn.get("value") is not None
    kept = () if sharegpt else ("role", "content")
    return {k: _nested_without_nulls(v) for k, v in turn.items() if v is not None or k in kept}


def _nested_without_nulls(value: Any) -> Any:
    """Arrow merges the structs of all rows, so a tool call's arguments or a tool's schema gains every key that any
    row has, as null; left in, those nulls would be rendered into the trained text."""
    if isinstance(value, dict):
        return {k: _nested_without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_nested_without_nulls(v) for v in value]
    return value


def _apply_columns(row: dict[str, Any], columns, where: str) -> dict[str, Any]:
    if columns is None:
        return row
    if isinstance(columns, list):
        return {k: v for k, v in row.items() if k in columns}
    for old, new in columns.items():
        if old in row and new in row and new not in columns:
            raise DataError(f"{where}: columns: renaming {old!r} to {new!r} would overwrite the row's own {new!r}")
    return {columns.get(k, k): v for k, v in row.items()}


class _RowEncoder:
    """The ``Dataset.map`` function for one part (a class, so that ``num_proc`` workers can pickle it)."""

    def __init__(self, part: _Part, columns, tokenizer: Any, max_seq_length: int):
        self.label, self.rows, self.columns = part.label, part.rows, columns
        self.tokenizer, self.max_seq_length = tokenizer, max_seq_length

    def __call__(self, example: dict, index: int) -> dict:
        if self.rows is not None:
            line, row = self.rows[index]
            where = f"{self.label}:{line}"
        else:
            row, where = _without_nulls(example), f"{self.label}, row {index}"
        encoded = encode_row(_apply_columns(row, self.columns, where), self.tokenizer, self.max_seq_length,
                             where=where)
        if encoded is None:
            return {"input_ids": [], "labels": [], TOKEN_WEIGHTS: [], "format": "", "truncated": False, "trained": 0,
                    "weighted": False}
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, TOKEN_WEIGHTS: encoded.weights or [],
                "format": encoded.format, "truncated": encoded.truncated, "trained": encoded.num_trained,
                "weighted": encoded.weights is not None}


def _encode_part(part: _Part, columns, tokenizer, max_seq_length: int, encoding: str, num_proc: int | None):
    import datasets

    if part.rows is not None:
        raw = datasets.Dataset.from_dict({"line": [line for line, _ in part.rows]})
        source = _hash([part.fingerprint, len(part.rows)])
    else:
        raw, source = part.dataset, part.dataset._fingerprint
    fingerprint = _hash([source, columns, encoding])
    cache_file = None
    if datasets.is_caching_enabled():
        folder = encoding_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        cache_file = str(folder / f"encoded-{fingerprint}.arrow")
    return raw.map(_RowEncoder(part, columns, tokenizer, max_seq_length), with_indices=True,
                   remove_columns=raw.column_names, features=_encoded_features(), new_fingerprint=fingerprint,
                   cache_file_name=cache_file, num_proc=num_proc if num_proc and num_proc > 1 else None,
                   desc=f"sstoken: encoding {Path(part.label).name}")


def _encode(sources: list[list[_Part]], specs_columns: list, tokenizer, max_seq_length: int, label: str,
            num_proc: int | None) -> tuple[Any, LoadStats]:
    """Encode every part; the used rows (input_ids, labels) and their :class:`LoadStats`."""
    import datasets

    encoding = encoding_fingerprint(tokenizer, max_seq_length)
    encoded = [_encode_part(part, columns, tokenizer, max_seq_length, encoding, num_proc)
               for parts, columns in zip(sources, specs_columns) for part in parts]
    everything = encoded[0] if len(encoded) == 1 else datasets.concatenate_datasets(encoded)
    summary = everything.select_columns(["format", "truncated", "trained", "weighted"]).to_dict()
    used = [i for i, trained in enumerate(summary["trained"]) if trained > 0]
    stats = LoadStats(rows_read=len(everything), used=len(used))
    stats.skipped_no_trainable_token = stats.rows_read - stats.used
    stats.truncated = sum(1 for i in used if summary["truncated"][i])
    stats.weighted = sum(1 for i in used if summary["weighted"][i])
    stats.trained_tokens = sum(summary["trained"][i] for i in used)
    for i in used:
        stats.formats[summary["format"][i]] = stats.formats.get(summary["format"][i], 0) + 1
    stats.ignored_columns = sorted({c for parts in sources for p in parts for c in p.ignored})
    if not used:
        raise DataError(f"{label}: no usable rows: all {stats.rows_read} rows were skipped because no trained token "
                        f"remains (weight 0, or nothing left after truncation to max_seq_length={max_seq_length})")
    rows = everything.select(used, keep_in_memory=True) if len(used) < len(everything) else everything
    # Unweighted data keeps exactly the columns it always had: nothing downstream changes for it.
    rows = rows.select_columns(list(_WEIGHTED_COLUMNS if stats.weighted else _ENCODED_COLUMNS))
    stats.tokens = sum(len(ids) for ids in rows.with_format("arrow")["input_ids"].to_pylist())
    return rows, stats


def load_data(spec: Any, tokenizer: Any, max_seq_length: int, *, what: str = "data", seed: int = 42,
              num_proc: int | None = None, max_line_bytes: int = MAX_LINE_BYTES) -> tuple[Any, LoadStats]:
    """Load, validate and encode a data spec: a ``datasets.Dataset`` of ``input_ids`` and ``labels`` (rows with
    no trained token left after truncation are dropped) and its :class:`LoadStats`.

    Fails fast: the first malformed row raises :class:`DataError` naming its file and line or row. A mixture
    (several sources) is shuffled with ``seed``. ``what`` names the spec in configuration errors.
    """
    check_tokenizer(tokenizer)
    check_max_seq_length(max_seq_length)
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
    specs = parse_data_spec(spec, what)
    sources = [_load_source(s, what, max_line_bytes) for s in specs]
    for s, parts in zip(specs, sources):
        if sum(len(p) for p in parts) == 0:
            kind = ("pipe is empty, was read already" if is_stream(s.path)
                    else "file is empty" if Path(s.path).is_file() else "source is empty")
            raise DataError(f"{s.path}: no rows (the {kind} or has only blank lines)")
    if specs[0].fraction is not None:
        sources = _mixture_heads(sources, [s.fraction for s in specs])
    label = specs[0].path if len(specs) == 1 else f"{what} (a mixture of {len(specs)} sources)"
    rows, stats = _encode(sources, [s.columns for s in specs], tokenizer, max_seq_length, label, num_proc)
    if len(specs) > 1:
        rows = rows.shuffle(seed=seed, keep_in_memory=True)
    if stats.ignored_columns:
        logger.info("%s: ignored columns that no format uses: %s", what,
                    ", ".join(shown(c) for c in stats.ignored_columns))
    return rows, stats


def encode_dataset(dataset: Any, tokenizer: Any, max_seq_length: int, *, label: str = "train_dataset",
                   num_proc: int | None = None, stream_text_refusal: str | None = None) -> tuple[Any, LoadStats]:
    """Encode a raw ``datasets.Dataset`` (messages, prompt/completion, alpaca, ShareGPT or text columns) like
    :func:`load_data` does a file: through the same cached ``Dataset.map``, with errors naming ``{label}, row i``.

    A streaming ``datasets.IterableDataset`` is encoded lazily, as TRL's SFTTrainer does (``IterableDataset.map``,
    no cache; rows without a trained token are filtered out as they stream): its :class:`LoadStats` are all zero,
    since no row has been read yet. Training on it needs ``max_steps``, as for any iterable dataset.
    ``stream_text_refusal``: why a plain text row cannot be used; the stream then raises ConfigError when it
    reaches one (a ``Dataset``'s text rows are counted in its stats instead).
    """
    check_tokenizer(tokenizer)
    check_max_seq_length(max_seq_length)
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return _encode_iterable(dataset, tokenizer, max_seq_length, label, stream_text_refusal), LoadStats()
    part = _dataset_part(label, dataset, None)
    if len(part) == 0:
        raise DataError(f"{label}: no rows")
    rows, stats = _encode([[part]], [None], tokenizer, max_seq_length, label, num_proc)
    if stats.ignored_columns:
        logger.info("%s: ignored columns that no format uses: %s", label,
                    ", ".join(shown(c) for c in stats.ignored_columns))
    return rows, stats


def _encode_iterable(dataset: Any, tokenizer: Any, max_seq_length: int, label: str, text_refusal: str | None):
    """A streaming dataset encoded as it is iterated (errors name ``{label}, row i``, counted from its start)."""
    names = dataset.column_names  # None where the stream's features are unknown until it is read
    encoder = _RowEncoder(_Part(label, dataset=dataset), None, tokenizer, max_seq_length)
    encoded = dataset.map(encoder, with_indices=True, remove_columns=names, features=_encoded_features())
    if text_refusal:
        encoded = encoded.map(_StreamTextRefusal(label, text_refusal), with_indices=True)
    # Whether a stream has weights is known only once it is read: it keeps the column ([] for unweighted rows).
    return encoded.filter(_has_trained_token).select_columns(list(_WEIGHTED_COLUMNS))


class _StreamTextRefusal:
    """Raises at the first plain text row of a stream, which could not be counted before training."""

    def __init__(self, label: str, why: str):
        self.label, self.why = label, why

    def __call__(self, row: dict, index: int) -> dict:
        if row["format"] == TEXT_KEY:
            raise ConfigError(f"{self.label}, row {index}: a plain text row {self.why}")
        return row


def _has_trained_token(row: Mapping[str, Any]) -> bool:
    return row["trained"] > 0


@dataclass
class LoadStats:
    """Counts from :func:`load_training_rows` / :func:`sstoken.data.sources.load_data`.

    ``rows_read`` = ``used`` + ``skipped_no_trainable_token`` (weight 0, or nothing trained left after
    truncation); ``truncated`` counts used rows that were cut to ``max_seq_length`` (rows both truncated and
    skipped count only as skipped); ``weighted``, used rows with a token weight other than 1 (their ``weight``
    fields). ``ignored_columns`` are the columns (top-level keys) that no format reads, dropped from the encoded
    rows.
    """

    rows_read: int = 0
    used: int = 0
    skipped_no_trainable_token: int = 0
    truncated: int = 0
    weighted: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)


def stats_of_selection(stats: LoadStats, rows: Any) -> LoadStats:
    """``stats`` for ``rows``, a selection of the encoded rows it counted (``sstoken compare``'s held-out split): the
    rows used and weighted are recounted; the other counts still describe everything read."""
    weights = rows[TOKEN_WEIGHTS] if TOKEN_WEIGHTS in rows.column_names else []
    return dataclasses.replace(stats, used=len(rows), weighted=sum(1 for w in weights if w))


def load_training_rows(
    path: Any,
    tokenizer: Any,
    max_seq_length: int,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> tuple[list[dict[str, list[int]]], LoadStats]:
    """Read, validate and encode training data: a JSONL file, or any data spec :mod:`sstoken.data.sources` reads.

    Returns rows ``{"input_ids": [...], "labels": [...]}`` and :class:`LoadStats`. Fails fast: the first
    malformed row raises :class:`DataError` (never train on partly bad data). A file with no rows, or whose
    rows are all skipped (no trained token after truncation), also raises :class:`DataError`. The encoding
    is cached (see :func:`sstoken.data.sources.load_data`, which returns a ``datasets.Dataset`` instead of a list).
    """
    dataset, stats = load_data(path, tokenizer, max_seq_length, max_line_bytes=max_line_bytes)
    return dataset.to_list(), stats



DEFAULT_DATA_SEED = 42
"""The seed of a mixture's shuffle when no recipe gives one: TrainingArguments' default ``seed``."""


def load_rows(spec, tokenizer, max_seq_length: int, *, what: str = "data", seed: int = DEFAULT_DATA_SEED,
              num_proc: int | None = None):
    """The one loader of every command (train, cache, compare, inspect, eval --held-out): the encoded rows of a
    data spec and their LoadStats, logged."""
    rows, stats = load_data(spec, tokenizer, max_seq_length, what=what, seed=seed, num_proc=num_proc)
    logger.info("%s %s: %d rows read, %d used, %d skipped (no trainable token: weight 0 or truncated away), "
                "%d truncated, %d weighted; formats: %s", what, escaped(spec) if isinstance(spec, str) else shown(spec),
                stats.rows_read, stats.used, stats.skipped_no_trainable_token, stats.truncated, stats.weighted,
                ", ".join(f"{fmt} {count}" for fmt, count in sorted(stats.formats.items())))
    return rows, stats
