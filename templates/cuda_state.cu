// popc op library: the CUDA kernels' per-stream state and error reporting without a host sync
// per call (see popc_cuda.h).
#include "cuda_device.h"

namespace popc::cuda {

DeviceState* new_device_state(bool sync_checks) {
  auto* state = new DeviceState();
  state->sync_checks = sync_checks;
  return state;
}

void delete_device_state(DeviceState* state) {
  if (!state) return;
  int current = -1;
  const bool restore = cudaGetDevice(&current) == cudaSuccess;
  for (auto& slot : state->slots) {
    // Errors are ignored: at process exit the CUDA context may already be gone. The streams may
    // be destroyed already (ORT frees them before the kernels): the device is waited for instead.
    if (cudaSetDevice(slot->device) != cudaSuccess) continue;
    cudaDeviceSynchronize();
    if (slot->copied) cudaEventDestroy(slot->copied);
    cudaFree(slot->counters);
    cudaFreeHost(slot->mirror);
    cudaFree(slot->scratch);
    for (void* old : slot->retired) cudaFree(old);
  }
  if (restore) cudaSetDevice(current);
  cudaGetLastError();  // leave no sticky error for the application
  delete state;
}

namespace {

Status make_slot(int device, cudaStream_t stream, Slot** out) {
  auto slot = std::make_unique<Slot>();
  slot->device = device;
  slot->stream = stream;
  if (cudaError_t e = cudaMalloc(&slot->counters, sizeof(Counters)); e != cudaSuccess) return cuda_error(e, "cudaMalloc");
  // On the slot's stream: ORT's streams do not wait for the legacy default stream.
  if (cudaError_t e = cudaMemsetAsync(slot->counters, 0, sizeof(Counters), stream); e != cudaSuccess)
    return cuda_error(e, "cudaMemsetAsync");
  if (cudaError_t e = cudaMallocHost(&slot->mirror, sizeof(Counters)); e != cudaSuccess) {
    cudaFree(slot->counters);
    return cuda_error(e, "cudaMallocHost");
  }
  *slot->mirror = Counters{0, 0};
  if (cudaError_t e = cudaEventCreateWithFlags(&slot->copied, cudaEventDisableTiming); e != cudaSuccess) {
    cudaFree(slot->counters);
    cudaFreeHost(slot->mirror);
    return cuda_error(e, "cudaEventCreate");
  }
  *out = slot.release();
  return Status{};
}

// The error (if any) the mirror shows beyond what was already reported.
Status new_errors(Slot* slot, bool earlier) {
  Status s;
  const Counters now = *slot->mirror;
  if (now.bad_index > slot->seen.bad_index) s.code = kBadIndex;
  else if (now.duplicate > slot->seen.duplicate) s.code = kDuplicate;
  s.earlier = earlier && s.code != kOk;
  slot->seen = now;
  return s;
}

}  // namespace

Status open_slot(DeviceState* state, cudaStream_t stream, size_t scratch_bytes, Slot** out, bool* capturing) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaError_t e = cudaStreamIsCapturing(stream, &capture); e != cudaSuccess) return cuda_error(e, "cudaStreamIsCapturing");
  *capturing = capture != cudaStreamCaptureStatusNone;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return cuda_error(e, "cudaGetDevice");
  Slot* slot = nullptr;
  for (auto& s : state->slots)
    if (s->device == device && s->stream == stream) slot = s.get();
  const bool grow = !slot || slot->scratch_bytes < scratch_bytes;
  if (grow && *capturing) {
    Status s;
    s.code = kCudaError;
    std::snprintf(s.message, sizeof(s.message),
                  "this node's device memory would grow during a CUDA-graph capture (%zu bytes of scratch); run "
                  "the same shapes once before capturing",
                  scratch_bytes);
    return s;
  }
  if (!slot) {
    if (Status s = make_slot(device, stream, &slot); s.code != kOk) return s;
    state->slots.emplace_back(slot);
  }
  if (*capturing) slot->captured = true;
  // Reports left by earlier calls, on this stream or another one of this kernel object (concurrent
  // Runs use several streams): the first whose copy has completed.
  if (!*capturing && !state->sync_checks) {
    for (auto& other : state->slots) {
      if (!other->pending || other->device != device) continue;
      const cudaError_t q = cudaEventQuery(other->copied);
      if (q == cudaErrorNotReady) {
        // Not an error, but the runtime records it as the thread's last error: cleared here, or
        // the launch's cudaGetLastError() would report this call as failed ("device not ready").
        cudaGetLastError();
        continue;
      }
      if (q != cudaSuccess) return cuda_error(q, "cudaEventQuery");
      other->pending = false;
      if (Status s = new_errors(other.get(), true); s.code != kOk) return s;
    }
  }
  if (slot->scratch_bytes < scratch_bytes) {
    // Grows (rarely: shapes grew); the old buffer may still be in use by queued kernels.
    if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) return cuda_error(e, "cudaStreamSynchronize");
    if (slot->captured && slot->scratch) slot->retired.push_back(slot->scratch);  // a graph may still use it
    else cudaFree(slot->scratch);
    slot->scratch = nullptr;
    slot->scratch_bytes = 0;
    const size_t bytes = scratch_bytes + scratch_bytes / 4;  // headroom for the next growth
    if (cudaError_t e = cudaMalloc(&slot->scratch, bytes); e != cudaSuccess) return cuda_error(e, "cudaMalloc (scratch)");
    slot->scratch_bytes = bytes;
  }
  *out = slot;
  return Status{};
}

Status close_slot(DeviceState* state, Slot* slot, bool capturing) {
  if (capturing) return Status{};
  if (state->sync_checks) {
    cudaError_t e = cudaMemcpyAsync(slot->mirror, slot->counters, sizeof(Counters), cudaMemcpyDeviceToHost, slot->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(slot->stream);
    if (e != cudaSuccess) return cuda_error(e, "checking indices (POPC_CUDA_SYNC_CHECKS)");
    return new_errors(slot, false);
  }
  if (slot->pending) return Status{};  // the queued copy has not been looked at; a later one takes these counts too
  cudaError_t e = cudaMemcpyAsync(slot->mirror, slot->counters, sizeof(Counters), cudaMemcpyDeviceToHost, slot->stream);
  if (e == cudaSuccess) e = cudaEventRecord(slot->copied, slot->stream);
  if (e != cudaSuccess) return cuda_error(e, "queueing the index check");
  slot->pending = true;
  return Status{};
}

}  // namespace popc::cuda
