"""Multi-LoRA shrink/expand entry points: Triton on CUDA, a torch reference everywhere else.

A LoRA linear adds ``scale * (x @ A[slot].T) @ B[slot].T`` to each token's output, with a different adapter slot
per token. ``lora_shrink`` computes the low-rank activations of every slice of a packed projection (q/k/v,
gate/up) in one launch; ``lora_expand`` adds them, through each slice's B, into that slice's output columns.

Weights are paged (see lora_meta.py): ``lora_a`` is [num_slices, num_pages, in_dim] and ``lora_b``
[num_pages, total_out], one page per rank row, so B is stored transposed. Rank row j of a batch slot's adapter is
page ``meta.page_table[slot, j]``; the kernels gather rows through it.

The torch reference is also the CPU production path: it reads the per-slot token counts on the host (one sync,
so it is not CUDA-graph capturable) and multiplies each active slot's gathered rows in fixed 16-row tiles, so that
a token's result does not depend on its batch mates (REF_TILE_ROWS). The Triton path never syncs.

Both are registered as torch custom ops (``torch.ops.loraplex.lora_shrink`` / ``lora_expand``), so that
torch.compile treats them as opaque mutating calls and CUDA graphs capture them. Importing this module does not
need triton; ``lora_shrink_triton`` / ``lora_expand_triton`` are resolved lazily.
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch

__all__ = ["lora_shrink", "lora_expand", "add_lora", "lora_buffer", "resolve_backend", "lora_shrink_ref",
           "lora_expand_ref", "lora_shrink_triton", "lora_expand_triton", "check_shrink_args", "check_expand_args",
           "HAS_TRITON"]

HAS_TRITON = importlib.util.find_spec("triton") is not None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_META_FIELDS = ("token_lora_indices", "sorted_token_ids", "num_tokens_per_lora", "lora_token_start", "lora_ranks",
                "page_table")


class _MetaView(NamedTuple):
    """The LoRAKernelMeta buffers the kernels read, rebuilt inside the custom ops (which take only tensors)."""
    token_lora_indices: torch.Tensor
    sorted_token_ids: torch.Tensor
    num_tokens_per_lora: torch.Tensor
    lora_token_start: torch.Tensor
    lora_ranks: torch.Tensor
    page_table: torch.Tensor


# ----------------------------------------------------------------------------------------------- checks
def _check_meta(op: str, meta, device: torch.device, num_tokens: int) -> tuple[int, int]:
    """(max_loras, max_rank) of meta, after checking its buffers."""
    for name in _META_FIELDS:
        t = getattr(meta, name)
        if t.dim() != (2 if name == "page_table" else 1) or t.dtype != torch.int32:
            raise ValueError(f"{op}: meta.{name} must be a {'2' if name == 'page_table' else '1'}-D int32 tensor, "
                             f"got {tuple(t.shape)} {t.dtype}")
        if t.device != device:
            raise ValueError(f"{op}: meta.{name} is on {t.device} but the operands are on {device}")
    max_loras = meta.num_tokens_per_lora.shape[0]
    if meta.lora_ranks.shape[0] != max_loras or meta.lora_token_start.shape[0] != max_loras + 1 \
            or meta.page_table.shape[0] != max_loras:
        raise ValueError(f"{op}: meta's per-slot buffers disagree on the number of slots ({max_loras})")
    if meta.sorted_token_ids.shape[0] < num_tokens or meta.token_lora_indices.shape[0] < num_tokens:
        raise ValueError(f"{op}: {num_tokens} tokens exceed meta's max_num_tokens "
                         f"{meta.sorted_token_ids.shape[0]}")
    return max_loras, meta.page_table.shape[1]


def check_shrink_args(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, meta) -> None:
    """Shape/dtype/device checks shared by both backends; never syncs with the device."""
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lora_shrink: x must be [num_tokens, in_dim] fp16/bf16/fp32, got {tuple(x.shape)} {x.dtype}")
    if lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_shrink: lora_a must be [num_slices, num_pages, in_dim={x.shape[1]}], "
                         f"got {tuple(lora_a.shape)}")
    if lora_a.dtype not in _FLOAT_DTYPES:
        # lora_a may differ from x (EngineArgs.lora_dtype): both are read as they are and multiplied in fp32.
        raise ValueError(f"lora_shrink: lora_a is {lora_a.dtype}, must be fp16/bf16/fp32 (any of them, whatever "
                         f"x's dtype)")
    for name, t in (("lora_a", lora_a), ("out", out)):
        if t.device != x.device:
            raise ValueError(f"lora_shrink: {name} is on {t.device} but x is on {x.device}")
    _, max_rank = _check_meta("lora_shrink", meta, x.device, x.shape[0])
    expected = (lora_a.shape[0], x.shape[0], max_rank)
    if tuple(out.shape[-3:]) != expected or out.dim() not in (3, 4) or out.dtype != torch.float32:
        raise ValueError(f"lora_shrink: out must be {list(expected)} (num_slices, num_tokens, max_rank) float32, "
                         f"optionally with a leading split dim, got {tuple(out.shape)} {out.dtype}")


def check_expand_args(buf: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta,
                      slice_offsets: torch.Tensor) -> None:
    """Shape/dtype/device checks shared by both backends; never syncs (offset values are not checked here)."""
    if buf.dim() not in (3, 4) or buf.dtype != torch.float32:
        raise ValueError(f"lora_expand: buf must be [num_slices, num_tokens, max_rank] float32 (optionally with a "
                         f"leading split dim), got {tuple(buf.shape)} {buf.dtype}")
    num_slices, num_tokens, max_rank = buf.shape[-3:]
    if lora_b.dim() != 2 or lora_b.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lora_expand: lora_b must be [num_pages, total_out] fp16/bf16/fp32, "
                         f"got {tuple(lora_b.shape)} {lora_b.dtype}")
    total_out = lora_b.shape[1]
    if tuple(out.shape) != (num_tokens, total_out) or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lora_expand: out must be [num_tokens={num_tokens}, total_out={total_out}] "
                         f"fp16/bf16/fp32, got {tuple(out.shape)} {out.dtype}")
    if slice_offsets.dim() != 1 or slice_offsets.shape[0] != num_slices + 1 \
            or slice_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lora_expand: slice_offsets must be [num_slices + 1 = {num_slices + 1}] int32, got "
                         f"{tuple(slice_offsets.shape)} {slice_offsets.dtype}")
    for name, t in (("lora_b", lora_b), ("out", out), ("slice_offsets", slice_offsets)):
        if t.device != buf.device:
            raise ValueError(f"lora_expand: {name} is on {t.device} but buf is on {buf.device}")
    _, meta_rank = _check_meta("lora_expand", meta, buf.device, num_tokens)
    if meta_rank != max_rank:
        raise ValueError(f"lora_expand: buf has {max_rank} rank columns but meta's page table {meta_rank}")


# ----------------------------------------------------------------------------------------------- reference
def _active_slots(meta) -> list[tuple[int, int, int, int, list[int]]]:
    """(slot, start, count, rank, pages) of every slot with tokens this step; one host sync per prepare."""
    if hasattr(meta, "active_slots"):
        return meta.active_slots()
    from loraplex.kernels.lora_meta import read_active_slots

    return read_active_slots(meta)


def _pages(t: torch.Tensor, dim: int, pages: list[int]) -> torch.Tensor:
    """Rows ``pages`` of t along dim: a view when they are one run (the pool allocates runs when it can)."""
    if pages and pages[-1] - pages[0] == len(pages) - 1 and pages == list(range(pages[0], pages[-1] + 1)):
        return t.narrow(dim, pages[0], len(pages))
    return t.index_select(dim, torch.tensor(pages, dtype=torch.int64, device=t.device))


# Every matmul of the torch path has exactly this many rows: a slot's tokens are cut into tiles, the last one padded
# (with row 0, whose results nobody reads). The CPU BLAS picks its kernel, and so its summation order, by shape (MKL
# sgemm sums a row differently for M = 1, 2..3 and >= 4), so one matmul over "the tokens of this adapter" would
# make a token's LoRA delta depend on how many other tokens share its adapter in the step. With one shape, a token's
# row is computed the same way whatever the batch (measured row-position independent within a tile): see
# docs/architecture.md, "Batch invariance".
REF_TILE_ROWS = 16


class _Segment(NamedTuple):
    count: int  # tokens of the slot
    rank: int
    pages: list
    ids: torch.Tensor  # [count] int64, the slot's token rows
    padded: torch.Tensor  # [count rounded up to REF_TILE_ROWS] int64: ids, then row 0


def _segments(meta) -> list[_Segment]:
    """The active slots as tiles, built once per prepare on a LoRAKernelMeta (shared by every shrink and expand of
    the step), per call on anything else."""
    version = getattr(meta, "num_prepares", None)
    cached = getattr(meta, "_ref_segments", None)
    if version is not None and cached is not None and cached[0] == version:
        return cached[1]
    segs = []
    for _, start, count, rank, pages in _active_slots(meta):
        ids = meta.sorted_token_ids[start:start + count].long()
        pad = -count % REF_TILE_ROWS
        segs.append(_Segment(count, rank, pages, ids, torch.nn.functional.pad(ids, (0, pad)) if pad else ids))
    if version is not None:
        meta._ref_segments = (version, segs)
    return segs


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, meta, scale: float = 1.0) -> None:
    """Torch shrink (fp32 math, whatever the dtypes of x and lora_a); same contract as :func:`lora_shrink`.

    Batch-invariant: a token's result does not depend on the other tokens of the step (REF_TILE_ROWS)."""
    check_shrink_args(x, lora_a, out, meta)
    max_rank = meta.page_table.shape[1]
    segments = _segments(meta)
    if out.dim() == 4:
        # Split-K layout: the whole sum goes to split 0, the other partials of adapter rows are zero.
        for seg in segments:
            out[1:].index_fill_(2, seg.ids, 0.0)
        out = out[0]
    num_slices, in_dim = lora_a.shape[0], lora_a.shape[2]
    T = REF_TILE_ROWS
    for count, rank, pages, ids, padded in segments:
        xs = x.index_select(0, padded).float()  # [padded, in_dim]
        # All slices in one product, in one layout whatever the pages' placement (a run of the pool or a gather).
        a = _pages(lora_a, 1, pages).float()
        if not a.is_contiguous():
            a = a.contiguous()
        a = a.view(num_slices * rank, in_dim).t()  # [in_dim, num_slices * rank]
        if xs.shape[0] == T:
            res = torch.mm(xs, a)
        else:
            res = torch.cat([torch.mm(xs[t:t + T], a) for t in range(0, xs.shape[0], T)])
        if res.shape[0] != count:
            res = res[:count]
        res = res.view(count, num_slices, rank).permute(1, 0, 2) * scale  # [num_slices, count, rank]
        if rank < max_rank:
            # Rank columns past the adapter's rank are defined as zero.
            res = torch.nn.functional.pad(res, (0, max_rank - rank))
        out.index_copy_(1, ids, res)


def lora_expand_ref(buf: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta,
                    slice_offsets: torch.Tensor) -> None:
    """Torch expand (fp32 math whatever lora_b's and out's dtypes); same contract as :func:`lora_expand`.

    A token's row becomes out + delta, accumulated in fp32 in fixed-shape tiles (batch-invariant, as the shrink)
    and rounded into out's dtype once."""
    check_expand_args(buf, lora_b, out, meta, slice_offsets)
    if buf.dim() == 4:
        buf = buf.sum(0)  # split-K partials
    num_slices = buf.shape[0]
    offsets = slice_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != out.shape[1] or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"lora_expand: slice_offsets must rise from 0 to total_out={out.shape[1]}, got {offsets}")
    T = REF_TILE_ROWS
    for count, rank, pages, ids, padded in _segments(meta):
        if rank == 0:
            continue
        low = buf.index_select(1, padded)[:, :, :rank]  # [num_slices, padded, rank]
        b = _pages(lora_b, 0, pages).float()  # [rank, total_out]
        if not b.is_contiguous():
            b = b.contiguous()  # one layout whatever the pages' placement
        rows = out.index_select(0, padded).float()  # [padded, total_out], a copy: accumulate in place
        for s in range(num_slices):
            lo, hi = offsets[s], offsets[s + 1]
            if hi > lo:
                r, u, w = rows[:, lo:hi], low[s], b[:, lo:hi]
                if rows.shape[0] == T:
                    r.addmm_(u, w)
                else:
                    for t in range(0, rows.shape[0], T):
                        r[t:t + T].addmm_(u[t:t + T], w)
        if rows.shape[0] != count:
            rows = rows[:count]
        out.index_copy_(0, ids, rows.to(out.dtype))


# ----------------------------------------------------------------------------------------------- custom ops
def _impl(name: str, backend: str, num_tokens: int):
    if backend == "triton":
        from loraplex.kernels import _triton_utils as tu

        if name == "expand" and tu.use_decode_expand(num_tokens, tu.interpreting()):
            from loraplex.kernels.lora_expand_decode import lora_expand_decode

            return lora_expand_decode
        if name == "shrink":
            from loraplex.kernels.lora_shrink import lora_shrink_triton as fn
        else:
            from loraplex.kernels.lora_expand import lora_expand_triton as fn
        return fn
    return lora_shrink_ref if name == "shrink" else lora_expand_ref


@torch.library.custom_op("loraplex::lora_shrink", mutates_args=("out",))
def _lora_shrink_op(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, token_lora_indices: torch.Tensor,
                    sorted_token_ids: torch.Tensor, num_tokens_per_lora: torch.Tensor, lora_token_start: torch.Tensor,
                    lora_ranks: torch.Tensor, page_table: torch.Tensor, scale: float, backend: str) -> None:
    meta = _MetaView(token_lora_indices, sorted_token_ids, num_tokens_per_lora, lora_token_start, lora_ranks,
                     page_table)
    _impl("shrink", backend, x.shape[0])(x, lora_a, out, meta, scale)


@_lora_shrink_op.register_fake
def _(x, lora_a, out, token_lora_indices, sorted_token_ids, num_tokens_per_lora, lora_token_start, lora_ranks,
      page_table, scale, backend):
    return None


@torch.library.custom_op("loraplex::lora_expand", mutates_args=("out",))
def _lora_expand_op(buf: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, slice_offsets: torch.Tensor,
                    token_lora_indices: torch.Tensor, sorted_token_ids: torch.Tensor,
                    num_tokens_per_lora: torch.Tensor, lora_token_start: torch.Tensor, lora_ranks: torch.Tensor,
                    page_table: torch.Tensor, backend: str) -> None:
    meta = _MetaView(token_lora_indices, sorted_token_ids, num_tokens_per_lora, lora_token_start, lora_ranks,
                     page_table)
    _impl("expand", backend, out.shape[0])(buf, lora_b, out, meta, slice_offsets)


@_lora_expand_op.register_fake
def _(buf, lora_b, out, slice_offsets, token_lora_indices, sorted_token_ids, num_tokens_per_lora, lora_token_start,
      lora_ranks, page_table, backend):
    return None


# ----------------------------------------------------------------------------------------------- public
def resolve_backend(op: str, backend: str, t: torch.Tensor) -> str:
    """'triton' or 'torch' for tensors like ``t``: 'auto' honours LORAPLEX_KERNELS, else Triton on CUDA."""
    from loraplex import envs

    if backend == "auto":
        backend = envs.use_triton_kernels()
        if backend == "auto":
            backend = "triton" if (t.is_cuda and HAS_TRITON) else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"{op}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{op}: backend='triton' but triton is not installed")
        if not t.is_cuda and not envs.triton_interpret():
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")
    return backend


def _meta_args(meta) -> list[torch.Tensor]:
    return [getattr(meta, name) for name in _META_FIELDS]


def _eager(t: torch.Tensor) -> bool:
    # The custom-op dispatcher costs tens of microseconds a call, paid twice per LoRA linear; only tracing
    # (torch.compile, fake/meta tensors) needs it, plain eager calls and CUDA-graph capture do not.
    return type(t) is torch.Tensor and not t.is_meta and not torch.compiler.is_compiling()


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, meta, scale: float = 1.0,
                backend: str = "auto") -> None:
    """out[s, t, j] = scale * x[t] . lora_a[s, page_table[slot(t), j]] for every token with an adapter, all slices
    at once.

    x:      [num_tokens, in_dim] fp32/bf16/fp16 (the model's dtype)
    lora_a: [num_slices, num_pages, in_dim] fp32/bf16/fp16 (the pool's, EngineArgs.lora_dtype; any strides: the
            pool hands out views). When it differs from x's dtype, both are multiplied in fp32.
    out:    [num_slices, num_tokens, max_rank] float32; rank columns >= lora_ranks[slot] are written as zeros;
            rows of tokens without an adapter (slot -1) are left untouched. A 4-D out [num_splits, ...] receives
            split-K partial sums (the result is out.sum(0)), which lora_expand adds up as it reads them.
    meta:   a LoRAKernelMeta prepared for these tokens. ``backend="auto"`` honours LORAPLEX_KERNELS.
    """
    backend = resolve_backend("lora_shrink", backend, x)
    if _eager(x):
        _impl("shrink", backend, x.shape[0])(x, lora_a, out, meta, float(scale))
    else:
        torch.ops.loraplex.lora_shrink(x, lora_a, out, *_meta_args(meta), float(scale), backend)


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta, slice_offsets: torch.Tensor,
                backend: str = "auto") -> None:
    """out[t, off[s]:off[s+1]] += sum_j buf[s, t, j] * lora_b[page_table[slot(t), j], off[s]:off[s+1]], fp32
    accumulate.

    buf:           [num_slices, num_tokens, max_rank] float32 (shrink's output), or [num_splits, ...] partials
    lora_b:        [num_pages, total_out], B transposed, all slices packed along dim 1 (the pool's dtype)
    out:           [num_tokens, total_out] (the model's dtype, may differ from lora_b's); rows of tokens without an
                   adapter are left untouched
    slice_offsets: [num_slices + 1] int32 on out's device, 0 = off[0] <= ... <= off[-1] = total_out
    Only rank columns < lora_ranks[slot] are read.
    """
    backend = resolve_backend("lora_expand", backend, buf)
    if _eager(buf):
        _impl("expand", backend, out.shape[0])(buf, lora_b, out, meta, slice_offsets)
    else:
        torch.ops.loraplex.lora_expand(buf, lora_b, out, slice_offsets, *_meta_args(meta), backend)


def _num_splits(x: torch.Tensor, backend: str) -> int:
    if not x.is_cuda or resolve_backend("add_lora", backend, x) != "triton":
        return 1
    from loraplex.kernels._triton_utils import shrink_splits

    return shrink_splits(x.shape[0], x.shape[1])


def lora_buffer(x: torch.Tensor, lora_a: torch.Tensor, meta, backend: str = "auto") -> torch.Tensor:
    """Scratch for one shrink of x through lora_a: float32 [num_splits, num_slices, num_tokens, max_rank], with
    split-K partials on CUDA. Rows of tokens without an adapter are never read, so it needs no zeroing."""
    return torch.empty((_num_splits(x, backend), lora_a.shape[0], x.shape[0], meta.page_table.shape[1]),
                       dtype=torch.float32, device=x.device)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, meta,
             slice_offsets: torch.Tensor, buffer: torch.Tensor | None = None, scale: float = 1.0,
             backend: str = "auto") -> None:
    """y += scale * (x @ A[slot].T) @ B[slot].T per token, for all slices of a packed projection.

    y: [num_tokens, total_out]; buffer: optional float32 scratch [num_slices, >= num_tokens, max_rank]
    (allocated per call when None, with split-K partials on CUDA). One shrink and one expand launch whatever the
    number of slices.
    """
    if lora_a.dim() != 3 or x.dim() != 2:
        raise ValueError(f"add_lora: x must be 2-D and lora_a 3-D, got {tuple(x.shape)} and {tuple(lora_a.shape)}")
    num_slices, max_rank = lora_a.shape[0], meta.page_table.shape[1]
    num_tokens = x.shape[0]
    if buffer is None:
        buffer = lora_buffer(x, lora_a, meta, backend)
    elif buffer.dim() != 3 or buffer.shape[0] != num_slices or buffer.shape[1] < num_tokens \
            or buffer.shape[2] != max_rank:
        raise ValueError(f"add_lora: buffer must be [num_slices={num_slices}, >= {num_tokens}, "
                         f"max_rank={max_rank}] float32, got {tuple(buffer.shape)}")
    else:
        buffer = buffer[:, :num_tokens]
    lora_shrink(x, lora_a, buffer, meta, scale, backend)
    lora_expand(buffer, lora_b, y, meta, slice_offsets, backend)


def __getattr__(name: str):
    # Lazy so that this module imports on machines without triton.
    if name == "lora_shrink_triton":
        from loraplex.kernels.lora_shrink import lora_shrink_triton

        return lora_shrink_triton
    if name == "lora_expand_triton":
        from loraplex.kernels.lora_expand import lora_expand_triton

        return lora_expand_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
