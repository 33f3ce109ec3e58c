// popc op library: the fused POP-online ops on the CUDA EP (ONNX Runtime side; the kernels are in
// pop_decode_cuda.cu and pop_partition_cuda.cu). Built only with POPC_WITH_CUDA.
//
//   PopSwiGLUDecode / PopGeGLUDecode (X, partition, config, Wg, Wu, Wd, output_norm) -> Y
//   PopPartition (Z, token_mask, config, static_score, output_norm) -> partition
// Same inputs, checks and math as their CPU twins (pop_ops_cpu.cc). config is a CPU input (ORT
// hands it over in host memory), so every output shape and launch size follows from input
// shapes and config alone: nothing is copied back from the device, nothing waits on the GPU
// (popc_cuda.h), and a decode step keeps its shapes from step to step (CUDA-graph friendly).
#ifdef POPC_WITH_CUDA
#include <string>
#include <vector>

#include "pop_ffn_ort.h"
#include "popc_cuda.h"

namespace popc::ort {
namespace {

constexpr size_t kConfigInput = 2;  // of both ops

OrtMemType config_on_host(size_t i) { return i == kConfigInput ? OrtMemTypeCPUInput : OrtMemTypeDefault; }

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

template <class T, bool GeGLU>
struct CudaPopDecodeKernel {
  static constexpr const char* kName = GeGLU ? "PopGeGLUDecode" : "PopSwiGLUDecode";
  static constexpr const char* kProvider = kCuda;
  static constexpr size_t kInputs = 7;
  static constexpr size_t kRequiredInputs = 6;
  static ONNXTensorElementDataType input_type(size_t i) { return (i == 1 || i == 2) ? kInt64 : onnx_type<T>(); }
  static ONNXTensorElementDataType output_type() { return onnx_type<T>(); }
  static OrtMemType input_memory_type(size_t i) { return config_on_host(i); }
  int activation = popc::kSilu;
  CudaState device;

  explicit CudaPopDecodeKernel(const OrtKernelInfo* info) {
    if constexpr (GeGLU) activation = gelu_activation(info, "tanh");  // the function's default
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0), part = ctx.GetInput(1), config = ctx.GetInput(2);
      auto wg = ctx.GetInput(3), wu = ctx.GetInput(4), wd = ctx.GetInput(5);
      const int64_t* cfg = config.GetTensorData<int64_t>();
      const auto xs = shape_of(x);
      const DecodeGeometry g =
          check_decode(kName, xs, shape_of(part), shape_of(config), shape_of(wg), shape_of(wu), shape_of(wd), cfg);
      auto y = ctx.GetOutput(0, xs.data(), xs.size());
      auto in = [](const Ort::ConstValue& v) { return static_cast<const T*>(v.GetTensorRawData()); };
      popc::cuda::PopDecodeArgs<T> args{in(x), part.GetTensorData<int64_t>(), in(wg), in(wu), in(wd), nullptr,
                                        static_cast<T*>(y.GetTensorMutableRawData()), g.B * g.S, g.S, g.H, g.D,
                                        g.RC, g.R, g.K, activation};
      args.output_norm = output_norm_for<T>(kName, optional_input(ctx, 6), cfg, g.D);
      const popc::cuda::Status status = popc::cuda::pop_decode(device.state, ctx.GetGPUComputeStream(), args);
      if (status.code != popc::cuda::kOk)
        raise_cuda_status(kName, status,
                          "an index of partition is outside [0, " + std::to_string(g.D) + ") (D = rows of the weights)");
    });
  }
};

template <class ZT>
struct CudaPartitionKernel {
  static constexpr const char* kName = "PopPartition";
  static constexpr const char* kProvider = kCuda;
  static constexpr size_t kInputs = 5;
  static constexpr size_t kRequiredInputs = 4;
  static ONNXTensorElementDataType input_type(size_t i) {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : i == 2 ? kInt64 : onnx_type<ZT>();
  }
  static ONNXTensorElementDataType output_type() { return kInt64; }
  static OrtMemType input_memory_type(size_t i) { return config_on_host(i); }
  CudaState device;

  explicit CudaPartitionKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] {
      Ort::KernelContext ctx(context);
      auto z = ctx.GetInput(0), mask = ctx.GetInput(1), config = ctx.GetInput(2), stat = ctx.GetInput(3);
      const int64_t* cfg = config.GetTensorData<int64_t>();
      const PartitionGeometry g =
          check_partition(kName, shape_of(z), shape_of(mask), shape_of(stat), shape_of(config), cfg);
      const ZT* norms = output_norm_for<ZT>(kName, optional_input(ctx, 4), cfg, g.D);
      const std::vector<int64_t> out_shape{g.B, g.count};
      auto out = ctx.GetOutput(0, out_shape.data(), out_shape.size());
      popc::cuda::PopPartitionArgs<ZT> args{static_cast<const ZT*>(z.GetTensorRawData()), mask.GetTensorData<float>(),
                                            static_cast<const ZT*>(stat.GetTensorRawData()), norms,
                                            out.GetTensorMutableData<int64_t>(), g.B, g.T, g.D, g.count, cfg[3]};
      raise_cuda_status(kName, popc::cuda::pop_partition(device.state, ctx.GetGPUComputeStream(), args), "");
    });
  }
};

template <class T> using SwiGLUDecode = CudaPopDecodeKernel<T, false>;
template <class T> using GeGLUDecode = CudaPopDecodeKernel<T, true>;

}  // namespace

void add_pop_cuda_ops(std::vector<Registration>& list) {
  add_each_float_type<SwiGLUDecode>(list, true, true);
  add_each_float_type<GeGLUDecode>(list, true, true);
  add_each_float_type<CudaPartitionKernel>(list, true, true);
}

}  // namespace popc::ort
#endif  // POPC_WITH_CUDA
