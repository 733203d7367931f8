"""Triton helpers shared by the kernels of several ops."""
import os

import triton
import triton.language as tl

# Whether this process runs Triton's interpreter (it must be set before triton is imported, so it cannot change
# later). A global constexpr is resolved when a kernel is compiled: GPU builds contain no trace of the branch below.
_INTERPRETER: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def store_rounded(ptr, offsets, value, mask):
    """Stores fp32 ``value`` in ``ptr``'s dtype, rounding to nearest even. Only under the interpreter, bf16 is
    rounded by hand, because the interpreter truncates fp32 -> bf16 casts; the hand-rounded value is exact in bf16,
    so its cast is the GPU's round-to-nearest-even cast (``cvt.rn.bf16.f32``), bit for bit. NaN is left as it is
    (adding the rounding bias to a NaN's payload could carry into its sign)."""
    if _INTERPRETER:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = tl.where(value == value, bits.to(tl.float32, bitcast=True), value)
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)
