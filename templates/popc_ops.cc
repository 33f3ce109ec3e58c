// popc op library: ONNX Runtime custom-op registration for the ai.popc domain.
//
// Ops (definitions and function bodies in templates/ops.py):
//   GatherMatMulT(X [.., H], W [N, H], I int64 [.., K]) -> Y [.., K]
//   GatherMatMul (Z [.., K], W [N, H], I int64 [.., K]) -> Y [.., H]
// for T = float32 and float16 (X/Z, W and Y share T). Their twins on block-quantized rows
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
// are added when built with POPC_WITH_CUDA and run on the CUDA EP's compute stream.
//
// Each kernel below is written once, as a template over its element type; `Op<Kernel>`
// turns any of them into an ORT custom op, and the registration table instantiates each
// kernel for every type of POPC_FOR_EACH_TYPE (popc_kernels.h). ORT picks the op whose
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

// ---- PopSwiGLUDecode / PopGeGLUDecode (CPU) ---------------------------------------------
// (X [B, S, H], partition int64 [B, RC], config int64 [4], Wg, Wu, Wd [D, H]) -> Y [B, S, H]:
// one POP-online FFN decode step (see popc_kernels.h). Partition ids must be unique and
// in [0, D).
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
#ifdef POPC_WITH_CUDA
template <class T> using CudaGatherT = CudaGatherKernel<T, true>;
template <class T> using CudaGather = CudaGatherKernel<T, false>;
#endif

const std::vector<Registration>& registrations() {
  static const std::vector<Registration>* list = [] {
    auto* ops = new std::vector<Registration>();
    add_each_type<CpuGatherT>(*ops, false);
    add_each_type<CpuGather>(*ops, false);
    add_pop_cpu_ops(*ops);
    add_pop_quant_cpu_ops(*ops);
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
  // PopPartition, the whole FFNs, and every op on quantized rows, which has no CUDA kernel): their
  // function bodies then run (popc sets it for CUDA sessions).
  const char* fused_env = std::getenv("POPC_OPLIB_FUSED");
  const bool fused = !(fused_env && std::strcmp(fused_env, "0") == 0);
  // POPC_OPLIB_WHOLE_FFN=0 leaves out the whole-FFN kernels only: the graph's If then runs its
  // pre-packed prefill Gemms and the fused decode kernel (faster prefill, slower decode).
  const char* whole_env = std::getenv("POPC_OPLIB_WHOLE_FFN");
  const bool whole_ffn = !(whole_env && std::strcmp(whole_env, "0") == 0);
  for (const Registration& r : registrations()) {
    if (r.fused && !fused) continue;
    if (r.whole_ffn && !whole_ffn) continue;
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, r.op)) return status;
  }
  return api->AddCustomOpDomain(options, domain);
}
