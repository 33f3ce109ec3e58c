"""Block quantization of weight rows: the scheme every quantized popc export uses.

A matrix ``W [N, K]`` is quantized along K in blocks of ``block_size`` consecutive
elements (K a multiple of the block), one float32 scale per block, symmetric (no zero
points: the implicit zero point is the midpoint, 8 for 4 bits and 128 for 8 bits), the
layout ONNX Runtime's ``com.microsoft.MatMulNBits`` and ``GatherBlockQuantized`` read:

* int4: ``q = clamp(round(w / d) + 8, 0, 15)`` with ``d = m / -8``, ``m`` the block's
  element of largest magnitude (with its sign; llama.cpp's Q4_0 rule). Two elements per
  byte, element ``2i`` in the low nibble of byte ``i``. ``packed [N, K / 2]`` uint8.
* int8: ``q = clamp(round(w / d), -127, 127) + 128`` with ``d = max|w| / 127`` (Q8_0's
  rule), ``packed [N, K]`` uint8.
* ``scales [N, K / block_size]`` float32; ``w ~= d * (q - zero_point)``.

The rules are idempotent: weights that already are such blocks (a Q4_0 or Q8_0 GGUF,
dequantized to float32 when it was loaded) quantize back to the same integers and
scales, so the mapping is lossless where the blocks line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popc.errors import PopcError

BITS = {"int4": 4, "int8": 8}
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits on the CPU: int8 activations (what onnxruntime-genai picks)


@dataclass(frozen=True)
class QuantScheme:
    """How an export's weights are quantized (recorded in popc.json)."""

    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL

    @classmethod
    def parse(cls, name: str, block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = DEFAULT_ACCURACY_LEVEL):
        if name not in BITS:
            raise PopcError(f"unknown --quant {name!r}; choose one of: {', '.join(BITS)}")
        if block_size < 16 or block_size & (block_size - 1):
            raise PopcError(f"--block-size must be a power of two >= 16 (MatMulNBits' rule), not {block_size}")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise PopcError(f"--accuracy-level must be 0..4 (MatMulNBits' accuracy_level), not {accuracy_level}")
        return cls(BITS[name], block_size, accuracy_level)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def config(self) -> dict:
        return {
            "scheme": self.name,
            "bits": self.bits,
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
            "symmetric": True,
            "zero_point": self.zero_point,
            "scales": "float32, one per block of block_size consecutive elements of a row",
            "rule": "int4: d = signed absmax / -8 (Q4_0); int8: d = absmax / 127 (Q8_0)",
        }


def check_blocks(k: int, block_size: int, what: str = "a weight row") -> None:
    if k % block_size:
        raise PopcError(f"{what} has {k} elements, not a multiple of the quantization block {block_size}")


def quantize_rows(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """``w [N, K]`` float -> (packed uint8, scales float32 [N, K / block])."""
    n, k = w.shape
    check_blocks(k, scheme.block_size)
    blocks = np.asarray(w, np.float32).reshape(n, k // scheme.block_size, scheme.block_size)
    if scheme.bits == 4:
        index = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, index, axis=-1)[..., 0]
        scales = (extreme / np.float32(-8.0)).astype(np.float32)
        low, high = -8, 7
    else:
        scales = (np.abs(blocks).max(axis=-1) / np.float32(127.0)).astype(np.float32)
        low, high = -127, 127
    safe = np.where(scales == 0, np.float32(1.0), scales)[..., None]
    q = np.clip(np.rint(blocks / safe), low, high).astype(np.int32) + scheme.zero_point
    q = q.reshape(n, k).astype(np.uint8)
    if scheme.bits == 4:
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q), np.ascontiguousarray(scales)


def unpack(packed: np.ndarray, scheme: QuantScheme, k: int) -> np.ndarray:
    """The stored integers ``q [N, K]`` (0 .. 2^bits - 1) of ``packed``."""
    if scheme.bits == 8:
        return packed.astype(np.int32)
    q = np.empty((packed.shape[0], k), np.int32)
    q[:, 0::2] = packed & 0x0F
    q[:, 1::2] = packed >> 4
    return q


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, scheme: QuantScheme, k: int) -> np.ndarray:
    """The float32 matrix ``[N, K]`` that (packed, scales) stand for."""
    q = unpack(packed, scheme, k) - scheme.zero_point
    n = q.shape[0]
    blocks = q.reshape(n, k // scheme.block_size, scheme.block_size).astype(np.float32)
    return (blocks * scales[..., None]).reshape(n, k)


def fake_quantize(w: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """``w`` as the quantized export stores it (quantize, then dequantize), same shape."""
    packed, scales = quantize_rows(w, scheme)
    return dequantize_rows(packed, scales, scheme, w.shape[1])


def quantized_bytes(n: int, k: int, scheme: QuantScheme) -> int:
    """Bytes a quantized ``[N, K]`` matrix occupies: packed integers and float32 scales."""
    return n * k * scheme.bits // 8 + n * (k // scheme.block_size) * 4
