// popc op library: what the .cu files share (internal header, CUDA only): device element types,
// the per-stream state behind popc_cuda.h's DeviceState, and `run_on_slot`, the one call
// sequence every op follows (report an earlier error, grow scratch, launch, queue the check).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

#include "popc_cuda.h"

namespace popc::cuda {

// Device element types: Dev<T>::type is what the kernels read for the host's T (bit for bit);
// to_f / from_f convert one element. Arithmetic is float32 for every type.
template <class T> struct Dev { using type = T; };
template <> struct Dev<::popc::half> { using type = __half; };
template <> struct Dev<::popc::bfloat16> { using type = __nv_bfloat16; };
template <class T> using dev_type = typename Dev<T>::type;
template <class T> const dev_type<T>* dev(const T* p) { return reinterpret_cast<const dev_type<T>*>(p); }
template <class T> dev_type<T>* dev(T* p) { return reinterpret_cast<dev_type<T>*>(p); }

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The device's error counters (one per Code that a kernel can find).
struct Counters {
  unsigned long long bad_index;  // ids outside [0, n)
  unsigned long long duplicate;  // a channel twice in one partition
};

__device__ __forceinline__ bool valid_id(int64_t id, int64_t n) { return static_cast<uint64_t>(id) < static_cast<uint64_t>(n); }

// One (device, stream)'s state. Used under DeviceState's lock.
struct Slot {
  int device = -1;
  cudaStream_t stream = nullptr;
  Counters* counters = nullptr;  // device
  Counters* mirror = nullptr;    // pinned host
  Counters seen{0, 0};           // counts already reported
  cudaEvent_t copied = nullptr;  // recorded after the copy to the mirror
  bool pending = false;          // a copy was queued and not yet looked at
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  // A CUDA graph captured on this stream keeps the scratch addresses it was captured with, and
  // may be replayed after a regular (uncaptured) call grew the scratch: once a capture has used
  // this slot, outgrown buffers are kept until the state is deleted instead of freed.
  bool captured = false;
  std::vector<void*> retired;
};

struct DeviceState {
  bool sync_checks = false;
  std::mutex lock;  // one call at a time per kernel object (concurrent Runs of one session)
  std::vector<std::unique_ptr<Slot>> slots;
};

inline Status cuda_error(cudaError_t err, const char* what) {
  Status s;
  s.code = kCudaError;
  std::snprintf(s.message, sizeof(s.message), "%s: %s", what, cudaGetErrorString(err));
  return s;
}

// Steps of a call (cuda_state.cu): `open` finds the stream's slot (creating it outside a
// capture), reports an error an earlier call left, and grows the scratch to `scratch_bytes`;
// `close` queues the counters' copy (or, with sync checks, waits and reports this call's).
Status open_slot(DeviceState* state, cudaStream_t stream, size_t scratch_bytes, Slot** slot, bool* capturing);
Status close_slot(DeviceState* state, Slot* slot, bool capturing);

// The whole call: `launch(slot)` enqueues the kernels (their scratch is slot.scratch) and
// returns cudaGetLastError() or another error.
template <typename Launch>
Status run_on_slot(DeviceState* state, void* stream_ptr, size_t scratch_bytes, Launch&& launch) {
  std::lock_guard<std::mutex> guard(state->lock);
  Slot* slot = nullptr;
  bool capturing = false;
  Status s = open_slot(state, static_cast<cudaStream_t>(stream_ptr), scratch_bytes, &slot, &capturing);
  if (s.code != kOk) return s;
  if (cudaError_t err = launch(*slot); err != cudaSuccess) return cuda_error(err, "kernel launch");
  return close_slot(state, slot, capturing);
}

constexpr unsigned kMaxGrid = 65535u;

// Bytes of scratch rounded up so that the next array starts 256-byte aligned.
inline size_t aligned(size_t bytes) { return (bytes + 255) & ~size_t{255}; }

// Carves typed arrays out of a slot's scratch in order (sizes as in the matching byte count).
struct Carver {
  char* at;
  template <class U>
  U* take(size_t count) {
    U* p = reinterpret_cast<U*>(at);
    at += aligned(count * sizeof(U));
    return p;
  }
};

}  // namespace popc::cuda
