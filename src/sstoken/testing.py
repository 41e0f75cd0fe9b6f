"""Tiny offline models and tokenizers for tests and smoke runs (no hub access needed).

The tokenizer is a byte-level BPE trained in memory on a few sentences, with ChatML special tokens and a
ChatML chat template, so every data format can be exercised without downloading anything.
"""

from __future__ import annotations

import functools

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice was born in Paris in 1984 and works as an engineer.",
    "What is the capital of France? The capital of France is Paris.",
    "Question: how many apples are left? Answer: 7 apples are left.",
    "system user assistant You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus times equals",
] * 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320):
    """A fast byte-level BPE tokenizer with ChatML special tokens, pad = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int | None = None, **overrides):
    """Config of a tiny random causal LM: 2 layers, hidden 32, 4 query heads, 2 KV heads (GQA)."""
    from transformers import AutoConfig

    tok = tiny_tokenizer()
    vocab = vocab_size or len(tok)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A randomly initialised tiny causal LM (float32, eval mode off: train mode like a fresh model)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model


def save_tiny_model(path, arch: str = "llama", seed: int = 0) -> str:
    """Write a tiny random model and its tokenizer to ``path`` (usable as ``model:`` in a recipe)."""
    model = tiny_model(arch, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def random_rows(prompt_lengths: list[int], response_lengths: list[int], seed: int = 0) -> list[dict]:
    """Encoded rows of random token ids (3..299, inside the tiny vocabulary): row i has ``prompt_lengths[i]``
    prompt tokens (label -100) then ``response_lengths[i]`` response tokens; the same seed, the same rows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_length, response_length in zip(prompt_lengths, response_lengths, strict=True):
        prompt = torch.randint(3, 300, (prompt_length,), generator=gen).tolist()
        response = torch.randint(3, 300, (response_length,), generator=gen).tolist()
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def tiny_training_args(output_dir, **settings):
    """SSTokenConfig for a quick CPU run: no reports, no checkpoints, seed 0; ``settings`` override these."""
    from sstoken.training.config import SSTokenConfig

    config = dict(output_dir=str(output_dir), report_to="none", save_strategy="no", use_cpu=True, seed=0,
                  dataloader_num_workers=0)
    config.update(settings)
    return SSTokenConfig(**config)


def tiny_lora():
    """The LoRA adapter of the tests: r=4 on q_proj / v_proj, no dropout (deterministic)."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def tiny_trainer(output_dir, rows: list[dict], model=None, lora: bool = True, **settings):
    """An SSTokenTrainer on encoded ``rows`` with the tiny model (or ``model``) and tokenizer, the
    :func:`tiny_training_args` (``settings`` override them) and :func:`tiny_lora` unless ``lora=False``."""
    from datasets import Dataset

    from sstoken.training.trainer import SSTokenTrainer

    return SSTokenTrainer(model=model if model is not None else tiny_model("llama"),
                          args=tiny_training_args(output_dir, **settings), train_dataset=Dataset.from_list(rows),
                          processing_class=tiny_tokenizer(), peft_config=tiny_lora() if lora else None)


def write_tiny_recipe(path, **settings):
    """A recipe file for a quick, quiet CPU run (no reports, no plots, 96-token rows) with ``settings`` on top;
    written as JSON, which is YAML. Returns ``path`` as a Path."""
    import json
    from pathlib import Path

    recipe = {"report_to": "none", "use_cpu": True, "plots": False, "max_seq_length": 96, **settings}
    path = Path(path)
    path.write_text(json.dumps(recipe), encoding="utf-8")
    return path


def write_tiny_jsonl(path, n_rows: int = 32, seed: int = 0) -> str:
    """A small messages-format training file with varied lengths and a few multi-turn rows."""
    import json
    import random

    rng = random.Random(seed)
    names = ["Alice", "Bob", "Carol", "Dan", "Eve", "Frank"]
    cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito"]
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n_rows):
            name, city = rng.choice(names), rng.choice(cities)
            year = rng.randint(1950, 2010)
            passage = f"{name} was born in {city} in {year} and works as an engineer."
            messages = [
                {"role": "user", "content": f"{passage} Where was {name} born?"},
                {"role": "assistant", "content": f"{name} was born in {city}."},
            ]
            if i % 4 == 3:
                messages += [
                    {"role": "user", "content": f"When was {name} born?"},
                    {"role": "assistant", "content": f"{name} was born in {year}."},
                ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return str(path)
