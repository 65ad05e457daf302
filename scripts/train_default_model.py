#!/usr/bin/env python
"""Train fleetllm's built-in default model.

The default model is a small Llama-architecture causal LM (~5.8M parameters)
trained from scratch on the Python standard library source of the running
interpreter, together with a byte-level BPE tokenizer. Everything is written in
the standard Hugging Face layout so that ``transformers`` (and fleetllm) can
load it directly.

Reproducibility: the data set is the sorted list of stdlib ``.py`` files, the
held-out split is a fixed function of each file's relative path, all random
number generators are seeded, and training runs for a fixed number of steps.
With the same Python/stdlib, library versions and ``--threads`` the run is
deterministic.

Usage (the command used to produce the committed model)::

    python scripts/train_default_model.py --threads 1 \
        --out fleetllm/default_model --plots docs/default_model

Held-out evaluation protocol (recorded in ``training_summary.json`` too): each
held-out file (listed in ``heldout_files.json``, paths relative to the stdlib
directory, read as bytes and decoded as UTF-8) is encoded with the tokenizer
and followed by one ``<|endoftext|>`` token; the encodings are concatenated in
the listed order; the resulting token stream is cut into consecutive,
non-overlapping windows of ``context_length`` tokens (the last window may be
shorter); within each window every token but the first is predicted from the
preceding tokens of the same window. The held-out loss is the mean negative
log-likelihood in nats over all predicted tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

LOG = logging.getLogger("train_default_model")

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
MAX_FILE_BYTES = 200 * 1024
HELDOUT_BUCKETS = 100
HELDOUT_BUCKETS_TAKEN = 3  # ~3% of files are held out
SAMPLE_PROMPT = "def fibonacci(n):"
SAMPLE_NEW_TOKENS = 60

EVAL_PROTOCOL = (
    "Each held-out file (heldout_files.json, relative to the stdlib dir, read as bytes "
    "and decoded as UTF-8) is encoded with tokenizer.json (no special tokens added) and "
    "followed by one <|endoftext|> token; encodings are concatenated in the listed order; "
    "the stream is cut into consecutive non-overlapping windows of context_length tokens "
    "(last window may be shorter); within each window every token but the first is "
    "predicted from the preceding tokens of that window. heldout_loss = mean NLL in nats "
    "over all predicted tokens (heldout_tokens)."
)


@dataclass(frozen=True)
class Corpus:
    """The stdlib source files, split into training and held-out sets."""

    root: Path
    train_files: list[str]
    heldout_files: list[str]

    def read(self, rel: str) -> str:
        return (self.root / rel).read_bytes().decode("utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("fleetllm/default_model"))
    parser.add_argument("--plots", type=Path, default=Path("docs/default_model"))
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="Python standard library directory to train on",
    )
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    parser.add_argument("--threads", type=int, default=1, help="torch/tokenizers CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast for the training forward/backward")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=25, help="steps between train-loss logs")
    parser.add_argument(
        "--eval-every", type=int, default=300, help="steps between held-out evaluations"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- data


def is_heldout(rel: str) -> bool:
    """Deterministic held-out assignment from the sha1 of the relative path."""
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()
    return int(digest, 16) % HELDOUT_BUCKETS < HELDOUT_BUCKETS_TAKEN


def collect_corpus(root: Path) -> Corpus:
    train: list[str] = []
    heldout: list[str] = []
    skipped_big = 0
    for path in sorted(root.rglob("*.py")):
        if not path.is_file():
            continue
        rel_path = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel_path.parts[:-1]):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            skipped_big += 1
            continue
        rel = rel_path.as_posix()
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            LOG.warning("skipping non-UTF-8 file %s", rel)
            continue
        (heldout if is_heldout(rel) else train).append(rel)
    train.sort()
    heldout.sort()
    LOG.info(
        "corpus %s: %d train files, %d held-out files, %d skipped (> %d bytes)",
        root,
        len(train),
        len(heldout),
        skipped_big,
        MAX_FILE_BYTES,
    )
    if not train or not heldout:
        raise RuntimeError(f"empty train or held-out split under {root}")
    return Corpus(root=root, train_files=train, heldout_files=heldout)


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(
        (corpus.read(rel) for rel in corpus.train_files),
        trainer=trainer,
        length=len(corpus.train_files),
    )
    LOG.info("trained byte-level BPE tokenizer, vocab size %d", tokenizer.get_vocab_size())
    return tokenizer


def check_round_trip(tokenizer: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if tokenizer.decode(ids, skip_special_tokens=False) != text:
            raise RuntimeError("tokenizer does not round-trip text exactly")


def save_tokenizer(tokenizer: Tokenizer, out: Path, model_max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out / "tokenizer_config.json", tokenizer_config)


def encode_files(tokenizer: Tokenizer, corpus: Corpus, files: list[str]) -> torch.Tensor:
    """Encode files and concatenate them, each followed by ``<|endoftext|>``."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    encodings = tokenizer.encode_batch(
        [corpus.read(rel) for rel in files], add_special_tokens=False
    )
    ids: list[int] = []
    for encoding in encodings:
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------- model


def build_config(vocab_size: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup then cosine decay from ``lr`` to ``lr * min_lr_ratio``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def sample_batch(
    stream: torch.Tensor, batch_size: int, context_length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(
        0, stream.numel() - context_length - 1, (batch_size,), generator=generator
    )
    offsets = torch.arange(context_length + 1)
    windows = stream[starts[:, None] + offsets[None, :]]
    return windows[:, :-1], windows[:, 1:]


@torch.inference_mode()
def heldout_loss(
    model: LlamaForCausalLM, stream: torch.Tensor, context_length: int, batch_size: int
) -> tuple[float, int]:
    """Mean nats/token over ``stream`` in non-overlapping windows (see module doc)."""
    was_training = model.training
    model.eval()
    n_full = stream.numel() // context_length
    full = stream[: n_full * context_length].view(n_full, context_length)
    total_nll = 0.0
    total_tokens = 0
    chunks = list(full.split(batch_size))
    tail = stream[n_full * context_length :]
    if tail.numel() >= 2:
        chunks.append(tail[None, :])
    for chunk in chunks:
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += chunk[:, 1:].numel()
    model.train(was_training)
    return total_nll / total_tokens, total_tokens


# ------------------------------------------------------------------------ outputs


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plot_losses(
    path: Path,
    train_steps: list[int],
    train_losses: list[float],
    eval_steps: list[int],
    eval_losses: list[float],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smoothed: list[float] = []
    ema = train_losses[0]
    for loss in train_losses:
        ema = 0.95 * ema + 0.05 * loss
        smoothed.append(ema)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(train_steps, train_losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(train_steps, smoothed, color="tab:blue", label="train (EMA 0.95)")
    ax.plot(eval_steps, eval_losses, "o-", color="tab:orange", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("fleetllm default model: Python stdlib")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    start_time = time.perf_counter()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    LOG.info("command: %s", command)

    # Thread settings must be in place before tokenizers/torch start their pools.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    args.plots.mkdir(parents=True, exist_ok=True)

    corpus = collect_corpus(args.stdlib)
    write_json(args.out / "heldout_files.json", corpus.heldout_files)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    check_round_trip(tokenizer, [corpus.read(rel) for rel in corpus.heldout_files])
    save_tokenizer(tokenizer, args.out, model_max_length=1024)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    train_stream = encode_files(tokenizer, corpus, corpus.train_files)
    heldout_stream = encode_files(tokenizer, corpus, corpus.heldout_files)
    tokenizer_seconds = time.perf_counter() - t0
    LOG.info(
        "tokenizer + encoding took %.1fs: %d train tokens, %d held-out tokens",
        tokenizer_seconds,
        train_stream.numel(),
        heldout_stream.numel(),
    )

    config = build_config(tokenizer.get_vocab_size(), eos_id)
    model = LlamaForCausalLM(config)
    model.float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model: %d parameters (%.2fM)", n_params, n_params / 1e6)
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)

    train_steps: list[int] = []
    train_losses: list[float] = []
    eval_steps: list[int] = []
    eval_losses: list[float] = []
    heldout_tokens = 0
    t0 = time.perf_counter()
    with logging_redirect_tqdm():
        for step in tqdm(range(1, args.steps + 1), desc="train", mininterval=10.0):
            lr = lr_at(step - 1, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = sample_batch(
                train_stream, args.batch_size, args.context_length, generator
            )
            # bfloat16 autocast: matmuls run on the CPU's bf16 units (weights, optimizer state
            # and the held-out evaluation stay float32).
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            train_steps.append(step)
            train_losses.append(loss.item())
            if step % args.log_every == 0 or step == 1:
                recent = train_losses[-args.log_every :]
                LOG.info(
                    "step %d/%d  loss %.4f (avg %.4f)  lr %.2e  grad_norm %.3f  %.2fs/step",
                    step,
                    args.steps,
                    train_losses[-1],
                    sum(recent) / len(recent),
                    lr,
                    grad_norm.item(),
                    (time.perf_counter() - t0) / step,
                )
            if step % args.eval_every == 0 or step == args.steps:
                val, heldout_tokens = heldout_loss(
                    model, heldout_stream, args.context_length, args.batch_size
                )
                eval_steps.append(step)
                eval_losses.append(val)
                LOG.info("step %d  held-out loss %.4f nats/token", step, val)
    train_seconds = time.perf_counter() - t0
    window = min(50, len(train_losses))
    final_train_loss = sum(train_losses[-window:]) / window
    LOG.info(
        "training took %.1fs (%.2fs/step); final train loss (mean of last %d steps) %.4f",
        train_seconds,
        train_seconds / args.steps,
        window,
        final_train_loss,
    )

    # Save in bfloat16, then reload the saved files to evaluate and sample from
    # exactly what is shipped (bf16 weights, float32 compute).
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id)
    model.to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    del model
    reloaded = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    reloaded.eval()
    saved_val, _ = heldout_loss(reloaded, heldout_stream, args.context_length, args.batch_size)
    LOG.info(
        "held-out loss: %.4f nats/token (float32 weights), %.4f (saved bfloat16 weights)",
        eval_losses[-1],
        saved_val,
    )

    prompt_ids = tokenizer.encode(SAMPLE_PROMPT, add_special_tokens=False).ids
    with torch.inference_mode():
        generated = reloaded.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=SAMPLE_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    completion = tokenizer.decode(generated[0].tolist(), skip_special_tokens=False)
    LOG.info("greedy sample:\n%s", completion)

    plot_losses(args.plots / "loss_curve.png", train_steps, train_losses, eval_steps, eval_losses)

    wall_seconds = time.perf_counter() - start_time
    summary = {
        "command": command,
        "seed": args.seed,
        "steps": args.steps,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "context_length": args.context_length,
        "tokens_seen": args.steps * args.batch_size * args.context_length,
        "peak_lr": args.lr,
        "min_lr_ratio": args.min_lr_ratio,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "params": n_params,
        "vocab_size": tokenizer.get_vocab_size(),
        "train_files": len(corpus.train_files),
        "heldout_files": len(corpus.heldout_files),
        "train_tokens": train_stream.numel(),
        "final_train_loss": final_train_loss,
        "final_train_loss_note": f"mean train loss over the last {window} steps",
        "final_heldout_loss": eval_losses[-1],
        "final_heldout_loss_bf16_weights": saved_val,
        "heldout_tokens": heldout_tokens,
        "heldout_eval_protocol": EVAL_PROTOCOL,
        "eval_history": [
            {"step": s, "heldout_loss": v} for s, v in zip(eval_steps, eval_losses, strict=True)
        ],
        "sample_prompt": SAMPLE_PROMPT,
        "sample_completion": completion,
        "sample_note": (
            f"greedy, {SAMPLE_NEW_TOKENS} new tokens, saved bf16 weights run in float32"
        ),
        "tokenizer_seconds": round(tokenizer_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall_seconds, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__,
    }
    write_json(args.out / "training_summary.json", summary)
    size = dir_size(args.out)
    LOG.info("wrote %s (%.2f MB) and %s", args.out, size / 1e6, args.plots / "loss_curve.png")
    if size > 30 * 1024 * 1024:
        LOG.warning("output directory is larger than 30 MB")
    LOG.info("done in %.1fs", wall_seconds)


if __name__ == "__main__":
    main()
