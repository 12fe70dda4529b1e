"""The paper's toy task ("find the block"), generated on the fly with a seeded RNG.

Layout of one sample (identical to the reference generator with block_length 5, query_legth 2, pad_len 319):

    text   = B1 . B2 . ... . B52 # Q            (the prompt: 52*5 + 51 + 1 + 2 = 314 characters)
    answer = the target block                    (5 characters)
    ids    = BOS + prompt + answer + EOS         (1 + 314 + 5 + 1 = 321 token ids)

Each block is 5 distinct letters a-z (an ordered sample); the target block is one of the 52; the query Q is 2
distinct letters sampled (in random order) from the target block; the other 51 blocks never contain both query
letters; no block string repeats. The 311 block characters fill the space exactly, so no '_' padding occurs.
A served model receives `prompt` (the server adds BOS) and must generate `answer` then EOS.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BLOCK_LEN = 5
QUERY_LEN = 2
N_BLOCKS = 52
BLOCK_SEP = "."
QUERY_SEP = "#"
CONTEXT_LEN = N_BLOCKS * BLOCK_LEN + (N_BLOCKS - 1) * len(BLOCK_SEP)  # 311
PROMPT_LEN = CONTEXT_LEN + len(QUERY_SEP) + QUERY_LEN  # 314
SEQ_LEN = 1 + PROMPT_LEN + BLOCK_LEN + 1  # 321 ids: BOS + 319 + EOS
ANSWER_START = 1 + PROMPT_LEN  # index of the first answer id in the 321 ids
TEST_SEED = 1234  # the fixed test set
TEST_SIZE = 1000


@dataclass(frozen=True, slots=True)
class ToySample:
    """prompt: what a client sends (no BOS); answer: the 5 letters of the target block."""

    prompt: str
    answer: str

    @property
    def context(self) -> str:
        """The 52 blocks (the prompt without '#' and the query)."""
        return self.prompt[:CONTEXT_LEN]

    @property
    def query(self) -> str:
        return self.prompt[CONTEXT_LEN + len(QUERY_SEP):]

    @property
    def blocks(self) -> list[str]:
        return self.context.split(BLOCK_SEP)


def _block(rng: random.Random) -> str:
    return "".join(rng.sample(ALPHABET, BLOCK_LEN))


def make_sample(rng: random.Random) -> ToySample:
    """One sample: a target block, a query from it, 51 distractor blocks without both query letters, shuffled."""
    target = _block(rng)
    query = "".join(rng.sample(target, QUERY_LEN))
    blocks, seen = [target], {target}
    while len(blocks) < N_BLOCKS:
        block = _block(rng)
        if block not in seen and not set(query) <= set(block):
            blocks.append(block)
            seen.add(block)
    rng.shuffle(blocks)
    return ToySample(BLOCK_SEP.join(blocks) + QUERY_SEP + query, target)


def sample_ids(sample: ToySample, tokenizer) -> list[int]:
    """BOS + prompt + answer + EOS as token ids (321 for the standard layout)."""
    return tokenizer.encode(sample.prompt + sample.answer, add_bos=True) + [tokenizer.eos_id]


def answer_range(sample: ToySample) -> range:
    """Indices of the answer letters inside `sample_ids(sample, ...)` (the EOS follows at the range's stop)."""
    start = 1 + len(sample.prompt)
    return range(start, start + len(sample.answer))


def test_set(n: int = TEST_SIZE, seed: int = TEST_SEED) -> list[ToySample]:
    """n samples with distinct contexts; test_set(m, s) is a prefix of test_set(n, s) for m <= n."""
    rng, out, contexts = random.Random(f"toy-test-{seed}"), [], set()
    while len(out) < n:
        sample = make_sample(rng)
        if sample.context not in contexts:
            contexts.add(sample.context)
            out.append(sample)
    return out


def train_batch(step: int, batch: int, seed: int, exclude: frozenset[str] | set[str]) -> list[ToySample]:
    """The training batch of `step` for run seed `seed`: a pure function of its arguments (so resuming and
    parallel workers reproduce it). Samples whose context is in `exclude` (the test contexts) are skipped."""
    rng, out = random.Random(f"toy-train-{seed}-{step}"), []
    while len(out) < batch:
        sample = make_sample(rng)
        if sample.context not in exclude:
            out.append(sample)
    return out


def train_stream(seed: int = 0, start_step: int = 0, batch: int = 64,
                 exclude: set[str] | None = None) -> Iterator[list[ToySample]]:
    """Endless training batches from `start_step` on, disjoint from the test set (by context, which also makes
    every prompt differ from every test prompt)."""
    exclude = frozenset(s.context for s in test_set()) if exclude is None else frozenset(exclude)
    step = start_step
    while True:
        yield train_batch(step, batch, seed, exclude)
        step += 1


test_set.__test__ = False  # not a pytest test when imported into a test module
