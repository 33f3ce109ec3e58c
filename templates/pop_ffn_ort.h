// popc op library: what the POP-online FFN kernels on float rows (pop_ops_cpu.cc) and on
// quantized rows (pop_quant_ops_cpu.cc) share on the ONNX Runtime side (internal header):
// the decode step's group loop over a CpuPopDecode job, and the whole-FFN prefill on float
// weights.
#pragma once

#include <algorithm>
#include <string>
#include <utility>

#include "ort_kernel.h"

namespace popc::ort {

// The weight rows a decode step reads are split into this many tasks for the thread pool.
constexpr int64_t kTasks = 8;

// [begin, end) of task c of `count` items.
inline std::pair<int64_t, int64_t> task_slice(int64_t count, int64_t c) {
  const int64_t step = (count + kTasks - 1) / kTasks;
  const int64_t begin = std::min<int64_t>(count, c * step);
  return {begin, std::min<int64_t>(count, begin + step)};
}

inline int gelu_activation(const OrtKernelInfo* info, const char* fallback) {
  std::string approximate = fallback;
  try {
    approximate = Ort::ConstKernelInfo(info).GetAttribute<std::string>("approximate");
  } catch (const Ort::Exception&) {
  }
  return approximate == "tanh" ? popc::kGeluTanh : popc::kGeluErf;
}

// ONNX Runtime's float32 MatMul as an op a kernel can invoke (the whole-FFN prefills).
inline Ort::Op float_matmul_op(const OrtKernelInfo* info) {
  const char* type_names[] = {"T"};
  const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  return Ort::Op::Create(info, "MatMul", "", 13, type_names, types, 1, nullptr, 0, 2, 1);
}

// One decode step of a validated CpuPopDecode job (any row layout) on the thread pool.
// Batch decode reads the union of what its rows need; even when that union is every channel
// the streamed kernel stays (ONNX Runtime's GEMM, invoked without its pre-packed weights,
// measured slower).
template <class Job>
void run_pop_decode(Ort::KernelContext& ctx, const Job& job, const char* op) {
  if (job.rows == 0 || job.H == 0) return;
  // Kept between calls (no allocation per step); the tasks below use this thread's plan
  // through a reference (a lambda naming a thread_local would reach the worker's own).
  thread_local popc::PopDecodePlan calling_thread_plan;
  popc::PopDecodePlan& plan = calling_thread_plan;
  const int64_t H = job.H;
  // Groups of up to 64 rows share their weight reads (one bit per row in the channel masks).
  for (int64_t row0 = 0; row0 < job.rows; row0 += popc::kPopRowsPerGroup) {
    const int64_t nrows = std::min(popc::kPopRowsPerGroup, job.rows - row0);
    if (!job.prepare(plan, row0, nrows))
      throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": a channel id appears twice in one partition"};
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
}

// The (R, K) of a decode step's config [4] for a partition of RC channels, clamped as the
// function bodies clamp them.
inline std::pair<int64_t, int64_t> decode_split(const int64_t* cfg, int64_t RC) {
  const int64_t R = std::min<int64_t>(std::max<int64_t>(cfg[0], 0), RC);
  const int64_t K = std::min<int64_t>(std::max<int64_t>(cfg[2], 0), RC - R);
  return {R, K};
}

// The count = R + C channels of config, checked against the FFN width D.
int64_t partition_count(const char* op, const int64_t* cfg, int64_t D);

// A decode step's validated shapes: X [B, S, H], partition [B, RC], weights [D, H], and the
// (R, K) of config (host memory: a CPU input of the CUDA kernels too). Shared by the CPU and
// CUDA kernels; ids are checked by each (on the device for CUDA).
struct DecodeGeometry {
  int64_t B = 0, S = 0, H = 0, D = 0, RC = 0, R = 0, K = 0;
};

inline DecodeGeometry check_decode(const char* op, const std::vector<int64_t>& xs, const std::vector<int64_t>& ps,
                                   const std::vector<int64_t>& cs, const std::vector<int64_t>& gs,
                                   const std::vector<int64_t>& us, const std::vector<int64_t>& ds, const int64_t* cfg) {
  auto fail = [&](const std::string& what) {
    throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (X " + shape_str(xs) + ", partition " +
                                            shape_str(ps) + ", W " + shape_str(gs) + ")"};
  };
  if (xs.size() != 3) fail("X must be [B, S, H]");
  if (ps.size() != 2 || ps[0] != xs[0]) fail("partition must be [B, R+C] with X's batch");
  if (gs.size() != 2 || gs[1] != xs[2]) fail("weights must be [D, H] with X's H");
  if (us != gs || ds != gs) fail("Wg, Wu and Wd must have one shape");
  if (cs.size() != 1 || cs[0] < 4) fail("config must be int64 [4]");
  DecodeGeometry g;
  g.B = xs[0];
  g.S = xs[1];
  g.H = xs[2];
  g.D = gs[0];
  g.RC = ps[1];
  if (g.RC > g.D) fail("the partition has more channels than the FFN");
  const auto [R, K] = decode_split(cfg, g.RC);
  g.R = R;
  g.K = K;
  return g;
}

// PopPartition's validated shapes: Z [B, T, D], token_mask [B, T], static_score [D], and the
// count = R + C of config.
struct PartitionGeometry {
  int64_t B = 0, T = 0, D = 0, count = 0;
};

inline PartitionGeometry check_partition(const char* op, const std::vector<int64_t>& zs,
                                         const std::vector<int64_t>& ms, const std::vector<int64_t>& ss,
                                         const std::vector<int64_t>& cs, const int64_t* cfg) {
  auto fail = [&](const std::string& what) {
    throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (Z " + shape_str(zs) + ", token_mask " +
                                            shape_str(ms) + ", static_score " + shape_str(ss) + ")"};
  };
  if (zs.size() != 3) fail("Z must be [B, T, D]");
  if (ms.size() != 2 || ms[0] != zs[0] || ms[1] != zs[1]) fail("token_mask must be [B, T] like Z");
  if (ss.size() != 1 || ss[0] != zs[2]) fail("static_score must be [D]");
  if (cs.size() != 1 || cs[0] < 4) fail("config must be int64 [4]");
  return {zs[0], zs[1], zs[2], partition_count(op, cfg, zs[2])};
}

// The output-aware weights of a call: output_norm [D] (type T) where config[3] asks for the
// output-aware score, else nullptr. `value` is the node's output_norm input, nullptr where the
// node has none (exports made before it existed); its shape is checked whenever it is there.
template <class T>
const T* output_norm_for(const char* op, const OrtValue* value, const int64_t* cfg, int64_t D) {
  if (value) {
    const auto shape = Ort::ConstValue{value}.GetTensorTypeAndShapeInfo().GetShape();
    if (shape != std::vector<int64_t>{D})
      throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": output_norm must be [D] = [" + std::to_string(D) +
                                              "], got " + shape_str(shape)};
  }
  if (cfg[3] != popc::kScoreOutput) return nullptr;
  if (!value)
    throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": config[3] = 2 (the output-aware score) needs the "
                                                          "node's output_norm input, which this export predates; "
                                                          "re-export the model with this popc"};
  return static_cast<const T*>(Ort::ConstValue{value}.GetTensorRawData());
}

// The whole FFN's prefill (an empty partition) on float32 weights Wg, Wu, Wd [D, H] (Wd as
// rows, like the decode): Y = (act(X Wg^T) * X Wu^T) Wd by ONNX Runtime's MatMul (`matmul`, an
// Ort::Op for float MatMul), and partition_out [B, R+C] by the partition kernel. Checks X
// [B, S, H] (H = the weights' H), token_mask, config, static_score and output_norm (nullptr
// where the node has none); the caller checks the weights. Y has X's shape.
// partition_out is output 1 of the node.
void pop_prefill(Ort::KernelContext& ctx, OrtKernelContext* context, Ort::Op& matmul, const char* op, int activation,
                 const Ort::ConstValue& x, const Ort::ConstValue& mask, const Ort::ConstValue& config,
                 const Ort::ConstValue& static_score, const OrtValue* output_norm, const float* Wg, const float* Wu,
                 const float* Wd, int64_t D, int64_t H, float* Y);

}  // namespace popc::ort
