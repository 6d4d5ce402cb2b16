"""Binary tensors stored as bits: 8 values per byte, in the tensor's memory order.

pack:   bytes[i] = Σ_j [v[8i + j] != 0] << j   over a dense tensor's storage (its last byte zero-padded);
        with CHECK, the number of values that are neither 0 nor 1 is added to a counter (one atomic per program).
unpack: v[8i + j] = (bytes[i] >> j) & 1, written in the output's dtype.
Each program handles BLOCK bytes = 8·BLOCK values: a [BLOCK, 8] tile, each thread a row of 8 contiguous values
(16 or 32 bytes, vector loads) and one byte.
"""
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _pack_bits_kernel(p_x, p_bits, p_bad, numel, CHECK: tl.constexpr, BLOCK: tl.constexpr):
    o_byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_bit = tl.arange(0, 8)
    o = o_byte[:, None] * 8 + o_bit[None, :]
    m = o < numel
    b_x = tl.load(p_x + o, mask=m, other=0.0)
    b_on = (b_x != 0).to(tl.int32)
    b_byte = tl.sum(b_on << o_bit[None, :], axis=1)
    tl.store(p_bits + o_byte, b_byte.to(tl.uint8), mask=o_byte * 8 < numel)
    if CHECK:
        b_bad = tl.sum(tl.sum(((b_x != 0) & (b_x != 1) & m).to(tl.int32), axis=1), axis=0)
        tl.atomic_add(p_bad, b_bad)


@triton.jit
def _unpack_bits_kernel(p_bits, p_x, numel, BLOCK: tl.constexpr):
    o_byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_bit = tl.arange(0, 8)
    o = o_byte[:, None] * 8 + o_bit[None, :]
    b_byte = tl.load(p_bits + o_byte, mask=o_byte * 8 < numel, other=0).to(tl.int32)
    b_x = (b_byte[:, None] >> o_bit[None, :]) & 1
    tl.store(p_x + o, b_x.to(p_x.dtype.element_ty), mask=o < numel)


def packed_bytes(numel: int) -> int:
    return -(-numel // 8)


def pack_bits(flat, bits, bad):
    """flat: the values of a dense tensor in memory order (1-D view); bits: uint8 [packed_bytes(numel)];
    bad: int32 [1] counter of non-binary values, or None (unchecked)."""
    numel = flat.numel()
    _pack_bits_kernel[(-(-packed_bytes(numel) // BLOCK),)](flat, bits, bits if bad is None else bad, numel,
                                                            CHECK=bad is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def unpack_bits(bits, flat):
    """flat: a 1-D output of numel values (the memory of a dense tensor), written 0/1 in its dtype."""
    numel = flat.numel()
    _unpack_bits_kernel[(-(-packed_bytes(numel) // BLOCK),)](bits, flat, numel, BLOCK=BLOCK, num_warps=NUM_WARPS)
