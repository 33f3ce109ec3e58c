// popc op library: quantized weight rows against int8 activations (internal header).
//
// The dots of quant_rows.h with X rounded to int8 per block (accuracy_level >= 4): the decode
// walk (pop_decode_cpu.cc) quantizes X once per step and takes its gate and up dots here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_rows.h"

namespace popc::cpu {
// ---- int8 activations (accuracy_level >= 4) -------------------------------------------------
// The decode step's gate and up dots with X rounded to int8 per block of the weights' block
// (the bodies' Int8Activations): s_x = max|x_block| / 127 (1 where that is 0), q_x =
// clip(round_half_even(x / s_x), -127, 127), and per block x . w = s_x s_w sum q_x (q_w - zp),
// the integer sum exact. prepare quantizes X once per step (quantize_x_row); the dots below
// read what it wrote.
//
// AVX2 works on chunks of 32 elements: per chunk, an int8 weight row is 32 bytes in order; an
// int4 one is 16 bytes, unpacked to [16 low nibbles | 16 high nibbles] (elements 0, 2, .., 30,
// then 1, 3, .., 31 of the chunk), so q_x is stored in that order (de-interleaved once per
// step, instead of re-interleaving the nibbles for each weight row). vpmaddubsw + vpmaddwd by
// ones leave 8 int32 lanes of 4 elements each; a lane's elements share a block (blocks >= 16,
// lanes within 8 aligned elements), so prepare writes each lane's s_x (lane_s) and, int4, zp
// times its sum of q_x (lane_zp: the zero point as one integer subtraction). The weight
// scales of a chunk are a broadcast (blocks >= 32) or two scales spread over the lanes
// (blocks of 16). int4: unsigned nibbles x signed q_x (|pair| <= 2 * 15 * 127); int8: signed
// q_w = q ^ 0x80 by the sign trick, |q_w| x sign(q_x, q_w) (|pair| <= 2 * 128 * 127): no int16
// saturation either way. A row whose H is not a multiple of 32 ends with 16 elements in natural
// order, taken by the portable block dot.
constexpr int64_t kXChunk = 32;

// X's rows quantized (the plan's buffers; row i at q + i * H, s + i * (H / block), lane_s and
// lane_zp + i * (H / 4)).
struct QuantX {
  const int8_t* q;         // [rows, H] q_x (AVX2 int4: each whole chunk de-interleaved)
  const float* s;          // [rows, H / block] s_x per block
  const float* lane_s;     // [rows, H / 4] AVX2: s_x of each chunk's 8 lanes
  const int32_t* lane_zp;  // [rows, H / 4] AVX2 int4: zp * sum q_x of each lane
  int64_t H, block;
};

// Whether the AVX2 int4 layout (de-interleaved chunks) applies: the kernels and prepare agree on it.
inline bool x_deinterleaved(bool use_avx2, int bits) { return use_avx2 && bits == 4; }

// The first element (chunk-relative) of int32 lane l of a chunk, in the AVX2 layout of `bits`.
inline int lane_first(int bits, int l) { return bits == 4 ? 8 * (l & 3) + (l >> 2) : 4 * l; }

// One row of X (float) quantized into q [H], s [H / block], lane_s and lane_zp [H / 4].
inline void quantize_x_row(const float* x, int64_t H, int64_t block, int bits, bool use_avx2, int8_t* q, float* s,
                           float* lane_s, int32_t* lane_zp) {
  int8_t natural[kXChunk];
  const bool deinterleave = x_deinterleaved(use_avx2, bits);
  for (int64_t b = 0; b < H / block; ++b) {
    const float* xb = x + b * block;
    float m = 0.0f;
    for (int64_t e = 0; e < block; ++e) m = std::max(m, std::fabs(xb[e]));
    const float scale = m / 127.0f;
    const float safe = scale == 0.0f ? 1.0f : scale;
    s[b] = safe;
    for (int64_t e = 0; e < block; ++e) {
      const float r = std::nearbyint(xb[e] / safe);  // half to even (the default rounding mode)
      q[b * block + e] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
    }
  }
  const int zp = 1 << (bits - 1);
  for (int64_t c = 0; c + kXChunk <= H; c += kXChunk) {
    int8_t* qc = q + c;
    if (deinterleave) {
      std::memcpy(natural, qc, kXChunk);
      for (int j = 0; j < 16; ++j) qc[j] = natural[2 * j], qc[16 + j] = natural[2 * j + 1];
    }
    for (int l = 0; l < 8; ++l) {
      lane_s[c / 4 + l] = s[(c + lane_first(bits, l)) / block];
      lane_zp[c / 4 + l] = zp * (qc[4 * l] + qc[4 * l + 1] + qc[4 * l + 2] + qc[4 * l + 3]);
    }
  }
}

// sum_{h in [h0, h0 + n)} (q_w[h] - zp) q_x[h], q_x in natural order (exact).
template <int Bits, class ST>
inline int32_t qx_dot_span(const QuantRow<ST>& r, const int8_t* qx, int64_t h0, int64_t n) {
  constexpr int zp = 1 << (Bits - 1);
  int32_t sum = 0;
  for (int64_t h = h0; h < h0 + n; ++h) {
    int q;
    if constexpr (Bits == 4) q = (r.q[h >> 1] >> ((h & 1) << 2)) & 0xF;
    else q = r.q[h];
    sum += (q - zp) * qx[h];
  }
  return sum;
}

// Blocks [b0, H / block) of a row: sum_b float(sum q_x (q_w - zp)) * (s_w s_x).
template <int Bits, class ST>
inline float qx_dot_blocks(const QuantRow<ST>& r, const int8_t* qx, const float* sx, int64_t H, int64_t block,
                           int64_t b0) {
  float acc = 0.0f;
  for (int64_t b = b0; b < H / block; ++b)
    acc += static_cast<float>(qx_dot_span<Bits>(r, qx, b * block, block)) * (Elem<ST>::to_float(r.s[b]) * sx[b]);
  return acc;
}

template <int Bits, class ST>
void quant_dot_x4_i8_portable(const QuantX& x, uint64_t mask, const QuantRow<ST>* w, float* out) {
  const int64_t H = x.H, block = x.block;
  for (; mask; mask &= mask - 1) {
    const int i = __builtin_ctzll(mask);
    for (int s = 0; s < kQuantStreams; ++s)
      out[i * kQuantStreams + s] = qx_dot_blocks<Bits>(w[s], x.q + i * H, x.s + i * (H / block), H, block, 0);
  }
}

#if POPC_X86
inline int block_shift(int64_t block) { return __builtin_ctzll(static_cast<uint64_t>(block)); }  // a power of two

// Chunk c's (elements [32c, 32c + 32)) weight scales over the 8 lanes.
template <int Bits, class ST>
POPC_AVX2 inline __m256 chunk_scales(const ST* s, int64_t c, int64_t block) {
  if (block >= kXChunk) return scale8(s + ((c * kXChunk) >> block_shift(block)));
  __m128 two;  // blocks of 16: the chunk's two scales
  if constexpr (std::is_same_v<ST, float>) {
    two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s + 2 * c)));
  } else {
    uint32_t v;
    std::memcpy(&v, s + 2 * c, 4);
    two = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(v)));
  }
  const __m256i spread = Bits == 4 ? _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), spread);
}

// Chunk c of a weight row as the unsigned operand of vpmaddubsw (int4: the 32 nibbles, low then
// high; int8: |q - 128|) and, int8, the signed weights the sign trick takes q_x's signs from.
template <int Bits>
struct WChunk {
  __m256i u, sgn;
  POPC_AVX2 WChunk(const uint8_t* q, int64_t c) {
    if constexpr (Bits == 4) {
      const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16)));
      u = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
      sgn = u;
    } else {
      sgn = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * 32)), _mm256_set1_epi8(-128));
      u = _mm256_abs_epi8(sgn);
    }
  }
  // The 8 int32 lanes of sum q_x (q_w - zp) for one row's chunk (xq: its 32 q_x; zp: lane_zp).
  POPC_AVX2 __m256i dot(const int8_t* xq, const int32_t* zp) const {
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    if constexpr (Bits == 8) x = _mm256_sign_epi8(x, sgn);
    __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
    if constexpr (Bits == 4) d = _mm256_sub_epi32(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zp)));
    return d;
  }
};

// Rows of X two at a time: each weight chunk unpacked once feeds both.
template <int Bits, class ST>
POPC_AVX2 void quant_dot_x4_i8_avx2(const QuantX& x, uint64_t mask, const QuantRow<ST>* w, float* out) {
  const int64_t H = x.H, block = x.block, chunks = H / kXChunk;
  const uint8_t *q0 = w[0].q, *q1 = w[1].q, *q2 = w[2].q, *q3 = w[3].q;
  while (mask) {
    const auto [i, j] = take_row_pair(mask);
    const int8_t *xi = x.q + i * H, *xj = x.q + j * H;
    const float *si = x.lane_s + i * (H / 4), *sj = x.lane_s + j * (H / 4);
    const int32_t *zi = x.lane_zp + i * (H / 4), *zj = x.lane_zp + j * (H / 4);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
#define POPC_I8_STREAM(k, A, B)                                                                         \
  {                                                                                                     \
    const WChunk<Bits> wc(q##k, c);                                                                     \
    const __m256 sw = chunk_scales<Bits>(w[k].s, c, block);                                             \
    A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wc.dot(xi + c * kXChunk, zi + c * 8)),                       \
                        _mm256_mul_ps(sw, _mm256_loadu_ps(si + c * 8)), A);                             \
    if (pair)                                                                                           \
      B = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wc.dot(xj + c * kXChunk, zj + c * 8)),                     \
                          _mm256_mul_ps(sw, _mm256_loadu_ps(sj + c * 8)), B);                           \
  }
    if (i == j) {
      constexpr bool pair = false;
      for (int64_t c = 0; c < chunks; ++c) {
        POPC_I8_STREAM(0, a0, b0) POPC_I8_STREAM(1, a1, b1) POPC_I8_STREAM(2, a2, b2) POPC_I8_STREAM(3, a3, b3)
      }
    } else {
      constexpr bool pair = true;
      for (int64_t c = 0; c < chunks; ++c) {
        POPC_I8_STREAM(0, a0, b0) POPC_I8_STREAM(1, a1, b1) POPC_I8_STREAM(2, a2, b2) POPC_I8_STREAM(3, a3, b3)
      }
    }
#undef POPC_I8_STREAM
    // The tail: H % 32 == 16 (blocks of 16), in natural order.
    const int64_t b0_tail = chunks * kXChunk / block;
    const float *sbi = x.s + i * (H / block), *sbj = x.s + j * (H / block);
    float* oi = out + i * kQuantStreams;
    oi[0] = hsum256(a0) + qx_dot_blocks<Bits>(w[0], xi, sbi, H, block, b0_tail);
    oi[1] = hsum256(a1) + qx_dot_blocks<Bits>(w[1], xi, sbi, H, block, b0_tail);
    oi[2] = hsum256(a2) + qx_dot_blocks<Bits>(w[2], xi, sbi, H, block, b0_tail);
    oi[3] = hsum256(a3) + qx_dot_blocks<Bits>(w[3], xi, sbi, H, block, b0_tail);
    if (j != i) {
      float* oj = out + j * kQuantStreams;
      oj[0] = hsum256(b0) + qx_dot_blocks<Bits>(w[0], xj, sbj, H, block, b0_tail);
      oj[1] = hsum256(b1) + qx_dot_blocks<Bits>(w[1], xj, sbj, H, block, b0_tail);
      oj[2] = hsum256(b2) + qx_dot_blocks<Bits>(w[2], xj, sbj, H, block, b0_tail);
      oj[3] = hsum256(b3) + qx_dot_blocks<Bits>(w[3], xj, sbj, H, block, b0_tail);
    }
  }
}
#endif  // POPC_X86

// out[i * 4 + s] = x_i . w_s on int8 X (prepare's QuantX, laid out for use_avx2).
template <class ST>
inline void quant_dot_x4_i8(bool use_avx2, int bits, const QuantX& x, uint64_t mask, const QuantRow<ST>* w,
                            float* out) {
#if POPC_X86
  if (use_avx2) {
    if (bits == 4) quant_dot_x4_i8_avx2<4>(x, mask, w, out);
    else quant_dot_x4_i8_avx2<8>(x, mask, w, out);
    return;
  }
#endif
  if (bits == 4) quant_dot_x4_i8_portable<4>(x, mask, w, out);
  else quant_dot_x4_i8_portable<8>(x, mask, w, out);
}

}  // namespace popc::cpu
