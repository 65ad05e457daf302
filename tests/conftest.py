"""Tiny random-weight checkpoints made with transformers, shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "The quick brown fox jumps over the lazy dog. Héllo wörld, ünïcode ✓ 日本語 テキスト.\n"
)


def make_tokenizer(out: Path) -> None:
    """A byte-level BPE with <|endoftext|> and chat tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "bos_token": None, "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))


ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def make_checkpoint(out: Path, arch: str = "llama", dtype: torch.dtype = torch.float32,
                    seed: int = 0, **overrides: object) -> Path:
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    # Larger weights than the default init make logits far apart, so greedy choices are
    # stable against float rounding and the texts vary from prompt to prompt.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if "embed" in name or "lm_head" in name else 0.08)
    model.to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory):
    """ckpt(arch, **overrides) -> a cached checkpoint directory."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides: object) -> Path:
        key = (arch, str(dtype), tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp(arch), arch, dtype, **overrides)
        return cache[key]

    return make
