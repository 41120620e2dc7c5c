/* fastlora_kernels: argument validation, dispatch over the embedded specialisations, and launches.
 *
 * Every entry point works in three stages so that bad input never reaches the driver:
 *   1. validate the arguments (FASTLORA_STATUS_INVALID_ARGUMENT);
 *   2. plan the launches: choose each kernel's specialisation from the shape alone, fill its arguments by name,
 *      and check them against what that specialisation was compiled for (unit strides, multiples of 16);
 *      anything else is FASTLORA_STATUS_UNSUPPORTED, before the driver is loaded;
 *   3. load the driver, pick the cubin for the current device's architecture, launch.
 */
#include "fastlora_kernels.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_driver.h"
#include "fastlora_kernel_args.h"
#include "kernel_table.h"

#define FL_DTYPE_FP32 2
#define FL_MAX_LAUNCHES 8
#define FL_MAX_PARAMS 64
/* Workspace regions start on 256-byte boundaries, as cudaMalloc's allocations do. */
#define FL_WS_ALIGN 256

static _Thread_local char last_error[512];

static fastlora_status fail(fastlora_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

static fastlora_status succeed(void) {
    last_error[0] = '\0';
    return FASTLORA_STATUS_OK;
}

const char *fastlora_status_string(fastlora_status status) {
    switch (status) {
    case FASTLORA_STATUS_OK:
        return "FASTLORA_STATUS_OK: success";
    case FASTLORA_STATUS_INVALID_ARGUMENT:
        return "FASTLORA_STATUS_INVALID_ARGUMENT: an argument is invalid (see fastlora_last_error())";
    case FASTLORA_STATUS_UNSUPPORTED:
        return "FASTLORA_STATUS_UNSUPPORTED: valid arguments outside the compiled specialisations "
               "(see fastlora_last_error())";
    case FASTLORA_STATUS_NO_CUDA_DRIVER:
        return "FASTLORA_STATUS_NO_CUDA_DRIVER: no CUDA driver: libcuda.so.1 could not be loaded or initialised";
    case FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE:
        return "FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE: this build has no kernel for the current GPU's architecture";
    case FASTLORA_STATUS_CUDA_ERROR:
        return "FASTLORA_STATUS_CUDA_ERROR: a CUDA driver call failed (see fastlora_last_error())";
    }
    return "FASTLORA_STATUS_UNKNOWN: not a fastlora_status value";
}

const char *fastlora_last_error(void) { return last_error; }

const char *fastlora_version(void) { return FASTLORA_KERNELS_VERSION; }

/* ------------------------------------------------------------------------------------------------ planning */

typedef struct fl_arg {
    int kind; /* FL_PARAM_* + 1; 0 = not set */
    union {
        uint64_t p;
        int32_t i;
        float f;
    } v;
} fl_arg;

typedef struct fl_launch {
    const char *op;
    const char *site;
    int dtype;
    int rank_tile;    /* 0: any */
    int want_block_m; /* preferred tile among the variants; another one is taken when it is not built */
    int64_t grid_m, grid_n, grid_r, grid_split;
    int memset_ones; /* before this launch, fill `ones` with 1.0f (the split reduction's left operand) */
    uint64_t ones;
    int64_t ones_count;
    fl_arg args[FL_MAX_KERNEL_ARGS];
} fl_launch;

static void set_ptr(fl_launch *l, int index, const void *p) {
    l->args[index].kind = FL_PARAM_PTR + 1;
    l->args[index].v.p = (uint64_t)(uintptr_t)p;
}

/* Callers check the range first: every value passed here fits in int32. */
static void set_i32(fl_launch *l, int index, int64_t value) {
    l->args[index].kind = FL_PARAM_I32 + 1;
    l->args[index].v.i = (int32_t)value;
}

static void set_f32(fl_launch *l, int index, float value) {
    l->args[index].kind = FL_PARAM_F32 + 1;
    l->args[index].v.f = value;
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

/* The autotune key of the Python launchers (kernels/_common.py m_bucket): passed for ABI fidelity only. */
static int64_t m_bucket(int64_t m) {
    int64_t p = 1;
    while (p < m && p < 16384) {
        p *= 2;
    }
    return p;
}

static const char *dtype_name(int dtype) {
    return dtype == FASTLORA_DTYPE_FP16 ? "fp16" : dtype == FASTLORA_DTYPE_BF16 ? "bf16" : "fp32";
}

static const fl_kernel *find_kernel(const fl_launch *l, int arch) {
    const fl_kernel *fallback = NULL;
    for (int i = 0; i < fl_num_kernels; i++) {
        const fl_kernel *k = &fl_kernels[i];
        if ((arch && k->arch != arch) || k->dtype != l->dtype || strcmp(k->op, l->op) || strcmp(k->site, l->site) ||
            (l->rank_tile && k->rank_tile != l->rank_tile)) {
            continue;
        }
        if (k->block_m == l->want_block_m) {
            return k;
        }
        if (fallback == NULL) {
            fallback = k;
        }
    }
    return fallback;
}

static fastlora_status grid_of(const fl_launch *l, const fl_kernel *k, unsigned grid[3]) {
    int64_t g[3] = {1, 1, 1};
    switch (k->grid) {
    case FL_GRID_TILES_MN:
        g[0] = cdiv(l->grid_m, k->block_m) * cdiv(l->grid_n, k->block_n);
        break;
    case FL_GRID_ROWS_BY_RANK:
        g[0] = cdiv(l->grid_m, k->block_m);
        g[1] = cdiv(l->grid_r, k->block_r);
        break;
    case FL_GRID_WGRAD:
        g[0] = cdiv(l->grid_n, k->block_n);
        g[1] = cdiv(l->grid_r, k->block_r);
        g[2] = l->grid_split;
        break;
    case FL_GRID_SEGMENTS_BY_RANK:
        g[0] = l->grid_split;
        g[1] = cdiv(l->grid_m, k->block_m);
        g[2] = cdiv(l->grid_r, k->block_r);
        break;
    case FL_GRID_SEGMENTS_BY_COLS:
        g[0] = l->grid_split;
        g[1] = cdiv(l->grid_m, k->block_m);
        g[2] = cdiv(l->grid_n, k->block_n);
        break;
    default:
        return fail(FASTLORA_STATUS_UNSUPPORTED, "%s: unknown grid rule %d", k->name, k->grid);
    }
    if (g[0] > INT32_MAX || g[1] > 65535 || g[2] > 65535) {
        return fail(FASTLORA_STATUS_UNSUPPORTED, "%s: grid (%lld, %lld, %lld) exceeds CUDA's limits", k->name,
                    (long long)g[0], (long long)g[1], (long long)g[2]);
    }
    for (int i = 0; i < 3; i++) {
        grid[i] = (unsigned)g[i];
    }
    return FASTLORA_STATUS_OK;
}

/* The launch's arguments against its specialisation (any architecture's: they share arguments, unit and div16
 * lists): every parameter set with the right type, every unit argument 1, every divisible-by-16 argument a
 * multiple of 16, and a grid within CUDA's limits. */
static fastlora_status check_launch(fl_launch *l) {
    const fl_kernel *k = find_kernel(l, 0);
    if (k == NULL) {
        return fail(FASTLORA_STATUS_UNSUPPORTED, "this build has no %s/%s kernel for %s%s", l->op, l->site,
                    dtype_name(l->dtype), l->rank_tile ? " at this rank tile" : "");
    }
    if (k->num_params > FL_MAX_PARAMS) {
        return fail(FASTLORA_STATUS_UNSUPPORTED, "%s takes %d parameters, more than this library's %d", k->name,
                    k->num_params, FL_MAX_PARAMS);
    }
    for (int j = 0; j < k->num_params; j++) {
        int a = k->params[j];
        if (a != FL_SCRATCH_PARAM && l->args[a].kind != k->types[j] + 1) {
            return fail(FASTLORA_STATUS_UNSUPPORTED,
                        "%s: argument %s is not set with the type its cubin declares (library and kernel table "
                        "out of sync)",
                        k->name, k->arg_names[a]);
        }
    }
    for (int j = 0; j < k->num_unit; j++) {
        const fl_arg *arg = &l->args[k->unit[j]];
        if (arg->kind != FL_PARAM_I32 + 1 || arg->v.i != 1) {
            return fail(FASTLORA_STATUS_UNSUPPORTED, "%s (%s/%s) was compiled with %s = 1 (unit stride), got %d",
                        k->name, k->op, k->site, k->arg_names[k->unit[j]], (int)arg->v.i);
        }
    }
    for (int j = 0; j < k->num_div16; j++) {
        const fl_arg *arg = &l->args[k->div16[j]];
        if (arg->kind != FL_PARAM_I32 + 1 || arg->v.i % 16 != 0) {
            return fail(FASTLORA_STATUS_UNSUPPORTED,
                        "%s (%s/%s) was compiled for %s a multiple of 16, got %d: K, N and the leading dimensions "
                        "must be multiples of 16 elements",
                        k->name, k->op, k->site, k->arg_names[k->div16[j]], (int)arg->v.i);
        }
    }
    unsigned grid[3];
    return grid_of(l, k, grid);
}

/* ------------------------------------------------------------------------------------------------ validation */

static int dtype_ok(fastlora_dtype dtype) { return dtype == FASTLORA_DTYPE_FP16 || dtype == FASTLORA_DTYPE_BF16; }

static fastlora_status check_dims(fastlora_dtype dtype, int64_t M, int64_t N, int64_t K, int64_t r) {
    if (!dtype_ok(dtype)) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT,
                    "dtype must be FASTLORA_DTYPE_FP16 or FASTLORA_DTYPE_BF16, got %d", (int)dtype);
    }
    const char *names[] = {"M", "N", "K", "r"};
    int64_t values[] = {M, N, K, r};
    for (int i = 0; i < 4; i++) {
        if (values[i] < 1) {
            return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "%s must be >= 1, got %lld", names[i], (long long)values[i]);
        }
    }
    /* The kernels index with 32-bit sizes and strides (their row offsets are 64-bit). */
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || r > INT32_MAX / K || r > INT32_MAX / N) {
        return fail(FASTLORA_STATUS_UNSUPPORTED, "M, N, K and r*K, r*N must fit in 32-bit integers");
    }
    return FASTLORA_STATUS_OK;
}

static fastlora_status check_ld(const char *name, int64_t ld, int64_t cols, const char *cols_name) {
    if (ld < cols) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "%s must be >= %s (%lld), got %lld", name, cols_name,
                    (long long)cols, (long long)ld);
    }
    if (ld > INT32_MAX) {
        return fail(FASTLORA_STATUS_UNSUPPORTED, "%s = %lld does not fit in a 32-bit stride", name, (long long)ld);
    }
    return FASTLORA_STATUS_OK;
}

typedef struct fl_ptr_arg {
    const char *name;
    const void *p;
    int optional;
} fl_ptr_arg;

static fastlora_status check_ptrs(const fl_ptr_arg *ptrs, int n) {
    for (int i = 0; i < n; i++) {
        if (ptrs[i].p == NULL && !ptrs[i].optional) {
            return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "%s must not be NULL", ptrs[i].name);
        }
    }
    for (int i = 0; i < n; i++) {
        if ((uintptr_t)ptrs[i].p % 16 != 0) {
            return fail(FASTLORA_STATUS_UNSUPPORTED, "%s must be 16-byte aligned (the kernels were compiled so)",
                        ptrs[i].name);
        }
    }
    return FASTLORA_STATUS_OK;
}

#define FL_TRY(expr)                                                                                                   \
    do {                                                                                                               \
        fastlora_status fl_status_ = (expr);                                                                           \
        if (fl_status_ != FASTLORA_STATUS_OK) {                                                                        \
            return fl_status_;                                                                                         \
        }                                                                                                              \
    } while (0)

/* ------------------------------------------------------------------------------------------------ driver side */

typedef struct fl_context {
    unsigned long long key; /* cuCtxGetId: never reused, unlike the context's address */
    int arch;        /* the table architecture this device runs, 0 if none */
    int cc;          /* compute capability, e.g. 86 */
    int smem_optin;  /* largest shared memory a block may opt in to */
    CUfunction *fns; /* per table row, loaded at first use */
} fl_context;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static fl_context *contexts;
static int num_contexts;

static fastlora_status cuda_fail(const fl_cuda *cuda, CUresult result, const char *what) {
    char buf[256];
    return fail(FASTLORA_STATUS_CUDA_ERROR, "%s failed: %s", what, fl_cuda_error_string(cuda, result, buf, sizeof buf));
}

static fastlora_status load_driver(const fl_cuda **cuda) {
    char error[512];
    *cuda = fl_cuda_get(error, sizeof error);
    if (*cuda == NULL) {
        return fail(FASTLORA_STATUS_NO_CUDA_DRIVER, "%s", error);
    }
    return FASTLORA_STATUS_OK;
}

fastlora_status fastlora_driver_status(void) {
    const fl_cuda *cuda;
    FL_TRY(load_driver(&cuda));
    return succeed();
}

/* sm_80 cubins run on every 8.x device; Triton compiles sm_90 as sm_90a, which runs on 9.0 only. */
static int table_arch(int cc) { return cc / 10 == 8 ? 80 : cc == 90 ? 90 : 0; }

/* The current context's cache entry (created on first use). Called with cache_lock held. */
static fastlora_status current_context(const fl_cuda *cuda, fl_context **out) {
    CUcontext ctx = NULL;
    CUresult result = cuda->cuCtxGetCurrent(&ctx);
    if (result != CUDA_SUCCESS) {
        return cuda_fail(cuda, result, "cuCtxGetCurrent");
    }
    if (ctx == NULL) {
        return fail(FASTLORA_STATUS_CUDA_ERROR,
                    "no CUDA context is current on this thread (call cudaSetDevice / cuCtxSetCurrent first)");
    }
    unsigned long long key = 0;
    if ((result = cuda->cuCtxGetId(ctx, &key)) != CUDA_SUCCESS) {
        return cuda_fail(cuda, result, "cuCtxGetId");
    }
    for (int i = 0; i < num_contexts; i++) {
        if (contexts[i].key == key) {
            *out = &contexts[i];
            return FASTLORA_STATUS_OK;
        }
    }
    CUdevice device;
    int major = 0, minor = 0, optin = 0;
    if ((result = cuda->cuCtxGetDevice(&device)) != CUDA_SUCCESS) {
        return cuda_fail(cuda, result, "cuCtxGetDevice");
    }
    if ((result = cuda->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)) ||
        (result = cuda->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)) ||
        (result = cuda->cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device))) {
        return cuda_fail(cuda, result, "cuDeviceGetAttribute");
    }
    CUfunction *fns = calloc((size_t)fl_num_kernels + 1, sizeof *fns);
    fl_context *grown = realloc(contexts, (size_t)(num_contexts + 1) * sizeof *contexts);
    if (fns == NULL || grown == NULL) {
        free(fns);
        if (grown != NULL) {
            contexts = grown;
        }
        return fail(FASTLORA_STATUS_CUDA_ERROR, "out of host memory");
    }
    contexts = grown;
    fl_context *c = &contexts[num_contexts++];
    c->key = key;
    c->cc = major * 10 + minor;
    c->arch = table_arch(c->cc);
    c->smem_optin = optin;
    c->fns = fns;
    *out = c;
    return FASTLORA_STATUS_OK;
}

/* Loads row `index`'s cubin into the context once. Called with cache_lock held. */
static fastlora_status get_function(const fl_cuda *cuda, fl_context *c, int index, CUfunction *fn) {
    if (c->fns[index] != NULL) {
        *fn = c->fns[index];
        return FASTLORA_STATUS_OK;
    }
    const fl_kernel *k = &fl_kernels[index];
    if (k->shared > c->smem_optin) {
        return fail(FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE, "%s needs %d bytes of shared memory, the device allows %d",
                    k->name, k->shared, c->smem_optin);
    }
    CUmodule module;
    CUresult result = cuda->cuModuleLoadData(&module, k->image);
    if (result != CUDA_SUCCESS) {
        return cuda_fail(cuda, result, "cuModuleLoadData (a driver older than the cubin's CUDA version?)");
    }
    if ((result = cuda->cuModuleGetFunction(fn, module, k->name)) != CUDA_SUCCESS) {
        return cuda_fail(cuda, result, "cuModuleGetFunction");
    }
    /* Above 48 KiB a block's dynamic shared memory must be opted in to, per function. */
    if (k->shared > 49152 &&
        (result = cuda->cuFuncSetAttribute(*fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k->shared))) {
        return cuda_fail(cuda, result, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
    }
    c->fns[index] = *fn;
    return FASTLORA_STATUS_OK;
}

/* Runs checked launches in order on `stream`. */
static fastlora_status execute(fl_launch *launches, int count, void *stream) {
    const fl_cuda *cuda;
    FL_TRY(load_driver(&cuda));
    CUfunction fns[FL_MAX_LAUNCHES];
    const fl_kernel *kernels[FL_MAX_LAUNCHES];
    pthread_mutex_lock(&cache_lock);
    fl_context *c = NULL;
    fastlora_status status = current_context(cuda, &c);
    for (int i = 0; i < count && status == FASTLORA_STATUS_OK; i++) {
        kernels[i] = c->arch ? find_kernel(&launches[i], c->arch) : NULL;
        if (kernels[i] == NULL) {
            status = fail(FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE,
                          "no %s/%s kernel for %s on this device (compute capability %d.%d); this build has %d "
                          "kernels for sm_80 (8.x devices) and sm_90 (9.0)",
                          launches[i].op, launches[i].site, dtype_name(launches[i].dtype), c->cc / 10, c->cc % 10,
                          fl_num_kernels);
        } else {
            status = get_function(cuda, c, (int)(kernels[i] - fl_kernels), &fns[i]);
        }
    }
    pthread_mutex_unlock(&cache_lock);
    FL_TRY(status);

    for (int i = 0; i < count; i++) {
        const fl_kernel *k = kernels[i];
        fl_launch *l = &launches[i];
        unsigned grid[3] = {1, 1, 1};
        FL_TRY(grid_of(l, k, grid));
        void *params[FL_MAX_PARAMS];
        uint64_t null_scratch[FL_MAX_PARAMS] = {0};
        for (int j = 0; j < k->num_params; j++) {
            int a = k->params[j];
            params[j] = a == FL_SCRATCH_PARAM ? (void *)&null_scratch[j] : (void *)&l->args[a].v;
        }
        CUresult result;
        if (l->memset_ones &&
            (result = cuda->cuMemsetD32Async(l->ones, 0x3f800000u, (size_t)l->ones_count, (CUstream)stream))) {
            return cuda_fail(cuda, result, "cuMemsetD32Async");
        }
        result = cuda->cuLaunchKernel(fns[i], grid[0], grid[1], grid[2], 32u * (unsigned)k->num_warps, 1, 1,
                                      (unsigned)k->shared, (CUstream)stream, params, NULL);
        if (result != CUDA_SUCCESS) {
            char what[160];
            snprintf(what, sizeof what, "cuLaunchKernel(%s, %s/%s, sm_%d)", k->name, k->op, k->site, k->arch);
            return cuda_fail(cuda, result, what);
        }
    }
    return succeed();
}

static fastlora_status check_all(fl_launch *launches, int count) {
    for (int i = 0; i < count; i++) {
        FL_TRY(check_launch(&launches[i]));
    }
    return FASTLORA_STATUS_OK;
}

/* ------------------------------------------------------------------------------------------------ launches */

/* Philox threshold of dropout probability 0, shifted into int32 range (kernels/_common.py signed_threshold). */
#define FL_NO_DROPOUT_THRESHOLD INT32_MIN

/* out[M, r] = scale · x[M, K] · wt[K, r], wt read with strides (stride_wk, stride_wr). */
static void plan_shrink(fl_launch *l, const char *site, int dtype, int64_t M, int64_t K, int64_t r, const void *x,
                        int64_t ldx, const void *wt, int64_t stride_wk, int64_t stride_wr, void *out, float scale) {
    memset(l, 0, sizeof *l);
    l->op = "shrink";
    l->site = site;
    l->dtype = dtype;
    l->grid_m = M;
    l->grid_r = r;
    set_ptr(l, FL_ARG_lora_shrink_x_ptr, x);
    set_ptr(l, FL_ARG_lora_shrink_wt_ptr, wt);
    set_ptr(l, FL_ARG_lora_shrink_out_ptr, out);
    set_ptr(l, FL_ARG_lora_shrink_seed_ptr, x);
    set_i32(l, FL_ARG_lora_shrink_M, M);
    set_i32(l, FL_ARG_lora_shrink_K, K);
    set_i32(l, FL_ARG_lora_shrink_R, r);
    set_i32(l, FL_ARG_lora_shrink_M_BUCKET, m_bucket(M));
    set_i32(l, FL_ARG_lora_shrink_stride_xm, ldx);
    set_i32(l, FL_ARG_lora_shrink_stride_xk, 1);
    set_i32(l, FL_ARG_lora_shrink_stride_wk, stride_wk);
    set_i32(l, FL_ARG_lora_shrink_stride_wr, stride_wr);
    set_i32(l, FL_ARG_lora_shrink_stride_om, r);
    set_i32(l, FL_ARG_lora_shrink_stride_or, 1);
    set_f32(l, FL_ARG_lora_shrink_scale, scale);
    set_i32(l, FL_ARG_lora_shrink_threshold, FL_NO_DROPOUT_THRESHOLD);
    set_f32(l, FL_ARG_lora_shrink_keep_scale, 1.0f);
}

/* out[M, N] = x[M, K]·wt[K, N] + low[M, r]·rt[r, N] + bias, each of wt / rt with one unit stride. */
static void plan_expand(fl_launch *l, const char *site, int dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                        const void *x, int64_t ldx, const void *wt, int64_t stride_wk, int64_t stride_wn,
                        const void *low, const void *rt, int64_t stride_rr, int64_t stride_rn, const void *bias,
                        void *out, int64_t ldo) {
    memset(l, 0, sizeof *l);
    l->op = "expand";
    l->site = site;
    l->dtype = dtype;
    l->grid_m = M;
    l->grid_n = N;
    /* 128x128 tiles once they fill two waves of a large GPU, 64x64 below (more programs for medium M). */
    l->want_block_m = cdiv(M, 128) * cdiv(N, 128) >= 256 ? 128 : 64;
    set_ptr(l, FL_ARG_lora_expand_x_ptr, x);
    set_ptr(l, FL_ARG_lora_expand_wt_ptr, wt);
    set_ptr(l, FL_ARG_lora_expand_l_ptr, low);
    set_ptr(l, FL_ARG_lora_expand_rt_ptr, rt);
    set_ptr(l, FL_ARG_lora_expand_bias_ptr, bias ? bias : x);
    set_ptr(l, FL_ARG_lora_expand_out_ptr, out);
    set_ptr(l, FL_ARG_lora_expand_seed_ptr, x);
    /* A dense W0: the 4-bit quantization state is not read (QBLOCK = 0). */
    set_ptr(l, FL_ARG_lora_expand_wq_absmax_ptr, x);
    set_ptr(l, FL_ARG_lora_expand_wq_code_ptr, x);
    set_ptr(l, FL_ARG_lora_expand_wq_absmax2_ptr, x);
    set_ptr(l, FL_ARG_lora_expand_wq_code2_ptr, x);
    set_ptr(l, FL_ARG_lora_expand_wq_offset_ptr, x);
    set_i32(l, FL_ARG_lora_expand_M, M);
    set_i32(l, FL_ARG_lora_expand_N, N);
    set_i32(l, FL_ARG_lora_expand_K, K);
    set_i32(l, FL_ARG_lora_expand_R, r);
    set_i32(l, FL_ARG_lora_expand_M_BUCKET, m_bucket(M));
    set_i32(l, FL_ARG_lora_expand_stride_xm, ldx);
    set_i32(l, FL_ARG_lora_expand_stride_xk, 1);
    set_i32(l, FL_ARG_lora_expand_stride_wk, stride_wk);
    set_i32(l, FL_ARG_lora_expand_stride_wn, stride_wn);
    set_i32(l, FL_ARG_lora_expand_stride_lm, r);
    set_i32(l, FL_ARG_lora_expand_stride_lr, 1);
    set_i32(l, FL_ARG_lora_expand_stride_rr, stride_rr);
    set_i32(l, FL_ARG_lora_expand_stride_rn, stride_rn);
    set_i32(l, FL_ARG_lora_expand_stride_om, ldo);
    set_i32(l, FL_ARG_lora_expand_stride_on, 1);
    set_i32(l, FL_ARG_lora_expand_threshold, FL_NO_DROPOUT_THRESHOLD);
    set_f32(l, FL_ARG_lora_expand_keep_scale, 1.0f);
}

/* out[split][R, Q] = u[M, R]ᵀ·v[M, Q] over token chunks; out's strides are (stride_os, stride_or, stride_oq). */
static void plan_wgrad(fl_launch *l, const char *site, int dtype, int64_t M, int64_t R, int64_t Q, int64_t split,
                       int64_t chunk, const void *u, int64_t stride_um, const void *v, int64_t stride_vm, void *out,
                       int64_t stride_os, int64_t stride_or, int64_t stride_oq) {
    memset(l, 0, sizeof *l);
    l->op = "wgrad";
    l->site = site;
    l->dtype = dtype;
    l->grid_n = Q;
    l->grid_r = R;
    l->grid_split = split;
    set_ptr(l, FL_ARG_lora_wgrad_u_ptr, u);
    set_ptr(l, FL_ARG_lora_wgrad_v_ptr, v);
    set_ptr(l, FL_ARG_lora_wgrad_out_ptr, out);
    set_ptr(l, FL_ARG_lora_wgrad_seed_ptr, u);
    set_i32(l, FL_ARG_lora_wgrad_M, M);
    set_i32(l, FL_ARG_lora_wgrad_R, R);
    set_i32(l, FL_ARG_lora_wgrad_Q, Q);
    set_i32(l, FL_ARG_lora_wgrad_chunk, chunk);
    set_i32(l, FL_ARG_lora_wgrad_M_BUCKET, m_bucket(M));
    set_i32(l, FL_ARG_lora_wgrad_stride_um, stride_um);
    set_i32(l, FL_ARG_lora_wgrad_stride_ur, 1);
    set_i32(l, FL_ARG_lora_wgrad_stride_vm, stride_vm);
    set_i32(l, FL_ARG_lora_wgrad_stride_vq, 1);
    set_i32(l, FL_ARG_lora_wgrad_stride_os, stride_os);
    set_i32(l, FL_ARG_lora_wgrad_stride_or, stride_or);
    set_i32(l, FL_ARG_lora_wgrad_stride_oq, stride_oq);
    set_i32(l, FL_ARG_lora_wgrad_threshold, FL_NO_DROPOUT_THRESHOLD);
    set_f32(l, FL_ARG_lora_wgrad_keep_scale, 1.0f);
}

/* ------------------------------------------------------------------------------------------------ forward */

static int use_onepass(int64_t M, int64_t r) { return M <= FL_ONEPASS_MAX_TOKENS && r <= 64; }

static size_t elem_bytes(fastlora_dtype dtype) {
    (void)dtype; /* fp16 and bf16 */
    return 2;
}

static size_t forward_workspace(fastlora_dtype dtype, int64_t M, int64_t r) {
    return use_onepass(M, r) ? 0 : (size_t)round_up(M * r * (int64_t)elem_bytes(dtype), FL_WS_ALIGN);
}

fastlora_status fastlora_lora_forward_workspace_size(fastlora_dtype dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                                                     size_t *bytes) {
    if (bytes == NULL) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "bytes must not be NULL");
    }
    *bytes = 0;
    FL_TRY(check_dims(dtype, M, N, K, r));
    *bytes = forward_workspace(dtype, M, r);
    return succeed();
}

static fastlora_status check_workspace(const void *workspace, size_t size, size_t needed) {
    if (needed > 0 && workspace == NULL) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "workspace must not be NULL: this shape needs %zu bytes", needed);
    }
    if (size < needed) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "workspace_size is %zu bytes, this shape needs %zu", size,
                    needed);
    }
    return FASTLORA_STATUS_OK;
}

fastlora_status fastlora_lora_forward(void *stream, fastlora_dtype dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                                      const void *x, int64_t ldx, const void *w, int64_t ldw, const void *bias,
                                      const void *a, const void *b, float scaling, void *y, int64_t ldy,
                                      void *workspace, size_t workspace_size) {
    FL_TRY(check_dims(dtype, M, N, K, r));
    const fl_ptr_arg ptrs[] = {{"x", x, 0}, {"w", w, 0}, {"a", a, 0}, {"b", b, 0},
                               {"y", y, 0}, {"bias", bias, 1}, {"workspace", workspace, 1}};
    FL_TRY(check_ptrs(ptrs, (int)(sizeof ptrs / sizeof ptrs[0])));
    FL_TRY(check_ld("ldx", ldx, K, "K"));
    FL_TRY(check_ld("ldw", ldw, K, "K"));
    FL_TRY(check_ld("ldy", ldy, N, "N"));
    size_t needed = forward_workspace(dtype, M, r);
    FL_TRY(check_workspace(workspace, workspace_size, needed));

    fl_launch launches[2];
    int count;
    if (use_onepass(M, r)) {
        fl_launch *l = &launches[0];
        memset(l, 0, sizeof *l);
        l->op = "onepass";
        l->site = bias ? "fwd" : "fwd_nobias";
        l->dtype = dtype;
        l->rank_tile = r <= 16 ? 16 : 64;
        l->grid_m = M;
        l->grid_n = N;
        set_ptr(l, FL_ARG_lora_onepass_x_ptr, x);
        set_ptr(l, FL_ARG_lora_onepass_wt_ptr, w);
        set_ptr(l, FL_ARG_lora_onepass_at_ptr, a);
        set_ptr(l, FL_ARG_lora_onepass_bt_ptr, b);
        set_ptr(l, FL_ARG_lora_onepass_bias_ptr, bias ? bias : x);
        set_ptr(l, FL_ARG_lora_onepass_y_ptr, y);
        set_ptr(l, FL_ARG_lora_onepass_xs_ptr, y);
        set_ptr(l, FL_ARG_lora_onepass_seed_ptr, x);
        /* A dense W0: the 4-bit quantization state is not read (QBLOCK = 0). */
        set_ptr(l, FL_ARG_lora_onepass_wq_absmax_ptr, x);
        set_ptr(l, FL_ARG_lora_onepass_wq_code_ptr, x);
        set_ptr(l, FL_ARG_lora_onepass_wq_absmax2_ptr, x);
        set_ptr(l, FL_ARG_lora_onepass_wq_code2_ptr, x);
        set_ptr(l, FL_ARG_lora_onepass_wq_offset_ptr, x);
        set_i32(l, FL_ARG_lora_onepass_M, M);
        set_i32(l, FL_ARG_lora_onepass_N, N);
        set_i32(l, FL_ARG_lora_onepass_K, K);
        set_i32(l, FL_ARG_lora_onepass_R, r);
        set_i32(l, FL_ARG_lora_onepass_M_BUCKET, m_bucket(M));
        set_i32(l, FL_ARG_lora_onepass_stride_xm, ldx);
        set_i32(l, FL_ARG_lora_onepass_stride_xk, 1);
        set_i32(l, FL_ARG_lora_onepass_stride_wk, 1);
        set_i32(l, FL_ARG_lora_onepass_stride_wn, ldw);
        set_i32(l, FL_ARG_lora_onepass_stride_ak, 1);
        set_i32(l, FL_ARG_lora_onepass_stride_ar, K);
        set_i32(l, FL_ARG_lora_onepass_stride_br, 1);
        set_i32(l, FL_ARG_lora_onepass_stride_bn, r);
        set_i32(l, FL_ARG_lora_onepass_stride_ym, ldy);
        set_i32(l, FL_ARG_lora_onepass_stride_yn, 1);
        set_i32(l, FL_ARG_lora_onepass_stride_sm, 0);
        set_i32(l, FL_ARG_lora_onepass_stride_sr, 1);
        set_f32(l, FL_ARG_lora_onepass_scaling, scaling);
        set_i32(l, FL_ARG_lora_onepass_threshold, FL_NO_DROPOUT_THRESHOLD);
        set_f32(l, FL_ARG_lora_onepass_keep_scale, 1.0f);
        count = 1;
    } else {
        void *xs = workspace; /* [M, r], activation dtype */
        /* x·Aᵀ: Aᵀ is [K, r] with strides (1, K); then xs·Bᵀ: Bᵀ is [r, N] with strides (1, r). */
        plan_shrink(&launches[0], "fwd", dtype, M, K, r, x, ldx, a, 1, K, xs, scaling);
        plan_expand(&launches[1], bias ? "fwd" : "fwd_nobias", dtype, M, N, K, r, x, ldx, w, 1, ldw, xs, b, 1, r,
                    bias, y, ldy);
        count = 2;
    }
    FL_TRY(check_all(launches, count));
    return execute(launches, count, stream);
}

/* ------------------------------------------------------------------------------------------------ backward */

/* (split, chunk) of the weight-gradient reduction over M tokens, as kernels/wgrad.py split_count: a function of
 * the shape alone, which keeps the gradients deterministic. */
static void split_count(int64_t M, int64_t R, int64_t Q, int64_t *split, int64_t *chunk) {
    int64_t tiles = cdiv(Q, 128) * cdiv(R, 64);
    int64_t s = cdiv(FL_WGRAD_TARGET_PROGRAMS, tiles);
    if (s > cdiv(M, FL_WGRAD_CHUNK_ALIGN)) {
        s = cdiv(M, FL_WGRAD_CHUNK_ALIGN);
    }
    if (s < 1) {
        s = 1;
    }
    *chunk = cdiv(cdiv(M, s), FL_WGRAD_CHUNK_ALIGN) * FL_WGRAD_CHUNK_ALIGN;
    *split = cdiv(M, *chunk);
}

typedef struct fl_backward_layout {
    int64_t split_a, chunk_a, split_b, chunk_b;
    size_t xs, dxa, partial_a, partial_b, ones, total; /* byte offsets into the workspace, and its size */
} fl_backward_layout;

static fl_backward_layout backward_layout(fastlora_dtype dtype, int64_t M, int64_t N, int64_t K, int64_t r) {
    fl_backward_layout b;
    split_count(M, r, K, &b.split_a, &b.chunk_a);
    split_count(M, r, N, &b.split_b, &b.chunk_b);
    int64_t low = round_up(M * r * (int64_t)elem_bytes(dtype), FL_WS_ALIGN);
    int64_t pa = b.split_a > 1 ? round_up(b.split_a * r * K * 4, FL_WS_ALIGN) : 0;
    int64_t pb = b.split_b > 1 ? round_up(b.split_b * N * r * 4, FL_WS_ALIGN) : 0;
    int64_t max_split = b.split_a > b.split_b ? b.split_a : b.split_b;
    int64_t ones = max_split > 1 ? round_up(max_split * 4, FL_WS_ALIGN) : 0;
    b.xs = 0;
    b.dxa = (size_t)low;
    b.partial_a = (size_t)(2 * low);
    b.partial_b = (size_t)(2 * low + pa);
    b.ones = (size_t)(2 * low + pa + pb);
    b.total = (size_t)(2 * low + pa + pb + ones);
    return b;
}

fastlora_status fastlora_lora_backward_workspace_size(fastlora_dtype dtype, int64_t M, int64_t N, int64_t K,
                                                      int64_t r, size_t *bytes) {
    if (bytes == NULL) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "bytes must not be NULL");
    }
    *bytes = 0;
    FL_TRY(check_dims(dtype, M, N, K, r));
    *bytes = backward_layout(dtype, M, N, K, r).total;
    return succeed();
}

/* out [Q] (fp32) = Σ_s partial[s, :] in index order, as onesᵀ·partial with an exact fp32 dot. */
static void plan_reduce(fl_launch *l, int64_t split, int64_t Q, const void *ones, const void *partial, float *out) {
    plan_wgrad(l, "reduce", FL_DTYPE_FP32, split, 1, Q, 1, round_up(split, 16), ones, 1, partial, Q, out, 0, Q, 1);
    l->memset_ones = 1;
    l->ones = (uint64_t)(uintptr_t)ones;
    l->ones_count = split;
}

fastlora_status fastlora_lora_backward(void *stream, fastlora_dtype dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                                       const void *dy, int64_t lddy, const void *x, int64_t ldx, const void *w,
                                       int64_t ldw, const void *a, const void *b, float scaling, void *dx,
                                       int64_t lddx, float *dA, float *dB, void *workspace, size_t workspace_size) {
    FL_TRY(check_dims(dtype, M, N, K, r));
    const fl_ptr_arg ptrs[] = {{"dy", dy, 0}, {"x", x, 0},   {"w", w, 0},   {"a", a, 0},
                               {"b", b, 0},   {"dA", dA, 0}, {"dB", dB, 0}, {"workspace", workspace, 0},
                               {"dx", dx, 1}};
    FL_TRY(check_ptrs(ptrs, (int)(sizeof ptrs / sizeof ptrs[0])));
    FL_TRY(check_ld("lddy", lddy, N, "N"));
    FL_TRY(check_ld("ldx", ldx, K, "K"));
    FL_TRY(check_ld("ldw", ldw, K, "K"));
    if (dx != NULL) {
        FL_TRY(check_ld("lddx", lddx, K, "K"));
    }
    fl_backward_layout lay = backward_layout(dtype, M, N, K, r);
    FL_TRY(check_workspace(workspace, workspace_size, lay.total));
    char *ws = workspace;
    void *xs = ws + lay.xs, *dxa = ws + lay.dxa;
    float *partial_a = (float *)(void *)(ws + lay.partial_a), *partial_b = (float *)(void *)(ws + lay.partial_b);
    void *ones = ws + lay.ones;

    fl_launch launches[FL_MAX_LAUNCHES];
    int n = 0;
    /* xs = s·x·Aᵀ, recomputed rather than kept from the forward; dxa = s·dy·B (B [N, r] read as [K=N, r]). */
    plan_shrink(&launches[n++], "fwd", dtype, M, K, r, x, ldx, a, 1, K, xs, scaling);
    plan_shrink(&launches[n++], "bwd", dtype, M, N, r, dy, lddy, b, r, 1, dxa, scaling);
    if (dx != NULL) {
        /* dx = dy·W0 + dxa·A: W0 [N, K] is already the [N, K] right operand (unit stride along K). */
        plan_expand(&launches[n++], "bwd", dtype, M, K, N, r, dy, lddy, w, ldw, 1, dxa, a, K, 1, NULL, dx, lddx);
    }
    /* dA [r, K] = dxaᵀ·x; dB [N, r] = (xsᵀ·dy)ᵀ, stored through transposed strides. */
    float *out_a = lay.split_a > 1 ? partial_a : dA;
    float *out_b = lay.split_b > 1 ? partial_b : dB;
    plan_wgrad(&launches[n++], "dA", dtype, M, r, K, lay.split_a, lay.chunk_a, dxa, r, x, ldx, out_a, r * K, K, 1);
    plan_wgrad(&launches[n++], "dB", dtype, M, r, N, lay.split_b, lay.chunk_b, xs, r, dy, lddy, out_b, N * r, 1, r);
    if (lay.split_a > 1) {
        plan_reduce(&launches[n++], lay.split_a, r * K, ones, partial_a, dA);
    }
    if (lay.split_b > 1) {
        plan_reduce(&launches[n++], lay.split_b, N * r, ones, partial_b, dB);
    }
    FL_TRY(check_all(launches, n));
    return execute(launches, n, stream);
}

/* ------------------------------------------------------------------------------------------------ multi-adapter */

static fastlora_status check_meta(const fastlora_batch_meta *meta, int64_t r_max) {
    if (meta == NULL) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "meta must not be NULL");
    }
    if (meta->num_tokens < 1 || meta->num_segments < 0 || meta->num_slots < 1 || meta->max_segment_len < 0 ||
        meta->max_rank < 0 || meta->max_rank > r_max) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT,
                    "meta: num_tokens (%lld) and num_slots (%lld) must be >= 1, num_segments (%lld) and "
                    "max_segment_len (%lld) >= 0, max_rank (%lld) in [0, r_max = %lld]",
                    (long long)meta->num_tokens, (long long)meta->num_slots, (long long)meta->num_segments,
                    (long long)meta->max_segment_len, (long long)meta->max_rank, (long long)r_max);
    }
    if (meta->num_segments > meta->num_tokens || meta->max_segment_len > meta->num_tokens ||
        (meta->num_segments > 0 && meta->max_segment_len < 1)) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT,
                    "meta: num_segments (%lld) and max_segment_len (%lld) must be in [1, num_tokens = %lld] (or both "
                    "0 when no token uses an adapter)",
                    (long long)meta->num_segments, (long long)meta->max_segment_len, (long long)meta->num_tokens);
    }
    int none = meta->num_segments == 0;
    const fl_ptr_arg ptrs[] = {{"meta->sorted_token_ids", meta->sorted_token_ids, none},
                               {"meta->seg_offsets", meta->seg_offsets, none},
                               {"meta->seg_slots", meta->seg_slots, none},
                               {"meta->slot_ranks", meta->slot_ranks, none},
                               {"meta->slot_scalings", meta->slot_scalings, none},
                               {"meta->token_scales", meta->token_scales, 1}};
    return check_ptrs(ptrs, (int)(sizeof ptrs / sizeof ptrs[0]));
}

/* Segment grids: (segments, token blocks of the longest segment, rank or column blocks). */
static void plan_segments(fl_launch *l, const char *op, const char *site, int dtype, const fastlora_batch_meta *meta) {
    memset(l, 0, sizeof *l);
    l->op = op;
    l->site = site;
    l->dtype = dtype;
    l->grid_split = meta->num_segments;
    l->grid_m = meta->max_segment_len;
    l->grid_r = meta->max_rank;
}

fastlora_status fastlora_multi_lora_shrink(void *stream, fastlora_dtype dtype, const fastlora_batch_meta *meta,
                                           int64_t K, int64_t r_max, const void *x, int64_t ldx, const void *a_pool,
                                           void *xa, int64_t ldxa) {
    FL_TRY(check_dims(dtype, meta ? meta->num_tokens : 1, 1, K, r_max));
    FL_TRY(check_meta(meta, r_max));
    const fl_ptr_arg ptrs[] = {{"x", x, 0}, {"a_pool", a_pool, 0}, {"xa", xa, 0}};
    FL_TRY(check_ptrs(ptrs, 3));
    FL_TRY(check_ld("ldx", ldx, K, "K"));
    FL_TRY(check_ld("ldxa", ldxa, meta->max_rank, "meta->max_rank"));
    if (meta->num_slots > INT32_MAX / (r_max * K) || meta->num_tokens > INT32_MAX / (ldxa > 0 ? ldxa : 1)) {
        return fail(FASTLORA_STATUS_UNSUPPORTED, "the pool (num_slots * r_max * K) and xa (T * ldxa) must have "
                                                 "fewer than 2^31 elements");
    }
    if (meta->num_segments == 0 || meta->max_rank == 0) {
        return succeed(); /* no token uses an adapter */
    }
    fl_launch l;
    plan_segments(&l, "multi_shrink", "seg", dtype, meta);
    l.rank_tile = meta->max_rank <= 16 ? 16 : 64;
    set_ptr(&l, FL_ARG_multi_lora_shrink_x_ptr, x);
    set_ptr(&l, FL_ARG_multi_lora_shrink_a_ptr, a_pool);
    set_ptr(&l, FL_ARG_multi_lora_shrink_xa_ptr, xa);
    set_ptr(&l, FL_ARG_multi_lora_shrink_sorted_ids_ptr, meta->sorted_token_ids);
    set_ptr(&l, FL_ARG_multi_lora_shrink_seg_offsets_ptr, meta->seg_offsets);
    set_ptr(&l, FL_ARG_multi_lora_shrink_seg_slots_ptr, meta->seg_slots);
    set_ptr(&l, FL_ARG_multi_lora_shrink_ranks_ptr, meta->slot_ranks);
    set_i32(&l, FL_ARG_multi_lora_shrink_K, K);
    set_i32(&l, FL_ARG_multi_lora_shrink_R, meta->max_rank);
    set_i32(&l, FL_ARG_multi_lora_shrink_M_BUCKET, m_bucket(meta->max_segment_len));
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_xm, ldx);
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_xk, 1);
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_as, r_max * K);
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_ar, K);
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_ak, 1);
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_os, meta->num_tokens * ldxa);
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_om, ldxa);
    set_i32(&l, FL_ARG_multi_lora_shrink_stride_or, 1);
    FL_TRY(check_all(&l, 1));
    return execute(&l, 1, stream);
}

fastlora_status fastlora_multi_lora_expand(void *stream, fastlora_dtype dtype, const fastlora_batch_meta *meta,
                                           int64_t N, int64_t r_max, const void *xa, int64_t ldxa, const void *b_pool,
                                           void *y, int64_t ldy) {
    FL_TRY(check_dims(dtype, meta ? meta->num_tokens : 1, N, 1, r_max));
    FL_TRY(check_meta(meta, r_max));
    const fl_ptr_arg ptrs[] = {{"xa", xa, 0}, {"b_pool", b_pool, 0}, {"y", y, 0}};
    FL_TRY(check_ptrs(ptrs, 3));
    FL_TRY(check_ld("ldxa", ldxa, meta->max_rank, "meta->max_rank"));
    FL_TRY(check_ld("ldy", ldy, N, "N"));
    if (meta->num_slots > INT32_MAX / (r_max * N) || meta->num_tokens > INT32_MAX / (ldxa > 0 ? ldxa : 1)) {
        return fail(FASTLORA_STATUS_UNSUPPORTED, "the pool (num_slots * N * r_max) and xa (T * ldxa) must have "
                                                 "fewer than 2^31 elements");
    }
    if (meta->num_segments == 0 || meta->max_rank == 0) {
        return succeed();
    }
    fl_launch l;
    plan_segments(&l, "multi_expand", meta->token_scales ? "seg_scales" : "seg", dtype, meta);
    l.grid_n = N;
    set_ptr(&l, FL_ARG_multi_lora_expand_xa_ptr, xa);
    set_ptr(&l, FL_ARG_multi_lora_expand_b_ptr, b_pool);
    set_ptr(&l, FL_ARG_multi_lora_expand_y_ptr, y);
    set_ptr(&l, FL_ARG_multi_lora_expand_sorted_ids_ptr, meta->sorted_token_ids);
    set_ptr(&l, FL_ARG_multi_lora_expand_seg_offsets_ptr, meta->seg_offsets);
    set_ptr(&l, FL_ARG_multi_lora_expand_seg_slots_ptr, meta->seg_slots);
    set_ptr(&l, FL_ARG_multi_lora_expand_ranks_ptr, meta->slot_ranks);
    set_ptr(&l, FL_ARG_multi_lora_expand_scalings_ptr, meta->slot_scalings);
    set_ptr(&l, FL_ARG_multi_lora_expand_token_scales_ptr,
            meta->token_scales ? (const void *)meta->token_scales : (const void *)meta->slot_scalings);
    set_i32(&l, FL_ARG_multi_lora_expand_N, N);
    set_i32(&l, FL_ARG_multi_lora_expand_R, meta->max_rank);
    set_i32(&l, FL_ARG_multi_lora_expand_M_BUCKET, m_bucket(meta->max_segment_len));
    set_i32(&l, FL_ARG_multi_lora_expand_stride_om, ldxa);
    set_i32(&l, FL_ARG_multi_lora_expand_stride_or, 1);
    set_i32(&l, FL_ARG_multi_lora_expand_stride_bs, N * r_max);
    set_i32(&l, FL_ARG_multi_lora_expand_stride_bn, r_max);
    set_i32(&l, FL_ARG_multi_lora_expand_stride_br, 1);
    set_i32(&l, FL_ARG_multi_lora_expand_stride_ym, ldy);
    set_i32(&l, FL_ARG_multi_lora_expand_stride_yn, 1);
    FL_TRY(check_all(&l, 1));
    return execute(&l, 1, stream);
}

/* ------------------------------------------------------------------------------------------------ introspection */

#define FL_EM_CUDA 190
#define FL_SHT_SYMTAB 2
#define FL_STT_FUNC 2

static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

static uint32_t rd32(const unsigned char *p) { return (uint32_t)rd16(p) | (uint32_t)rd16(p + 2) << 16; }

static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

/* The SM of a CUDA ELF. Cubins of ptxas up to 12.x (ELF ABI version 7, OS/ABI 0x33) keep it in e_flags' low byte;
 * ptxas 13.x (ABI version 8, OS/ABI 0x41) moved it to bits 8-15 and uses the low byte for feature bits. */
static int elf_arch(const unsigned char *elf, size_t size) {
    if (size < 64 || memcmp(elf, "\177ELF", 4) != 0 || elf[4] != 2 || elf[5] != 1 || rd16(elf + 18) != FL_EM_CUDA) {
        return -1;
    }
    uint32_t flags = rd32(elf + 48);
    return (int)(elf[8] >= 8 ? (flags >> 8) & 0xff : flags & 0xff);
}

/* Whether the ELF's symbol table defines function `name`. */
static int elf_has_function(const unsigned char *elf, size_t size, const char *name) {
    if (elf_arch(elf, size) < 0) {
        return 0;
    }
    uint64_t shoff = rd64(elf + 40);
    uint16_t shentsize = rd16(elf + 58), shnum = rd16(elf + 60);
    if (shentsize < 64 || shoff > size || (uint64_t)shnum * shentsize > size - shoff) {
        return 0;
    }
    for (unsigned i = 0; i < shnum; i++) {
        const unsigned char *sh = elf + shoff + (uint64_t)i * shentsize;
        if (rd32(sh + 4) != FL_SHT_SYMTAB) {
            continue;
        }
        uint64_t off = rd64(sh + 24), sz = rd64(sh + 32), ent = rd64(sh + 56);
        uint32_t link = rd32(sh + 40);
        if (ent < 24 || off > size || sz > size - off || link >= shnum) {
            return 0;
        }
        const unsigned char *strsh = elf + shoff + (uint64_t)link * shentsize;
        uint64_t stroff = rd64(strsh + 24), strsz = rd64(strsh + 32);
        if (stroff > size || strsz > size - stroff) {
            return 0;
        }
        size_t len = strlen(name);
        for (uint64_t s = 0; s + ent <= sz; s += ent) {
            const unsigned char *sym = elf + off + s;
            uint32_t st_name = rd32(sym);
            if ((sym[4] & 0xf) != FL_STT_FUNC || rd16(sym + 6) == 0 || st_name + len >= strsz) {
                continue;
            }
            const char *sname = (const char *)elf + stroff + st_name;
            if (memcmp(sname, name, len + 1) == 0) {
                return 1;
            }
        }
    }
    return 0;
}

int fastlora_kernel_count(void) { return fl_num_kernels; }

fastlora_status fastlora_kernel_info(int i, fastlora_kernel_desc *info) {
    if (info == NULL) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "info must not be NULL");
    }
    if (i < 0 || i >= fl_num_kernels) {
        return fail(FASTLORA_STATUS_INVALID_ARGUMENT, "kernel index %d is outside [0, %d)", i, fl_num_kernels);
    }
    const fl_kernel *k = &fl_kernels[i];
    info->name = k->name;
    info->op = k->op;
    info->site = k->site;
    info->config = k->config;
    info->arch = k->arch;
    info->dtype = k->dtype;
    info->rank_tile = k->rank_tile;
    info->num_warps = k->num_warps;
    info->shared_bytes = k->shared;
    info->num_params = k->num_params;
    info->params = k->param_list;
    info->cubin = k->image;
    info->cubin_bytes = k->image_size;
    info->elf_arch = elf_arch(k->image, k->image_size);
    info->elf_has_kernel = elf_has_function(k->image, k->image_size, k->name);
    return succeed();
}
