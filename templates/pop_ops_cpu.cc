// popc op library: the fused POP-online ops on the CPU (ONNX Runtime side; the compute is in
// pop_decode_cpu.cc and popc_kernels_cpu.cc).
//
//   PopSwiGLUDecode / PopGeGLUDecode (X, partition, config, Wg, Wu, Wd, output_norm) -> Y: one
//       decode step.
//   PopPartition (Z, token_mask, config, static_score, output_norm) -> partition: prefill scoring.
//   PopSwiGLU / PopGeGLU (X, token_mask, partition, config, Wg, Wu, Wd, static_score, output_norm)
//       -> (Y, partition_out): the whole POP FFN, both branches, so that a graph run with the
//       library has no If per layer (its function body branches on an empty partition).
//       Prefill runs ONNX Runtime's own MatMul kernel (OrtApi::InvokeOp) and the
//       partition kernel; decode runs the fused decode kernel.
// config[3] is the score mode (0 activation, 1 static, 2 output-aware: scores times output_norm
// [D] = ||Wd[d, :]||). output_norm is optional, so that exports made before it still run; mode 2
// without it is an error.
#include <algorithm>
#include <string>
#include <vector>

#include "cpu_simd.h"
#include "pop_ffn_ort.h"

namespace popc::ort {
namespace {

// A float32 [r, c] tensor over memory the caller owns.
Ort::Value float_view(const void* data, int64_t r, int64_t c) {
  static const auto memory = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  const int64_t shape[] = {r, c};
  return Ort::Value::CreateTensor<float>(memory, static_cast<float*>(const_cast<void*>(data)), static_cast<size_t>(r * c),
                                         shape, 2);
}

// ONNX Runtime's own MatMul, for the whole-FFN kernel's prefill. It runs without the
// weights ORT pre-packs for graph nodes, so W is used as the left operand where it can be:
// W X^T reads W in place and packs only the small X^T (measured 1.3x faster than X W^T with
// W packed per call, 16-token prompt, SmolLM2 shapes).
struct DenseOps {
  OrtKernelContext* context;
  Ort::Op* matmul;

  void w_xt(const void* W, int64_t D, int64_t H, const float* XT, int64_t rows, float* out) const {  // out = W X^T
    Ort::Value in[] = {float_view(W, D, H), float_view(XT, H, rows)};
    Ort::Value result[] = {float_view(out, D, rows)};
    matmul->Invoke(context, in, 2, result, 1);
  }
  void z_w(const float* Z, int64_t rows, int64_t D, const void* W, int64_t H, float* out) const {  // out = Z W
    Ort::Value in[] = {float_view(Z, rows, D), float_view(W, D, H)};
    Ort::Value result[] = {float_view(out, rows, H)};
    matmul->Invoke(context, in, 2, result, 1);
  }
};

// One decode step (inputs X, partition, config, Wg, Wu, Wd, output_norm or nullptr), Y written
// to `y`.
template <class T>
void pop_decode(Ort::KernelContext& ctx, const char* op, const Ort::ConstValue& x, const Ort::ConstValue& part,
                const Ort::ConstValue& config, const Ort::ConstValue& wg, const Ort::ConstValue& wu,
                const Ort::ConstValue& wd, const OrtValue* output_norm, int activation, bool use_avx2, T* y) {
  auto shape = [](const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); };
  const int64_t* cfg = config.GetTensorData<int64_t>();
  const auto ps = shape(part);
  const DecodeGeometry g = check_decode(op, shape(x), ps, shape(config), shape(wg), shape(wu), shape(wd), cfg);
  const int64_t D = g.D, H = g.H, RC = g.RC, R = g.R, K = g.K;
  const int64_t* I = part.GetTensorData<int64_t>();
  check_indices(op, I, ps[0] * RC, D);
  auto in = [](const Ort::ConstValue& v) { return static_cast<const T*>(v.GetTensorRawData()); };
  popc::CpuPopDecode<T> job{in(x), I, in(wg), in(wu), in(wd), y, g.B * g.S, g.S, H, D, RC, R, K,
                            activation, use_avx2, 0};
  job.output_norm = output_norm_for<T>(op, output_norm, cfg, D);
  run_pop_decode(ctx, job, op);
}

// Prefill scoring of Z [B, T, D] into out [B, count].
// mode: config[3]; output_norm: [D] for mode 2 (checked by the caller), else unused.
template <class ZT>
void pop_partition(Ort::KernelContext& ctx, const ZT* Z, const float* mask, const ZT* static_score,
                   const ZT* output_norm, int64_t B, int64_t T, int64_t D, int64_t count, int64_t mode, int64_t* out) {
  if (B == 0 || count == 0) return;
  std::vector<float> inv_norm(static_cast<size_t>(B * T));
  std::vector<double> score(static_cast<size_t>(B * D));
  popc::CpuPopPartition<ZT> job{Z, mask, static_score, out, B, T, D, count, mode == popc::kScoreStatic, &inv_norm,
                                &score};
  if (mode == popc::kScoreOutput) job.output_norm = output_norm;
  if (!job.use_static && T > 0) parallel_for(ctx, B * T, [&](int64_t row) { job.norms(row); });
  if (T == 0 && !job.use_static) {
    std::fill(score.begin(), score.end(), 0.0);
  } else {
    const int64_t chunks = (D + 255) / 256;
    parallel_for(ctx, B * chunks, [&](int64_t i) {
      const int64_t b = i / chunks, k = i % chunks;
      job.scores(b, k * 256, std::min<int64_t>(D, (k + 1) * 256));
    });
  }
  for (int64_t b = 0; b < B; ++b) job.rank(b);
}

// ---- PopSwiGLUDecode / PopGeGLUDecode --------------------------------------------------
// (X [B, S, H], partition int64 [B, RC], config int64 [4], Wg, Wu, Wd [D, H], output_norm [D]
// (optional)) -> Y [B, S, H]: one POP-online FFN decode step (see popc_kernels.h). Partition ids
// must be unique and in [0, D).
template <class T, bool GeGLU>
struct CpuPopDecodeKernel {
  static constexpr const char* kName = GeGLU ? "PopGeGLUDecode" : "PopSwiGLUDecode";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 7;
  static constexpr size_t kRequiredInputs = 6;
  static ONNXTensorElementDataType input_type(size_t i) { return (i == 1 || i == 2) ? kInt64 : onnx_type<T>(); }
  static ONNXTensorElementDataType output_type() { return onnx_type<T>(); }
  bool use_avx2 = popc::cpu_has_avx2();
  int activation = popc::kSilu;

  explicit CpuPopDecodeKernel(const OrtKernelInfo* info) {
    if constexpr (GeGLU) activation = gelu_activation(info, "tanh");  // the function's default
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0);
      const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
      auto y = ctx.GetOutput(0, xs.data(), xs.size());
      pop_decode<T>(ctx, kName, x, ctx.GetInput(1), ctx.GetInput(2), ctx.GetInput(3), ctx.GetInput(4),
                    ctx.GetInput(5), optional_input(ctx, 6), activation, use_avx2,
                    static_cast<T*>(y.GetTensorMutableRawData()));
    });
  }
};

// ---- PopPartition -------------------------------------------------------------------------
// (Z [B, T, D], token_mask float [B, T], config int64 [4], static_score [D], output_norm [D]
// (optional)) -> int64 [B, R+C]: POP-online's prefill scoring and top-(R+C) ranking in one pass
// (see popc_kernels.h).
template <class ZT>
struct CpuPartitionKernel {
  static constexpr const char* kName = "PopPartition";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 5;
  static constexpr size_t kRequiredInputs = 4;
  static ONNXTensorElementDataType input_type(size_t i) {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : i == 2 ? kInt64 : onnx_type<ZT>();
  }
  static ONNXTensorElementDataType output_type() { return kInt64; }

  explicit CpuPartitionKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = kName;
    return guarded(op, [&] {
      Ort::KernelContext ctx(context);
      auto z = ctx.GetInput(0), mask = ctx.GetInput(1), config = ctx.GetInput(2), stat = ctx.GetInput(3);
      auto shape = [](const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); };
      const int64_t* cfg = config.GetTensorData<int64_t>();
      const PartitionGeometry g = check_partition(op, shape(z), shape(mask), shape(stat), shape(config), cfg);
      const int64_t B = g.B, T = g.T, D = g.D, count = g.count;
      const ZT* norms = output_norm_for<ZT>(op, optional_input(ctx, 4), cfg, D);
      const std::vector<int64_t> out_shape{B, count};
      auto out = ctx.GetOutput(0, out_shape.data(), out_shape.size());
      pop_partition<ZT>(ctx, static_cast<const ZT*>(z.GetTensorRawData()), mask.GetTensorData<float>(),
                        static_cast<const ZT*>(stat.GetTensorRawData()), norms, B, T, D, count, cfg[3],
                        out.GetTensorMutableData<int64_t>());
    });
  }
};

// ---- PopSwiGLU / PopGeGLU: the whole FFN (float32) ----------------------------------------
// (X [B, S, H], token_mask float [B, S], partition int64 [B, P], config int64 [4], Wg, Wu, Wd [D, H],
//  static_score [D], output_norm [D] (optional)) -> (Y [B, S, H], partition_out int64). P = 0 is
// prefill: the FFN runs dense and partition_out is the new partition [B, R+C]; otherwise a decode
// step and partition_out = partition.
template <bool GeGLU>
struct CpuPopFfnKernel {
  static constexpr const char* kName = GeGLU ? "PopGeGLU" : "PopSwiGLU";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 9;
  static constexpr size_t kRequiredInputs = 8;
  static constexpr size_t kOutputs = 2;
  static ONNXTensorElementDataType input_type(size_t i) {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : (i == 2 || i == 3) ? kInt64 : onnx_type<float>();
  }
  static ONNXTensorElementDataType output_type(size_t i) { return i == 0 ? onnx_type<float>() : kInt64; }
  bool use_avx2 = popc::cpu_has_avx2();
  int activation = popc::kSilu;
  Ort::Op matmul{nullptr};

  explicit CpuPopFfnKernel(const OrtKernelInfo* info) {
    if constexpr (GeGLU) activation = gelu_activation(info, "tanh");  // the function's default
    matmul = float_matmul_op(info);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0), part = ctx.GetInput(2);
      const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
      const auto ps = part.GetTensorTypeAndShapeInfo().GetShape();
      auto y = ctx.GetOutput(0, xs.data(), xs.size());
      if (part.GetTensorTypeAndShapeInfo().GetElementCount() == 0) return prefill(ctx, context, y);
      pop_decode<float>(ctx, kName, x, part, ctx.GetInput(3), ctx.GetInput(4), ctx.GetInput(5), ctx.GetInput(6),
                        optional_input(ctx, 8), activation, use_avx2, y.GetTensorMutableData<float>());
      auto out = ctx.GetOutput(1, ps.data(), ps.size());
      std::copy_n(part.GetTensorData<int64_t>(), part.GetTensorTypeAndShapeInfo().GetElementCount(),
                  out.GetTensorMutableData<int64_t>());
    });
  }

  void prefill(Ort::KernelContext& ctx, OrtKernelContext* context, Ort::UnownedValue& y) {
    auto x = ctx.GetInput(0), wg = ctx.GetInput(4), wu = ctx.GetInput(5), wd = ctx.GetInput(6);
    const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const auto gs = wg.GetTensorTypeAndShapeInfo().GetShape();
    auto fail = [&](const std::string& what) {
      throw OpError{ORT_INVALID_ARGUMENT, std::string(kName) + ": " + what + " (X " + shape_str(xs) + ", W " +
                                              shape_str(gs) + ")"};
    };
    if (xs.size() != 3) fail("X must be [B, S, H]");
    if (gs.size() != 2 || gs[1] != xs[2]) fail("weights must be [D, H] with X's H");
    if (wu.GetTensorTypeAndShapeInfo().GetShape() != gs || wd.GetTensorTypeAndShapeInfo().GetShape() != gs)
      fail("Wg, Wu and Wd must have one shape");
    pop_prefill(ctx, context, matmul, kName, activation, x, ctx.GetInput(1), ctx.GetInput(3), ctx.GetInput(7),
                optional_input(ctx, 8), wg.GetTensorData<float>(), wu.GetTensorData<float>(),
                wd.GetTensorData<float>(), gs[0], gs[1], y.GetTensorMutableData<float>());
  }
};

template <class T> using SwiGLUDecode = CpuPopDecodeKernel<T, false>;
template <class T> using GeGLUDecode = CpuPopDecodeKernel<T, true>;

}  // namespace

// The count = R + C channels of config, checked against the FFN width D.
int64_t partition_count(const char* op, const int64_t* cfg, int64_t D) {
  const int64_t count = cfg[0] + cfg[1];
  if (cfg[0] < 0 || cfg[1] < 0 || count > D) {
    std::ostringstream msg;
    msg << op << ": config asks for " << count << " channels (retain " << cfg[0] << " + candidate " << cfg[1]
        << ") of an FFN with " << D;
    throw OpError{ORT_INVALID_ARGUMENT, msg.str()};
  }
  return count;
}

void pop_prefill(Ort::KernelContext& ctx, OrtKernelContext* context, Ort::Op& matmul, const char* op, int activation,
                 const Ort::ConstValue& x, const Ort::ConstValue& mask, const Ort::ConstValue& config,
                 const Ort::ConstValue& static_score, const OrtValue* output_norm, const float* Wg, const float* Wu,
                 const float* Wd, int64_t D, int64_t H, float* Y) {
  const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
  const auto ms = mask.GetTensorTypeAndShapeInfo().GetShape();
  const auto ss = static_score.GetTensorTypeAndShapeInfo().GetShape();
  const auto cs = config.GetTensorTypeAndShapeInfo().GetShape();
  auto fail = [&](const std::string& what) {
    throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (X " + shape_str(xs) + ", token_mask " +
                                            shape_str(ms) + ", static_score " + shape_str(ss) + ", D " +
                                            std::to_string(D) + ")"};
  };
  if (xs.size() != 3 || xs[2] != H) fail("X must be [B, S, H] with the weights' H");
  if (ms.size() != 2 || ms[0] != xs[0] || ms[1] != xs[1]) fail("token_mask must be [B, S] like X");
  if (ss != std::vector<int64_t>{D}) fail("static_score must be [D]");
  if (cs.size() != 1 || cs[0] < 4) fail("config must be int64 [4]");
  const int64_t B = xs[0], S = xs[1], rows = B * S;
  const int64_t* cfg = config.GetTensorData<int64_t>();
  const int64_t count = partition_count(op, cfg, D);
  const float* norms = output_norm_for<float>(op, output_norm, cfg, D);
  const std::vector<int64_t> part_shape{B, count};
  auto part_out = ctx.GetOutput(1, part_shape.data(), part_shape.size());
  if (rows == 0) return;
  // G^T = Wg X^T and U^T = Wu X^T by ONNX Runtime's MatMul, Z = act(G) * U, Y = Z Wd.
  thread_local std::vector<float> xt_buffer, gate_buffer, up_buffer, z_buffer;
  std::vector<float>& xt = xt_buffer;
  std::vector<float>& gate = gate_buffer;
  std::vector<float>& up = up_buffer;
  std::vector<float>& z = z_buffer;
  xt.resize(static_cast<size_t>(rows * H));
  gate.resize(static_cast<size_t>(rows * D));
  up.resize(static_cast<size_t>(rows * D));
  z.resize(static_cast<size_t>(rows * D));
  const float* X = x.GetTensorData<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < H; ++h) xt[h * rows + r] = X[r * H + h];
  const DenseOps dense{context, &matmul};
  dense.w_xt(Wg, D, H, xt.data(), rows, gate.data());
  dense.w_xt(Wu, D, H, xt.data(), rows, up.data());
  const int act = activation;
  constexpr int64_t kBlock = 64;  // channels per task: the transposed reads stay in cache lines
  parallel_for(ctx, (D + kBlock - 1) / kBlock, [&](int64_t c) {
    const int64_t d1 = std::min(D, (c + 1) * kBlock);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = c * kBlock; d < d1; ++d)
        z[r * D + d] = popc::cpu::activate(gate[d * rows + r], act) * up[d * rows + r];
  });
  dense.z_w(z.data(), rows, D, Wd, H, Y);
  pop_partition<float>(ctx, z.data(), mask.GetTensorData<float>(), static_score.GetTensorData<float>(), norms, B, S, D,
                       count, cfg[3], part_out.GetTensorMutableData<int64_t>());
}

void add_pop_cpu_ops(std::vector<Registration>& list) {
  // CPU twins of the CUDA kernels (pop_ops_cuda.cc), for every float type.
  add_each_float_type<SwiGLUDecode>(list, true, kWithCuda);
  add_each_float_type<GeGLUDecode>(list, true, kWithCuda);
  add_each_float_type<CpuPartitionKernel>(list, true, kWithCuda);
  // The whole FFN for float32 only: other types run the function body (If + the ops above).
  list.push_back({new Op<CpuPopFfnKernel<false>>(), true, true});
  list.push_back({new Op<CpuPopFfnKernel<true>>(), true, true});
}

}  // namespace popc::ort
