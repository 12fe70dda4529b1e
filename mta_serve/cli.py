"""The `mta-serve` command: serve a model (default), or convert checkpoints into the native format.

  mta-serve [--model DIR | --config YAML] [--host H] [--port P] ...   serve over HTTP
  mta-serve convert reference SRC_DIR OUT_DIR [--tokenizer FILE] [--dtype D]
  mta-serve convert hf SRC_DIR OUT_DIR [--mta-config YAML] [--tokenizer FILE] [--dtype D]

Bad input ends with a one-line `mta-serve: error: ...` on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
from importlib import resources
from pathlib import Path

from .config import DTYPES, CacheConfig, ModelConfig, MTAConfig, SchedulerConfig
from .sampling_params import valid_seed

DEFAULT_MODEL = "mta-toy"  # the embedded checkpoint served when no model is named
EMBEDDED_MODELS = ("mta-toy", "toy-baseline")
DEFAULT_SEED = 0


class CLIError(ValueError):
    pass


def embedded_model_dir(name: str) -> Path:
    """A checkpoint shipped inside the package (mta_serve/checkpoints/NAME)."""
    return Path(str(resources.files("mta_serve") / "checkpoints" / name))


def _model_dir(model: str | None) -> Path:
    """--model: a checkpoint directory, or the name of an embedded one (default: mta-toy)."""
    if model is None:
        return embedded_model_dir(DEFAULT_MODEL)
    if model in EMBEDDED_MODELS and not Path(model).exists():
        return embedded_model_dir(model)
    if not Path(model).exists():
        raise CLIError(f"--model {model}: no such checkpoint directory, and not an embedded model "
                       f"({', '.join(EMBEDDED_MODELS)})")
    return Path(model)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: allowed an integer in [0, 65535]")
    return port


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mta-serve",
        description="Serve a Multi-Token Attention model over an OpenAI-compatible HTTP API. With no "
                    "arguments it serves the embedded default model, mta-toy (the paper's toy task). "
                    "Other commands: `mta-serve convert reference|hf --help`.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="native checkpoint directory (config.json, "
                     "model.safetensors, tokenizer files), or an embedded model: "
                     f"{', '.join(EMBEDDED_MODELS)} (default: {DEFAULT_MODEL})")
    src.add_argument("--config", metavar="YAML", help="serve a seeded random model of this config "
                     "(byte tokenizer; the config's vocab_size must be >= 258), e.g. configs/tiny.yaml")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="weight seed for --config; sampling seed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--served-model-name", metavar="NAME", help="model id in the API (default: the checkpoint "
                   "directory's name, or the --config file's stem)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API routes")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests that may wait for the engine before new ones get 429 (default: 256)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                   help="attention backend: triton kernels (CUDA) or exact PyTorch (any device); "
                   "auto = triton on CUDA, else torch (default: auto)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (for debugging)")
    e = p.add_argument_group("engine")
    cache, sched = CacheConfig(), SchedulerConfig()
    e.add_argument("--max-num-seqs", type=int, default=sched.max_num_seqs,
                   help="most requests batched in one step")
    e.add_argument("--max-num-batched-tokens", type=int, default=sched.max_num_batched_tokens,
                   help="most tokens computed in one step (prompt chunks + decodes)")
    e.add_argument("--max-chunk-tokens", type=int, help="most prompt tokens one request computes per step")
    e.add_argument("--block-size", type=int, default=cache.block_size, help="tokens per KV-cache block")
    e.add_argument("--num-kv-blocks", type=int, help="KV-cache size in blocks (default: from the memory budget)")
    e.add_argument("--cpu-kv-cache-bytes", type=int, default=cache.cpu_kv_cache_bytes,
                   help="KV-cache memory budget on the CPU")
    e.add_argument("--gpu-memory-utilization", type=float, default=cache.gpu_memory_utilization,
                   help="fraction of GPU memory the weights, activations and KV cache may use")
    e.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    e.add_argument("--no-overlap-steps", action="store_true",
                   help="complete each step before scheduling the next (for debugging; by default on CUDA the "
                   "next step is scheduled and runs on the GPU while the host reads and streams the one before)")
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mta-serve convert", description="Write a native mta-serve checkpoint.")
    sub = p.add_subparsers(dest="source", required=True)
    ref = sub.add_parser("reference", help="from the reference implementation: consolidated.pth + params.json")
    hf = sub.add_parser("hf", help="from a Hugging Face Llama-architecture checkpoint (safetensors), as an "
                                   "identity-initialized MTA model that computes the same logits")
    for q in (ref, hf):
        q.add_argument("src_dir", metavar="SRC_DIR")
        q.add_argument("out_dir", metavar="OUT_DIR")
        q.add_argument("--tokenizer", metavar="FILE", help="tokenizer file (tiktoken ranks or tokenizer.json) "
                       "when the source's recorded tokenizer is not available here")
        q.add_argument("--dtype", choices=DTYPES, help="weight dtype to write (default: the source's)")
    hf.add_argument("--mta-config", metavar="YAML", help="MTA options (the `mta:` section of a config) "
                    "for the converted model; default: the paper's conv + head mixing, no norm/gate")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["convert"]:
            return convert(convert_parser().parse_args(argv[1:]))
        return serve(serve_parser().parse_args(argv))
    except (ValueError, OSError, RuntimeError) as exc:  # config, checkpoint, tokenizer, device errors
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"mta-serve: error: {message}", file=sys.stderr)
        return 1


def _check_bindable(host: str, port: int) -> None:
    """Bind every address `host` resolves to, as asyncio's server will, then let go: a bad --host or a port
    in use is then a one-line error before the model loads, not uvicorn's log lines and exit 3."""
    sockets = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sockets.append(socket.socket(family, kind, proto))
            sockets[-1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: IPv4 and IPv6 sockets side by side
                sockets[-1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sockets[-1].bind(address)
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        for sock in sockets:
            sock.close()


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"invalid --device {name!r}: allowed e.g. cpu, cuda, cuda:1") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"unsupported --device {name!r}: allowed cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(args: argparse.Namespace):
    """-> (model, tokenizer, served name) for the serve arguments."""
    from .checkpoint import load_checkpoint
    from .model import DTYPES as TORCH_DTYPES, build_model
    from .tokenizer import BytesTokenizer

    args.device = _device(args.device)
    dtype = TORCH_DTYPES[args.dtype] if args.dtype else None
    if args.config:
        cfg = ModelConfig.from_yaml(args.config)
        tokenizer = BytesTokenizer()
        if cfg.vocab_size < tokenizer.vocab_size:
            raise CLIError(f"--config vocab_size={cfg.vocab_size} is below the byte tokenizer's 258 ids")
        model = build_model(cfg, seed=args.seed, mta_init="random", device=args.device, dtype=dtype)
        return model, tokenizer, args.served_model_name or Path(args.config).stem
    model_dir = _model_dir(args.model)
    model, tokenizer = load_checkpoint(model_dir, device=args.device, dtype=dtype)
    return model, tokenizer, args.served_model_name or model_dir.resolve().name


def build_engine(args: argparse.Namespace, model, tokenizer):
    from .engine import LLMEngine

    cache = CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        cpu_kv_cache_bytes=args.cpu_kv_cache_bytes, enable_prefix_caching=not args.no_prefix_caching,
                        attention_backend=args.backend, enforce_eager=args.enforce_eager)
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_chunk_tokens=args.max_chunk_tokens,
                                overlap_steps=False if args.no_overlap_steps else None)
    return LLMEngine(model, tokenizer, cache, scheduler, seed=args.seed)


def serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from .async_engine import AsyncEngine
    from .metrics import Metrics
    from .server import ServedModel, build_app

    if args.max_queued_requests < 1:
        raise CLIError(f"invalid --max-queued-requests {args.max_queued_requests}: allowed an integer >= 1")
    if not valid_seed(args.seed):  # also the sampler's seed, which would fail only at the first draw
        raise CLIError(f"invalid --seed {args.seed}: allowed an integer in [0, 2^63)")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise CLIError(f"invalid --shutdown-timeout {args.shutdown_timeout}: allowed a number of seconds >= 0")
    _check_bindable(args.host, args.port)
    torch.set_grad_enabled(False)
    model, tokenizer, name = load_model(args)
    engine = AsyncEngine(build_engine(args, model, tokenizer), Metrics(name), max_queued=args.max_queued_requests)
    app = build_app(ServedModel(name, engine, api_key=args.api_key))
    print(f"mta-serve: serving '{name}' on http://{args.host}:{args.port}", file=sys.stderr)
    # uvicorn re-raises the signal that stopped it to the handler installed before it: a no-op here, so a
    # requested shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    _graceful_server(config, engine, args.shutdown_timeout).run()
    engine.abort_all()
    engine.stop()
    return 0


def _graceful_server(config, engine, grace: float):
    """uvicorn's server; on SIGTERM/SIGINT it stops accepting, and in-flight requests get `grace` seconds to
    finish. Then they are aborted through the engine, so each still gets a proper answer (a 503 error JSON,
    or an error event and [DONE] in a stream) before uvicorn's own deadline, set a little later, closes
    whatever is left."""
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                timer = threading.Timer(grace, engine.abort_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    return Server(config)


def _mta_from_yaml(path: str) -> MTAConfig:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise CLIError(f"{path} is not valid YAML: {exc}") from None
    if isinstance(data, dict) and "mta" in data:
        data = data["mta"]
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping of MTA options")
    # the options alone; layer ids and the head kernel are checked against the source's layers and heads
    return ModelConfig.mta_from_dict(data)


def convert(args: argparse.Namespace) -> int:
    from .checkpoint import import_reference, save_native

    if Path(args.out_dir).resolve() == Path(args.src_dir).resolve():
        raise CLIError(f"OUT_DIR {args.out_dir} is SRC_DIR: the conversion would overwrite its source; "
                       "give another directory")

    if args.source == "reference":
        cfg, state_dict, tokenizer = import_reference(args.src_dir, args.tokenizer, args.dtype)
    else:
        cfg, state_dict, tokenizer = _convert_hf(args)
    out = save_native(args.out_dir, cfg, state_dict, tokenizer)
    print(f"mta-serve: wrote {out} ({cfg.dtype}, {cfg.n_layers} layers); serve it with "
          f"`mta-serve --model {out}`")
    return 0


def _convert_hf(args: argparse.Namespace):
    from .hf_llama import convert_hf_llama
    from .tokenizer import load_tokenizer, tokenizer_from_file

    mta = _mta_from_yaml(args.mta_config) if args.mta_config else None
    cfg, state_dict = convert_hf_llama(Path(args.src_dir), mta=mta, dtype=args.dtype)
    tokenizer = tokenizer_from_file(args.tokenizer) if args.tokenizer else load_tokenizer(Path(args.src_dir))
    return cfg, state_dict, tokenizer


if __name__ == "__main__":
    sys.exit(main())
