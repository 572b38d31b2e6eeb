"""LoRA shrink/expand (Triton + torch reference) and LoRAKernelMeta against a naive per-token oracle.

Without CUDA the Triton kernels run under the interpreter (tests/conftest.py), so the CPU cases stay small.
Adapters sit on shuffled pages of a pool whose other pages hold NaN: a read past an adapter's rank, or through a
wrong page, poisons the result.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from loraplex.kernels.lora_meta import LoRAKernelMeta
from loraplex.kernels.lora_ops import (HAS_TRITON, add_lora, lora_buffer, lora_expand, lora_expand_ref, lora_shrink,
                                       lora_shrink_ref)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# "triton" = the grouped kernels; "triton-decode" = grouped shrink + per-token expand (lora_expand_decode.py).
SHRINK_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
BACKENDS = SHRINK_BACKENDS + [pytest.param("triton-decode", marks=needs_triton)]
# Relative to the largest magnitude of the expected tensor; bf16/fp16 round the inputs and (expand) the output.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
SENTINEL = 7.0  # shrink rows of tokens without an adapter must keep it


def _public_backend(backend, monkeypatch) -> str:
    """The backend name add_lora takes, with the Triton kernel family pinned whatever the batch size."""
    if backend == "torch":
        return backend
    from loraplex.kernels import _triton_utils as tu

    monkeypatch.setattr(tu, "use_decode_expand", lambda n, interpret: backend == "triton-decode")
    return "triton"


def _impls(backend):
    if backend == "torch":
        return lora_shrink_ref, lora_expand_ref
    from loraplex.kernels.lora_expand import lora_expand_triton
    from loraplex.kernels.lora_expand_decode import lora_expand_decode
    from loraplex.kernels.lora_shrink import lora_shrink_triton

    return lora_shrink_triton, (lora_expand_decode if backend == "triton-decode" else lora_expand_triton)


@dataclass
class Case:
    x: torch.Tensor  # [num_tokens, in_dim]
    lora_a: torch.Tensor  # [num_slices, num_pages, in_dim], a strided view of a flat pool as the runtime uses
    lora_b: torch.Tensor  # [num_pages, total_out], B transposed
    meta: LoRAKernelMeta
    offsets: torch.Tensor  # [num_slices + 1] int32
    slots: list  # entry per token
    ranks: list  # per entry
    out_sizes: tuple
    dense_a: torch.Tensor  # [num_slices, num_entries, max_rank, in_dim] (oracle only)
    dense_b: torch.Tensor  # [num_entries, total_out, max_rank]

    @property
    def max_rank(self) -> int:
        return self.meta.max_rank


def make_case(num_tokens, in_dim, out_sizes, ranks, slots, dtype, max_rank=None, device=DEVICE, seed=0,
              max_loras=None) -> Case:
    """Entries of the given ranks, their rank rows on shuffled pages of one flat pool; every page no entry owns
    holds NaN, so a read through a wrong page poisons the result."""
    gen = torch.Generator().manual_seed(seed)
    num_entries, num_slices, total_out = len(ranks), len(out_sizes), sum(out_sizes)
    max_rank = max_rank or max(max(ranks), 1)
    dense_a = torch.randn(num_slices, num_entries, max_rank, in_dim, generator=gen) / in_dim ** 0.5
    dense_b = torch.randn(num_entries, total_out, max_rank, generator=gen) / max_rank ** 0.5
    num_pages = sum(ranks) + 5
    order = torch.randperm(num_pages, generator=gen).tolist()
    pages, used = [], 0
    for r in ranks:
        pages.append(order[used:used + r])
        used += r
    # One page = [pad | A of every slice | pad | B^T row]: strided views, as the pool hands them out.
    a_off, b_off = 3, 3 + num_slices * in_dim + 2
    flat = torch.full((num_pages, b_off + total_out + 1), float("nan"))
    for e, r in enumerate(ranks):
        for j, page in enumerate(pages[e]):
            flat[page, a_off:a_off + num_slices * in_dim] = dense_a[:, e, j].reshape(-1)
            flat[page, b_off:b_off + total_out] = dense_b[e, :, j]
    flat = flat.to(device, dtype)
    lora_a = flat[:, a_off:a_off + num_slices * in_dim].view(num_pages, num_slices, in_dim).permute(1, 0, 2)
    lora_b = flat[:, b_off:b_off + total_out]
    meta = LoRAKernelMeta(num_tokens + 5, max_loras or num_entries, max_rank, num_entries, device)
    for e, r in enumerate(ranks):
        meta.set_entry(e, pages[e], r)
    meta.prepare(torch.tensor(slots, dtype=torch.int64))  # CPU int64 in: prepare moves and casts it
    offsets = torch.tensor([0] + [sum(out_sizes[:i + 1]) for i in range(num_slices)], dtype=torch.int32)
    return Case(torch.randn(num_tokens, in_dim, generator=gen).to(device, dtype), lora_a, lora_b, meta,
                offsets.to(device), list(slots), list(ranks), tuple(out_sizes), dense_a.to(dtype), dense_b.to(dtype))


def _entry(c: Case, slot: int) -> int | None:
    return slot if 0 <= slot < len(c.ranks) else None


def naive_shrink(c: Case, scale: float, fill: float = SENTINEL) -> torch.Tensor:
    """[num_slices, num_tokens, max_rank] float64; rows of tokens without an adapter hold ``fill``."""
    num_slices = c.dense_a.shape[0]
    a, x = c.dense_a.double(), c.x.double().cpu()
    out = torch.full((num_slices, len(c.slots), c.max_rank), fill, dtype=torch.float64)
    for t, slot in enumerate(c.slots):
        e = _entry(c, slot)
        if e is not None:
            out[:, t] = 0.0
            out[:, t, :c.ranks[e]] = scale * (a[:, e, :c.ranks[e]] @ x[t])
    return out


def naive_expand(c: Case, buf: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out, buf, b = y.double().cpu().clone(), buf.double().cpu(), c.dense_b.double()
    off = c.offsets.tolist()
    for t, slot in enumerate(c.slots):
        e = _entry(c, slot)
        for s in range(len(c.out_sizes) if e is not None else 0):
            r = c.ranks[e]
            out[t, off[s]:off[s + 1]] += b[e, off[s]:off[s + 1], :r] @ buf[s, t, :r]
    return out


def assert_close(actual, expected, dtype):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not actual.isnan().any(), "NaN leaked from rank padding or skipped rows"
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOL[dtype] * scale)


# (num_tokens, in_dim, out_sizes, ranks per slot, token slots, dtype, max_rank)
CASES = {
    # q/k/v with GQA, odd in_dim, no-adapter rows, an entry with rank 0 that tokens still point at
    "qkv_fp32": (13, 100, (64, 24, 24), [8, 16, 1, 0], [0, 1, -1, 2, 1, 1, 3, 0, -1, 2, 1, 0, 1], torch.float32, 16),
    # gate/up, rank 33 (not a power of two) next to rank 64 and 5, max_rank > every rank but one
    "gate_up_bf16": (12, 100, (96, 96), [33, 64, 5], [2, 0, 1, 1, -1, 0, 2, 2, 1, 0, -1, 1], torch.bfloat16, 64),
    # single slice, fp16, one adapter for every row; entry 1 resident but unused
    "single_fp16": (9, 64, (48,), [16, 16], [0] * 9, torch.float16, 16),
    # 16 adapters of ranks 1..16, many entries with one token, some with none
    "many_bf16": (20, 48, (40, 8), list(range(1, 17)), [i % 13 for i in range(19)] + [-1], torch.bfloat16, 16),
    "rank1_fp32": (7, 33, (16,), [1], [0, -1, 0, 0, -1, 0, 0], torch.float32, 1),
    "no_adapter_rows": (6, 32, (24, 8), [8, 4], [-1] * 6, torch.bfloat16, 8),
}


def _case(name, seed=0) -> Case:
    n, k, sizes, ranks, slots, dtype, max_rank = CASES[name]
    return make_case(n, k, sizes, ranks, slots, dtype, max_rank=max_rank, seed=seed)


@pytest.mark.parametrize("backend", SHRINK_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_shrink(backend, name):
    c = _case(name)
    shrink, _ = _impls(backend)
    out = torch.full((c.lora_a.shape[0], c.x.shape[0], c.max_rank), SENTINEL, device=DEVICE)
    shrink(c.x, c.lora_a, out, c.meta, 0.5)
    assert_close(out, naive_shrink(c, 0.5), CASES[name][5])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_expand(backend, name):
    c = _case(name)
    dtype = CASES[name][5]
    _, expand = _impls(backend)
    # Activations as shrink leaves them: NaN rows for tokens without an adapter must never be read.
    buf = naive_shrink(c, 1.0, fill=float("nan")).float().to(DEVICE)
    y = torch.randn(c.x.shape[0], sum(c.out_sizes), generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    expected = naive_expand(c, buf.nan_to_num(0.0), y)
    expand(buf, c.lora_b, y, c.meta, c.offsets)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["qkv_fp32", "gate_up_bf16", "many_bf16", "rank1_fp32"])
@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_k(backend, name, num_splits, monkeypatch):
    """Shrink into [num_splits, ...] partials (uneven and even K tails, splits wholly past in_dim for 5 x 16 > 48),
    then expand adding them up: same as the unsplit result; adapter rows of every split are written."""
    from loraplex.kernels import _triton_utils as tu

    monkeypatch.setattr(tu, "shrink_config", lambda *a: tu.LoRAConfig(16, 16, 16, 1, 1))
    c = _case(name, seed=4)
    dtype = CASES[name][5]
    shrink, expand = _impls(backend)
    parts = torch.full((num_splits, c.lora_a.shape[0], c.x.shape[0], c.max_rank), float("nan"),
                       device=DEVICE)
    shrink(c.x, c.lora_a, parts, c.meta, 0.5)
    expected = naive_shrink(c, 0.5, fill=float("nan"))
    assert_close(parts.sum(0).nan_to_num(0.0), expected.nan_to_num(0.0), dtype)
    has_adapter = torch.tensor([slot >= 0 for slot in c.slots])
    assert not parts[:, :, has_adapter.to(DEVICE)].isnan().any(), "a split left adapter rows unwritten"
    y = torch.randn(c.x.shape[0], sum(c.out_sizes), generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    want = naive_expand(c, expected.nan_to_num(0.0), y)
    expand(parts, c.lora_b, y, c.meta, c.offsets)
    assert_close(y, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["qkv_fp32", "gate_up_bf16", "many_bf16", "no_adapter_rows"])
def test_add_lora_public(backend, name, monkeypatch):
    backend = _public_backend(backend, monkeypatch)
    c = _case(name, seed=2)
    dtype = CASES[name][5]
    y = torch.randn(c.x.shape[0], sum(c.out_sizes), generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    expected = naive_expand(c, naive_shrink(c, 2.0, fill=0.0), y)
    # A static scratch larger than this step, as a runtime would keep one per max_num_tokens.
    buffer = torch.full((len(c.out_sizes), c.x.shape[0] + 3, c.max_rank), float("nan"), device=DEVICE)
    add_lora(y, c.x, c.lora_a, c.lora_b, c.meta, c.offsets, buffer=buffer, scale=2.0, backend=backend)
    assert_close(y, expected, dtype)


@needs_triton
def test_triton_many_blocks(monkeypatch):
    """Tiny blocks on CPU-sized shapes: several m/n/k blocks, n-blocks past a slot's rank, an expand n-block
    straddling two slices, uneven K tails."""
    from loraplex.kernels import _triton_utils as tu

    monkeypatch.setattr(tu, "shrink_config", lambda *a: tu.LoRAConfig(16, 16, 16, 1, 1))
    monkeypatch.setattr(tu, "expand_config", lambda *a: tu.LoRAConfig(16, 16, 16, 1, 1))
    slots = [0] * 18 + [1] * 3 + [-1, 2, 2]
    c = make_case(24, 40, (24, 20, 20), [33, 7, 18], slots, torch.float32, max_rank=40, seed=4)
    shrink, expand = _impls("triton")
    out = torch.full((3, 24, 40), SENTINEL, device=DEVICE)
    shrink(c.x, c.lora_a, out, c.meta, 1.0)
    assert_close(out, naive_shrink(c, 1.0), torch.float32)
    y = torch.zeros(24, 64, device=DEVICE)
    expand(out, c.lora_b, y, c.meta, c.offsets)
    assert_close(y, naive_expand(c, naive_shrink(c, 1.0, fill=0.0), torch.zeros(24, 64)), torch.float32)


@needs_triton
def test_decode_expand_many_blocks(monkeypatch):
    """Per-token expand with tiny column blocks straddling slices, split-K partials, a rank-0 slot."""
    from loraplex.kernels import _triton_utils as tu

    monkeypatch.setattr(tu, "decode_expand_block_n", lambda *a: 16)
    slots = [0, 1, -1, 2, 2, 0, 1]
    c = make_case(7, 70, (24, 20, 20), [33, 7, 0], slots, torch.float32, max_rank=40, seed=6)
    shrink, expand = _impls("triton-decode")
    out = torch.full((2, 3, 7, 40), SENTINEL, device=DEVICE)
    shrink(c.x, c.lora_a, out, c.meta, 1.0)
    assert_close(out.sum(0), naive_shrink(c, 1.0, fill=2 * SENTINEL), torch.float32)
    y = torch.zeros(7, 64, device=DEVICE)
    expand(out, c.lora_b, y, c.meta, c.offsets)
    assert_close(y, naive_expand(c, naive_shrink(c, 1.0, fill=0.0), torch.zeros(7, 64)), torch.float32)


def test_meta_prepare_grouping():
    meta = LoRAKernelMeta(12, 4, 2, 8, DEVICE)
    for e, (pages, rank) in {2: ([5, 9], 2), 0: ([1], 1), 5: ([3, 4], 2), 7: ([], 0)}.items():
        meta.set_entry(e, pages, rank)
    entries = [5, -1, 0, 5, 9, 2, 0, -3, 5]  # 9 and -3 are outside the pool: no adapter
    meta.prepare(torch.tensor(entries, dtype=torch.int16))
    # Batch slots number the step's distinct entries in entry order: 0 -> 0, 2 -> 1, 5 -> 2.
    assert meta.token_lora_indices.tolist() == [2, -1, 0, 2, -1, 1, 0, -1, 2, -1, -1, -1]
    assert meta.num_tokens_per_lora.tolist() == [2, 1, 3, 0]
    assert meta.lora_token_start.tolist() == [0, 2, 3, 6, 6]
    assert meta.lora_ranks.tolist() == [1, 2, 2, 0]
    assert meta.page_table.tolist() == [[1, 0], [5, 9], [3, 4], [0, 0]]
    # Stable within a slot; rows without an adapter (and unused rows) follow in index order.
    assert meta.sorted_token_ids.tolist() == [2, 6, 5, 0, 3, 8, 1, 4, 7, 9, 10, 11]
    for t in (meta.token_lora_indices, meta.sorted_token_ids, meta.num_tokens_per_lora, meta.lora_token_start,
              meta.page_table):
        assert t.dtype == torch.int32 and t.device.type == DEVICE
    # A smaller batch afterwards leaves no stale rows behind; a free entry (rank 0) still takes a slot.
    meta.prepare(torch.tensor([7, 7], dtype=torch.int32, device=DEVICE))
    assert meta.token_lora_indices.tolist() == [0, 0] + [-1] * 10
    assert meta.num_tokens_per_lora.tolist() == [2, 0, 0, 0]
    assert meta.lora_ranks.tolist() == [0, 0, 0, 0]
    assert meta.sorted_token_ids.tolist() == list(range(12))
    meta.prepare(torch.empty(0, dtype=torch.int64))
    assert meta.num_tokens_per_lora.tolist() == [0, 0, 0, 0]


def test_meta_more_entries_than_slots_run_without_adapter():
    """More distinct entries than max_loras is a scheduler bug; the extra ones must not write out of bounds."""
    meta = LoRAKernelMeta(6, 2, 1, 5, DEVICE)
    for e in range(5):
        meta.set_entry(e, [e], 1)
    meta.prepare(torch.tensor([4, 0, 3, 1, 0]))
    assert meta.token_lora_indices.tolist() == [-1, 0, -1, 1, 0, -1]
    assert meta.page_table.tolist() == [[0], [1]]


def test_meta_errors():
    meta = LoRAKernelMeta(4, 2, 8, 3, "cpu")
    with pytest.raises(ValueError, match="max_num_tokens"):
        meta.prepare(torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="int"):
        meta.prepare(torch.zeros(3))
    with pytest.raises(ValueError, match="entry"):
        meta.set_entry(3, [0], 1)
    with pytest.raises(ValueError, match="rank"):
        meta.set_entry(1, [0, 1], 9)
    with pytest.raises(ValueError, match="max_rank"):
        LoRAKernelMeta(4, 2, 0, 3, "cpu")
    meta.set_entry(1, [6, 2], 2)
    assert meta.entry_ranks.tolist() == [0, 2, 0, 0] and meta.entry_pages[1].tolist()[:2] == [6, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_checks(backend):
    c = _case("qkv_fp32")
    shrink, expand = _impls(backend)
    out = torch.zeros(3, 13, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        shrink(c.x, c.lora_a, out.half(), c.meta)
    with pytest.raises(ValueError, match="lora_a is"):
        shrink(c.x, c.lora_a.double(), out, c.meta)
    with pytest.raises(ValueError, match="in_dim"):
        shrink(c.x[:, :50], c.lora_a, out, c.meta)
    with pytest.raises(ValueError, match="max_rank"):
        shrink(c.x, c.lora_a, out[:, :, :8], c.meta)
    y = torch.zeros(13, 112, device=DEVICE)
    with pytest.raises(ValueError, match="slice_offsets"):
        expand(out, c.lora_b, y, c.meta, c.offsets[:-1])
    with pytest.raises(ValueError, match="out must be"):
        expand(out, c.lora_b, y[:, :100], c.meta, c.offsets)


def test_backend_dispatch(monkeypatch):
    c = _case("rank1_fp32")
    out = torch.zeros(1, 7, 1, device=DEVICE)
    with pytest.raises(ValueError, match="backend must be"):
        lora_shrink(c.x, c.lora_a, out, c.meta, backend="cuda")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="CUDA"):
            lora_shrink(c.x, c.lora_a, out, c.meta, backend="triton")
    lora_shrink(c.x, c.lora_a, out, c.meta, backend="auto")  # torch on CPU, Triton on CUDA
    assert_close(out, naive_shrink(c, 1.0, fill=0.0), torch.float32)


@needs_triton
def test_host_launch_math_matches_triton():
    """The host-side cdiv / next_power_of_2 that launchers use instead of triton's constexpr_functions."""
    import triton

    from loraplex.kernels import _triton_utils as tu

    assert all(tu.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(tu.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 40))


@needs_triton
def test_decode_expand_knob(monkeypatch):
    """LORAPLEX_LORA_DECODE_MAX_TOKENS (alias VLLM_*) picks the per-token expand up to that batch; 0 turns it off;
    the interpreter always runs the grouped one unless a test forces it."""
    from loraplex.kernels import _triton_utils as tu

    for name in ("LORAPLEX_LORA_DECODE_MAX_TOKENS", "VLLM_LORA_DECODE_MAX_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    assert tu.use_decode_expand(32, False) and not tu.use_decode_expand(33, False)
    assert not tu.use_decode_expand(1, True)
    monkeypatch.setenv("VLLM_LORA_DECODE_MAX_TOKENS", "64")
    assert tu.use_decode_expand(64, False)
    monkeypatch.setenv("LORAPLEX_LORA_DECODE_MAX_TOKENS", "0")
    assert not tu.use_decode_expand(1, False)


def test_custom_ops_trace():
    """Registered ops: schema/fake checks pass and torch.compile traces add_lora without a graph break."""
    c = _case("qkv_fp32")
    m = [c.meta.token_lora_indices, c.meta.sorted_token_ids, c.meta.num_tokens_per_lora, c.meta.lora_token_start,
         c.meta.lora_ranks, c.meta.page_table]
    buf = torch.zeros(3, 13, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.loraplex.lora_shrink.default, (c.x, c.lora_a, buf, *m, 0.5, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.loraplex.lora_expand.default,
                          (buf, c.lora_b, torch.zeros(13, 112, device=DEVICE), c.offsets, *m, "torch"),
                          test_utils=("test_schema", "test_faketensor"))

    def f(y, x):
        add_lora(y, x, c.lora_a, c.lora_b, c.meta, c.offsets, backend="torch")
        return y * 1

    y1, y2 = torch.zeros(13, 112, device=DEVICE), torch.zeros(13, 112, device=DEVICE)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(y1, c.x)
    torch.testing.assert_close(got, f(y2, c.x))


def test_imports_without_triton():
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import loraplex.kernels.lora_ops as ops\n"
        "from loraplex.kernels.lora_meta import LoRAKernelMeta\n"
        "meta = LoRAKernelMeta(4, 2, 2, 2, 'cpu'); meta.set_entry(1, [2, 3], 2)\n"
        "meta.prepare(torch.tensor([1, -1, 1]))\n"
        "y = torch.zeros(3, 4)\n"
        "ops.add_lora(y, torch.ones(3, 5), torch.ones(1, 4, 5), torch.ones(4, 4), meta,\n"
        "             torch.tensor([0, 4], dtype=torch.int32))\n"
        "assert not ops.HAS_TRITON\n"
        "assert y.tolist() == [[10.0] * 4, [0.0] * 4, [10.0] * 4], y\n"
        "try:\n    ops.lora_shrink_triton\nexcept ImportError:\n    print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORAPLEX_KERNELS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ----------------------------------------------------------------------------------------------- GPU
def _gpu_case(num_tokens, hidden, out_sizes, ranks, dtype, seed=0, no_adapter_every=5):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, len(ranks), (num_tokens,), generator=gen)
    slots[::no_adapter_every] = -1
    return make_case(num_tokens, hidden, out_sizes, ranks, slots.tolist(), dtype, max_rank=max(ranks), seed=seed)


def _oracle(c: Case, y: torch.Tensor, scale: float) -> torch.Tensor:
    return naive_expand(c, naive_shrink(c, scale, fill=0.0), y)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_tokens,out_sizes", [(256, (3072, 1024, 1024)), (512, (8192, 8192)), (7, (3072,))])
def test_gpu_large(dtype, num_tokens, out_sizes):
    ranks = [16] * 32 if num_tokens != 512 else [8, 16, 64, 33] * 8
    c = _gpu_case(num_tokens, 3072, out_sizes, ranks, dtype)
    y0 = torch.randn(num_tokens, sum(out_sizes), device=DEVICE).to(dtype)
    expected = _oracle(c, y0, 0.25)
    for backend in ("triton", "torch"):
        y = y0.clone()
        add_lora(y, c.x, c.lora_a, c.lora_b, c.meta, c.offsets, scale=0.25, backend=backend)
        assert_close(y, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton-decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens,num_adapters", [(1, 1), (32, 8), (64, 32), (48, 3)])
def test_gpu_decode_sizes(backend, dtype, num_tokens, num_adapters, monkeypatch):
    """Decode batch sizes through both kernel families, with split-K partials as the runtime allocates them."""
    name = _public_backend(backend, monkeypatch)
    for in_dim, out_sizes in ((3072, (3072, 1024, 1024)), (8192, (3072,)), (3072, (8192, 8192))):
        c = _gpu_case(num_tokens, in_dim, out_sizes, [16] * num_adapters, dtype, no_adapter_every=7)
        y0 = torch.randn(num_tokens, sum(out_sizes), device=DEVICE).to(dtype)
        expected = _oracle(c, y0, 0.5)
        buffer = lora_buffer(c.x, c.lora_a, c.meta, name)
        assert buffer.shape[0] > 1, "decode batches take split-K partials on CUDA"
        lora_shrink(c.x, c.lora_a, buffer, c.meta, 0.5, backend=name)
        lora_expand(buffer, c.lora_b, y0, c.meta, c.offsets, backend=name)
        assert_close(y0, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [256, 32])
def test_gpu_cuda_graph_replay(num_tokens):
    """prepare + add_lora captured once, replayed with new inputs and a new adapter mix (256 tokens run the
    grouped kernels, 32 the per-token decode kernels)."""
    ranks = [16] * 32
    c = _gpu_case(num_tokens, 3072, (3072, 1024, 1024), ranks, torch.bfloat16)
    static_x, static_idx = c.x.clone(), torch.tensor(c.slots, dtype=torch.int32, device=DEVICE)
    static_y = torch.zeros(num_tokens, 5120, dtype=torch.bfloat16, device=DEVICE)
    buffer = torch.empty(3, num_tokens, 16, device=DEVICE)

    def step():
        c.meta.prepare(static_idx)
        static_y.zero_()
        add_lora(static_y, static_x, c.lora_a, c.lora_b, c.meta, c.offsets, buffer=buffer, backend="triton")

    step()  # Triton compiles outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2, 3):
        fresh = _gpu_case(num_tokens, 3072, (3072, 1024, 1024), ranks, torch.bfloat16, seed=seed,
                          no_adapter_every=2 + seed)
        fresh.dense_a, fresh.dense_b = c.dense_a, c.dense_b  # the captured pool's weights, new tokens and entries
        static_x.copy_(fresh.x)
        static_idx.copy_(torch.tensor(fresh.slots, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_y, _oracle(fresh, torch.zeros_like(static_y), 1.0), torch.bfloat16)


# ----------------------------------------------------------------------------------------------- lora_dtype
# (x dtype = the model's, lora dtype = EngineArgs.lora_dtype). When they differ, both kernels multiply in fp32.
MIXED = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
         (torch.float16, torch.float32), (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)]
_MIXED_PARAMS = [pytest.param("torch", x, w, id=f"torch-{x}-{w}".replace("torch.", "")) for x, w in MIXED] + [
    pytest.param(b, x, w, id=f"{b}-{x}-{w}".replace("torch.", ""), marks=needs_triton)
    for b in ("triton", "triton-decode") for x, w in MIXED[::2]]


def _mixed_case(x_dtype, lora_dtype, seed=0, name="qkv_fp32", device=DEVICE) -> Case:
    """CASES[name] with the pool in lora_dtype and x drawn in x_dtype (full precision of its own dtype)."""
    n, k, sizes, ranks, slots, _, max_rank = CASES[name]
    c = make_case(n, k, sizes, ranks, slots, lora_dtype, max_rank=max_rank, seed=seed, device=device)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 100)).to(device, x_dtype)
    return dataclasses.replace(c, x=x)


@pytest.mark.parametrize("backend,x_dtype,lora_dtype", _MIXED_PARAMS)
def test_mixed_dtypes(backend, x_dtype, lora_dtype, monkeypatch):
    """x in the model's dtype, A/B in lora_dtype. The shrink meets fp32's tolerance (the stored values multiplied
    exactly, neither operand rounded to the other's dtype); the expand meets y's (fp32 accumulation, one rounding
    into y's dtype: an fp32 y keeps fp32's tolerance, so the activations were not dropped to lora_b's dtype)."""
    c = _mixed_case(x_dtype, lora_dtype)
    shrink, expand = _impls(backend)
    out = torch.full((c.lora_a.shape[0], c.x.shape[0], c.max_rank), SENTINEL, device=DEVICE)
    shrink(c.x, c.lora_a, out, c.meta, 0.5)
    assert_close(out, naive_shrink(c, 0.5), torch.float32)
    y = torch.randn(c.x.shape[0], sum(c.out_sizes), generator=torch.Generator().manual_seed(1)).to(DEVICE, x_dtype)
    expected = naive_expand(c, naive_shrink(c, 0.5, fill=0.0), y)
    expand(out, c.lora_b, y, c.meta, c.offsets)
    assert_close(y, expected, x_dtype)
    # The public entry point, split-K scratch and dispatch included.
    y = torch.zeros(c.x.shape[0], sum(c.out_sizes), device=DEVICE, dtype=x_dtype)
    add_lora(y, c.x, c.lora_a, c.lora_b, c.meta, c.offsets, scale=0.5, backend=_public_backend(backend, monkeypatch))
    assert_close(y, _oracle(c, torch.zeros_like(y), 0.5), x_dtype)


def test_mixed_dtype_checks():
    c = _mixed_case(torch.float32, torch.bfloat16)
    out = torch.zeros(3, 13, 16, device=DEVICE)
    with pytest.raises(ValueError, match="lora_a is torch.int8"):
        lora_shrink(c.x, c.lora_a.to(torch.int8), out, c.meta, backend="torch")
    with pytest.raises(ValueError, match="lora_b must be"):
        lora_expand(out, c.lora_b.double(), torch.zeros(13, 112, device=DEVICE), c.meta, c.offsets, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton-decode"])
@pytest.mark.parametrize("x_dtype,lora_dtype", MIXED)
@pytest.mark.parametrize("num_tokens", [256, 32])
def test_gpu_mixed_dtypes(backend, x_dtype, lora_dtype, num_tokens, monkeypatch):
    """Compiled kernels over mixed dtypes, split-K partials as the runtime allocates them."""
    name = _public_backend(backend, monkeypatch)
    c = _gpu_case(num_tokens, 3072, (3072, 1024, 1024), [16, 8, 16], lora_dtype)
    c = dataclasses.replace(c, x=c.x.to(x_dtype))
    y0 = torch.randn(num_tokens, 5120, device=DEVICE).to(x_dtype)
    expected = _oracle(c, y0, 0.5)
    add_lora(y0, c.x, c.lora_a, c.lora_b, c.meta, c.offsets, scale=0.5, backend=name)
    assert_close(y0, expected, x_dtype)
