// popc op library: what every ai.popc kernel shares (internal header): errors as ORT
// statuses, shape and index checks, the intra-op thread pool, and Op<Kernel>, the one
// wrapper that turns a kernel struct into an ORT custom op.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "popc_kernels.h"
#ifdef POPC_WITH_CUDA
#include "popc_cuda.h"
#endif

namespace popc::ort {

inline constexpr const char* kDomain = "ai.popc";


struct OpError {
  OrtErrorCode code;
  std::string message;
};

inline std::string shape_str(const std::vector<int64_t>& s) {
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
inline Geometry check_shapes(const char* op, bool transposed, const std::vector<int64_t>& a,
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

inline void check_indices(const char* op, const int64_t* idx, int64_t count, int64_t n) {
  const int64_t bad = popc::first_bad_index(idx, count, n);
  if (bad >= 0) {
    std::ostringstream msg;
    msg << op << ": index " << idx[bad] << " at flat position " << bad << " of I is outside [0, " << n
        << ") (N = rows of W); popc ops reject out-of-range and negative indices";
    throw OpError{ORT_INVALID_ARGUMENT, msg.str()};
  }
}

inline OrtStatus* to_status(const OpError& e) { return Ort::GetApi().CreateStatus(e.code, e.message.c_str()); }

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
  static_assert(std::is_same<T, float>::value || std::is_same<T, popc::half>::value ||
                    std::is_same<T, popc::bfloat16>::value,
                "no ORT type for T");
  if (std::is_same<T, float>::value) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (std::is_same<T, popc::half>::value) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
}

inline constexpr ONNXTensorElementDataType kInt64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
inline constexpr const char* kCpu = "CPUExecutionProvider";
inline constexpr const char* kCuda = "CUDAExecutionProvider";

// Kernels with one output declare output_type(); others kOutputs and output_type(i).
template <class Kernel, class = void>
struct has_outputs : std::false_type {};
template <class Kernel>
struct has_outputs<Kernel, std::void_t<decltype(Kernel::kOutputs)>> : std::true_type {};

template <class Kernel>
constexpr size_t output_count() {
  if constexpr (has_outputs<Kernel>::value) return Kernel::kOutputs;
  else return 1;
}

template <class Kernel>
ONNXTensorElementDataType output_type_of(size_t i) {
  if constexpr (has_outputs<Kernel>::value) return Kernel::output_type(i);
  else return Kernel::output_type();
}

// Kernels whose last inputs may be absent declare kRequiredInputs (< kInputs): inputs from there
// on are optional, so that nodes of older exports, which lack them, still bind to the kernel.
template <class Kernel, class = void>
struct has_required_inputs : std::false_type {};
template <class Kernel>
struct has_required_inputs<Kernel, std::void_t<decltype(Kernel::kRequiredInputs)>> : std::true_type {};

template <class Kernel>
constexpr size_t required_inputs() {
  if constexpr (has_required_inputs<Kernel>::value) return Kernel::kRequiredInputs;
  else return Kernel::kInputs;
}

// Kernels with inputs the host must read (pop_config: it fixes output shapes and counts) declare
// input_memory_type(i): a CUDA kernel returns OrtMemTypeCPUInput for them, so that ORT hands
// them over in host memory and no device-to-host copy (a stream sync) is needed per call.
template <class Kernel, class = void>
struct has_input_memory_type : std::false_type {};
template <class Kernel>
struct has_input_memory_type<Kernel, std::void_t<decltype(Kernel::input_memory_type(size_t{0}))>> : std::true_type {};

template <class Kernel>
OrtMemType input_memory_type_of(size_t i) {
  if constexpr (has_input_memory_type<Kernel>::value) return Kernel::input_memory_type(i);
  else return OrtMemTypeDefault;
}

// Input i of the call, or nullptr where the node does not have it (an optional input).
inline const OrtValue* optional_input(Ort::KernelContext& ctx, size_t i) {
  if (ctx.GetInputCount() <= i) return nullptr;
  return static_cast<const OrtValue*>(ctx.GetInput(i));
}

// The one custom-op wrapper. A Kernel provides kName, kProvider, kInputs, input_type(i),
// output_type(), a constructor from the OrtKernelInfo, and ComputeV2 (and kRequiredInputs
// where trailing inputs are optional, input_memory_type(i) where inputs live on the host).
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
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < required_inputs<Kernel>() ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  OrtMemType GetInputMemoryType(size_t i) const { return input_memory_type_of<Kernel>(i); }
  size_t GetOutputTypeCount() const { return output_count<Kernel>(); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return output_type_of<Kernel>(i); }
};


// One op object per kernel and element type; `fused` marks the fused kernels that
// POPC_OPLIB_FUSED=0 leaves out. The objects outlive every session: never freed.
// POPC_OPLIB_PROVIDER=cuda registers only the ops with `has_cuda` (their CPU and CUDA kernels):
// every other op then runs its function body, so that no CPU-only kernel pulls a CUDA session's
// FFN onto the CPU.
struct Registration {
  OrtCustomOp* op;
  bool fused;
  bool whole_ffn = false;  // PopSwiGLU / PopGeGLU: POPC_OPLIB_WHOLE_FFN=0 leaves them out
  bool has_cuda = false;   // the op has a CUDA kernel (this registration may be its CPU twin)
};

// Each type of POPC_FOR_EACH_TYPE (the quantized-row ops).
template <template <class> class Kernel>
void add_each_type(std::vector<Registration>& list, bool fused) {
#define POPC_ADD(T) list.push_back({new Op<Kernel<T>>(), fused, false, false});
  POPC_FOR_EACH_TYPE(POPC_ADD)
#undef POPC_ADD
}

// Each type of POPC_FOR_EACH_FLOAT_TYPE (the dense-row ops, which have CUDA kernels).
template <template <class> class Kernel>
void add_each_float_type(std::vector<Registration>& list, bool fused, bool has_cuda) {
#define POPC_ADD(T) list.push_back({new Op<Kernel<T>>(), fused, false, has_cuda});
  POPC_FOR_EACH_FLOAT_TYPE(POPC_ADD)
#undef POPC_ADD
}

// Whether the library was built with CUDA kernels (then the dense-row ops have them).
#ifdef POPC_WITH_CUDA
inline constexpr bool kWithCuda = true;
#else
inline constexpr bool kWithCuda = false;
#endif

// Whether environment variable `name` is set to something other than "" or "0".
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

// The fused POP ops (pop_ops_cpu.cc).
void add_pop_cpu_ops(std::vector<Registration>& list);

// The ops on block-quantized rows (pop_quant_ops_cpu.cc).
void add_pop_quant_cpu_ops(std::vector<Registration>& list);

// The fused POP ops on the CUDA EP (pop_ops_cuda.cc; only with POPC_WITH_CUDA).
void add_pop_cuda_ops(std::vector<Registration>& list);

#ifdef POPC_WITH_CUDA
// A CUDA kernel object's device state (popc_cuda.h): created with the kernel, freed with it.
// POPC_CUDA_SYNC_CHECKS=1 (read here) makes each call wait for its stream and report its own
// bad indices; by default a later call reports them.
struct CudaState {
  popc::cuda::DeviceState* state = popc::cuda::new_device_state(env_flag("POPC_CUDA_SYNC_CHECKS"));
  CudaState() = default;
  CudaState(const CudaState&) = delete;
  CudaState& operator=(const CudaState&) = delete;
  ~CudaState() { popc::cuda::delete_device_state(state); }
};

// Throws the ORT error of a failed CUDA call. `ids` names the index input and its range, as in
// "an index of I is outside [0, 16) (N = rows of W)" (the CPU kernels' wording).
inline void raise_cuda_status(const char* op, const popc::cuda::Status& s, const std::string& ids) {
  if (s.code == popc::cuda::kOk) return;
  if (s.code == popc::cuda::kCudaError) throw OpError{ORT_FAIL, std::string(op) + ": CUDA error: " + s.message};
  std::string what = s.code == popc::cuda::kBadIndex
                         ? ids + "; popc ops reject out-of-range and negative indices"
                         : std::string("a channel id appears twice in one partition");
  if (s.earlier)
    what = "an earlier call of this node had bad input: " + what +
           " (the GPU skipped it without reading out of bounds; it is reported by a later call because the CUDA "
           "kernels do not wait for the GPU per call: POPC_CUDA_SYNC_CHECKS=1 checks every call)";
  throw OpError{ORT_INVALID_ARGUMENT, std::string(op) + ": " + what};
}
#endif  // POPC_WITH_CUDA

}  // namespace popc::ort
