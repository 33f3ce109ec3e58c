// popc op library: ONNX Runtime custom-op registration for the ai.popc domain.
//
// Ops (definitions and function bodies in templates/ops.py):
//   GatherMatMulT(X [.., H], W [N, H], I int64 [.., K]) -> Y [.., K]
//   GatherMatMul (Z [.., K], W [N, H], I int64 [.., K]) -> Y [.., H]
// for T = float32 and float16 (X/Z, W and Y share T).
//
// Index contract: every I must satisfy 0 <= I < N. Anything else (including
// negative indices, which ONNX Gather would count from the end) makes the call
// fail with ORT_INVALID_ARGUMENT before any weight is read. Shapes are checked
// too: W must be 2-D, X/Z and I must have the same rank >= 1 with equal leading
// dimensions, X's last dimension must equal H and Z's must equal K.
//
// The CPU kernels are always registered (a CUDA-only registration would make
// CPU sessions fail instead of running the function bodies); the CUDA kernels
// are added when built with POPC_WITH_CUDA and run on the CUDA EP's compute stream.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "popc_kernels.h"

#if defined(_WIN32)
#define POPC_EXPORT __declspec(dllexport)
#else
#define POPC_EXPORT __attribute__((visibility("default")))
#endif

namespace {

constexpr const char* kDomain = "ai.popc";

struct OpError {
  OrtErrorCode code;
  std::string message;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << "]";
  return out.str();
}

// Validated geometry of one call.
struct Geometry {
  int64_t rows = 1, H = 0, N = 0, K = 0;
  std::vector<int64_t> out_shape;
};

// transposed: GatherMatMulT (first input X [.., H], output [.., K]);
// otherwise GatherMatMul (first input Z [.., K], output [.., H]).
Geometry check_shapes(const char* op, bool transposed, const std::vector<int64_t>& a,
                      const std::vector<int64_t>& w, const std::vector<int64_t>& idx) {
  const char* a_name = transposed ? "X" : "Z";
  auto fail = [&](const std::string& what) {
    throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what + " (" + a_name + " " + shape_str(a) +
                                            ", W " + shape_str(w) + ", I " + shape_str(idx) + ")"};
  };
  if (w.size() != 2) fail("W must be 2-D [N, H]");
  if (a.empty()) fail(std::string(a_name) + " must have rank >= 1");
  if (a.size() != idx.size()) fail(std::string(a_name) + " and I must have the same rank");
  for (size_t d = 0; d + 1 < a.size(); ++d)
    if (a[d] != idx[d]) fail(std::string("leading dimensions of ") + a_name + " and I differ");
  Geometry g;
  g.N = w[0];
  g.H = w[1];
  g.K = idx.back();
  for (size_t d = 0; d + 1 < a.size(); ++d) g.rows *= a[d];
  if (transposed && a.back() != g.H) fail("the last dimension of X must equal W's second dimension H");
  if (!transposed && a.back() != g.K) fail("the last dimension of Z must equal the last dimension of I");
  g.out_shape = idx;
  if (!transposed) g.out_shape.back() = g.H;
  return g;
}

void check_indices(const char* op, const int64_t* idx, int64_t count, int64_t n) {
  const int64_t bad = popc::first_bad_index(idx, count, n);
  if (bad >= 0) {
    std::ostringstream msg;
    msg << op << ": index " << idx[bad] << " at flat position " << bad << " of I is outside [0, " << n
        << ") (N = rows of W); popc ops reject out-of-range and negative indices";
    throw OpError{ORT_INVALID_ARGUMENT, msg.str()};
  }
}

OrtStatus* to_status(const OpError& e) { return Ort::GetApi().CreateStatus(e.code, e.message.c_str()); }

template <typename Body>
OrtStatus* guarded(const char* op, Body&& body) {
  try {
    body();
    return nullptr;
  } catch (const OpError& e) {
    return to_status(e);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), (std::string(op) + ": " + e.what()).c_str());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": " + e.what()).c_str());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": unknown error").c_str());
  }
}

template <typename Job>
void run_parallel(Ort::KernelContext& ctx, const Job& job) {
  const int64_t tasks = job.task_count();
  if (tasks <= 0) return;
  if (tasks > 1) {
    try {
      ctx.ParallelFor([](void* data, size_t i) { static_cast<const Job*>(data)->run_task(static_cast<int64_t>(i)); },
                      static_cast<size_t>(tasks), 0, const_cast<Job*>(&job));
      return;
    } catch (const Ort::Exception&) {
      // Runtime without KernelContext_ParallelFor: fall through to one thread.
    }
  }
  for (int64_t t = 0; t < tasks; ++t) job.run_task(t);
}

template <typename T>
constexpr ONNXTensorElementDataType elem_type() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

// ---- CPU kernels ------------------------------------------------------------------
template <typename T, bool Transposed>
struct CpuKernel {
  bool use_avx2 = popc::cpu_has_avx2();

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = Transposed ? "GatherMatMulT" : "GatherMatMul";
    return guarded(op, [&] {
      Ort::KernelContext ctx(context);
      auto a = ctx.GetInput(0), w = ctx.GetInput(1), idx = ctx.GetInput(2);
      const Geometry g = check_shapes(op, Transposed, a.GetTensorTypeAndShapeInfo().GetShape(),
                                      w.GetTensorTypeAndShapeInfo().GetShape(),
                                      idx.GetTensorTypeAndShapeInfo().GetShape());
      const int64_t* I = idx.GetTensorData<int64_t>();
      check_indices(op, I, g.rows * g.K, g.N);
      auto y = ctx.GetOutput(0, g.out_shape.data(), g.out_shape.size());
      constexpr bool half = !std::is_same<T, float>::value;
      if constexpr (Transposed) {
        popc::CpuGatherMatMulT job{a.GetTensorRawData(), w.GetTensorRawData(), I, y.GetTensorMutableRawData(),
                                   g.rows, g.H, g.K, half, use_avx2, 0};
        // ~32k multiply-adds per task: enough to amortise the thread-pool hand-off.
        job.block = std::max<int64_t>(1, (32768 + g.H - 1) / std::max<int64_t>(g.H, 1));
        run_parallel(ctx, job);
      } else {
        popc::CpuGatherMatMul job{a.GetTensorRawData(), w.GetTensorRawData(), I, y.GetTensorMutableRawData(),
                                  g.rows, g.H, g.K, half, use_avx2, 64};
        if (g.rows * g.H == 0) return;
        run_parallel(ctx, job);
      }
    });
  }
};

template <typename T, bool Transposed>
struct CpuOp : Ort::CustomOpBase<CpuOp<T, Transposed>, CpuKernel<T, Transposed>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new CpuKernel<T, Transposed>();
    return nullptr;
  }
  const char* GetName() const { return Transposed ? "GatherMatMulT" : "GatherMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : elem_type<T>();
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return elem_type<T>(); }
};


// ---- PopSwiGLUDecode / PopGeGLUDecode (CPU) ---------------------------------------------
// (X [B, S, H], partition int64 [B, RC], config int64 [4], Wg, Wu, Wd [D, H]) -> Y [B, S, H]:
// one POP-online FFN decode step (see popc_kernels.h). Partition ids must be unique and
// in [0, D).
template <typename T, bool GeGLU>
struct CpuPopDecodeKernel {
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
    const char* op = GeGLU ? "PopGeGLUDecode" : "PopSwiGLUDecode";
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
      constexpr bool half = !std::is_same<T, float>::value;
      const int64_t rows = xs[0] * xs[1];
      if (rows == 0 || H == 0) return;
      popc::CpuPopDecode job{x.GetTensorRawData(), I, wg.GetTensorRawData(), wu.GetTensorRawData(),
                             wd.GetTensorRawData(), y.GetTensorMutableRawData(), rows, xs[1], H, D, RC, R, K,
                             activation, half, use_avx2};
      const std::string duplicate = std::string(op) + ": a channel id appears twice in one partition";
      if (rows > 1) {
        std::atomic<bool> ok{true};
        struct RowTask { const popc::CpuPopDecode* job; std::atomic<bool>* ok; };
        RowTask task{&job, &ok};
        auto one = [](void* data, size_t i) {
          auto* t = static_cast<RowTask*>(data);
          if (!t->job->run_row(static_cast<int64_t>(i))) t->ok->store(false);
        };
        bool parallel = true;
        try {
          ctx.ParallelFor(one, static_cast<size_t>(rows), 0, &task);
        } catch (const Ort::Exception&) {
          parallel = false;
        }
        if (!parallel)
          for (int64_t r = 0; r < rows; ++r) one(&task, static_cast<size_t>(r));
        if (!ok.load()) throw OpError{ORT_INVALID_ARGUMENT, duplicate};
        return;
      }
      // One row: split the channels of the gate, then of up/down, over the thread pool.
      popc::PopDecodeScratch scratch;
      if (!job.prepare(0, scratch)) throw OpError{ORT_INVALID_ARGUMENT, duplicate};
      constexpr int64_t kChunks = 8;
      struct Phase { const popc::CpuPopDecode* job; popc::PopDecodeScratch* s; int64_t count; int64_t H; };
      Phase phase{&job, &scratch, static_cast<int64_t>(scratch.order.size()), H};
      auto split = [&](void (*fn)(void*, size_t)) {
        try {
          ctx.ParallelFor(fn, static_cast<size_t>(kChunks), 0, &phase);
        } catch (const Ort::Exception&) {
          for (int64_t c = 0; c < kChunks; ++c) fn(&phase, static_cast<size_t>(c));
        }
      };
      split([](void* data, size_t c) {
        auto* p = static_cast<Phase*>(data);
        const int64_t step = (p->count + kChunks - 1) / kChunks;
        const int64_t begin = std::min<int64_t>(p->count, static_cast<int64_t>(c) * step);
        p->job->gate(*p->s, begin, std::min<int64_t>(p->count, begin + step));
      });
      job.select(scratch);
      phase.count = static_cast<int64_t>(scratch.kept.size());
      scratch.partial.assign(static_cast<size_t>(kChunks * H), 0.0f);
      split([](void* data, size_t c) {
        auto* p = static_cast<Phase*>(data);
        const int64_t step = (p->count + kChunks - 1) / kChunks;
        const int64_t begin = std::min<int64_t>(p->count, static_cast<int64_t>(c) * step);
        p->job->updown(*p->s, begin, std::min<int64_t>(p->count, begin + step), p->s->partial.data() + c * p->H);
      });
      float* total = scratch.partial.data();
      for (int64_t c = 1; c < kChunks; ++c)
        for (int64_t h = 0; h < H; ++h) total[h] += scratch.partial[c * H + h];
      job.finish(0, total);
    });
  }
};

template <typename T, bool GeGLU>
struct CpuPopDecodeOp : Ort::CustomOpBase<CpuPopDecodeOp<T, GeGLU>, CpuPopDecodeKernel<T, GeGLU>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    *kernel = new CpuPopDecodeKernel<T, GeGLU>(info);
    return nullptr;
  }
  const char* GetName() const { return GeGLU ? "PopGeGLUDecode" : "PopSwiGLUDecode"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == 1 || i == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : elem_type<T>();
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return elem_type<T>(); }
};

// ---- PopPartition (CPU) -------------------------------------------------------------------
// (Z [B, T, D], token_mask float [B, T], config int64 [4], static_score [D]) -> int64 [B, R+C]:
// POP-online's prefill scoring and top-(R+C) ranking in one pass (see popc_kernels.h).
template <typename Elem>
struct CpuPartitionKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = "PopPartition";
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
      popc::CpuPopPartition job{z.GetTensorRawData(), mask.GetTensorData<float>(), stat.GetTensorRawData(),
                                out.GetTensorMutableData<int64_t>(), B, T, D, count,
                                !std::is_same<Elem, float>::value, cfg[3] != 0, &inv_norm, &score};
      auto parallel = [&](size_t tasks, void (*fn)(void*, size_t)) {
        try {
          ctx.ParallelFor(fn, tasks, 0, &job);
        } catch (const Ort::Exception&) {
          for (size_t i = 0; i < tasks; ++i) fn(&job, i);
        }
      };
      if (!job.use_static && T > 0)
        parallel(static_cast<size_t>(B * T), [](void* data, size_t i) {
          static_cast<popc::CpuPopPartition*>(data)->norms(static_cast<int64_t>(i));
        });
      if (T == 0 && !job.use_static) std::fill(score.begin(), score.end(), 0.0);
      else {
        const int64_t chunks = (D + 255) / 256;
        struct Chunked { popc::CpuPopPartition* job; int64_t chunks; };
        Chunked chunked{&job, chunks};
        try {
          ctx.ParallelFor([](void* data, size_t i) {
            auto* c = static_cast<Chunked*>(data);
            const int64_t b = static_cast<int64_t>(i) / c->chunks, k = static_cast<int64_t>(i) % c->chunks;
            c->job->scores(b, k * 256, std::min<int64_t>(c->job->D, (k + 1) * 256));
          }, static_cast<size_t>(B * chunks), 0, &chunked);
        } catch (const Ort::Exception&) {
          for (int64_t b = 0; b < B; ++b)
            for (int64_t k = 0; k < chunks; ++k) job.scores(b, k * 256, std::min<int64_t>(D, (k + 1) * 256));
        }
      }
      for (int64_t b = 0; b < B; ++b) job.rank(b);
    });
  }
};

template <typename Elem>
struct CpuPartitionOp : Ort::CustomOpBase<CpuPartitionOp<Elem>, CpuPartitionKernel<Elem>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new CpuPartitionKernel<Elem>();
    return nullptr;
  }
  const char* GetName() const { return "PopPartition"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (i == 2) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    return elem_type<Elem>();
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; }
};

#ifdef POPC_WITH_CUDA
// ---- CUDA kernels -----------------------------------------------------------------
// Shapes are checked on the host; indices live on the device and are checked by the
// kernels themselves (a bad index is skipped, never read, and reported back: this
// waits for the stream once per call unless POPC_CUDA_NO_INDEX_SYNC=1).
bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

template <typename T, bool Transposed>
struct CudaKernel {
  bool check = !env_flag("POPC_CUDA_NO_INDEX_SYNC");

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = Transposed ? "GatherMatMulT" : "GatherMatMul";
    return guarded(op, [&] {
      Ort::KernelContext ctx(context);
      auto a = ctx.GetInput(0), w = ctx.GetInput(1), idx = ctx.GetInput(2);
      const Geometry g = check_shapes(op, Transposed, a.GetTensorTypeAndShapeInfo().GetShape(),
                                      w.GetTensorTypeAndShapeInfo().GetShape(),
                                      idx.GetTensorTypeAndShapeInfo().GetShape());
      auto y = ctx.GetOutput(0, g.out_shape.data(), g.out_shape.size());
      constexpr bool half = !std::is_same<T, float>::value;
      char error[256] = {0};
      void* stream = ctx.GetGPUComputeStream();
      const int rc = Transposed
          ? popc::cuda_gather_matmul_t(stream, half, a.GetTensorRawData(), w.GetTensorRawData(),
                                       idx.GetTensorData<int64_t>(), y.GetTensorMutableRawData(), g.rows, g.H,
                                       g.N, g.K, check, error, sizeof(error))
          : popc::cuda_gather_matmul(stream, half, a.GetTensorRawData(), w.GetTensorRawData(),
                                     idx.GetTensorData<int64_t>(), y.GetTensorMutableRawData(), g.rows, g.H,
                                     g.N, g.K, check, error, sizeof(error));
      if (rc == 1) {
        std::ostringstream msg;
        msg << op << ": an index of I is outside [0, " << g.N
            << ") (N = rows of W); popc ops reject out-of-range and negative indices";
        throw OpError{ORT_INVALID_ARGUMENT, msg.str()};
      }
      if (rc != 0) throw OpError{ORT_FAIL, std::string(op) + ": CUDA error: " + error};
    });
  }
};

template <typename T, bool Transposed>
struct CudaOp : Ort::CustomOpBase<CudaOp<T, Transposed>, CudaKernel<T, Transposed>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new CudaKernel<T, Transposed>();
    return nullptr;
  }
  const char* GetName() const { return Transposed ? "GatherMatMulT" : "GatherMatMul"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : elem_type<T>();
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return elem_type<T>(); }
};
#endif  // POPC_WITH_CUDA

// The op objects must outlive every session that uses them: they are static. Each
// registration gets its own domain object (kept alive too), as ORT's samples do.
struct Ops {
  CpuOp<float, true> cpu_t32;
  CpuOp<Ort::Float16_t, true> cpu_t16;
  CpuOp<float, false> cpu_32;
  CpuOp<Ort::Float16_t, false> cpu_16;
  CpuPopDecodeOp<float, false> swiglu_32;
  CpuPopDecodeOp<Ort::Float16_t, false> swiglu_16;
  CpuPopDecodeOp<float, true> geglu_32;
  CpuPopDecodeOp<Ort::Float16_t, true> geglu_16;
  CpuPartitionOp<float> partition_32;
  CpuPartitionOp<Ort::Float16_t> partition_16;
#ifdef POPC_WITH_CUDA
  CudaOp<float, true> cuda_t32;
  CudaOp<Ort::Float16_t, true> cuda_t16;
  CudaOp<float, false> cuda_32;
  CudaOp<Ort::Float16_t, false> cuda_16;
#endif
};

}  // namespace

extern "C" POPC_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // runtime older than the headers this was built with
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = std::string("the popc op library was built with ONNX Runtime API ") +
                      std::to_string(ORT_API_VERSION) + " headers and needs a newer runtime than " +
                      api_base->GetVersionString();
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  static std::mutex lock;
  static Ops* ops = new Ops();                          // never freed: lives as long as the process
  static auto* domains = new std::vector<OrtCustomOpDomain*>();
  std::lock_guard<std::mutex> guard(lock);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
  domains->push_back(domain);
  OrtCustomOp* list[] = {&ops->cpu_t32, &ops->cpu_t16, &ops->cpu_32, &ops->cpu_16,
                         &ops->swiglu_32, &ops->swiglu_16, &ops->geglu_32, &ops->geglu_16,
                         &ops->partition_32, &ops->partition_16,
#ifdef POPC_WITH_CUDA
                         &ops->cuda_t32, &ops->cuda_t16, &ops->cuda_32, &ops->cuda_16,
#endif
  };
  // POPC_OPLIB_FUSED=0 leaves out the fused CPU kernels (PopSwiGLUDecode, PopGeGLUDecode,
  // PopPartition): their function bodies then run (popc sets it for CUDA sessions).
  const char* fused_env = std::getenv("POPC_OPLIB_FUSED");
  const bool fused = !(fused_env && std::strcmp(fused_env, "0") == 0);
  const OrtCustomOp* fused_ops[] = {&ops->swiglu_32, &ops->swiglu_16, &ops->geglu_32, &ops->geglu_16,
                                    &ops->partition_32, &ops->partition_16};
  for (OrtCustomOp* op : list) {
    if (!fused && std::find(std::begin(fused_ops), std::end(fused_ops), op) != std::end(fused_ops)) continue;
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, op)) return status;
  }
  return api->AddCustomOpDomain(options, domain);
}
