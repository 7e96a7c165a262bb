"""Packed bytes to float16 tensor-core operands, one bit plane at a time (Triton helpers of the kernels).

A plane of a tile's packed bytes ``[T, C]`` holds one code a byte (``quantize.pack_codes``). On the GPU
the codes become float16 through bit operations in PTX (``_half_codes_asm``); elsewhere (the interpreter,
float32 models) through integer shifts and a conversion. Both give exact codes.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _half_codes_asm(shift: int, bits: int, dequantize: bool) -> tl.constexpr:
    """PTX turning four packed bytes (``$2``) into the float16 codes of one plane, two half2 registers.

    No integer-to-float conversion (a quarter-rate instruction) is used. Plain codes are masked in place
    and spread two to a register, as the bit patterns of float16 subnormals: ``code * 2**-24``, exact,
    four codes in four instructions (tensor cores multiply subnormals exactly; the caller scales the
    float32 sums back). Dequantized codes need normal numbers: each code goes under the float16 exponent
    of 1024 (mantissa step 1), 1024 is subtracted, then ``code * scale + zero`` (``$3, $4``; ``$5, $6``).
    """
    word = "w" if shift else "$2"
    lines = [".reg .b32 w, lo, hi, magic;"]
    if shift:
        lines.append(f"shr.b32 w, $2, {shift};")
    if not dequantize:
        lines += [
            f"and.b32 w, {word}, {((1 << bits) - 1) * 0x01010101:#x};",
            "prmt.b32 $0, w, 0, 0x4140;",
            "prmt.b32 $1, w, 0, 0x4342;",
        ]
        return tl.constexpr("{\n" + "\n".join(lines) + "\n}")
    mask = ((1 << bits) - 1) * 0x10001
    lines += [
        "mov.b32 magic, 0x64006400;",
        f"prmt.b32 lo, {word}, 0, 0x4140;",
        f"prmt.b32 hi, {word}, 0, 0x4342;",
        f"lop3.b32 lo, lo, {mask:#x}, magic, 0xea;",
        f"lop3.b32 hi, hi, {mask:#x}, magic, 0xea;",
        "sub.f16x2 lo, lo, magic;",
        "sub.f16x2 hi, hi, magic;",
        "fma.rn.f16x2 $0, lo, $3, $5;",
        "fma.rn.f16x2 $1, hi, $4, $6;",
    ]
    return tl.constexpr("{\n" + "\n".join(lines) + "\n}")


# One text per (bits, plane): shifts and masks are immediates.
_CODES_2_0, _CODES_2_1, _CODES_2_2, _CODES_2_3 = (_half_codes_asm(2 * p, 2, False) for p in range(4))
_CODES_4_0, _CODES_4_1 = (_half_codes_asm(4 * p, 4, False) for p in range(2))
_CODES_8_0 = _half_codes_asm(0, 8, False)
_DEQUANTIZE_2_0, _DEQUANTIZE_2_1, _DEQUANTIZE_2_2, _DEQUANTIZE_2_3 = (_half_codes_asm(2 * p, 2, True) for p in range(4))
_DEQUANTIZE_4_0, _DEQUANTIZE_4_1 = (_half_codes_asm(4 * p, 4, True) for p in range(2))
_DEQUANTIZE_8_0 = _half_codes_asm(0, 8, True)


@triton.jit
def _run_asm(text: tl.constexpr, packed, scale, zero, DEQUANTIZE: tl.constexpr):
    if DEQUANTIZE:
        return tl.inline_asm_elementwise(
            text, "=r,=r,r,r,r,r,r", [packed, scale, zero], dtype=tl.float16, is_pure=True, pack=4
        )
    else:
        return tl.inline_asm_elementwise(text, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _half_codes(packed, scale, zero, PLANE: tl.constexpr, BITS: tl.constexpr, DEQUANTIZE: tl.constexpr):
    """Float16 codes (or ``code * scale + zero``) of one plane of packed bytes, through ``_half_codes_asm``."""
    if BITS == 8:
        if DEQUANTIZE:
            return _run_asm(_DEQUANTIZE_8_0, packed, scale, zero, True)
        else:
            return _run_asm(_CODES_8_0, packed, scale, zero, False)
    elif BITS == 4:
        if DEQUANTIZE:
            if PLANE == 0:
                return _run_asm(_DEQUANTIZE_4_0, packed, scale, zero, True)
            else:
                return _run_asm(_DEQUANTIZE_4_1, packed, scale, zero, True)
        else:
            if PLANE == 0:
                return _run_asm(_CODES_4_0, packed, scale, zero, False)
            else:
                return _run_asm(_CODES_4_1, packed, scale, zero, False)
    else:
        if DEQUANTIZE:
            if PLANE == 0:
                return _run_asm(_DEQUANTIZE_2_0, packed, scale, zero, True)
            elif PLANE == 1:
                return _run_asm(_DEQUANTIZE_2_1, packed, scale, zero, True)
            elif PLANE == 2:
                return _run_asm(_DEQUANTIZE_2_2, packed, scale, zero, True)
            else:
                return _run_asm(_DEQUANTIZE_2_3, packed, scale, zero, True)
        else:
            if PLANE == 0:
                return _run_asm(_CODES_2_0, packed, scale, zero, False)
            elif PLANE == 1:
                return _run_asm(_CODES_2_1, packed, scale, zero, False)
            elif PLANE == 2:
                return _run_asm(_CODES_2_2, packed, scale, zero, False)
            else:
                return _run_asm(_CODES_2_3, packed, scale, zero, False)


@triton.jit
def plane_codes(packed, PLANE: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Codes ``[T, C]`` of plane ``PLANE`` of packed bytes ``[T, C]``, times ``code_unit(ASM)`` (exact)."""
    if ASM:  # float16 subnormals
        return _half_codes(packed, packed, packed, PLANE, BITS, False)
    else:
        return ((packed.to(tl.int32) >> (PLANE * BITS)) & ((1 << BITS) - 1)).to(DTYPE)


@triton.jit
def code_unit(ASM: tl.constexpr):
    """What :func:`plane_codes` multiplies codes by: ``2**-24`` for float16 subnormals, else 1."""
    if ASM:
        return 5.9604644775390625e-08
    else:
        return 1.0


@triton.jit
def dequantized_plane(packed, scale, zero, PLANE: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr,
                       ASM: tl.constexpr):  # fmt: skip
    """``code * scale + zero`` of one plane of packed bytes, with ``scale`` and ``zero`` broadcastable to it."""
    if ASM:  # float16: one fused multiply-add per two codes
        scale = tl.broadcast_to(scale.to(tl.float16), packed.shape)
        zero = tl.broadcast_to(zero.to(tl.float16), packed.shape)
        return _half_codes(packed, scale, zero, PLANE, BITS, True)
    else:
        codes = plane_codes(packed, PLANE, BITS, DTYPE, ASM)
        return codes * scale.to(DTYPE) + zero.to(DTYPE)
