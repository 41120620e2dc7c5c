/* Loads the CUDA driver with dlopen at first use, so libfastlora_kernels builds and links without CUDA. */
#include "cuda_driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static fl_cuda driver;
static const fl_cuda *loaded;
static char load_error[512];

/* dlsym returns an object pointer; its bytes are copied into the function pointer, which ISO C allows. */
static int resolve(void *lib, const char *name, void *slot, size_t size) {
    void *sym = dlsym(lib, name);
    if (sym == NULL || size != sizeof sym) {
        snprintf(load_error, sizeof load_error, "the CUDA driver library lacks %s (driver too old?)", name);
        return 0;
    }
    memcpy(slot, &sym, size);
    return 1;
}

static void load(void) {
    const char *override = getenv("FASTLORA_LIBCUDA");
    const char *path = override && *override ? override : "libcuda.so.1";
    /* RTLD_LOCAL keeps the driver's symbols out of the engine's namespace; the engine's own dlopen of the same
     * library path returns the same handle, so both share one driver instance. */
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL && !(override && *override)) {
        lib = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
    }
    if (lib == NULL) {
        const char *why = dlerror();
        snprintf(load_error, sizeof load_error, "no CUDA driver: dlopen(%s) failed: %s", path, why ? why : "?");
        return;
    }
    int ok = 1;
#define FL_RESOLVE(fn) ok = ok && resolve(lib, #fn, &driver.fn, sizeof driver.fn)
    FL_RESOLVE(cuInit);
    FL_RESOLVE(cuDriverGetVersion);
    FL_RESOLVE(cuGetErrorString);
    FL_RESOLVE(cuGetErrorName);
    FL_RESOLVE(cuCtxGetCurrent);
    FL_RESOLVE(cuCtxGetDevice);
    FL_RESOLVE(cuDeviceGetAttribute);
    FL_RESOLVE(cuModuleLoadData);
    FL_RESOLVE(cuModuleGetFunction);
    FL_RESOLVE(cuFuncSetAttribute);
    FL_RESOLVE(cuLaunchKernel);
    FL_RESOLVE(cuMemsetD32Async);
    /* Required (CUDA 12.0+ drivers, which the cubins need anyway): context ids are never reused, so the per-context
     * module cache cannot hand a new context the functions of a destroyed one at the same address. */
    FL_RESOLVE(cuCtxGetId);
#undef FL_RESOLVE
    if (!ok) {
        return;
    }
    CUresult result = driver.cuInit(0);
    if (result != CUDA_SUCCESS) {
        char buf[256];
        snprintf(load_error, sizeof load_error, "no usable CUDA driver: cuInit failed: %s",
                 fl_cuda_error_string(&driver, result, buf, sizeof buf));
        return;
    }
    loaded = &driver;
}

const fl_cuda *fl_cuda_get(char *error, size_t error_size) {
    pthread_once(&load_once, load);
    if (loaded == NULL && error != NULL && error_size > 0) {
        snprintf(error, error_size, "%s", load_error);
    }
    return loaded;
}

const char *fl_cuda_error_string(const fl_cuda *cuda, CUresult result, char *buf, size_t size) {
    const char *name = NULL;
    const char *text = NULL;
    if (cuda->cuGetErrorName(result, &name) != CUDA_SUCCESS || name == NULL) {
        name = "CUDA_ERROR_UNKNOWN";
    }
    if (cuda->cuGetErrorString(result, &text) != CUDA_SUCCESS || text == NULL) {
        text = "unknown error";
    }
    snprintf(buf, size, "%s (%d): %s", name, result, text);
    return buf;
}
