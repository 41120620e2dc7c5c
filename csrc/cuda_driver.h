/* The few CUDA driver API entry points fastlora_kernels uses, resolved with dlopen/dlsym at first use so the
 * library neither links against libcuda nor needs CUDA's headers to build. Types and values are cuda.h's. */
#ifndef FASTLORA_CUDA_DRIVER_H
#define FASTLORA_CUDA_DRIVER_H

#include <stddef.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef unsigned long long CUdeviceptr;

#define CUDA_SUCCESS 0
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76
#define CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN 97
#define CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES 8

typedef struct fl_cuda {
    CUresult (*cuInit)(unsigned int flags);
    CUresult (*cuDriverGetVersion)(int *version);
    CUresult (*cuGetErrorString)(CUresult error, const char **str);
    CUresult (*cuGetErrorName)(CUresult error, const char **str);
    CUresult (*cuCtxGetCurrent)(CUcontext *ctx);
    CUresult (*cuCtxGetDevice)(CUdevice *device);
    CUresult (*cuDeviceGetAttribute)(int *value, int attrib, CUdevice device);
    CUresult (*cuModuleLoadData)(CUmodule *module, const void *image);
    CUresult (*cuModuleGetFunction)(CUfunction *function, CUmodule module, const char *name);
    CUresult (*cuFuncSetAttribute)(CUfunction function, int attrib, int value);
    CUresult (*cuLaunchKernel)(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                               unsigned int by, unsigned int bz, unsigned int shared_bytes, CUstream stream,
                               void **params, void **extra);
    CUresult (*cuMemsetD32Async)(CUdeviceptr dst, unsigned int value, size_t count, CUstream stream);
    /* Optional (CUDA 12.0+, else NULL): a context's process-unique id, which a re-created context does not reuse. */
    CUresult (*cuCtxGetId)(CUcontext ctx, unsigned long long *id);
} fl_cuda;

/* The loaded driver, or NULL with `error` (at least 256 bytes) saying why: no libcuda.so.1, a missing symbol, or
 * cuInit failing. The first call decides for the process; $FASTLORA_LIBCUDA overrides the library's path (a path
 * that does not exist gives the behaviour of a machine without a driver). */
const fl_cuda *fl_cuda_get(char *error, size_t error_size);

/* "CUDA_ERROR_xxx: description" for a driver error code. */
const char *fl_cuda_error_string(const fl_cuda *cuda, CUresult result, char *buf, size_t size);

#endif
