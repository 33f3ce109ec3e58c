// popc op library: GatherMatMulTQ / GatherMatMulQ on the CPU (see popc_kernels.h): the float
// gathers' math on block-quantized rows, four selected rows at a time through quant_rows.h's
// dot and axpy (the same inner loops as the fused decode on quantized rows).
#include <algorithm>
#include <vector>

#include "cpu_simd.h"
#include "popc_kernels.h"
#include "quant_rows.h"

namespace popc {

using namespace cpu;

// ---- GatherMatMulTQ ------------------------------------------------------------------
template <class T>
int64_t CpuGatherMatMulTQ<T>::task_count() const {
  const int64_t total = rows * K;
  return total == 0 ? 0 : (total + block - 1) / block;
}

template <class T>
void CpuGatherMatMulTQ<T>::run_task(int64_t task) const {
  const int64_t total = rows * K;
  const int64_t begin = task * block, end = std::min(total, begin + block);
  thread_local std::vector<float> xbuf;
  for (int64_t e = begin; e < end;) {
    const int64_t r = e / K;
    const float* x = float_row(X + r * H, H, xbuf);  // this token's activations, widened once
    const int64_t stop = std::min(end, (r + 1) * K);
    while (e < stop) {
      const int64_t n = std::min<int64_t>(kQuantStreams, stop - e);
      QuantRow<T> w[kQuantStreams];
      for (int s = 0; s < kQuantStreams; ++s) w[s] = W.row(I[e + (s < n ? s : 0)], H);
      float out[kQuantStreams];
      quant_dot_x4(use_avx2, W.bits, W.block, x, H, 1, w, out);
      for (int64_t s = 0; s < n; ++s) Y[e + s] = Elem<T>::from_float(out[s]);
      e += n;
    }
  }
}

// ---- GatherMatMulQ -------------------------------------------------------------------
template <class T>
int64_t CpuGatherMatMulQ<T>::task_count() const {
  return rows * ((H + block - 1) / block);
}

template <class T>
void CpuGatherMatMulQ<T>::run_task(int64_t task) const {
  // Columns [h0, h0 + len) of one row: len is a multiple of the quantization block, so the
  // slice of each weight row starts at a byte and at a scale of its own.
  const int64_t blocks = (H + block - 1) / block;
  const int64_t r = task / blocks;
  const int64_t h0 = (task % blocks) * block, len = std::min(H, h0 + block) - h0;
  const int64_t* idx = I + r * K;
  thread_local std::vector<float> zbuf, acc;
  const float* z = float_row(Z + r * K, K, zbuf);
  acc.assign(static_cast<size_t>(len), 0.0f);
  auto slice = [&](int64_t k) {
    QuantRow<T> w = W.row(idx[k], H);
    return QuantRow<T>{w.q + h0 * W.bits / 8, w.s + h0 / W.block};
  };
  for (int64_t k = 0; k < K; k += kQuantStreams) {
    const int64_t n = std::min<int64_t>(kQuantStreams, K - k);
    for (int64_t p = k + kQuantStreams; p < std::min(K, k + 2 * kQuantStreams); ++p)  // the next four rows
      prefetch_quant_row(slice(p), len, W.bits, W.block);
    QuantRow<T> w[kQuantStreams];
    float zz[kQuantStreams];
    for (int s = 0; s < kQuantStreams; ++s) {
      w[s] = slice(k + (s < n ? s : 0));
      zz[s] = s < n ? z[k + s] : 0.0f;
    }
    quant_axpy_x4(use_avx2, W.bits, W.block, acc.data(), len, 1, w, zz);
  }
  narrow(acc.data(), len, Y + r * H + h0);
}

#define POPC_INSTANTIATE(T)            \
  template struct CpuGatherMatMulTQ<T>; \
  template struct CpuGatherMatMulQ<T>;
POPC_FOR_EACH_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc
