// popc op library: the fused POP-online ops on the CPU (ONNX Runtime side; the compute is in
// pop_decode_cpu.cc and popc_kernels_cpu.cc).
#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "ort_kernel.h"

namespace popc::ort {
namespace {

// The weight rows a decode step reads are split into this many tasks for the thread pool.
constexpr int64_t kTasks = 8;

// [begin, end) of task c of `count` items.
inline std::pair<int64_t, int64_t> task_slice(int64_t count, int64_t c) {
  const int64_t step = (count + kTasks - 1) / kTasks;
  const int64_t begin = std::min<int64_t>(count, c * step);
  return {begin, std::min<int64_t>(count, begin + step)};
}

template <class T, bool GeGLU>
struct CpuPopDecodeKernel {
  static constexpr const char* kName = GeGLU ? "PopGeGLUDecode" : "PopSwiGLUDecode";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 6;
  static ONNXTensorElementDataType input_type(size_t i) { return (i == 1 || i == 2) ? kInt64 : onnx_type<T>(); }
  static ONNXTensorElementDataType output_type() { return onnx_type<T>(); }
  bool use_avx2 = popc::cpu_has_avx2();
  int activation = popc::kSilu;

  explicit CpuPopDecodeKernel(const OrtKernelInfo* info) {
    if constexpr (GeGLU) {
      std::string approximate = "none";
      try {
        approximate = Ort::ConstKernelInfo(info).GetAttribute<std::string>("approximate");
      } catch (const Ort::Exception&) {
      }
      activation = approximate == "tanh" ? popc::kGeluTanh : popc::kGeluErf;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = kName;
    return guarded(op, [&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0), part = ctx.GetInput(1), config = ctx.GetInput(2);
      auto wg = ctx.GetInput(3), wu = ctx.GetInput(4), wd = ctx.GetInput(5);
      const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
      const auto ps = part.GetTensorTypeAndShapeInfo().GetShape();
      const auto cs = config.GetTensorTypeAndShapeInfo().GetShape();
      const auto gs = wg.GetTensorTypeAndShapeInfo().GetShape();
      auto fail = [&](const std::string& what) {
        throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (X " + shape_str(xs) + ", partition " +
                                                shape_str(ps) + ", W " + shape_str(gs) + ")"};
      };
      if (xs.size() != 3) fail("X must be [B, S, H]");
      if (ps.size() != 2 || ps[0] != xs[0]) fail("partition must be [B, R+C] with X's batch");
      if (gs.size() != 2 || gs[1] != xs[2]) fail("weights must be [D, H] with X's H");
      if (wu.GetTensorTypeAndShapeInfo().GetShape() != gs || wd.GetTensorTypeAndShapeInfo().GetShape() != gs)
        fail("Wg, Wu and Wd must have one shape");
      if (cs.size() != 1 || cs[0] < 3) fail("config must be int64 [4]");
      const int64_t D = gs[0], H = gs[1], RC = ps[1];
      if (RC > D) fail("the partition has more channels than the FFN");
      const int64_t* I = part.GetTensorData<int64_t>();
      check_indices(op, I, ps[0] * RC, D);
      const int64_t* cfg = config.GetTensorData<int64_t>();
      const int64_t R = std::min<int64_t>(std::max<int64_t>(cfg[0], 0), RC);
      const int64_t K = std::min<int64_t>(std::max<int64_t>(cfg[2], 0), RC - R);
      auto y = ctx.GetOutput(0, xs.data(), xs.size());
      const int64_t rows = xs[0] * xs[1];
      if (rows == 0 || H == 0) return;
      auto in = [](const Ort::ConstValue& v) { return static_cast<const T*>(v.GetTensorRawData()); };
      const popc::CpuPopDecode<T> job{in(x), I, in(wg), in(wu), in(wd), static_cast<T*>(y.GetTensorMutableRawData()),
                                      rows, xs[1], H, D, RC, R, K, activation, use_avx2};
      const std::string duplicate = std::string(op) + ": a channel id appears twice in one partition";
      // Groups of up to 64 rows share their weight reads (one bit per row in the channel masks).
      // Kept between calls (no allocation per step); the tasks below use this thread's plan
      // through a reference (a lambda naming a thread_local would reach the worker's own).
      thread_local popc::PopDecodePlan calling_thread_plan;
      popc::PopDecodePlan& plan = calling_thread_plan;
      for (int64_t row0 = 0; row0 < rows; row0 += popc::kPopRowsPerGroup) {
        const int64_t nrows = std::min(popc::kPopRowsPerGroup, rows - row0);
        if (!job.prepare(plan, row0, nrows)) throw OpError{ORT_INVALID_ARGUMENT, duplicate};
        const int64_t gates = static_cast<int64_t>(plan.gate_list.size());
        parallel_for(ctx, kTasks, [&](int64_t c) {
          const auto [begin, end] = task_slice(gates, c);
          job.gate(plan, begin, end);
        });
        if (nrows > 1) parallel_for(ctx, nrows, [&](int64_t i) { job.select(plan, i); });
        else job.select(plan, 0);
        job.gather_kept(plan);
        const int64_t kept = static_cast<int64_t>(plan.keep_list.size());
        plan.partial.assign(static_cast<size_t>(kTasks * nrows * H), 0.0f);
        parallel_for(ctx, kTasks, [&](int64_t c) {
          const auto [begin, end] = task_slice(kept, c);
          job.updown(plan, begin, end, plan.partial.data() + c * nrows * H);
        });
        job.finish(plan, kTasks);
      }
    });
  }
};

// ---- PopPartition (CPU) -------------------------------------------------------------------
// (Z [B, T, D], token_mask float [B, T], config int64 [4], static_score [D]) -> int64 [B, R+C]:
// POP-online's prefill scoring and top-(R+C) ranking in one pass (see popc_kernels.h).
template <class ZT>
struct CpuPartitionKernel {
  static constexpr const char* kName = "PopPartition";
  static constexpr const char* kProvider = kCpu;
  static constexpr size_t kInputs = 4;
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
      const auto zs = z.GetTensorTypeAndShapeInfo().GetShape();
      const auto ms = mask.GetTensorTypeAndShapeInfo().GetShape();
      const auto ss = stat.GetTensorTypeAndShapeInfo().GetShape();
      const auto cs = config.GetTensorTypeAndShapeInfo().GetShape();
      auto fail = [&](const std::string& what) {
        throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (Z " + shape_str(zs) + ", token_mask " +
                                                shape_str(ms) + ", static_score " + shape_str(ss) + ")"};
      };
      if (zs.size() != 3) fail("Z must be [B, T, D]");
      if (ms.size() != 2 || ms[0] != zs[0] || ms[1] != zs[1]) fail("token_mask must be [B, T] like Z");
      if (ss.size() != 1 || ss[0] != zs[2]) fail("static_score must be [D]");
      if (cs.size() != 1 || cs[0] < 4) fail("config must be int64 [4]");
      const int64_t* cfg = config.GetTensorData<int64_t>();
      const int64_t B = zs[0], T = zs[1], D = zs[2];
      const int64_t count = cfg[0] + cfg[1];
      if (cfg[0] < 0 || cfg[1] < 0 || count > D) {
        std::ostringstream msg;
        msg << op << ": config asks for " << count << " channels (retain " << cfg[0] << " + candidate " << cfg[1]
            << ") of an FFN with " << D;
        throw OpError{ORT_INVALID_ARGUMENT, msg.str()};
      }
      const std::vector<int64_t> out_shape{B, count};
      auto out = ctx.GetOutput(0, out_shape.data(), out_shape.size());
      if (B == 0 || count == 0) return;
      std::vector<float> inv_norm(static_cast<size_t>(B * T));
      std::vector<double> score(static_cast<size_t>(B * D));
      const popc::CpuPopPartition<ZT> job{static_cast<const ZT*>(z.GetTensorRawData()), mask.GetTensorData<float>(),
              static_cast<const ZT*>(stat.GetTensorRawData()), out.GetTensorMutableData<int64_t>(), B, T, D, count,
              cfg[3] != 0, &inv_norm, &score};
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
    });
  }
};


template <class T> using SwiGLUDecode = CpuPopDecodeKernel<T, false>;
template <class T> using GeGLUDecode = CpuPopDecodeKernel<T, true>;

}  // namespace

void add_pop_cpu_ops(std::vector<Registration>& list) {
  add_each_type<SwiGLUDecode>(list, true);
  add_each_type<GeGLUDecode>(list, true);
  add_each_type<CpuPartitionKernel>(list, true);
}

}  // namespace popc::ort
