"""Helpers shared by the benchmarks: peak-memory probes, machine description, model preparation, result files.

Peak memory on CPU is the process's resident-set high-water mark (``VmHWM``). Each measured variant runs in its
own process, and the mark is reset (``/proc/self/clear_refs``) once the model is loaded, so the number covers
the training steps only and one variant's allocations can never show up in another's.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import re
import resource
import subprocess
import sys
from pathlib import Path

from sstoken.io import atomic_write_json, atomic_write_text

# ----------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return (kb or 0) * 1024


def peak_rss_bytes() -> int:
    """High-water RSS since the last :func:`reset_peak_rss` (or process start)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss is the whole-process peak (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return kb * 1024


# glibc mallopt() parameters, from <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - raises AttributeError where the C library is not glibc
        return libc
    except (OSError, AttributeError):
        return None


def malloc_follows_live_memory(on: bool) -> bool:
    """Switch glibc's malloc between a memory-measuring mode and its usual steady state; False if not glibc.

    By default glibc raises its mmap threshold after the first large frees (up to 32 MiB), after which
    multi-MB tensors come from the heap, stay resident when freed, and the RSS high-water mark records the
    heap's fragmentation rather than the step's live memory. ``on``: every block of 128 KiB or more gets its own
    mapping and is unmapped when freed, so peak RSS follows live memory; free heap pages are returned first.
    That costs a page fault per fresh page, which would distort timing, so ``off`` restores the thresholds
    glibc's own adjustment settles at (mmap 32 MiB, trim twice that) for the timed steps.
    """
    libc = _glibc()
    if libc is None:
        return False
    if on:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
    return True


class PeakMemory:
    """Peak memory of a block of work: RSS high-water on CPU, ``max_memory_allocated`` on CUDA."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0
        self.method = ""

    def start(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
        else:
            exact = malloc_follows_live_memory(True)
            reset = reset_peak_rss()
            self.baseline = current_rss_bytes()
            self.method = ("RSS high-water (VmHWM reset before the step" + (", glibc malloc returning every block "
                           ">= 128 KiB" if exact else "") + ")") if reset else "ru_maxrss (whole process)"

    def peak(self) -> int:
        """Peak since :meth:`start`; on CPU this also puts malloc back in its steady state for timing."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        peak = peak_rss_bytes()
        malloc_follows_live_memory(False)
        return peak


# ----------------------------------------------------------------------------------------------- processes
_PRELOAD = ["torch", "transformers", "peft", "trl", "sstoken.training.trainer", "sstoken.selection.history", "sstoken.selection.attention",
            "overhead", "attention_memory", "cache_throughput"]


def worker_context():
    """Multiprocessing context for measured workers: a fork server that has imported torch and the trainer.

    Each worker must be its own process (its own memory high-water mark), but importing torch, transformers and
    TRL afresh costs 10-20 s per process on a busy 2-core machine. Forking from a server that did the imports
    once (and never ran any computation, so no thread pools exist to be broken by the fork) makes a worker start
    in well under a second while keeping it separate from the parent and from every other worker.
    """
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


# ----------------------------------------------------------------------------------------------- machine


def run_in_worker(target, args: tuple, what: str, timeout_s: float):
    """Run ``target(conn, *args)`` in a fresh worker process and return the payload it sends back.

    The worker answers ``("ok", payload)`` or ``("error", traceback text)``; a worker that says nothing in
    ``timeout_s`` or fails is a RuntimeError naming ``what``.
    """
    ctx = worker_context()
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise RuntimeError(f"{what} worker did not answer")
        kind, payload = parent.recv()
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    if kind != "ok":
        raise RuntimeError(f"{what} worker failed:\n{payload}")
    return payload


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str) -> dict:
    import torch
    import transformers

    info = {
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import peft
        import trl

        info["peft"] = peft.__version__
        info["trl"] = trl.__version__
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------------------------- models


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sstoken" / "bench"


def hf_checkpoint(model_name: str | None, workdir: Path, quick: bool) -> str:
    """A directory ``from_pretrained`` loads in seconds.

    The embedded model is a GGUF file that transformers dequantises on every load (about 40 s here); the
    benchmark loads the model once per variant and length, so the dequantised weights are saved once as a
    normal checkpoint under ``~/.cache/sstoken/bench`` (keyed by the GGUF file's path, size and mtime) and
    every worker loads that. ``--quick`` writes the tiny random model of :mod:`sstoken.testing` instead.
    """
    if quick:
        from sstoken.testing import save_tiny_model

        target = workdir / "tiny-model"
        if not (target / "config.json").exists():
            save_tiny_model(target)
        return str(target)
    from sstoken.models import resolve_model

    path, gguf = resolve_model(model_name)
    if gguf is None:
        return path
    gguf_path = Path(path) / gguf
    stat = gguf_path.stat()
    import transformers

    key = hashlib.sha1(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
                       .encode()).hexdigest()[:12]
    target = cache_root() / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists() and (target / "DONE").exists():
        return str(target)
    # Conversion in a child process: the 40 s dequantisation leaves large freed arenas behind, and the parent
    # process should stay small while the measured workers run.
    # load_model drops the GGUF quantisation marker of the dequantised weights, so the saved copy loads (and
    # trains) as an ordinary model.
    code = ("import sys; from sstoken.models import load_model, load_tokenizer; "
            "m = load_model(sys.argv[1]); t = load_tokenizer(sys.argv[1]); "
            "m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2]); "
            "open(sys.argv[2] + '/DONE', 'w').write('ok')")
    target.mkdir(parents=True, exist_ok=True)
    print(f"[bench] converting {gguf_path.name} to a plain checkpoint in {target} (once)", flush=True)
    subprocess.run([sys.executable, "-c", code, model_name or "embedded", str(target)], check=True)
    return str(target)


# google/gemma-3-270m's shapes: a 262k vocabulary on a small body, where the LM head dominates a step's memory.
GEMMA3_270M_SHAPES = {
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "max_position_embeddings": 32768,
}
# The same architecture at test size (--quick): a vocabulary still wider than one fused-head tile (32768).
GEMMA3_TINY_SHAPES = {
    "vocab_size": 40000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "query_pre_attn_scalar": 8,
    "sliding_window": 32,
    "max_position_embeddings": 512,
}
# Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes (tied embeddings, 152k vocabulary): the 0.5B and 1.5B classes.
QWEN25_05B_SHAPES = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
                     "max_position_embeddings": 32768}
QWEN25_15B_SHAPES = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
                     "max_position_embeddings": 32768}
QWEN2_TINY_SHAPES = {"vocab_size": 4096, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                     "max_position_embeddings": 512}
# name -> (model_type, architecture, real shapes, test-size shapes)
MODEL_SHAPES = {
    "gemma-3-270m": ("gemma3_text", "Gemma3ForCausalLM", GEMMA3_270M_SHAPES, GEMMA3_TINY_SHAPES),
    "qwen2.5-0.5b": ("qwen2", "Qwen2ForCausalLM", QWEN25_05B_SHAPES, QWEN2_TINY_SHAPES),
    "qwen2.5-1.5b": ("qwen2", "Qwen2ForCausalLM", QWEN25_15B_SHAPES, QWEN2_TINY_SHAPES),
}


def shape_config(shape: str, quick: bool, **special_tokens):
    """The transformers config of ``shape`` (a :data:`MODEL_SHAPES` name; ``quick``: at test size) with the given
    special token ids (``pad_token_id``, ``eos_token_id``, ``bos_token_id``)."""
    from transformers import AutoConfig

    model_type, architecture, shapes, tiny = MODEL_SHAPES[shape]
    config = AutoConfig.for_model(model_type, **(tiny if quick else shapes), **special_tokens)
    config.architectures = [architecture]
    return config


def shaped_checkpoint(shape: str, tokenizer_dir: str, workdir: Path, quick: bool) -> str:
    """A directory with the config of ``shape`` (no weights: load it with ``random_init``) and the tokenizer of
    ``tokenizer_dir``, whose ids all fall inside the shape's vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    target = workdir / f"{shape}-model"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shape_config(shape, quick, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                 bos_token_id=tokenizer.bos_token_id).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def random_weights_checkpoint(model_dir: str, workdir: Path, dtype: str | None) -> str:
    """``model_dir``'s architecture with the random weights of :func:`load_bench_model` saved as a checkpoint, for
    loaders that need weight files (4-bit quantization quantizes them as they load)."""
    target = workdir / (Path(model_dir).name + "-random-weights")
    if not (target / "config.json").exists():
        from transformers import AutoTokenizer

        load_bench_model(model_dir, random_init=True, dtype=dtype).save_pretrained(target)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return str(target)


def load_bench_model(model_dir: str, random_init: bool = False, attn_implementation: str = "sdpa",
                     dtype: str | None = None, quantization: dict | None = None, device: str = "cpu"):
    """The benchmark's model: the checkpoint in ``model_dir``, or (``random_init``) its architecture with random
    weights. Step time and memory depend on the architecture, not on the weight values, so a machine that cannot
    receive the weights (the GPU machines take at most 64 MiB of files) still measures the same costs.
    ``dtype``: the weights' dtype (default: the checkpoint's, float32 for random weights); ``quantization``:
    sstoken's QLoRA settings (weights quantized while loading onto ``device``, which needs a checkpoint)."""
    import torch

    if quantization and random_init:
        raise ValueError("quantization needs weight files: save the random weights first (random_weights_checkpoint)")
    if not random_init:
        from sstoken.models import load_model

        return load_model(model_dir, dtype=dtype, attn_implementation=attn_implementation,
                          quantization=quantization, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    kwargs = {} if dtype in (None, "auto") else {"dtype": getattr(torch, dtype)}
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, **kwargs)


# ----------------------------------------------------------------------------------------------- results


def write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)


def replace_marked_block(path: str | os.PathLike, section: str, marker: str, body: str) -> None:
    """Write ``body`` between ``<!-- marker:begin -->`` / ``<!-- marker:end -->`` in ``path``.

    The block sits under the ``## section`` heading; a missing file, heading or block is created. Text outside
    the markers (other sections, hand-written notes) is left untouched.
    """
    path = Path(path)
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        heading = f"## {section}"
        match = re.search(rf"^{re.escape(heading)}\s*$", text, re.MULTILINE)
        if match is None:
            text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
        else:
            # Append at the end of the section (before the next "## " heading).
            nxt = re.search(r"^## ", text[match.end():], re.MULTILINE)
            cut = match.end() + (nxt.start() if nxt else len(text) - match.end())
            text = text[:cut].rstrip() + f"\n\n{block}\n\n" + text[cut:].lstrip("\n")
    atomic_write_text(path, text.rstrip() + "\n")
