"""Train a model on the paper's toy task (find the block holding both query letters), resumably.

    python -m mta_serve.train_toy --config configs/toy_mta.yaml --out DIR [--steps 100000] [--batch 64]
        [--lr 1e-4] [--warmup 1000] [--max-minutes M] [--device cuda] [--seed S] [--bf16] [--compile] [--resume]

The loss is cross-entropy on the answer only (5 letters + EOS). AdamW (beta2 0.98, no weight decay), linear
warmup then a constant lr, gradient clipping at 1.0, as in the reference toy config. Every --log-every steps a
line goes to stdout and OUT/log.jsonl: step, mean loss, lr, elapsed seconds and the exact-match error of greedy
answers on a fixed held-out set (the first --eval-n samples of the toy test set). OUT/checkpoint (a native
checkpoint, servable with `mta-serve --model OUT/checkpoint`) and OUT/train_state.pt (model, optimizer, step,
RNG states) are written every --save-minutes, at the end and when --max-minutes is reached; --resume continues
from OUT/train_state.pt. Batches are a pure function of (seed, step), so a resumed run sees the same data as an
uninterrupted one; --workers processes generate them ahead of time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import toy_task
from .checkpoint import save_model
from .config import ModelConfig
from .dense_attention import batched_dense_attention
from .model import MTATransformer, build_model, count_parameters
from .tokenizer import CharTokenizer

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoint"


# ---- data -----------------------------------------------------------------------------------------------

_EXCLUDE: frozenset[str] = frozenset()  # test-set contexts, set per worker process


def _init_worker() -> None:
    global _EXCLUDE
    _EXCLUDE = frozenset(s.context for s in toy_task.test_set())


def _batch_bytes(step: int, batch: int, seed: int) -> bytes:
    """The ids of training batch `step` as bytes (all ids < 256): cheap to send between processes."""
    tok = CharTokenizer()
    samples = toy_task.train_batch(step, batch, seed, _EXCLUDE)
    return bytes(i for s in samples for i in toy_task.sample_ids(s, tok))


class BatchSource:
    """Training batches [B, SEQ_LEN] for steps s, s+1, ... (s set by `start`), generated `prefetch` steps ahead
    by a process pool (or inline with workers=0)."""

    def __init__(self, seed: int, batch: int, workers: int, prefetch: int = 16):
        # Forked before the caller touches CUDA; the workers only run plain Python.
        self.seed, self.batch, self.prefetch = seed, batch, prefetch
        self.pool = mp.get_context("fork").Pool(workers, initializer=_init_worker) if workers > 0 else None
        if self.pool is None:
            _init_worker()
        self.pending: deque = deque()
        self.next_step = self._submitted = 0

    def start(self, step: int) -> None:
        """Serve batches from `step` on."""
        self.next_step = self._submitted = step

    def _fill(self) -> None:
        while self.pool is not None and len(self.pending) < self.prefetch:
            self.pending.append(self.pool.apply_async(_batch_bytes, (self._submitted, self.batch, self.seed)))
            self._submitted += 1

    def next(self) -> torch.Tensor:
        self._fill()
        raw = self.pending.popleft().get() if self.pool else _batch_bytes(self.next_step, self.batch, self.seed)
        self.next_step += 1
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(self.batch, -1).long()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def encode_prompts(samples: list[toy_task.ToySample], tok: CharTokenizer) -> torch.Tensor:
    """BOS + prompt for equal-length samples -> [B, 1 + PROMPT_LEN]."""
    return torch.tensor([tok.encode(s.prompt, add_bos=True) for s in samples], dtype=torch.long)


# ---- model ----------------------------------------------------------------------------------------------

def batched_attend(batch: int):
    """An attention backend for `batch` equal-length whole sequences flattened to [B*T, ...]."""
    def attend(layer_id, attn, q, k, v):
        split = lambda x: x.unflatten(0, (batch, -1))  # noqa: E731
        return batched_dense_attention(split(q), split(k), split(v), attn.mta_weights()).flatten(0, 1)
    return attend


def hidden_states(model: MTATransformer, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] -> final hidden states [B, T, dim]."""
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).repeat(batch)
    return model(tokens.flatten(), positions, batched_attend(batch)).unflatten(0, (batch, seq))


def answer_loss(model: MTATransformer, tokens: torch.Tensor, start: int = toy_task.ANSWER_START) -> torch.Tensor:
    """Mean cross-entropy of the answer letters and the EOS after them (ids start..T-1), tokens [B, T]."""
    hidden = hidden_states(model, tokens)[:, start - 1:-1]
    logits = model.logits(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, start:].flatten())


@torch.no_grad()
def greedy_answers(model: MTATransformer, prompts: torch.Tensor, n_new: int = toy_task.BLOCK_LEN,
                   chunk: int = 64) -> torch.Tensor:
    """Greedy-decode n_new ids after each prompt (one full forward per new token), prompts [B, T] -> [B, n_new]."""
    out = []
    for part in prompts.split(chunk):
        seq = part
        for _ in range(n_new):
            nxt = model.logits(hidden_states(model, seq)[:, -1]).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        out.append(seq[:, part.shape[1]:])
    return torch.cat(out)


def error_rate(model: MTATransformer, samples: list[toy_task.ToySample], device: torch.device,
               chunk: int = 64, autocast=nullcontext) -> float:
    """Percentage of samples whose 5 greedy answer letters are not exactly the target block."""
    tok = CharTokenizer()
    answers = torch.tensor([tok.encode(s.answer, add_bos=False) for s in samples], device=device)
    was_training = model.training
    model.eval()
    with autocast():
        pred = greedy_answers(model, encode_prompts(samples, tok).to(device), answers.shape[1], chunk)
    model.train(was_training)
    return 100.0 * (pred != answers).any(-1).float().mean().item()


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then constant."""
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


# ---- state ----------------------------------------------------------------------------------------------

def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_all(out: Path, model: MTATransformer, opt: torch.optim.Optimizer, step: int, elapsed: float,
             args: argparse.Namespace) -> None:
    """Write OUT/checkpoint (native, servable) and OUT/train_state.pt (resumable), each replaced atomically."""
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model, CharTokenizer())
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    os.replace(tmp, out / CHECKPOINT_DIR)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "elapsed_s": elapsed, "seed": args.seed, "config": model.cfg.to_dict(),
                        "rng": rng, "args": vars(args)}, out / STATE_FILE)


def load_state(path: Path, model: MTATransformer, opt: torch.optim.Optimizer, seed: int) -> tuple[int, float]:
    """Restore model, optimizer and RNG states -> (step, elapsed seconds so far)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"] != model.cfg.to_dict():
        raise SystemExit(f"{path} was written for another model config; use the same --config to resume")
    if state["seed"] != seed:
        raise SystemExit(f"{path} was written with --seed {state['seed']}, not {seed}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["elapsed_s"]


# ---- main -----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="ModelConfig YAML (configs/toy_mta.yaml, toy_baseline.yaml)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=100_000, help="total optimizer steps (across resumes)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--save-minutes", type=float, default=5.0, help="save checkpoint + state this often")
    p.add_argument("--log-every", type=int, default=500, help="log loss and held-out error every K steps")
    p.add_argument("--eval-n", type=int, default=256, help="held-out samples for the logged error rate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42, help="model init and data seed")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights and optimizer stay fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training loss (fp32 only: with --bf16 the baseline diverged on H200)")
    p.add_argument("--workers", type=int, default=3, help="data generation processes (0 = inline)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt if it exists")
    args = p.parse_args(argv)
    if args.bf16 and args.compile:
        # Seen on H200 (torch 2.11): the compiled bf16 baseline's loss blew up to uniform letters at ~1.3k
        # steps, twice, while eager bf16 and compiled fp32 trained identically to eager fp32.
        p.error("--compile with --bf16 is unstable; use one of them")
    return args


def _log(out: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the last logged record."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / STATE_FILE).exists() and not args.resume:
        raise SystemExit(f"{out / STATE_FILE} exists: pass --resume to continue it or choose another --out")
    cfg = ModelConfig.from_yaml(args.config)
    device = torch.device(args.device)
    source = BatchSource(args.seed, args.batch, args.workers)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(cfg, seed=args.seed, mta_init="identity", device=device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    step, elapsed_before = 0, 0.0
    if args.resume and (out / STATE_FILE).exists():
        step, elapsed_before = load_state(out / STATE_FILE, model, opt, args.seed)
        print(f"resumed from {out / STATE_FILE} at step {step}", flush=True)
    print(f"{args.config}: {count_parameters(model):,} parameters on {device}", flush=True)

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    loss_fn = torch.compile(answer_loss) if args.compile else answer_loss
    held_out = toy_task.test_set(args.eval_n)
    source.start(step)
    start = last_save = time.monotonic()
    losses: list[torch.Tensor] = []
    record: dict = {}
    try:
        while step < args.steps:
            now = time.monotonic()
            if args.max_minutes is not None and now - start >= 60 * args.max_minutes:
                print(f"--max-minutes {args.max_minutes} reached at step {step}", flush=True)
                break
            if now - last_save >= 60 * args.save_minutes:
                save_all(out, model, opt, step, elapsed_before + now - start, args)
                last_save = now
            tokens = source.next().to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.lr, args.warmup)
            with autocast():
                loss = loss_fn(model, tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            step += 1
            losses.append(loss.detach())
            if step % args.log_every == 0 or step == args.steps:
                record = _record(model, held_out, device, args, step, losses, elapsed_before + time.monotonic() - start,
                                 autocast)
                _log(out, record)
                losses = []
    finally:
        source.close()
        save_all(out, model, opt, step, elapsed_before + time.monotonic() - start, args)
    if losses or not record:
        record = _record(model, held_out, device, args, step, losses, elapsed_before + time.monotonic() - start,
                         autocast)
        _log(out, record)
    print(f"saved {out / CHECKPOINT_DIR} and {out / STATE_FILE} at step {step}", flush=True)
    return record


def _record(model, held_out, device, args, step, losses, elapsed, autocast) -> dict:
    loss = torch.stack(losses).float().mean().item() if losses else None
    err = error_rate(model, held_out, device, chunk=args.batch, autocast=autocast)
    return {"step": step, "loss": loss, "lr": lr_at(max(step - 1, 0), args.lr, args.warmup),
            "elapsed_s": round(elapsed, 1), "error_pct": err}


if __name__ == "__main__":
    main(sys.argv[1:])
