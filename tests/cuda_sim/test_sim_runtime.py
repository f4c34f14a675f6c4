"""The execution layer itself (tests/cuda_sim/include/cuda_sim.h, src/sim_runtime.cpp),
driven by the small CUDA kernels of src/selftest.cu.

Checked here: index variables for 3-D grids and blocks; __syncthreads() as a real
barrier (a tree sum, and a read of a neighbour's shared value that only a barrier
orders); warp shuffles, ballots and votes against CUDA's documented semantics,
full and partial masks and segment widths; atomics racing across two OS threads;
half/bfloat16 conversions bit for bit (every half and bf16 value, every rounding
boundary); the __f*_rn intrinsics as single IEEE roundings; the CUB sort stand-in;
launch-configuration errors; and the undefined behaviour the simulation reports
instead of running on (divergent barriers, deadlock, collectives with exited,
missing or absent lanes), plus out-of-bounds accesses, which kill the process
with a message naming the buffer, offset, kernel and thread.

What a simulation cannot show: speed; the GPU memory model (fibers of a block
never run at the same time, so a race between threads shows only as a
dependence on the schedule, which these tests vary); nvcc's contraction of
a*b+c into fma and fast-math approximations (glibc's expf/logf run here); and
how divergent warps are scheduled.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from cuda_sim_lib import INVALID_CONFIGURATION, INVALID_VALUE, LAUNCH_FAILURE, SUCCESS

pytestmark = pytest.mark.cuda_sim


def dev_array(sim, values, dtype):
    """A device tensor holding ``values`` (numpy or list) as ``dtype``."""
    return sim.device(torch.as_tensor(np.asarray(values)).to(dtype))


def test_index_variables_cover_3d_grids_and_blocks(sim):
    grid, block = (2, 3, 2), (4, 3, 2)
    nblocks, nthreads = int(np.prod(grid)), int(np.prod(block))
    out = sim.empty((nblocks * nthreads, 8), torch.int32)
    sim.check(sim.lib.sim_test_index(sim.ptr(out), (ctypes.c_int * 3)(*grid), (ctypes.c_int * 3)(*block)), "index")
    got = out.numpy()
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(n) for n in (grid[2], grid[1], grid[0], block[2], block[1],
                                                                  block[0])), indexing="ij")
    want = np.stack([bx, by, bz, tx, ty, tz], -1).reshape(-1, 6)
    assert np.array_equal(got[:, :6], want)
    assert (got[:, 6] == 232).all() and (got[:, 7] == 432).all()
    assert sim.get("blocks") >= nblocks


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_barriers_order_a_shared_memory_tree_sum(sim, schedule):
    g = torch.Generator().manual_seed(3)
    blocks, threads, n = 3, 128, 1000
    x = torch.randn(blocks, n, generator=g)
    xd, out = sim.device(x), sim.empty((blocks,), torch.float32)
    with sim.settings(schedule=schedule, seed=11):
        sim.check(sim.lib.sim_test_block_sum(sim.ptr(xd), sim.ptr(out), blocks, threads, n), "block_sum")
    # the same tree, in float32, in numpy
    lanes = np.zeros((blocks, threads), np.float32)
    for i in range(n):
        lanes[:, i % threads] += x[:, i].numpy()
    half = threads // 2
    while half:
        lanes[:, :half] += lanes[:, half:2 * half]
        half //= 2
    assert np.array_equal(out.numpy(), lanes[:, 0])


def test_a_missing_barrier_shows_as_a_schedule_dependence(sim):
    """Thread t reads the shared value thread t+1 wrote. With the barrier every
    schedule gives t+1; without it the result depends on who ran first, which is
    how the simulation exposes a race (the kernel tests run several schedules)."""
    threads = 64
    want = (np.arange(threads) + 1) % threads
    results = {}
    for barrier in (1, 0):
        for schedule in ("forward", "reverse", "random"):
            out = sim.empty((threads,), torch.int32)
            with sim.settings(schedule=schedule, seed=5):
                sim.check(sim.lib.sim_test_neighbour(sim.ptr(out), threads, barrier), "neighbour")
            results[barrier, schedule] = out.numpy().copy()
    for schedule in ("forward", "reverse", "random"):
        assert np.array_equal(results[1, schedule], want)
    # forward: every thread but the last reads before its neighbour wrote (0xFF... = -1);
    # reverse: only the last one does (thread 0 runs last)
    assert (results[0, "forward"][:-1] == -1).all() and results[0, "forward"][-1] == 0
    assert np.array_equal(results[0, "reverse"][:-1], want[:-1]) and results[0, "reverse"][-1] == -1


def _shuffle_model(x, width, arg):
    """CUDA's documented __shfl*_sync results for a full mask, per lane."""
    n = len(x)
    out = np.zeros((n, 4), np.int64)
    for t in range(n):
        lane, base = t % 32, t - t % 32
        seg = lane & ~(width - 1)
        src_idx = seg + (arg & (width - 1))
        src_xor = lane ^ arg
        if src_xor >= seg + width:
            src_xor = lane  # a later segment: own value
        src_up = lane - arg if lane - arg >= seg else lane
        src_down = lane + arg if lane + arg < seg + width else lane
        out[t] = [x[base + s] for s in (src_idx, src_xor, src_up, src_down)]
    return out


@pytest.mark.parametrize("width,arg", [(32, 0), (32, 1), (32, 13), (32, 31), (16, 5), (16, 9), (8, 3), (4, 2),
                                       (2, 1), (1, 0)])
def test_warp_shuffles_ballots_and_votes(sim, width, arg):
    threads = 96
    rng = np.random.default_rng(width * 100 + arg)
    x = rng.integers(0, 1000, threads).astype(np.int32)
    x[7] = 7  # warp 0 has the value __any_sync looks for
    x[32 + 7] = 8  # warp 1 does not
    x[64 + 7] = 64 + 7
    xd, out = dev_array(sim, x, torch.int32), sim.empty((threads, 8), torch.int32)
    dout = sim.empty((threads,), torch.float64)
    sim.check(sim.lib.sim_test_warp_ops(sim.ptr(xd), sim.ptr(out), sim.ptr(dout), threads, width, arg), "warp_ops")
    got = out.numpy().astype(np.int64)
    assert np.array_equal(got[:, :4], _shuffle_model(x, width, arg))
    for w in range(threads // 32):
        lanes = slice(32 * w, 32 * w + 32)
        ballot = sum(1 << i for i in range(32) if x[32 * w + i] & 1)
        assert (got[lanes, 4] & 0xFFFFFFFF == ballot).all()
        assert (got[lanes, 5] == int((x[lanes] == 7 + 32 * w).any())).all()
        assert (got[lanes, 6] == 1).all()
        assert (got[lanes, 7] & 0xFFFFFFFF == 0xFFFFFFFF).all()
    # an 8-byte type goes through the shuffle unchanged
    xor_src = _shuffle_model(np.arange(threads), width, arg)[:, 1]
    assert np.array_equal(dout.numpy(), 0.25 + x[xor_src])


def test_partial_mask_shuffles_in_both_halves_of_a_warp(sim):
    x = np.arange(64, dtype=np.int32) * 3
    xd, out = dev_array(sim, x, torch.int32), sim.empty((64,), torch.int32)
    sim.check(sim.lib.sim_test_half_warp(sim.ptr(xd), sim.ptr(out)), "half_warp")
    want = x.copy()
    for t in range(64):
        lane = t % 32
        if lane < 16:
            want[t] = x[t + 1] if lane + 1 < 16 else x[t]
        else:
            want[t] = x[t - 1] if lane - 1 >= 16 else x[t]
    assert np.array_equal(out.numpy(), want)


def test_atomics_are_exact_with_blocks_racing_on_two_threads(sim):
    blocks, threads = 64, 128
    total = blocks * threads
    f, d = dev_array(sim, [0.0], torch.float32), dev_array(sim, [0.0], torch.float64)
    i, mx, cas = (dev_array(sim, [v], torch.int32) for v in (0, -5, 0))
    u = dev_array(sim, [0], torch.int64)  # unsigned long long: same bytes
    with sim.settings(workers=2):
        sim.check(sim.lib.sim_test_atomics(blocks, threads, *(sim.ptr(t) for t in (f, d, i, u, mx, cas))), "atomics")
    assert f.item() == total and d.item() == total / 2 and i.item() == total
    assert u.item() == 2 * total and mx.item() == total - 1 and cas.item() == total


FAULTS = {  # which: the message (either, depending on which lanes the schedule runs first)
    0: ("divergent code",),
    1: ("deadlock",),
    2: ("exited while lanes", "naming exited lanes"),
    3: ("not in the mask",),
    4: ("divergent warp collectives",),
}


@pytest.mark.parametrize("which", sorted(FAULTS))
def test_undefined_behaviour_is_reported_and_sticky(sim, which):
    out = sim.empty((64,), torch.int32)
    assert sim.lib.sim_test_fault(which, sim.ptr(out)) == LAUNCH_FAILURE
    assert any(message in sim.fault() for message in FAULTS[which]), sim.fault()
    assert "kernel " in sim.fault() and "selftest.cu" in sim.fault() or which == 1
    # a failed kernel leaves the context unusable until it is reset, as on a GPU
    assert sim.lib.sim_test_launch_config(3, 1024) == LAUNCH_FAILURE
    sim.reset()
    assert sim.lib.sim_test_launch_config(3, 1024) == SUCCESS


def test_launch_configuration_errors(sim):
    assert sim.lib.sim_test_launch_config(0, 0) == INVALID_CONFIGURATION  # empty grid
    assert sim.lib.sim_test_launch_config(1, 0) == INVALID_CONFIGURATION  # 2048 threads
    big = 64 * 1024
    assert sim.lib.sim_test_launch_config(2, big) == INVALID_VALUE  # > 48 KiB without the attribute
    assert sim.lib.sim_test_launch_config(3, big) == SUCCESS
    assert sim.lib.sim_test_launch_config(4, 232448 + 1) == INVALID_VALUE  # over the device's opt-in limit
    with sim.settings(smem_optin=32 * 1024):
        assert sim.lib.sim_test_launch_config(4, big) == INVALID_VALUE
    assert [r.status for r in sim.launches()] == [INVALID_CONFIGURATION, INVALID_CONFIGURATION, INVALID_VALUE,
                                                  SUCCESS]
    assert sim.fault() == ""


_CRASH = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.sim_malloc.restype = ctypes.c_void_p
lib.sim_malloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
lib.sim_test_write.argtypes = [ctypes.c_void_p, ctypes.c_int64]
lib.sim_test_smem_write.argtypes = [ctypes.c_size_t, ctypes.c_int64]
case = sys.argv[2]
if case == "past_end":
    lib.sim_test_write(lib.sim_malloc(40, 4, 0), 10)
elif case == "before_start":
    lib.sim_test_write(lib.sim_malloc(40, 4, 1), -1)
elif case == "in_bounds":
    lib.sim_test_write(lib.sim_malloc(40, 4, 0), 9)
    lib.sim_test_write(lib.sim_malloc(40, 4, 1), 0)
    lib.sim_test_smem_write(128, 127)
else:
    lib.sim_test_smem_write(128, 128)
print("survived")
"""


@pytest.mark.parametrize("case,message", [
    ("past_end", "byte offset 40 of a test buffer of 40 bytes, in kernel write_kernel block (0,0,0) thread (0,0,0)"),
    ("before_start", "byte offset -4 of a test buffer of 40 bytes"),
    ("smem", "byte offset 128 of dynamic shared memory of 128 bytes, in kernel smem_write_kernel"),
    ("in_bounds", None),
])
def test_out_of_bounds_accesses_kill_the_process_with_a_message(sim, case, message):
    proc = subprocess.run([sys.executable, "-c", _CRASH, sim.path, case], capture_output=True, text=True, timeout=60)
    if message is None:
        assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr
    else:
        assert proc.returncode != 0 and "survived" not in proc.stdout
        assert message in proc.stderr, proc.stderr


def _call_u16(sim, fn, x: np.ndarray, out_dtype) -> np.ndarray:
    out = np.empty(x.shape, out_dtype)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def _rounding_probes(grid_f32: np.ndarray) -> np.ndarray:
    """Every value of a target format (as float32), the midpoints between neighbours,
    one float32 ulp either side of each, plus specials and random floats."""
    g = np.sort(grid_f32[np.isfinite(grid_f32)].astype(np.float64))
    mids = ((g[:-1] + g[1:]) / 2).astype(np.float32)  # exact: a midpoint has one more bit
    near = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, -65520, 3.4028235e38,
                        1e-45, -1e-45, 2**-24, 2**-25, 2**-25 * 1.0000001, 2**-14, 5.96e-8], np.float32)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FA00000], np.uint32).view(np.float32)
    return np.concatenate([grid_f32.astype(np.float32), near, rand, special, nans])


def test_half_conversions_are_bit_exact(sim):
    every = np.arange(2**16, dtype=np.uint16)
    as_float = _call_u16(sim, sim.lib.sim_test_half2float, every, np.float32)
    want = every.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(as_float[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.isnan(as_float[nan]).all()
    probes = _rounding_probes(want)
    got = _call_u16(sim, sim.lib.sim_test_float2half, probes, np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = probes.astype(np.float16).view(np.uint16)  # IEEE round-to-nearest-even
    isnan = np.isnan(probes)
    assert np.array_equal(got[~isnan], ref[~isnan])
    assert (got[isnan] == 0x7FFF).all()  # CUDA's canonical NaN


def test_bfloat16_conversions_are_bit_exact(sim):
    every = np.arange(2**16, dtype=np.uint16)
    as_float = _call_u16(sim, sim.lib.sim_test_bf162float, every, np.float32)
    assert np.array_equal(as_float.view(np.uint32), every.astype(np.uint32) << 16)
    probes = _rounding_probes(as_float)
    got = _call_u16(sim, sim.lib.sim_test_float2bf16, probes, np.uint16)
    ref = torch.from_numpy(probes).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    isnan = np.isnan(probes)
    assert np.array_equal(got[~isnan], ref[~isnan])
    assert (got[isnan] == 0x7FFF).all()


def _round_f32(x: Fraction) -> np.float32:
    """The float32 nearest to the exact rational x, ties to even."""
    f = np.float32(float(x))
    if not np.isfinite(f):
        return f
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    dist = [abs(Fraction(float(c)) - x) for c in cands]
    best = min(dist)
    ties = [c for c, d in zip(cands, dist) if d == best]
    return min(ties, key=lambda c: int(np.array(c).view(np.uint32)) & 1)


def test_rn_intrinsics_round_once(sim):
    rng = np.random.default_rng(1)
    n = 3000
    a, b, c = ((rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32) for _ in range(3))
    a[:10], b[:10] = np.float32(1) + np.float32(2**-23), np.float32(1) - np.float32(2**-23)  # fma differs here
    c[:10] = np.float32(-1)
    out = np.empty(n, np.float32)
    ptrs = [t.ctypes.data for t in (a, b, c, out)]
    for op, fn in enumerate([np.add, np.subtract, np.multiply, np.divide]):
        sim.lib.sim_test_float_op(op, *ptrs, n)
        assert np.array_equal(out, fn(a, b)), op
    sim.lib.sim_test_float_op(4, *ptrs, n)
    want = np.array([_round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                     for x, y, z in zip(a, b, c)], np.float32)
    assert np.array_equal(out, want)
    assert not np.array_equal(out[:10], a[:10] * b[:10] + c[:10])  # one rounding, not two


@pytest.mark.parametrize("begin_bit,end_bit", [(0, 32), (0, 7), (3, 9)])
def test_sort_pairs_is_a_stable_sort_on_the_key_bits(sim, begin_bit, end_bit):
    rng = np.random.default_rng(end_bit)
    n = 5000
    keys = rng.integers(0, 2**12, n).astype(np.uint32)
    ids = np.arange(n, dtype=np.int32)
    keys_in, ids_in = dev_array(sim, keys.view(np.int32), torch.int32), dev_array(sim, ids, torch.int32)
    keys_out, ids_out = sim.empty((n,), torch.int32), sim.empty((n,), torch.int32)
    status = sim.lib.sim_test_sort_pairs(*(sim.ptr(t) for t in (keys_in, keys_out, ids_in, ids_out)), n, begin_bit,
                                         end_bit)
    assert status == SUCCESS
    field = (keys >> begin_bit) & ((1 << (end_bit - begin_bit)) - 1 if end_bit - begin_bit < 32 else 0xFFFFFFFF)
    order = np.argsort(field, kind="stable")
    assert np.array_equal(ids_out.numpy(), order)
    assert np.array_equal(keys_out.numpy().view(np.uint32), keys[order])
