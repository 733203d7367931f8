"""Triton helpers shared by the kernels of several ops."""
import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, offsets, value, mask):
    """Stores fp32 ``value`` in ``ptr``'s dtype, rounding to nearest even. bf16 is rounded by hand because Triton's
    interpreter truncates fp32 -> bf16 casts; the rounded value is exact in bf16, so GPU and interpreter agree."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)
