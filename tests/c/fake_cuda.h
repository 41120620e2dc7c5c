/* A stand-in for libcuda.so.1 that records what libfastlora_kernels asks of the driver, so the launch path (kernel
 * choice per architecture, module loading, shared-memory opt-in, grids, parameter marshalling) is tested on
 * machines without a GPU. Loaded by the library through $FASTLORA_LIBCUDA; the test reaches the same instance
 * with dlopen of the same path.
 *
 * Environment, read at each call: FAKE_CUDA_CC (compute capability of the current device, e.g. 90; 0 = no current
 * context), FAKE_CUDA_FAIL_LAUNCH (1: cuLaunchKernel fails with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES). */
#ifndef FASTLORA_FAKE_CUDA_H
#define FASTLORA_FAKE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#define FAKE_CUDA_MAX_PARAMS 64

typedef struct fake_cuda_launch {
    const void *image; /* the cubin the launched function's module was loaded from */
    char name[128];
    unsigned grid[3];
    unsigned block[3];
    unsigned shared;
    void *stream;
    int num_params; /* -1 when the test did not register the image's parameter count */
    uint64_t params[FAKE_CUDA_MAX_PARAMS]; /* the first 8 bytes behind each parameter pointer */
    int memsets_before; /* cuMemsetD32Async calls recorded before this launch */
} fake_cuda_launch;

typedef struct fake_cuda_log {
    int module_loads;
    int shared_optins; /* cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) calls */
    int last_optin_bytes;
    int memsets;
    uint64_t memset_dst;
    unsigned memset_value;
    size_t memset_count;
    int num_launches;
    fake_cuda_launch launches[32];
} fake_cuda_log;

typedef fake_cuda_log *(*fake_cuda_log_fn)(void);
typedef void (*fake_cuda_param_counts_fn)(const void *const *images, const int *counts, int n);

#endif
