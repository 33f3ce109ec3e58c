// popc op library: the ops on block-quantized weight rows, CPU (ONNX Runtime side; the compute
// is in quant_kernels_cpu.cc, pop_decode_cpu.cc and quant_rows.h). Definitions and function
// bodies: templates/ops.py and templates/pop_ffn_quant.py; the layout: popc/quantize.py.
//
//   GatherMatMulTQ(X [.., H], Wq uint8 [N, H*bits/8], Ws [N, H/block_size], I int64 [.., K]) -> [.., K]
//   GatherMatMulQ (Z [.., K], Wq, Ws, I) -> [.., H]
//   PopSwiGLUDecodeQ / PopGeGLUDecodeQ (X, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds,
//       output_norm) -> Y (accuracy_level >= 4: the gate and up dots on X rounded to int8 per block)
//   PopSwiGLUQ / PopGeGLUQ (X, token_mask, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds,
//       static_score, output_norm) -> (Y, partition_out): the whole FFN, float32 only. Prefill dequantizes the
//       three matrices into float scratch (kept per calling thread, reused by every layer and
//       call) and runs the float whole-FFN prefill; decode runs the fused quantized decode.
// output_norm [D] (the dequantized down rows' norms, for config[3] = 2, the output-aware score) is
// optional, as in pop_ops_cpu.cc, so that exports made before it still run.
// Attributes bits (4 or 8) and block_size (a power of two >= 16); the scales have the
// activations' type (float32 or float16). Index contract and errors as the float ops: every
// violation is an ORT error naming the op and the shapes, before any weight is read.
//
// All are CPU kernels registered as `fused` and without CUDA kernels: POPC_OPLIB_FUSED=0 and
// POPC_OPLIB_PROVIDER=cuda (popc's CUDA sessions) leave them out, and the function bodies run there.
#include <algorithm>
#include <string>
#include <vector>

#include "pop_ffn_ort.h"
#include "quant_rows.h"

namespace popc::ort {
namespace {

inline constexpr ONNXTensorElementDataType kUint8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

// bits and block_size as the node has them (the functions' defaults 4 and 32 otherwise); they are
// checked at each call, where a bad value can be an ORT error rather than a failed session.
// accuracy_level (the decode ops and the whole FFN; default 0): >= 4 takes the decode's gate and up
// dots on X rounded to int8 (as the bodies' DecodeActivations); anything below 4 (1..3 included,
// as MatMulNBits takes levels below 4 in float on the CPU) keeps X in float. Never an error.
struct QuantAttrs {
  int64_t bits = 4, block = 32, accuracy_level = 0;
  explicit QuantAttrs(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    try { bits = k.GetAttribute<int64_t>("bits"); } catch (const Ort::Exception&) {}
    try { block = k.GetAttribute<int64_t>("block_size"); } catch (const Ort::Exception&) {}
    try { accuracy_level = k.GetAttribute<int64_t>("accuracy_level"); } catch (const Ort::Exception&) {}
  }
  int level() const { return accuracy_level >= 4 ? 4 : 0; }
};

// Checks one quantized matrix (Wq, Ws) for rows of H elements; returns its rows N. `shapes` ends
// each message (the call's shapes).
int64_t check_quant(const char* op, const char* name, const std::vector<int64_t>& qs, const std::vector<int64_t>& ss,
                    int64_t H, const QuantAttrs& a, const std::string& shapes) {
  auto fail = [&](const std::string& what) {
    throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (" + shapes + ")"};
  };
  if (a.bits != 4 && a.bits != 8) fail("attribute bits must be 4 or 8, not " + std::to_string(a.bits));
  if (a.block < 16 || (a.block & (a.block - 1)))
    fail("attribute block_size must be a power of two >= 16, not " + std::to_string(a.block));
  if (H % a.block)
    fail("H = " + std::to_string(H) + " is not a multiple of block_size " + std::to_string(a.block));
  if (qs.size() != 2) fail(std::string(name) + "q must be 2-D [N, H * bits / 8]");
  if (qs[1] != H * a.bits / 8)
    fail(std::string(name) + "q must be [N, H * bits / 8] = [N, " + std::to_string(H * a.bits / 8) + "] for H = " +
         std::to_string(H) + " and bits = " + std::to_string(a.bits));
  if (ss != std::vector<int64_t>{qs[0], H / a.block})
    fail(std::string(name) + "s must be [N, H / block_size] = [" + std::to_string(qs[0]) + ", " +
         std::to_string(H / a.block) + "]");
  return qs[0];
}

template <class T>
popc::QuantRows<T> quant_rows(const Ort::ConstValue& q, const Ort::ConstValue& s, const QuantAttrs& a) {
  return {q.GetTensorData<uint8_t>(), static_cast<const T*>(s.GetTensorRawData()), static_cast<int>(a.bits), a.block};
}

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

// ---- GatherMatMulTQ / GatherMatMulQ --------------------------------------------------------
template <class T, bool Transposed>
struct CpuGatherQKernel {
  static constexpr const char* kName = Transposed ? "GatherMatMulTQ" : "GatherMatMulQ";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 4;
  static ONNXTensorElementDataType input_type(size_t i) {
    return i == 1 ? kUint8 : i == 3 ? kInt64 : onnx_type<T>();
  }
  static ONNXTensorElementDataType output_type() { return onnx_type<T>(); }
  bool use_avx2 = popc::cpu_has_avx2();
  QuantAttrs attrs;

  explicit CpuGatherQKernel(const OrtKernelInfo* info) : attrs(info) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = kName;
    return guarded(op, [&] {
      Ort::KernelContext ctx(context);
      auto a = ctx.GetInput(0), wq = ctx.GetInput(1), ws = ctx.GetInput(2), idx = ctx.GetInput(3);
      const auto as = shape_of(a), qs = shape_of(wq), ss = shape_of(ws), is = shape_of(idx);
      const std::string shapes = std::string(Transposed ? "X " : "Z ") + shape_str(as) + ", Wq " + shape_str(qs) +
                                 ", Ws " + shape_str(ss) + ", I " + shape_str(is);
      if (qs.size() != 2) throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": Wq must be 2-D (" + shapes + ")"};
      if (attrs.bits != 4 && attrs.bits != 8)
        check_quant(op, "W", qs, ss, 0, attrs, shapes);  // reports the bad attribute
      // H: X's last dimension (GatherMatMulTQ) or what Wq holds (GatherMatMulQ).
      const int64_t H = Transposed ? (as.empty() ? 0 : as.back()) : qs[1] * 8 / attrs.bits;
      const int64_t N = check_quant(op, "W", qs, ss, H, attrs, shapes);
      const Geometry g = check_shapes(op, Transposed, as, {N, H}, is);
      const int64_t* I = idx.GetTensorData<int64_t>();
      check_indices(op, I, g.rows * g.K, g.N);
      auto y = ctx.GetOutput(0, g.out_shape.data(), g.out_shape.size());
      const T* A = static_cast<const T*>(a.GetTensorRawData());
      T* Y = static_cast<T*>(y.GetTensorMutableRawData());
      const popc::QuantRows<T> W = quant_rows<T>(wq, ws, attrs);
      if constexpr (Transposed) {
        // ~32k multiply-adds per task: enough to amortise the thread-pool hand-off.
        const int64_t block = std::max<int64_t>(1, (32768 + g.H - 1) / std::max<int64_t>(g.H, 1));
        run_parallel(ctx, popc::CpuGatherMatMulTQ<T>{A, W, I, Y, g.rows, g.H, g.K, use_avx2, block});
      } else {
        const int64_t block = std::max<int64_t>(W.block, 256);  // columns per task, whole blocks
        run_parallel(ctx, popc::CpuGatherMatMulQ<T>{A, W, I, Y, g.rows, g.H, g.K, use_avx2, block});
      }
    });
  }
};

// ---- the decode step on quantized rows ------------------------------------------------------
// Inputs X, partition, config, then (Wq, Ws) of gate, up and down at w[0..6), and output_norm
// (nullptr where the node has none); Y written to y.
template <class T>
void pop_decode_q(Ort::KernelContext& ctx, const char* op, const Ort::ConstValue& x, const Ort::ConstValue& part,
                  const Ort::ConstValue& config, const Ort::ConstValue* w, const OrtValue* output_norm,
                  const QuantAttrs& attrs, int activation, bool use_avx2, T* y) {
  const auto xs = shape_of(x), ps = shape_of(part), cs = shape_of(config);
  const auto gq = shape_of(w[0]), gs = shape_of(w[1]);
  const std::string shapes = "X " + shape_str(xs) + ", partition " + shape_str(ps) + ", Wgq " + shape_str(gq) +
                             ", Wgs " + shape_str(gs);
  auto fail = [&](const std::string& what) {
    throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (" + shapes + ")"};
  };
  if (xs.size() != 3) fail("X must be [B, S, H]");
  if (ps.size() != 2 || ps[0] != xs[0]) fail("partition must be [B, R+C] with X's batch");
  const int64_t H = xs[2];
  const int64_t D = check_quant(op, "Wg", gq, gs, H, attrs, shapes);
  if (shape_of(w[2]) != gq || shape_of(w[4]) != gq || shape_of(w[3]) != gs || shape_of(w[5]) != gs)
    fail("Wgq, Wuq and Wdq must have one shape, and Wgs, Wus and Wds one shape (Wuq " + shape_str(shape_of(w[2])) +
         ", Wus " + shape_str(shape_of(w[3])) + ", Wdq " + shape_str(shape_of(w[4])) + ", Wds " +
         shape_str(shape_of(w[5])) + ")");
  if (cs.size() != 1 || cs[0] < 4) fail("config must be int64 [4]");
  const int64_t RC = ps[1];
  if (RC > D) fail("the partition has more channels than the FFN");
  const int64_t* I = part.GetTensorData<int64_t>();
  check_indices(op, I, ps[0] * RC, D);
  const int64_t* cfg = config.GetTensorData<int64_t>();
  const auto [R, K] = decode_split(cfg, RC);
  popc::CpuPopDecode<T, popc::QuantRows<T>> job{
      static_cast<const T*>(x.GetTensorRawData()), I, quant_rows<T>(w[0], w[1], attrs), quant_rows<T>(w[2], w[3], attrs),
      quant_rows<T>(w[4], w[5], attrs), y, xs[0] * xs[1], xs[1], H, D, RC, R, K, activation, use_avx2,
      attrs.level()};
  job.output_norm = output_norm_for<T>(op, output_norm, cfg, D);
  run_pop_decode(ctx, job, op);
}

// (X [B, S, H], partition int64 [B, RC], config int64 [4], Wgq, Wgs, Wuq, Wus, Wdq, Wds,
//  output_norm [D] (optional)) -> Y.
template <class T, bool GeGLU>
struct CpuPopDecodeQKernel {
  static constexpr const char* kName = GeGLU ? "PopGeGLUDecodeQ" : "PopSwiGLUDecodeQ";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 10;
  static constexpr size_t kRequiredInputs = 9;
  static ONNXTensorElementDataType input_type(size_t i) {
    return (i == 1 || i == 2) ? kInt64 : (i == 3 || i == 5 || i == 7) ? kUint8 : onnx_type<T>();
  }
  static ONNXTensorElementDataType output_type() { return onnx_type<T>(); }
  bool use_avx2 = popc::cpu_has_avx2();
  int activation = popc::kSilu;
  QuantAttrs attrs;

  explicit CpuPopDecodeQKernel(const OrtKernelInfo* info) : attrs(info) {
    if constexpr (GeGLU) activation = gelu_activation(info, "tanh");  // the function's default
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0);
      const auto xs = shape_of(x);
      auto y = ctx.GetOutput(0, xs.data(), xs.size());
      const Ort::ConstValue w[] = {ctx.GetInput(3), ctx.GetInput(4), ctx.GetInput(5),
                                   ctx.GetInput(6), ctx.GetInput(7), ctx.GetInput(8)};
      pop_decode_q<T>(ctx, kName, x, ctx.GetInput(1), ctx.GetInput(2), w, optional_input(ctx, 9), attrs, activation,
                      use_avx2, static_cast<T*>(y.GetTensorMutableRawData()));
    });
  }
};

// ---- PopSwiGLUQ / PopGeGLUQ: the whole FFN (float32) ------------------------------------------
// The float copies of the three matrices a prefill runs on: one set per calling thread, reused by
// every layer and call (3 * D * H floats at the largest FFN seen).
std::vector<float>& prefill_scratch() {
  thread_local std::vector<float> scratch;
  return scratch;
}

template <bool GeGLU>
struct CpuPopFfnQKernel {
  static constexpr const char* kName = GeGLU ? "PopGeGLUQ" : "PopSwiGLUQ";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 12;
  static constexpr size_t kRequiredInputs = 11;
  static constexpr size_t kOutputs = 2;
  static ONNXTensorElementDataType input_type(size_t i) {
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (i == 2 || i == 3) return kInt64;
    if (i == 4 || i == 6 || i == 8) return kUint8;
    return onnx_type<float>();
  }
  static ONNXTensorElementDataType output_type(size_t i) { return i == 0 ? onnx_type<float>() : kInt64; }
  bool use_avx2 = popc::cpu_has_avx2();
  int activation = popc::kSilu;
  QuantAttrs attrs;
  Ort::Op matmul{nullptr};

  explicit CpuPopFfnQKernel(const OrtKernelInfo* info) : attrs(info) {
    if constexpr (GeGLU) activation = gelu_activation(info, "tanh");  // the function's default
    matmul = float_matmul_op(info);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0), part = ctx.GetInput(2);
      const auto xs = shape_of(x), ps = shape_of(part);
      auto y = ctx.GetOutput(0, xs.data(), xs.size());
      const Ort::ConstValue w[] = {ctx.GetInput(4), ctx.GetInput(5), ctx.GetInput(6),
                                   ctx.GetInput(7), ctx.GetInput(8), ctx.GetInput(9)};
      const int64_t count = part.GetTensorTypeAndShapeInfo().GetElementCount();
      if (count == 0) return prefill(ctx, context, x, w, y.GetTensorMutableData<float>());
      pop_decode_q<float>(ctx, kName, x, part, ctx.GetInput(3), w, optional_input(ctx, 11), attrs, activation,
                          use_avx2, y.GetTensorMutableData<float>());
      auto out = ctx.GetOutput(1, ps.data(), ps.size());
      std::copy_n(part.GetTensorData<int64_t>(), count, out.GetTensorMutableData<int64_t>());
    });
  }

  void prefill(Ort::KernelContext& ctx, OrtKernelContext* context, const Ort::ConstValue& x, const Ort::ConstValue* w,
               float* y) {
    const auto xs = shape_of(x), gq = shape_of(w[0]), gs = shape_of(w[1]);
    const std::string shapes = "X " + shape_str(xs) + ", Wgq " + shape_str(gq) + ", Wgs " + shape_str(gs);
    if (xs.size() != 3) throw OpError{ORT_INVALID_ARGUMENT, std::string(kName) + ": X must be [B, S, H] (" + shapes + ")"};
    const int64_t H = xs[2];
    const int64_t D = check_quant(kName, "Wg", gq, gs, H, attrs, shapes);
    for (int m = 1; m < 3; ++m)
      if (shape_of(w[2 * m]) != gq || shape_of(w[2 * m + 1]) != gs)
        throw OpError{ORT_INVALID_ARGUMENT, std::string(kName) + ": Wgq, Wuq and Wdq must have one shape, and Wgs, "
                                                                 "Wus and Wds one shape (" + shapes + ", " +
                                                (m == 1 ? "Wuq " : "Wdq ") + shape_str(shape_of(w[2 * m])) + ", " +
                                                (m == 1 ? "Wus " : "Wds ") + shape_str(shape_of(w[2 * m + 1])) + ")"};
    std::vector<float>& scratch = prefill_scratch();
    scratch.resize(static_cast<size_t>(3 * D * H));
    const popc::QuantRows<float> rows[] = {quant_rows<float>(w[0], w[1], attrs), quant_rows<float>(w[2], w[3], attrs),
                                           quant_rows<float>(w[4], w[5], attrs)};
    constexpr int64_t kRowsPerTask = 64;
    const int64_t chunks = (D + kRowsPerTask - 1) / kRowsPerTask;
    float* base = scratch.data();
    const bool avx2 = use_avx2;
    parallel_for(ctx, 3 * chunks, [&](int64_t task) {
      const int64_t m = task / chunks, r0 = (task % chunks) * kRowsPerTask, r1 = std::min(D, r0 + kRowsPerTask);
      const popc::QuantRows<float>& q = rows[m];
      for (int64_t r = r0; r < r1; ++r)
        popc::cpu::dequant_row(avx2, q.bits, q.block, q.row(r, H), H, base + (m * D + r) * H);
    });
    pop_prefill(ctx, context, matmul, kName, activation, x, ctx.GetInput(1), ctx.GetInput(3), ctx.GetInput(10),
                optional_input(ctx, 11), base, base + D * H, base + 2 * D * H, D, H, y);
  }
};

template <class T> using GatherTQ = CpuGatherQKernel<T, true>;
template <class T> using GatherQ = CpuGatherQKernel<T, false>;
template <class T> using SwiGLUDecodeQ = CpuPopDecodeQKernel<T, false>;
template <class T> using GeGLUDecodeQ = CpuPopDecodeQKernel<T, true>;

}  // namespace

void add_pop_quant_cpu_ops(std::vector<Registration>& list) {
  add_each_type<GatherTQ>(list, true);
  add_each_type<GatherQ>(list, true);
  add_each_type<SwiGLUDecodeQ>(list, true);
  add_each_type<GeGLUDecodeQ>(list, true);
  // The whole FFN for float32 only, as the float one: other types run the function body.
  list.push_back({new Op<CpuPopFfnQKernel<false>>(), true, true});
  list.push_back({new Op<CpuPopFfnQKernel<true>>(), true, true});
}

}  // namespace popc::ort
