// popc op library: compute kernels, independent of ONNX Runtime's headers.
//
// Both ops work on "rows": the leading dimensions [B, S] flattened into R = B * S.
//   GatherMatMulT: Y[r, k] = sum_h X[r, h] * W[I[r, k], h]      (X [R, H], I [R, K], Y [R, K])
//   GatherMatMul:  Y[r, h] = sum_k Z[r, k] * W[I[r, k], h]      (Z [R, K], I [R, K], Y [R, H])
// W is [N, H], row-major. Indices must lie in [0, N): callers validate them first
// (popc_ops.cc rejects the call with an ORT error); the CUDA kernels check again on
// the device and never read out of bounds.
//
// Element types: every kernel is a template over T (activations and output) and WT
// (weights, WT = T today). The types the library is built for are listed once, in
// POPC_FOR_EACH_TYPE; popc_ops.cc picks one per ORT tensor type at registration, so the
// kernels never branch on the type at run time. A new weight type (int8, int4) needs an
// `Elem<WT>` load/convert trait in popc_kernels_cpu.cc (and the .cu), not new loops.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace popc {

// IEEE binary16 storage (layout of Ort::Float16_t and CUDA's __half). A struct, not a bare
// uint16_t, so that templates can tell it from a future 16-bit integer weight type.
struct half {
  uint16_t bits;
};

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// bfloat16 storage (the upper half of a float32; layout of CUDA's __nv_bfloat16).
struct bfloat16 {
  uint16_t bits;
};

float bfloat16_to_float(uint16_t b);
uint16_t float_to_bfloat16(float f);  // round to nearest even; NaN stays NaN

// X(T) for each (activation = weight) type the quantized-row kernels are instantiated for.
#define POPC_FOR_EACH_TYPE(X) X(float) X(::popc::half)
// X(T) for the dense-row ops, the ones with CUDA kernels (GatherMatMul(T), PopSwiGLUDecode,
// PopGeGLUDecode, PopPartition): every CUDA kernel has a CPU twin for every type.
#define POPC_FOR_EACH_FLOAT_TYPE(X) X(float) X(::popc::half) X(::popc::bfloat16)

// ---- CPU ---------------------------------------------------------------------------
// Work is split into independent tasks so that a thread pool can run them in any
// order; run_task(i) for every i in [0, task_count()) computes the whole output.
template <class T, class WT = T>
struct CpuGatherMatMulT {
  const T* X; const WT* W; const int64_t* I; T* Y;
  int64_t rows, H, K;
  bool use_avx2;  // x86 AVX2+FMA+F16C path (checked at run time by the caller)
  int64_t block;  // output elements per task
  int64_t task_count() const;
  void run_task(int64_t task) const;
};

template <class T, class WT = T>
struct CpuGatherMatMul {
  const T* Z; const WT* W; const int64_t* I; T* Y;
  int64_t rows, H, K;
  bool use_avx2;
  int64_t block;  // output columns per task
  int64_t task_count() const;
  void run_task(int64_t task) const;
};

// PopSwiGLUDecode / PopGeGLUDecode: a whole POP-online FFN decode step, fused.
//   per row r (token) of X [rows, H], with its sequence's partition P[b] (RC channel ids,
//   the R retained first): g_j = act(X[r] . Wg[P[b, j]]) for every j; the top-K candidates
//   (j >= R) by |g_j| (by |g_j| * output_norm[id_j] when output_norm is set: the output-aware
//   score, config mode 2; ties to the lower j) plus all retained are "kept";
//   Y[r] = sum_{kept j} g_j * (X[r] . Wu[id_j]) * Wd[id_j].
// The rows of one call share their reads: each weight row is read once, for the union of
// the channels the rows need (gate: the union of their partitions; up/down: the union of
// what they kept), and applied to every row that needs it, in ascending channel id. A task
// walks its slice of that union as kStreams interleaved forward streams (one row from each
// per step), which keeps several hardware prefetch streams busy. Ids must be unique per
// sequence and in [0, D) (the caller validates them; prepare reports duplicates).
enum PopActivation { kSilu = 0, kGeluErf = 1, kGeluTanh = 2 };

// config[3] of a POP op: how channels are scored (popc/pop.py's PopSettings.mode).
enum PopScoreMode : int64_t { kScoreActivation = 0, kScoreStatic = 1, kScoreOutput = 2 };

// Rows one PopDecodePlan covers (one bit each in the channel masks); the op splits larger
// calls into groups of this many rows.
constexpr int64_t kPopRowsPerGroup = 64;

struct PopDecodePlan {
  int64_t row0 = 0, nrows = 0;         // the rows [row0, row0 + nrows) of X this plan covers
  std::vector<float> xf;               // [nrows, H] those rows of X, in float
  std::vector<uint64_t> gate_rows;     // [D] bit i: row row0 + i reads this channel's gate
  std::vector<uint64_t> keep_rows;     // [D] bit i: row row0 + i kept this channel
  std::vector<int32_t> gate_list;      // channels with gate_rows != 0, ascending
  std::vector<int32_t> keep_list;      // channels with keep_rows != 0, ascending
  std::vector<float> act;              // [nrows, D] gate activations (valid where gate_rows has the bit)
  std::vector<std::vector<int32_t>> kept;  // [nrows] each row's kept channels (select's output)
  std::vector<float> partial;          // [tasks, nrows, H] partial sums of Y
  std::vector<int32_t> seen;           // [D] scratch
  // accuracy_level >= 4 on quantized rows: X rounded to int8 per block (quant_rows.h's QuantX).
  std::vector<int8_t> xq;              // [nrows, H]
  std::vector<float> xs;               // [nrows, H / block]
  std::vector<float> x_lane_s;         // [nrows, H / 4]
  std::vector<int32_t> x_lane_zp;      // [nrows, H / 4]
};

// How the decode walk reaches a weight row (its one generalisation point: the walk, the
// union of channels and the streams are the same for every layout). Row is a handle to one
// row; row(ch, H) finds it. DenseRows: rows of WT (float, half), [D, H] row-major.
// QuantRows: block-quantized rows (popc/quantize.py): q uint8 [D, H * bits / 8] (int4: element
// 2i in the low nibble of byte i), s [D, H / block] scales of type ST, zero point 2^(bits-1),
// w[h] = s[h / block] * (q[h] - 2^(bits-1)). H must be a multiple of block (>= 16, a power of
// two; the op checks). The dot and axpy per layout are in pop_decode_cpu.cc / quant_rows.h.
template <class WT>
struct DenseRows {
  using Row = const WT*;
  const WT* w = nullptr;
  DenseRows() = default;
  DenseRows(const WT* rows) : w(rows) {}  // NOLINT: implicit, a dense weight is its pointer
  Row row(int64_t ch, int64_t H) const { return w + ch * H; }
  int64_t row_bytes(int64_t H) const { return H * static_cast<int64_t>(sizeof(WT)); }
};

template <class ST>
struct QuantRow {
  const uint8_t* q;  // the row's packed integers
  const ST* s;       // its block scales
};

template <class ST>
struct QuantRows {
  using Row = QuantRow<ST>;
  const uint8_t* q = nullptr;
  const ST* s = nullptr;
  int bits = 4;        // 4 or 8
  int64_t block = 32;  // elements per scale
  Row row(int64_t ch, int64_t H) const { return {q + ch * (H * bits / 8), s + ch * (H / block)}; }
  int64_t row_bytes(int64_t H) const { return H * bits / 8; }
};

template <class T, class Rows = DenseRows<T>>
struct CpuPopDecode {
  const T* X; const int64_t* P; Rows Wg, Wu, Wd; T* Y;
  int64_t rows, seq, H, D, RC, R, K;
  int activation;
  bool use_avx2;
  // Quantized rows (MatMulNBits' levels): >= 4 takes the gate and up dots with X rounded to int8
  // per block (the bodies' Int8Activations); below 4, float X. Dense rows ignore it.
  int accuracy_level = 0;
  // [D] ||Wd[d, :]|| when the candidates are ranked output-aware (config mode 2), else nullptr.
  const T* output_norm = nullptr;
  // Phases of one group of rows (each phase's calls are independent and may run in parallel):
  // prepare(row0, nrows) -> gate(gate_list slice) x tasks -> select(row) x nrows -> gather_kept
  // -> updown(keep_list slice, partial of that task) x tasks -> finish(tasks).
  // prepare returns false on a duplicate channel id in a partition.
  bool prepare(PopDecodePlan& p, int64_t row0, int64_t nrows) const;
  void gate(PopDecodePlan& p, int64_t begin, int64_t end) const;
  void select(PopDecodePlan& p, int64_t i) const;
  void gather_kept(PopDecodePlan& p) const;
  void updown(const PopDecodePlan& p, int64_t begin, int64_t end, float* out) const;
  void finish(PopDecodePlan& p, int64_t tasks) const;  // sums the tasks' partials into Y
};

// GatherMatMulTQ / GatherMatMulQ: GatherMatMulT / GatherMatMul on quantized rows W (see
// QuantRows; ST the scales' type, = T). Same tasks contract as the float gathers.
template <class T>
struct CpuGatherMatMulTQ {
  const T* X; QuantRows<T> W; const int64_t* I; T* Y;
  int64_t rows, H, K;
  bool use_avx2;
  int64_t block;  // output elements per task
  int64_t task_count() const;
  void run_task(int64_t task) const;
};

template <class T>
struct CpuGatherMatMulQ {
  const T* Z; QuantRows<T> W; const int64_t* I; T* Y;
  int64_t rows, H, K;
  bool use_avx2;
  int64_t block;  // output columns per task (a multiple of W.block)
  int64_t task_count() const;
  void run_task(int64_t task) const;
};

// PopPartition: POP-online's prefill scoring and ranking, fused.
//   Z [B, T, D] (the FFN's channel activations), token_mask float [B, T]:
//   score[b, d] = sqrt(sum_t (Z[b,t,d] / (||Z[b,t,:]|| + 1e-12) * mask[b,t])^2), or
//   static_score[d] when `use_static`; times output_norm[d] (= ||Wd[d, :]||, the output-aware
//   score, config mode 2) when `output_norm` is set; out[b, :] = the `count` channels of
//   highest score, in decreasing score (ties to the lower channel id, as ONNX TopK).
template <class ZT>
struct CpuPopPartition {
  const ZT* Z; const float* mask; const ZT* static_score; int64_t* out;
  int64_t B, T, D, count;
  bool use_static;
  std::vector<float>* inv_norm;  // [B * T] scratch
  std::vector<double>* score;    // [B * D] scratch
  const ZT* output_norm = nullptr;  // [D]: weights the scores (not with use_static)
  void norms(int64_t row) const;                 // one (b, t) row: inv_norm = mask / (norm + eps)
  void scores(int64_t b, int64_t d0, int64_t d1) const;  // score[b, d0..d1)
  void rank(int64_t b) const;                    // out[b, :]
};

// The first index outside [0, n) in idx[0..count), or -1 when all are valid.
int64_t first_bad_index(const int64_t* idx, int64_t count, int64_t n);

// Whether this CPU has AVX2, FMA and F16C (and POPC_OPLIB_NO_AVX2 is not set).
bool cpu_has_avx2();

// The CUDA kernels' host interface is popc_cuda.h (only in builds with POPC_WITH_CUDA).

}  // namespace popc
