"""CUDA graphs for decode steps: the whole forward (embedding, every layer's projections, Triton attention
kernels and MLP, the final norm and the logits) captured once per padded batch size and replayed.

A decode step has one query row per sequence, so its shapes depend only on the number of sequences. The
step's integer inputs live in one persistent device buffer at fixed addresses (tokens, positions, sequence
ends, cache slots, MTA state slots, block tables), filled by one copy from a pinned host buffer; a batch of
n sequences runs the graph of the smallest captured size >= n, the extra rows being padding sequences of one
token that read and write only a scratch cache block and a scratch state slot no request owns. Every real
row's state slot must hold the rows of its step before (the runner sends other rows down the eager path).
The kernels' buffers and grids are sized for the model's max_seq_len whatever the context, so one graph
serves every context length (for a very long max_seq_len the MTA row buffers then run in several waves per
layer). All graphs share one memory pool (they never run at the same time) and write their logits into one
buffer (fp32 for bf16 and fp16 models).

Without capture (no CUDA, or enforce_eager) the same padded, fixed-address step runs eagerly: the CPU tests
check everything but the capture itself, and graphs on and off compute the same thing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

PADDED_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
                1024)
WAVE_BUDGET = 512 << 20  # kernels.mta_attention's default: MTA row buffers of one layer call stay under it


def graph_pool_bytes(cfg, max_batch: int) -> int:
    """An upper estimate of the decode graphs' memory pool: one layer's MTA row buffers (the wave budget),
    the logits of the largest batch three times over (the model's output, its fp32 copy, the output buffer)
    and the largest batch's activations, with 64 MiB to spare."""
    logits = 3 * max_batch * cfg.vocab_size * 4
    activations = 8 * max_batch * (3 * cfg.ffn_hidden_dim + 8 * cfg.dim + 4 * cfg.n_heads * cfg.head_dim)
    return WAVE_BUDGET + logits + activations + (64 << 20)


def padded_sizes(max_batch: int) -> list[int]:
    """The batch sizes to capture: PADDED_SIZES up to max_batch, and max_batch itself."""
    sizes = [b for b in PADDED_SIZES if b < max_batch]
    return sizes + [max_batch]


@dataclass(slots=True)
class DecodeRow:
    """One sequence's decode row: it computes position `position` (its length becomes position + 1)."""

    token: int  # its input token, or a placeholder (< 0) that run()'s fill_pending replaces on the device
    position: int
    slot: int  # cache slot of the new token
    # Its block table, at least ceil((position + 1) / block_size) entries: the KV-cache manager's own list,
    # which only ever grows (a request whose blocks are freed gets a new list), so a row whose list is the
    # one it had last step is rewritten only where it grew.
    block_ids: list[int]
    state_slot: int = 0  # its MTA state slot, holding the rows of the step before (kv_cache_manager)


class DecodeGraphs:
    """Fixed-address inputs and one captured graph per padded batch size (or the same steps run eagerly)."""

    def __init__(self, model, backend, max_batch: int, scratch_block: int, capture: bool = True):
        self.model, self.backend = model, backend
        self.device = model.tok_embeddings.weight.device
        self.sizes = padded_sizes(max_batch)
        self.max_batch = max_batch
        self.width = -(-model.cfg.max_seq_len // backend.block_size)  # block-table entries per sequence
        self.scratch_slot = scratch_block * backend.block_size
        self.scratch_block = scratch_block
        # Sections of the input buffer, each max_batch long (the tables max_batch x width), at fixed offsets.
        n = -(-max_batch // 4) * 4  # sections start 16-byte aligned, as Triton's compiled variants expect
        self.offsets = dict(tokens=0, positions=n, ends=2 * n, slots=3 * n, states=4 * n, tables=5 * n)
        total = 5 * n + max_batch * self.width
        pinned = self.device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=pinned)  # [total] int32
        self.host_np = self.host.numpy()
        self.inputs = torch.zeros(total, dtype=torch.int32, device=self.device)  # [total] int32
        self.rows = torch.arange(max_batch, dtype=torch.int32, device=self.device)  # [max_batch] int32
        logits_dtype = torch.promote_types(model.tok_embeddings.weight.dtype, torch.float32)  # as model.logits
        self.logits = torch.zeros(max_batch, model.cfg.vocab_size, dtype=logits_dtype, device=self.device)  # [B, V]
        self.copied = torch.cuda.Event() if pinned else None
        # per row of the host block tables: (the list it holds, how many of its entries), to skip the rewrite
        self._tables_held: list[tuple[list[int] | None, int]] = [(None, 0)] * max_batch
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_runs = 0  # steps run (replayed, or eagerly without CUDA)
        if capture:
            self._capture_all()

    def batch_size(self, num_rows: int) -> int | None:
        """The padded size a batch of num_rows decode rows runs at (None: too many for any graph)."""
        return next((b for b in self.sizes if b >= num_rows), None)

    def run(self, rows: list[DecodeRow], fill_pending=None) -> torch.Tensor:
        """The decode step of `rows`: logits [len(rows), vocab] fp32, a view valid until the next run.
        fill_pending(tokens [len(rows)] int32, device), if given, replaces the tokens' placeholders in place
        once they are on the device (model_runner)."""
        size = self.batch_size(len(rows))
        self._fill(rows, size)
        if fill_pending is not None:
            fill_pending(self.inputs[self.offsets["tokens"]:][:len(rows)])
        self.num_runs += 1
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.logits[:len(rows)]

    def warm_up(self) -> None:
        """One all-padding step of the smallest size, eagerly: compiles every kernel of the forward (the
        fused ops' shapes are runtime arguments, so prompt steps reuse them) and touches only the scratch
        block."""
        self._fill([], self.sizes[0])
        with torch.no_grad():
            self._forward(self.sizes[0])

    def _fill(self, rows: list[DecodeRow], size: int) -> None:
        """Write the step's inputs (padding rows after the real ones) and copy them to the device at once."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous copy has read the host buffer
        n, o, h = len(rows), self.offsets, self.host_np
        h[o["tokens"]:o["tokens"] + n] = [r.token for r in rows]
        h[o["positions"]:o["positions"] + n] = [r.position for r in rows]
        h[o["slots"]:o["slots"] + n] = [r.slot for r in rows]
        h[o["states"]:o["states"] + n] = [r.state_slot for r in rows]
        pad = slice(n, size)
        for name, value in (("tokens", 0), ("positions", 0), ("slots", self.scratch_slot),
                            ("states", self.backend.scratch_state)):
            h[o[name] + pad.start:o[name] + pad.stop] = value
        h[o["ends"]:o["ends"] + size] = h[o["positions"]:o["positions"] + size] + 1
        self._fill_tables(h[o["tables"]:o["tables"] + size * self.width].reshape(size, self.width), rows, size)
        end = o["tables"] + size * self.width
        self.inputs[:end].copy_(self.host[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(self.device))

    def _fill_tables(self, tables, rows: list[DecodeRow], size: int) -> None:
        """Block tables of the real rows into `tables` [size, width] (host), writing only what changed since
        the previous step (a decode step's tables mostly did not: 8,192 entries at batch 64 x 2048 otherwise),
        then the padding rows'."""
        held = self._tables_held
        for i, r in enumerate(rows):
            ids, (was, count) = r.block_ids, held[i]
            if ids is not was:
                tables[i, :len(ids)] = ids
            elif len(ids) != count:
                tables[i, count:len(ids)] = ids[count:]
            else:
                continue
            held[i] = (ids, len(ids))
        tables[len(rows):size, 0] = self.scratch_block
        held[len(rows):size] = [(None, 0)] * (size - len(rows))

    def _views(self, size: int):
        """(tokens, positions, ends, slots, state slots [size] int32, block tables [size, width] int32) of the
        input buffer."""
        o = self.offsets

        def section(name, length):
            return self.inputs[o[name]:o[name] + length]

        tables = section("tables", size * self.width).view(size, self.width)
        return (section("tokens", size), section("positions", size), section("ends", size), section("slots", size),
                section("states", size), tables)

    def _forward(self, size: int) -> None:
        """The step at `size` rows, reading only the fixed-address inputs: what the graph captures."""
        tokens, positions, ends, slots, states, tables = self._views(size)
        batch = self.backend.decode_batch(slots, tables, positions, ends, self.rows[:size], states)

        def attend(layer_id, attn, q, k, v):
            return self.backend.attend(batch, layer_id, attn, q, k, v)

        hidden = self.model(tokens, positions, attend, fused=True,
                            cache_of=functools.partial(self.backend.cache_of, batch))
        self.logits[:size].copy_(self.model.logits(hidden))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Capture the largest size first, so that the shared pool is sized once and reused by the rest."""
        pool = None
        for size in sorted(self.sizes, reverse=True):
            self._fill([], size)  # all rows padding: the capture reads and writes only the scratch block
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(size)  # compile and initialise everything outside the capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(size)
            except RuntimeError as exc:
                raise RuntimeError(f"capturing the decode CUDA graph of batch size {size} failed: {exc} "
                                   "(--enforce-eager / enforce_eager=True runs without graphs)") from exc
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
