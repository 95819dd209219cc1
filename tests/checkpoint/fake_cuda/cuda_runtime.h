// A fake CUDA runtime for testing cuda_ext/src/device_reader.cu on machines without a GPU.
//
// Only the API device_reader.cu uses. Streams are real threads that run their queued work in
// order, each copy after a small random delay, so a pinned slot overwritten before its copy
// ran would corrupt the data the test compares. Events complete when their stream reaches
// them. "Device memory" is ordinary host memory. Any call can be made to fail (the Nth call
// of an API, see fake_cuda::fail_at), and live pinned allocations, events and streams are
// counted so tests can assert that nothing leaks. Not thread-safe to reconfigure while a
// read runs, except through the hooks.
#pragma once
#include <cstddef>
#include <functional>
#include <string>

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorUnknown = 999,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
};

constexpr unsigned int cudaHostAllocDefault = 0;
constexpr unsigned int cudaEventDisableTiming = 2;
constexpr unsigned int cudaStreamNonBlocking = 1;

struct FakeCudaStream;
struct FakeCudaEvent;
typedef FakeCudaStream* cudaStream_t;
typedef FakeCudaEvent* cudaEvent_t;

const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int flags);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int flags);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s);

namespace fake_cuda {
// Make the nth (1-based, counted from now) call of `api` fail; api is the function's name,
// e.g. "cudaHostAlloc". n = 0 clears it. reset() clears every injection and call count.
void fail_at(const std::string& api, int n);
void reset();
// Live pinned allocations, events and streams (created and not yet destroyed).
int live_host();
size_t live_host_bytes();
int live_events();
int live_streams();
// Calls made to an API since reset().
int calls(const std::string& api);
int device_count();
void set_device_count(int n);
// Offset added to every pointer cudaHostAlloc returns (0: 4096-aligned, as the real one seems to be).
void set_host_misalign(size_t bytes);
// Upper bound of the random delay before each queued copy runs, in microseconds.
void set_max_delay_us(int us);
// Called (on the caller's thread) by every successful cudaMemcpyAsync with its 1-based index.
void on_memcpy(std::function<void(int)> hook);
}  // namespace fake_cuda
