/* The recording stand-in for libcuda.so.1 described in fake_cuda.h. Test code only. */
#include "fake_cuda.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FAKE_API __attribute__((visibility("default")))
#define FAKE_MAX_IMAGES 512

typedef struct fake_function {
    const void *image;
    char name[128];
} fake_function;

static fake_cuda_log log_;
static const void *images[FAKE_MAX_IMAGES];
static int counts[FAKE_MAX_IMAGES];
static int num_images;
static fake_function functions[FAKE_MAX_IMAGES];
static int num_functions;

FAKE_API fake_cuda_log *fake_cuda_get_log(void) { return &log_; }

FAKE_API void fake_cuda_set_param_counts(const void *const *imgs, const int *cnts, int n) {
    num_images = n < FAKE_MAX_IMAGES ? n : FAKE_MAX_IMAGES;
    for (int i = 0; i < num_images; i++) {
        images[i] = imgs[i];
        counts[i] = cnts[i];
    }
}

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

FAKE_API int cuInit(unsigned flags) { return flags == 0 ? 0 : 1; }

FAKE_API int cuDriverGetVersion(int *v) {
    *v = 13010;
    return 0;
}

FAKE_API int cuGetErrorName(int e, const char **s) {
    *s = e == 701 ? "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES" : "CUDA_ERROR_FAKE";
    return 0;
}

FAKE_API int cuGetErrorString(int e, const char **s) {
    *s = e == 701 ? "too many resources requested for launch" : "fake error";
    return 0;
}

/* One context per compute capability, so the library's per-context cache sees a new device when it changes. */
FAKE_API int cuCtxGetCurrent(void **ctx) {
    int cc = env_int("FAKE_CUDA_CC", 90);
    *ctx = cc ? (void *)(uintptr_t)(0x1000 + cc) : NULL;
    return 0;
}

FAKE_API int cuCtxGetDevice(int *device) {
    *device = env_int("FAKE_CUDA_CC", 90);
    return 0;
}

FAKE_API int cuDeviceGetAttribute(int *value, int attrib, int device) {
    switch (attrib) {
    case 75: /* CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR */
        *value = device / 10;
        return 0;
    case 76:
        *value = device % 10;
        return 0;
    case 97: /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: A100 163 KiB, H100 227 KiB, others 99 KiB */
        *value = device == 80 ? 166912 : device == 90 ? 232448 : 101376;
        return 0;
    }
    return 1;
}

FAKE_API int cuModuleLoadData(void **module, const void *image) {
    log_.module_loads++;
    *module = (void *)image;
    return 0;
}

FAKE_API int cuModuleGetFunction(void **fn, void *module, const char *name) {
    if (num_functions == FAKE_MAX_IMAGES) {
        return 2;
    }
    fake_function *f = &functions[num_functions++];
    f->image = module;
    strncpy(f->name, name, sizeof f->name - 1);
    *fn = f;
    return 0;
}

FAKE_API int cuFuncSetAttribute(void *fn, int attrib, int value) {
    (void)fn;
    if (attrib == 8) { /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES */
        log_.shared_optins++;
        log_.last_optin_bytes = value;
    }
    return 0;
}

FAKE_API int cuMemsetD32Async(uint64_t dst, unsigned value, size_t count, void *stream) {
    (void)stream;
    log_.memsets++;
    log_.memset_dst = dst;
    log_.memset_value = value;
    log_.memset_count = count;
    return 0;
}

FAKE_API int cuLaunchKernel(void *fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared, void *stream, void **params, void **extra) {
    if (env_int("FAKE_CUDA_FAIL_LAUNCH", 0)) {
        return 701;
    }
    if (extra != NULL || log_.num_launches == (int)(sizeof log_.launches / sizeof log_.launches[0])) {
        return 1;
    }
    const fake_function *f = fn;
    fake_cuda_launch *l = &log_.launches[log_.num_launches++];
    memset(l, 0, sizeof *l);
    l->image = f->image;
    memcpy(l->name, f->name, sizeof l->name);
    l->grid[0] = gx, l->grid[1] = gy, l->grid[2] = gz;
    l->block[0] = bx, l->block[1] = by, l->block[2] = bz;
    l->shared = shared;
    l->stream = stream;
    l->memsets_before = log_.memsets;
    l->num_params = -1;
    for (int i = 0; i < num_images; i++) {
        if (images[i] == f->image) {
            l->num_params = counts[i];
        }
    }
    for (int i = 0; i < l->num_params && i < FAKE_CUDA_MAX_PARAMS; i++) {
        /* Every parameter slot the library passes is 8 bytes of storage (a union or a null pointer). */
        memcpy(&l->params[i], params[i], sizeof l->params[i]);
    }
    return 0;
}

/* Context ids as CUDA 12 reports them; the fake's contexts are one per compute capability. */
FAKE_API int cuCtxGetId(void *ctx, unsigned long long *id) {
    *id = 7000 + (unsigned long long)(uintptr_t)ctx;
    return 0;
}
