"""The built-in default model: it loads through the ordinary checkpoint path, writes
Python-like code (and a dummy-weight model of the same shape does not), and its held-out
loss, recomputed with fleetllm's own forward pass, beats a count-based bigram model by more
than 1 nat/token."""

from __future__ import annotations

import importlib.util
import io
import json
import keyword
import math
import sys
import sysconfig
import tokenize
from pathlib import Path

import numpy as np
import pytest

from fleetllm import LLM, SamplingParams
from fleetllm.default_model import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "    def __repr__(self):\n",
    "for i in range(10):\n",
    "def read_config(path):\n    with open(path) as f:\n",
]
WINDOW = 256  # the training script's context length and held-out protocol


KEYWORDS = set(keyword.kwlist) | {"self"}


def _tokens(text: str) -> list[tokenize.TokenInfo] | None:
    """Python tokens of text; a cut-off end (open bracket or string) just stops early."""
    tokens: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            tokens.append(tok)
    except tokenize.TokenError:
        pass
    except (IndentationError, SyntaxError):
        return None
    return tokens


def looks_like_python(prompt: str, completion: str) -> bool:
    """The prompt plus completion tokenizes as Python, and at least a quarter of the
    completion's tokens are structure (keywords, comments, strings, line ends) rather than a
    soup of made-up names and operators."""
    if _tokens(prompt + completion) is None:
        return False
    tokens = _tokens(completion) or []
    if any(t.type == tokenize.ERRORTOKEN and t.string.strip() for t in tokens):
        return False
    skip = {tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    significant = [t for t in tokens if t.type not in skip]
    structure = [t for t in significant
                 if t.type in (tokenize.COMMENT, tokenize.STRING, tokenize.NEWLINE)
                 or (t.type == tokenize.NAME and t.string in KEYWORDS)]
    return len(significant) >= 5 and len(structure) / len(significant) >= 0.25


def python_likeness(llm: LLM) -> float:
    """Share of the prompts whose greedy completion looks like Python."""
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    return sum(looks_like_python(p, o.outputs[0].text) for p, o in zip(PROMPTS, outs)) / len(
        PROMPTS)


@pytest.fixture(scope="module")
def default_llm():
    llm = LLM()  # no model named: the built-in one
    yield llm
    llm.shutdown()


def test_default_model_is_used_and_is_a_real_checkpoint(default_llm: LLM, caplog) -> None:
    assert Path(default_llm.config.model_config.model) == DEFAULT_MODEL_DIR
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg.get("dtype", cfg.get(
        "torch_dtype")) == "bfloat16"
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file())
    assert size < 30 * 2**20
    with caplog.at_level("INFO", logger="fleetllm.default_model"):
        LLM(max_model_len=64).shutdown()
    assert sum("built-in default model" in r.message for r in caplog.records) == 1


def test_writes_python_and_noise_does_not(default_llm: LLM) -> None:
    trained = python_likeness(default_llm)
    dummy = LLM(load_format="dummy", seed=1)
    try:
        noise = python_likeness(dummy)
    finally:
        dummy.shutdown()
    assert trained >= 0.6, f"only {trained:.0%} of the completions look like Python"
    assert noise <= 0.2, f"the metric cannot tell noise apart ({noise:.0%} passes)"


def test_chat_template_renders(default_llm: LLM) -> None:
    out = default_llm.chat([{"role": "user", "content": "write a function"}],
                           SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>user\nwrite a function<|im_end|>")
    assert out.prompt.endswith("<|im_start|>assistant\n")


def _training_script():
    spec = importlib.util.spec_from_file_location(
        "train_default_model", ROOT / "scripts" / "train_default_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def _bigram_loss(train: np.ndarray, heldout_windows: list[np.ndarray], vocab: int) -> float:
    """Count-based bigram model, interpolated with add-one unigrams; the mixing weight is
    the best of a grid on the held-out data itself, which only favours the baseline."""
    unigram = (np.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab)
    pairs = np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(
        vocab, vocab)
    context = pairs.sum(axis=1)
    best = math.inf
    for lam in (0.5, 0.7, 0.8, 0.9, 0.95):
        total = count = 0.0
        for w in heldout_windows:
            prev, nxt = w[:-1], w[1:]
            bigram = np.divide(pairs[prev, nxt], context[prev],
                               out=np.zeros(len(prev)), where=context[prev] > 0)
            p = lam * bigram + (1 - lam) * unigram[nxt]
            total -= np.log(p).sum()
            count += len(nxt)
        best = min(best, total / count)
    return best


def test_heldout_loss_beats_a_bigram_model_by_one_nat() -> None:
    script = _training_script()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = script.collect_corpus(stdlib)
    shipped = json.loads((DEFAULT_MODEL_DIR / "heldout_files.json").read_text())
    assert corpus.heldout_files == shipped, "this Python's stdlib differs from the training one"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    heldout = script.encode_files(tok, corpus, corpus.heldout_files).numpy()
    train = script.encode_files(tok, corpus, corpus.train_files).numpy()
    windows = [heldout[i:i + WINDOW] for i in range(0, len(heldout), WINDOW)]
    windows = [w for w in windows if len(w) > 1]

    llm = LLM(max_model_len=WINDOW + 1)
    try:
        outs = llm.generate([{"prompt_token_ids": w.tolist()} for w in windows],
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    finally:
        llm.shutdown()
    nll = [-lp[tok_id].logprob for out in outs
           for tok_id, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
    model_loss = float(np.mean(nll))
    assert len(nll) == sum(len(w) - 1 for w in windows)
    summary = json.loads((DEFAULT_MODEL_DIR / "training_summary.json").read_text())
    assert abs(model_loss - summary["final_heldout_loss_bf16_weights"]) < 0.05
    bigram = _bigram_loss(train, windows, tok.get_vocab_size())
    assert model_loss <= bigram - 1.0, (model_loss, bigram)
