"""The data spec of a recipe, validated before the model loads.

``data:`` and ``eval_data:`` in a recipe (and the ``--data`` / ``--eval_data`` / ``--held-out`` flags) take a
*data spec*, one of:

* text: a local file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ``.tsv``, ``.arrow``; any other extension
  is read as JSONL; the text formats also compressed, ``.jsonl.gz``, ``.bz2``, ``.xz``, ``.zst``), a folder of
  such files or one written by ``Dataset.save_to_disk``, or a Hugging Face Hub dataset id (anything that is not
  a local path);
* a mapping with ``path`` and optionally ``config``, ``split``, ``data_files``, ``data_dir`` and ``columns``: the
  fields of TRL's ``DatasetConfig``, with ``config`` for its ``name`` and ``columns`` either a rename mapping
  (``{question: prompt}``) or, as in TRL, a list of the columns to keep;
* a list of such texts or mappings: a mixture. With ``fraction`` on every item the rows are taken as TRL's
  ``get_dataset`` takes them; without it the sources are concatenated. The mixture is shuffled with a seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sstoken.errors import ConfigError, did_you_mean, shown

SOURCE_KEYS = ("path", "config", "split", "data_files", "data_dir", "columns", "fraction")


# Names other tools use for a source key: a pointed hint instead of a plain "unknown key".
_KEY_ALIASES = {"name": "config", "subset": "config", "proportion": "fraction", "weight": "fraction"}


BUILDER_OF_SUFFIX = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
                      ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}


# Compressed text files (``train.jsonl.gz``) are read by datasets, which decompresses them (fsspec).
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


BUILDERS = ("json", "parquet", "csv", "arrow")
"""``path:`` values that name a ``datasets`` builder for the files in ``data_files`` (as in TRL recipes)."""


@dataclass
class SourceSpec:
    """One source of a data spec (see the module docstring); ``fraction`` is set only inside a mixture."""

    path: str
    config: str | None = None
    split: str = "train"
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    data_dir: str | None = None
    columns: dict[str, str] | list[str] | None = None
    fraction: float | None = None


def parse_data_spec(value: Any, what: str = "data") -> list[SourceSpec]:
    """The sources of a data spec, checked for shape (not for existence); ``what`` names it in errors."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{what} is an empty list; give a path, a Hub dataset id or a list of sources")
        specs = [_source(item, f"{what}[{i}]") for i, item in enumerate(value)]
        with_fraction = [spec.fraction is not None for spec in specs]
        if any(with_fraction) and not all(with_fraction):
            raise ConfigError(f"{what}: set fraction on every source of the mixture or on none (none: concatenate)")
        return specs
    spec = _source(value, what)
    if spec.fraction is not None:
        raise ConfigError(f"{what}: fraction is for the sources of a mixture (a list under {what}:)")
    return [spec]


def _source(value: Any, what: str) -> SourceSpec:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a path, a Hub dataset id, a mapping with path: or a list of them, got "
                          f"{shown(value)}")
    for key in value:
        if key not in SOURCE_KEYS:
            hint = f" (write {_KEY_ALIASES[key]!r})" if key in _KEY_ALIASES else did_you_mean(key, SOURCE_KEYS)
            raise ConfigError(f"unknown {what} key {shown(key)}{hint}; a source has {', '.join(SOURCE_KEYS)}")
    path = value.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{what}: path must be a file, a folder or a Hub dataset id (text), got {shown(path)}")
    for key in ("config", "data_dir"):
        if value.get(key) is not None and not (isinstance(value[key], str) and value[key].strip()):
            raise ConfigError(f"{what}: {key} must be text, got {shown(value[key])}")
    if path in BUILDERS and value.get("data_files") is None and not Path(path).exists():
        raise ConfigError(f"{what}: path {path} names a datasets builder; add data_files: the files it reads")
    split = value.get("split", "train")
    if not isinstance(split, str) or not split.strip():
        raise ConfigError(f"{what}: split must be a split name such as train or test, got {shown(split)}")
    return SourceSpec(path=str(Path(path).expanduser()) if path.startswith("~") else path,
                      config=value.get("config"), split=split, data_dir=value.get("data_dir"),
                      data_files=_data_files(value.get("data_files"), what),
                      columns=_columns(value.get("columns"), what), fraction=_fraction(value.get("fraction"), what))


def _is_text_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def _data_files(value: Any, what: str):
    if value is None or (isinstance(value, str) and value) or _is_text_list(value):
        return value
    if isinstance(value, Mapping) and value and all(
            isinstance(k, str) and ((isinstance(v, str) and v) or _is_text_list(v)) for k, v in value.items()):
        return dict(value)
    raise ConfigError(f"{what}: data_files must be a file, a list of files or a mapping of split to files, got "
                      f"{shown(value)}")


def _columns(value: Any, what: str):
    if value is None or _is_text_list(value):
        return value
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and isinstance(v, str) and v
                                                    for k, v in value.items()):
        targets = list(value.values())
        duplicate = next((t for t in targets if targets.count(t) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"{what}: columns renames two columns to {duplicate!r}")
        return dict(value)
    raise ConfigError(f"{what}: columns must map column names to sstoken's (e.g. {{question: prompt, answer: "
                      f"completion}}) or list the columns to keep, got {shown(value)}")


def _fraction(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: fraction must be a number > 0, got {shown(value)}")
    return float(value)


def is_builder_source(spec: SourceSpec) -> bool:
    return spec.path in BUILDERS and spec.data_files is not None


def looks_local(path: str) -> bool:
    """Whether ``path`` was meant as a local file or folder (a Hub id is ``name`` or ``org/name``)."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path or path.count("/") > 1
            or data_suffix(Path(path))[0] in BUILDER_OF_SUFFIX)


def check_data_spec(value: Any, what: str = "data", label: str | None = None) -> list[SourceSpec]:
    """:func:`parse_data_spec` plus what can be checked before loading: local paths exist.

    ``label`` names the data in the "does not exist" message (default: ``what``).
    """
    specs = parse_data_spec(value, what)
    for spec in specs:
        if is_builder_source(spec):
            continue  # data_files may be globs: resolved (and reported when they match nothing) at load time
        if not Path(spec.path).exists() and (looks_local(spec.path) or spec.path in BUILDERS):
            raise ConfigError(f"{label or what} {spec.path} does not exist")
    return specs


def resolve_relative_paths(value: Any, base: Path) -> Any:
    """``value`` (a data spec from the recipe in ``base``) with relative local paths made relative to ``base``.

    A path is rewritten only where ``base / path`` exists, so a Hub id is never mistaken for a file. The
    ``data_files`` of a ``path: json`` (builder) source are local files too; those of a folder or a Hub dataset
    are relative to it and stay as written.
    """
    if isinstance(value, str):
        return _relative(value, base)
    if isinstance(value, list):
        return [resolve_relative_paths(item, base) for item in value]
    if isinstance(value, Mapping):
        out = dict(value)
        if isinstance(out.get("path"), str):
            out["path"] = _relative(out["path"], base)
        if out.get("path") in BUILDERS:
            files = out.get("data_files")
            if isinstance(files, str):
                out["data_files"] = _joined(files, base)
            elif isinstance(files, list):
                out["data_files"] = [_joined(f, base) if isinstance(f, str) else f for f in files]
            elif isinstance(files, Mapping):
                out["data_files"] = {k: _joined(v, base) if isinstance(v, str) else
                                     [_joined(f, base) if isinstance(f, str) else f for f in v]
                                     if isinstance(v, list) else v for k, v in files.items()}
        return out
    return value


def _relative(path: str, base: Path) -> str:
    expanded = str(Path(path).expanduser())
    if not Path(expanded).is_absolute() and (base / expanded).exists():
        return str(base / expanded)
    return expanded


def _joined(pattern: str, base: Path) -> str:
    """A builder source's data file or glob pattern made relative to ``base``: always (a glob such as
    ``data/*.jsonl`` names no existing path), except a URL (``hf://...``, ``https://...``)."""
    if "://" in pattern:
        return pattern
    expanded = str(Path(pattern).expanduser())
    return expanded if Path(expanded).is_absolute() else str(base / expanded)


def data_suffix(path: Path) -> tuple[str, str]:
    """``(format suffix, compression suffix)`` of a file name: ``("jsonl", ".gz")`` for ``a.jsonl.gz``."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), ""
