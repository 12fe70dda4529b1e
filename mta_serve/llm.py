"""Offline batch generation: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .config import CacheConfig, ModelConfig, SchedulerConfig
from .engine import LLMEngine, RequestOutput
from .model import DTYPES, MTATransformer, build_model
from .sampling_params import SamplingParams


class LLM:
    """Load a native checkpoint (or take a built model and tokenizer) and generate with the engine.

    `model` is a checkpoint directory, a config YAML (seeded random weights, no tokenizer: prompts must be
    token ids) or an `MTATransformer`; a `tokenizer` given with a checkpoint replaces the checkpoint's. Engine
    options are the fields of CacheConfig and SchedulerConfig.
    """

    def __init__(self, model: str | Path | MTATransformer, tokenizer=None, device: str = "cpu",
                 dtype: str | None = None, seed: int = 0, **engine_options):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"invalid dtype={dtype!r}: allowed {', '.join(DTYPES)} or None (the model's own)")
        torch_dtype = DTYPES[dtype] if dtype else None
        if isinstance(model, MTATransformer):
            built = model
        elif Path(model).is_dir():
            built, own_tokenizer = load_checkpoint(model, device=device, dtype=torch_dtype)
            tokenizer = own_tokenizer if tokenizer is None else tokenizer
        else:
            built = build_model(ModelConfig.from_yaml(model), seed=seed, mta_init="random", device=device,
                                dtype=torch_dtype)
        cache = CacheConfig(**_pick(engine_options, CacheConfig))
        scheduler = SchedulerConfig(**_pick(engine_options, SchedulerConfig))
        if engine_options:
            raise TypeError(f"unknown engine option(s): {sorted(engine_options)}")
        self.engine = LLMEngine(built, tokenizer, cache, scheduler, seed=seed)
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. If it raises (a prompt the engine
        refuses, an error in a step, Ctrl-C), its requests are aborted: none of them runs in later calls."""
        if hasattr(prompts, "tolist"):  # a NumPy array or tensor of ids
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (prompts and not _is_prompt(prompts[0])):  # one prompt of ids
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order = []
        try:
            for prompt, p in zip(prompts, params):
                order.append(f"llm-{next(self._ids)}")
                self.engine.add_request(order[-1], prompt, p or SamplingParams())
            return self._run(order, use_tqdm)
        except BaseException:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with torch.inference_mode(), tqdm(total=len(order), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in order]


def _is_prompt(x) -> bool:
    """Whether x is one prompt (text, or a sequence or array of ids) rather than one id."""
    return isinstance(x, (str, list, tuple)) or getattr(x, "ndim", 0) > 0


def _pick(options: dict, cls: type) -> dict:
    names = set(cls.__slots__)
    return {k: options.pop(k) for k in list(options) if k in names}
