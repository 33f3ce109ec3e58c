// popc op library: the CUDA kernels' host interface (internal header; builds with POPC_WITH_CUDA).
// No CUDA header is needed to include it: the ONNX Runtime side (.cc files) calls these and the
// .cu files implement them.
//
// No host synchronisation per call. Every kernel object owns a DeviceState: per (device, stream)
// a device word of error counters, a pinned host mirror of it, an event, and scratch memory,
// all allocated on first use and grown only when shapes grow (never inside a CUDA-graph capture).
// Kernels skip (never read through) an invalid index and count it on the device; after the
// launch an asynchronous copy of the counters to the mirror follows on the same stream, with
// the event recorded. A later call whose event has completed (cudaEventQuery, which does not
// block) and whose mirror has grown fails with `earlier` set. So a bad index is reported by a
// later call of the same node, not by the call that had it; POPC_CUDA_SYNC_CHECKS=1 (read when
// the kernel is created) waits for the stream after each call and reports it there instead.
// While the stream is being captured into a CUDA graph the copy and the query are left out:
// graph replays still skip bad indices, but do not report them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "popc_kernels.h"

namespace popc::cuda {

enum Code : int { kOk = 0, kBadIndex = 1, kDuplicate = 2, kCudaError = 3 };

struct Status {
  int code = kOk;
  bool earlier = false;     // the error was in an earlier call of this kernel object
  char message[256] = {0};  // kCudaError: what failed
};

struct DeviceState;
DeviceState* new_device_state(bool sync_checks);
void delete_device_state(DeviceState* state);  // waits for the state's streams, then frees

// GatherMatMulT / GatherMatMul (popc_kernels.h's math) on the device; W [N, H].
template <class T>
Status gather_matmul_t(DeviceState* state, void* stream, const T* X, const T* W, const int64_t* I, T* Y,
                       int64_t rows, int64_t H, int64_t N, int64_t K);
template <class T>
Status gather_matmul(DeviceState* state, void* stream, const T* Z, const T* W, const int64_t* I, T* Y, int64_t rows,
                     int64_t H, int64_t N, int64_t K);

// PopSwiGLUDecode / PopGeGLUDecode (popc_kernels.h's CpuPopDecode math): X [rows, H] with rows =
// B * seq, P [B, RC] (R retained first), weights [D, H], output_norm [D] or nullptr (mode 2 only).
// The host has checked shapes and clamped R, K (decode_split); ids are checked on the device.
template <class T>
struct PopDecodeArgs {
  const T* X; const int64_t* P; const T* Wg; const T* Wu; const T* Wd; const T* output_norm; T* Y;
  int64_t rows, seq, H, D, RC, R, K;
  int activation;  // PopActivation
};
template <class T>
Status pop_decode(DeviceState* state, void* stream, const PopDecodeArgs<T>& args);

// PopPartition (popc_kernels.h's CpuPopPartition math): Z [B, T, D], mask float [B, T], out int64
// [B, count]; mode is config[3] (output_norm is used in mode 2 only, static_score in mode 1 only).
template <class ZT>
struct PopPartitionArgs {
  const ZT* Z; const float* mask; const ZT* static_score; const ZT* output_norm; int64_t* out;
  int64_t B, T, D, count;
  int64_t mode;
};
template <class ZT>
Status pop_partition(DeviceState* state, void* stream, const PopPartitionArgs<ZT>& args);

}  // namespace popc::cuda
