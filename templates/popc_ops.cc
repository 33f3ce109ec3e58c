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

#include <cstdlib>
#include <cstring>
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
#ifdef POPC_WITH_CUDA
                         &ops->cuda_t32, &ops->cuda_t16, &ops->cuda_32, &ops->cuda_16,
#endif
  };
  for (OrtCustomOp* op : list)
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, op)) return status;
  return api->AddCustomOpDomain(options, domain);
}
