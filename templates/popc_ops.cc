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
//
// Each kernel below is written once, as a template over its element type; `Op<Kernel>`
// turns any of them into an ORT custom op, and the registration table instantiates each
// kernel for every type of POPC_FOR_EACH_TYPE (popc_kernels.h). ORT picks the op whose
// declared tensor types match the node, so the element type is fixed at that boundary.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
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

// fn(i) for every i in [0, n) on ORT's intra-op thread pool, or in turn on runtimes
// without KernelContext_ParallelFor (it then throws before running anything).
template <class Fn>
void parallel_for(Ort::KernelContext& ctx, int64_t n, const Fn& fn) {
  if (n <= 0) return;
  if (n > 1) {
    try {
      ctx.ParallelFor([](void* data, size_t i) { (*static_cast<const Fn*>(data))(static_cast<int64_t>(i)); },
                      static_cast<size_t>(n), 0, const_cast<Fn*>(&fn));
      return;
    } catch (const Ort::Exception&) {
    }
  }
  for (int64_t i = 0; i < n; ++i) fn(i);
}

template <typename Job>
void run_parallel(Ort::KernelContext& ctx, const Job& job) {
  parallel_for(ctx, job.task_count(), [&job](int64_t t) { job.run_task(t); });
}

// The ORT tensor type of each kernel element type.
template <class T>
constexpr ONNXTensorElementDataType onnx_type() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, popc::half>::value, "no ORT type for T");
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

constexpr ONNXTensorElementDataType kInt64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
constexpr const char* kCpu = "CPUExecutionProvider";
constexpr const char* kCuda = "CUDAExecutionProvider";

// The one custom-op wrapper. A Kernel provides kName, kProvider, kInputs, input_type(i),
// output_type(), a constructor from the OrtKernelInfo, and ComputeV2.
template <class Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    *kernel = new Kernel(info);
    return nullptr;
  }
  const char* GetName() const { return Kernel::kName; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return Kernel::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return Kernel::input_type(i); }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return Kernel::output_type(); }
};

// GatherMatMulT / GatherMatMul (X or Z, W, I int64) -> Y, shared by the CPU and CUDA kernels.
template <class T, bool Transposed>
struct GatherSignature {
  static constexpr const char* kName = Transposed ? "GatherMatMulT" : "GatherMatMul";
  static constexpr size_t kInputs = 3;
  static ONNXTensorElementDataType input_type(size_t i) { return i == 2 ? kInt64 : onnx_type<T>(); }
  static ONNXTensorElementDataType output_type() { return onnx_type<T>(); }
};

// ---- CPU kernels ------------------------------------------------------------------
template <class T, bool Transposed>
struct CpuGatherKernel : GatherSignature<T, Transposed> {
  static constexpr const char* kProvider = kCpu;
  bool use_avx2 = popc::cpu_has_avx2();

  explicit CpuGatherKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = this->kName;
    return guarded(op, [&] {
      Ort::KernelContext ctx(context);
      auto a = ctx.GetInput(0), w = ctx.GetInput(1), idx = ctx.GetInput(2);
      const Geometry g = check_shapes(op, Transposed, a.GetTensorTypeAndShapeInfo().GetShape(),
                                      w.GetTensorTypeAndShapeInfo().GetShape(),
                                      idx.GetTensorTypeAndShapeInfo().GetShape());
      const int64_t* I = idx.GetTensorData<int64_t>();
      check_indices(op, I, g.rows * g.K, g.N);
      auto y = ctx.GetOutput(0, g.out_shape.data(), g.out_shape.size());
      const T* A = static_cast<const T*>(a.GetTensorRawData());
      const T* W = static_cast<const T*>(w.GetTensorRawData());
      T* Y = static_cast<T*>(y.GetTensorMutableRawData());
      if constexpr (Transposed) {
        popc::CpuGatherMatMulT<T> job{A, W, I, Y, g.rows, g.H, g.K, use_avx2, 0};
        // ~32k multiply-adds per task: enough to amortise the thread-pool hand-off.
        job.block = std::max<int64_t>(1, (32768 + g.H - 1) / std::max<int64_t>(g.H, 1));
        run_parallel(ctx, job);
      } else {
        popc::CpuGatherMatMul<T> job{A, W, I, Y, g.rows, g.H, g.K, use_avx2, 64};
        if (g.rows * g.H == 0) return;
        run_parallel(ctx, job);
      }
    });
  }
};

// ---- PopSwiGLUDecode / PopGeGLUDecode (CPU) ---------------------------------------------
// (X [B, S, H], partition int64 [B, RC], config int64 [4], Wg, Wu, Wd [D, H]) -> Y [B, S, H]:
// one POP-online FFN decode step (see popc_kernels.h). Partition ids must be unique and
// in [0, D).
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

#ifdef POPC_WITH_CUDA
// ---- CUDA kernels -----------------------------------------------------------------
// Shapes are checked on the host; indices live on the device and are checked by the
// kernels themselves (a bad index is skipped, never read, and reported back: this
// waits for the stream once per call unless POPC_CUDA_NO_INDEX_SYNC=1).
bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

template <class T, bool Transposed>
struct CudaGatherKernel : GatherSignature<T, Transposed> {
  static constexpr const char* kProvider = kCuda;
  bool check = !env_flag("POPC_CUDA_NO_INDEX_SYNC");

  explicit CudaGatherKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const char* op = this->kName;
    return guarded(op, [&] {
      Ort::KernelContext ctx(context);
      auto a = ctx.GetInput(0), w = ctx.GetInput(1), idx = ctx.GetInput(2);
      const Geometry g = check_shapes(op, Transposed, a.GetTensorTypeAndShapeInfo().GetShape(),
                                      w.GetTensorTypeAndShapeInfo().GetShape(),
                                      idx.GetTensorTypeAndShapeInfo().GetShape());
      auto y = ctx.GetOutput(0, g.out_shape.data(), g.out_shape.size());
      const T* A = static_cast<const T*>(a.GetTensorRawData());
      const T* W = static_cast<const T*>(w.GetTensorRawData());
      T* Y = static_cast<T*>(y.GetTensorMutableRawData());
      const int64_t* I = idx.GetTensorData<int64_t>();
      char error[256] = {0};
      void* stream = ctx.GetGPUComputeStream();
      const int rc = Transposed
          ? popc::cuda_gather_matmul_t(stream, A, W, I, Y, g.rows, g.H, g.N, g.K, check, error, sizeof(error))
          : popc::cuda_gather_matmul(stream, A, W, I, Y, g.rows, g.H, g.N, g.K, check, error, sizeof(error));
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
#endif  // POPC_WITH_CUDA

// ---- registration -----------------------------------------------------------------
// Every kernel, with one op object per element type. The op objects must outlive every
// session that uses them: they are created once and never freed.
template <class T> using CpuGatherT = CpuGatherKernel<T, true>;
template <class T> using CpuGather = CpuGatherKernel<T, false>;
template <class T> using SwiGLUDecode = CpuPopDecodeKernel<T, false>;
template <class T> using GeGLUDecode = CpuPopDecodeKernel<T, true>;
#ifdef POPC_WITH_CUDA
template <class T> using CudaGatherT = CudaGatherKernel<T, true>;
template <class T> using CudaGather = CudaGatherKernel<T, false>;
#endif

struct Registration {
  OrtCustomOp* op;
  bool fused;  // a fused CPU kernel (PopSwiGLUDecode, PopGeGLUDecode, PopPartition)
};

template <template <class> class Kernel>
void add_each_type(std::vector<Registration>& list, bool fused) {
#define POPC_ADD(T) list.push_back({new Op<Kernel<T>>(), fused});
  POPC_FOR_EACH_TYPE(POPC_ADD)
#undef POPC_ADD
}

const std::vector<Registration>& registrations() {
  static const std::vector<Registration>* list = [] {
    auto* ops = new std::vector<Registration>();
    add_each_type<CpuGatherT>(*ops, false);
    add_each_type<CpuGather>(*ops, false);
    add_each_type<SwiGLUDecode>(*ops, true);
    add_each_type<GeGLUDecode>(*ops, true);
    add_each_type<CpuPartitionKernel>(*ops, true);
#ifdef POPC_WITH_CUDA
    add_each_type<CudaGatherT>(*ops, false);
    add_each_type<CudaGather>(*ops, false);
#endif
    return ops;
  }();
  return *list;
}

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
  static auto* domains = new std::vector<OrtCustomOpDomain*>();  // each registration's domain, kept alive
  std::lock_guard<std::mutex> guard(lock);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
  domains->push_back(domain);
  // POPC_OPLIB_FUSED=0 leaves out the fused CPU kernels (PopSwiGLUDecode, PopGeGLUDecode,
  // PopPartition): their function bodies then run (popc sets it for CUDA sessions).
  const char* fused_env = std::getenv("POPC_OPLIB_FUSED");
  const bool fused = !(fused_env && std::strcmp(fused_env, "0") == 0);
  for (const Registration& r : registrations()) {
    if (r.fused && !fused) continue;
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, r.op)) return status;
  }
  return api->AddCustomOpDomain(options, domain);
}
