// popc op library: ONNX Runtime custom-op registration for the ai.popc domain.
//
// Ops (definitions and function bodies in templates/ops.py):
//   GatherMatMulT(X [.., H], W [N, H], I int64 [.., K]) -> Y [.., K]
//   GatherMatMul (Z [.., K], W [N, H], I int64 [.., K]) -> Y [.., H]
// for T = float32, float16 and bfloat16 (X/Z, W and Y share T). Their twins on block-quantized rows
// (GatherMatMulTQ, GatherMatMulQ) and the fused POP ops are in pop_quant_ops_cpu.cc and
// pop_ops_cpu.cc.
//
// Index contract: every I must satisfy 0 <= I < N. Anything else (including
// negative indices, which ONNX Gather would count from the end) makes the call
// fail with ORT_INVALID_ARGUMENT before any weight is read. Shapes are checked
// too: W must be 2-D, X/Z and I must have the same rank >= 1 with equal leading
// dimensions, X's last dimension must equal H and Z's must equal K.
//
// The CPU kernels are always registered (a CUDA-only registration would make
// CPU sessions fail instead of running the function bodies); the CUDA kernels
// are added when built with POPC_WITH_CUDA and run on the CUDA EP's compute stream
// (the fused POP ops' CUDA kernels are in pop_ops_cuda.cc). POPC_OPLIB_PROVIDER=cuda
// registers only the ops that have a CUDA kernel (with their CPU twins).
//
// Each kernel below is written once, as a template over its element type; `Op<Kernel>`
// turns any of them into an ORT custom op, and the registration table instantiates each
// kernel for every type of POPC_FOR_EACH_FLOAT_TYPE (popc_kernels.h). ORT picks the op whose
// declared tensor types match the node, so the element type is fixed at that boundary.
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

#include "ort_kernel.h"
#include "popc_kernels.h"

#if defined(_WIN32)
#define POPC_EXPORT __declspec(dllexport)
#else
#define POPC_EXPORT __attribute__((visibility("default")))
#endif

namespace {

using namespace popc::ort;

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

#ifdef POPC_WITH_CUDA
// ---- CUDA kernels -----------------------------------------------------------------
// Shapes are checked on the host; indices live on the device and are checked by the kernels
// themselves: a bad index is skipped, never read, and reported without a stream wait per call
// (by a later call of the node; POPC_CUDA_SYNC_CHECKS=1 reports it in the call: popc_cuda.h).
template <class T, bool Transposed>
struct CudaGatherKernel : GatherSignature<T, Transposed> {
  static constexpr const char* kProvider = kCuda;
  CudaState device;

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
      void* stream = ctx.GetGPUComputeStream();
      const popc::cuda::Status status =
          Transposed ? popc::cuda::gather_matmul_t(device.state, stream, A, W, I, Y, g.rows, g.H, g.N, g.K)
                     : popc::cuda::gather_matmul(device.state, stream, A, W, I, Y, g.rows, g.H, g.N, g.K);
      if (status.code != popc::cuda::kOk)  // (the message is built only then: this is the hot path)
        raise_cuda_status(op, status, "an index of I is outside [0, " + std::to_string(g.N) + ") (N = rows of W)");
    });
  }
};
#endif  // POPC_WITH_CUDA

// ---- registration -----------------------------------------------------------------
// Every kernel, with one op object per element type. The op objects must outlive every
// session that uses them: they are created once and never freed.
template <class T> using CpuGatherT = CpuGatherKernel<T, true>;
template <class T> using CpuGather = CpuGatherKernel<T, false>;
#ifdef POPC_WITH_CUDA
template <class T> using CudaGatherT = CudaGatherKernel<T, true>;
template <class T> using CudaGather = CudaGatherKernel<T, false>;
#endif

const std::vector<Registration>& registrations() {
  static const std::vector<Registration>* list = [] {
    auto* ops = new std::vector<Registration>();
    add_each_float_type<CpuGatherT>(*ops, false, kWithCuda);
    add_each_float_type<CpuGather>(*ops, false, kWithCuda);
    add_pop_cpu_ops(*ops);
    add_pop_quant_cpu_ops(*ops);
#ifdef POPC_WITH_CUDA
    add_each_float_type<CudaGatherT>(*ops, false, true);
    add_each_float_type<CudaGather>(*ops, false, true);
    add_pop_cuda_ops(*ops);
#endif
    return ops;
  }();
  return *list;
}

// Whether environment variable `name` is exactly `value`.
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
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
  // POPC_OPLIB_FUSED=0 leaves out the fused kernels (PopSwiGLUDecode, PopGeGLUDecode, PopPartition,
  // the whole FFNs, every op on quantized rows): their function bodies then run.
  const bool fused = !env_is("POPC_OPLIB_FUSED", "0");
  // POPC_OPLIB_WHOLE_FFN=0 leaves out the whole-FFN kernels only: the graph's If then runs its
  // pre-packed prefill Gemms and the fused decode kernel (faster prefill, slower decode).
  const bool whole_ffn = !env_is("POPC_OPLIB_WHOLE_FFN", "0");
  // POPC_OPLIB_PROVIDER=cuda (for CUDA sessions) registers only the ops with a CUDA kernel, each
  // with its CPU twin: a CPU-only kernel (whole FFNs, quantized rows) would pull the FFN off the GPU.
  const char* provider = std::getenv("POPC_OPLIB_PROVIDER");
  const bool cuda_only = provider && std::strcmp(provider, "cuda") == 0;
  if (provider && *provider && !cuda_only && std::strcmp(provider, "all") != 0)
    return api->CreateStatus(ORT_INVALID_ARGUMENT,
                             (std::string("POPC_OPLIB_PROVIDER=") + provider +
                              " is not understood: use 'cuda' (only the ops with CUDA kernels) or leave it unset")
                                 .c_str());
  for (const Registration& r : registrations()) {
    if (r.fused && !fused) continue;
    if (r.whole_ffn && !whole_ffn) continue;
    if (cuda_only && !r.has_cuda) continue;
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, r.op)) return status;
  }
  return api->AddCustomOpDomain(options, domain);
}
