/* Tests of libfastlora_kernels, one mode per ctest test:
 *   arguments       every entry point rejects bad arguments before touching the driver
 *   no-driver       with no loadable driver, valid calls return FASTLORA_STATUS_NO_CUDA_DRIVER and say so
 *   manifest FILE   the embedded table and cubins (ELF arch, kernel symbol) match what fastlora.aot declared
 *   fake-driver LIB the launch path against a recording stand-in for the driver (fake_cuda.c): which cubin runs on
 *                   which architecture, grids, parameter values, shared-memory opt-in, driver errors
 *   gpu             forward and backward on the GPU against a CPU reference; exit 77 (skip) without a GPU
 */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_cuda.h"
#include "fastlora_kernels.h"

static int failures;

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            failures++;                                                                                                \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);                                   \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fprintf(stderr, "\n");                                                                                     \
        }                                                                                                              \
    } while (0)

static void expect(fastlora_status got, fastlora_status want, const char *needle, const char *what) {
    CHECK(got == want, "%s: got %s, want %s (last error: %s)", what, fastlora_status_string(got),
          fastlora_status_string(want), fastlora_last_error());
    if (needle != NULL) {
        CHECK(strstr(fastlora_last_error(), needle) != NULL, "%s: last error \"%s\" does not mention \"%s\"", what,
              fastlora_last_error(), needle);
    }
}

/* Stand-ins for device pointers: aligned, never dereferenced (every call here fails before a launch). */
#define DEV(n) ((void *)(uintptr_t)(0x100000u * (n)))

static fastlora_status forward(int dtype, int64_t M, int64_t N, int64_t K, int64_t r, const void *x, int64_t ldx,
                               int64_t ldw, int64_t ldy, void *ws, size_t ws_size) {
    return fastlora_lora_forward(NULL, (fastlora_dtype)dtype, M, N, K, r, x, ldx, DEV(2), ldw, NULL, DEV(3), DEV(4),
                                 0.5f, DEV(5), ldy, ws, ws_size);
}

static int test_arguments(void) {
    const fastlora_status all[] = {FASTLORA_STATUS_OK,          FASTLORA_STATUS_INVALID_ARGUMENT,
                                   FASTLORA_STATUS_UNSUPPORTED, FASTLORA_STATUS_NO_CUDA_DRIVER,
                                   FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE, FASTLORA_STATUS_CUDA_ERROR};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        const char *s = fastlora_status_string(all[i]);
        CHECK(s != NULL && strncmp(s, "FASTLORA_STATUS_", 16) == 0, "status %d has string %s", (int)all[i], s);
    }
    CHECK(strstr(fastlora_status_string((fastlora_status)99), "UNKNOWN") != NULL, "unknown status");
    CHECK(strcmp(fastlora_version(), FASTLORA_KERNELS_VERSION) == 0, "version %s", fastlora_version());

    /* Forward: 64x128x64, r 8 runs the one-pass kernel and needs no workspace. */
    expect(forward(0, 4, 128, 64, 8, NULL, 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "x", "x NULL");
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 4, 128, 64, 8, DEV(1), 64, NULL, 64, NULL, DEV(3), DEV(4),
                                 1.f, DEV(5), 128, NULL, 0),
           FASTLORA_STATUS_INVALID_ARGUMENT, "w", "w NULL");
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 4, 128, 64, 8, DEV(1), 64, DEV(2), 64, NULL, DEV(3), DEV(4),
                                 1.f, NULL, 128, NULL, 0),
           FASTLORA_STATUS_INVALID_ARGUMENT, "y", "y NULL");
    expect(forward(0, 0, 128, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "M", "M = 0");
    expect(forward(0, -3, 128, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "M", "M < 0");
    expect(forward(0, 4, 128, 64, 0, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "r", "r = 0");
    expect(forward(0, 4, 0, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "N", "N = 0");
    expect(forward(7, 4, 128, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "dtype",
           "bad dtype");
    expect(forward(2, 4, 128, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "dtype",
           "fp32 is not an activation dtype of the C API");
    expect(forward(0, 4, 128, 64, 8, DEV(1), 32, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "ldx",
           "ldx < K");
    expect(forward(0, 4, 128, 64, 8, DEV(1), 64, 63, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "ldw",
           "ldw < K");
    expect(forward(0, 4, 128, 64, 8, DEV(1), 64, 64, 100, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "ldy",
           "ldy < N");

    /* Large M takes shrink + GEMM, which needs a workspace of M * r activations. */
    size_t ws = 0;
    expect(fastlora_lora_forward_workspace_size(FASTLORA_DTYPE_BF16, 4, 128, 64, 8, &ws), FASTLORA_STATUS_OK, NULL,
           "workspace query, one-pass");
    CHECK(ws == 0, "one-pass workspace %zu", ws);
    expect(fastlora_lora_forward_workspace_size(FASTLORA_DTYPE_BF16, 1000, 128, 64, 8, &ws), FASTLORA_STATUS_OK, NULL,
           "workspace query, split");
    CHECK(ws >= 1000 * 8 * 2 && ws % 256 == 0, "split workspace %zu", ws);
    expect(fastlora_lora_forward_workspace_size(FASTLORA_DTYPE_BF16, 1000, 128, 64, 8, NULL),
           FASTLORA_STATUS_INVALID_ARGUMENT, "bytes", "workspace query without an output");
    expect(forward(1, 1000, 128, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_INVALID_ARGUMENT, "workspace",
           "missing workspace");
    expect(forward(1, 1000, 128, 64, 8, DEV(1), 64, 64, 128, DEV(9), ws - 256), FASTLORA_STATUS_INVALID_ARGUMENT,
           "workspace_size", "short workspace");

    /* Valid, but outside the compiled specialisations. */
    expect(forward(0, 4, 128, 72, 8, DEV(1), 72, 72, 128, NULL, 0), FASTLORA_STATUS_UNSUPPORTED, "multiple of 16",
           "K not a multiple of 16");
    expect(forward(0, 4, 128, 64, 8, DEV(1), 80, 64, 136, NULL, 0), FASTLORA_STATUS_UNSUPPORTED, "multiple of 16",
           "ldy not a multiple of 16");
    expect(forward(0, 4, 128, 64, 8, (char *)DEV(1) + 2, 64, 64, 128, NULL, 0), FASTLORA_STATUS_UNSUPPORTED,
           "aligned", "misaligned x");

    /* Backward. */
    expect(fastlora_lora_backward_workspace_size(FASTLORA_DTYPE_FP16, 5000, 128, 64, 8, &ws), FASTLORA_STATUS_OK, NULL,
           "backward workspace query");
    CHECK(ws >= 2 * 5000 * 8 * 2, "backward workspace %zu", ws);
    expect(fastlora_lora_backward(NULL, FASTLORA_DTYPE_FP16, 5000, 128, 64, 8, DEV(1), 128, DEV(2), 64, DEV(3), 64,
                                  DEV(4), DEV(5), 1.f, DEV(6), 64, NULL, DEV(8), DEV(9), ws),
           FASTLORA_STATUS_INVALID_ARGUMENT, "dA", "dA NULL");
    expect(fastlora_lora_backward(NULL, FASTLORA_DTYPE_FP16, 5000, 128, 64, 8, DEV(1), 64, DEV(2), 64, DEV(3), 64,
                                  DEV(4), DEV(5), 1.f, DEV(6), 64, DEV(7), DEV(8), DEV(9), ws),
           FASTLORA_STATUS_INVALID_ARGUMENT, "lddy", "lddy < N");
    expect(fastlora_lora_backward(NULL, FASTLORA_DTYPE_FP16, 5000, 128, 64, 8, DEV(1), 128, DEV(2), 64, DEV(3), 64,
                                  DEV(4), DEV(5), 1.f, DEV(6), 32, DEV(7), DEV(8), DEV(9), ws),
           FASTLORA_STATUS_INVALID_ARGUMENT, "lddx", "lddx < K");
    expect(fastlora_lora_backward(NULL, FASTLORA_DTYPE_FP16, 5000, 128, 64, 8, DEV(1), 128, DEV(2), 64, DEV(3), 64,
                                  DEV(4), DEV(5), 1.f, DEV(6), 64, DEV(7), DEV(8), DEV(9), ws / 2),
           FASTLORA_STATUS_INVALID_ARGUMENT, "workspace_size", "short backward workspace");

    /* Multi-adapter entry points. */
    fastlora_batch_meta meta = {8, 1, 8, 16, 4, DEV(10), DEV(11), DEV(12), DEV(13), DEV(14), NULL};
    expect(fastlora_multi_lora_shrink(NULL, FASTLORA_DTYPE_FP16, NULL, 64, 16, DEV(1), 64, DEV(2), DEV(3), 16),
           FASTLORA_STATUS_INVALID_ARGUMENT, "meta", "meta NULL");
    expect(fastlora_multi_lora_shrink(NULL, FASTLORA_DTYPE_FP16, &meta, 64, 8, DEV(1), 64, DEV(2), DEV(3), 16),
           FASTLORA_STATUS_INVALID_ARGUMENT, "max_rank", "max_rank > r_max");
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_FP16, &meta, 128, 16, DEV(1), 8, DEV(2), DEV(3), 128),
           FASTLORA_STATUS_INVALID_ARGUMENT, "ldxa", "ldxa < r_max");
    expect(fastlora_multi_lora_shrink(NULL, FASTLORA_DTYPE_FP16, &meta, 72, 16, DEV(1), 72, DEV(2), DEV(3), 16),
           FASTLORA_STATUS_UNSUPPORTED, "multiple of 16", "multi shrink, K not a multiple of 16");
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_FP16, &meta, 128, 16, DEV(1), 16, DEV(2), DEV(3), 136),
           FASTLORA_STATUS_UNSUPPORTED, "multiple of 16", "multi expand, ldy not a multiple of 16");
    meta.max_segment_len = 0;
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_FP16, &meta, 128, 16, DEV(1), 16, DEV(2), DEV(3), 128),
           FASTLORA_STATUS_INVALID_ARGUMENT, "max_segment_len", "segments without tokens");
    meta.max_segment_len = 8;
    meta.seg_slots = (const int32_t *)((const char *)DEV(12) + 4);
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_FP16, &meta, 128, 16, DEV(1), 16, DEV(2), DEV(3), 128),
           FASTLORA_STATUS_UNSUPPORTED, "seg_slots", "misaligned metadata");
    meta.seg_slots = DEV(12);
    meta.slot_ranks = NULL;
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_FP16, &meta, 128, 16, DEV(1), 16, DEV(2), DEV(3), 128),
           FASTLORA_STATUS_INVALID_ARGUMENT, "slot_ranks", "slot_ranks NULL");
    /* A batch where no token uses an adapter launches nothing, so it succeeds even without a driver. */
    fastlora_batch_meta none = {8, 0, 0, 0, 4, NULL, NULL, NULL, NULL, NULL, NULL};
    expect(fastlora_multi_lora_shrink(NULL, FASTLORA_DTYPE_FP16, &none, 64, 16, DEV(1), 64, DEV(2), DEV(3), 16),
           FASTLORA_STATUS_OK, NULL, "no adapter in the batch");

    /* Introspection. */
    fastlora_kernel_desc info;
    expect(fastlora_kernel_info(-1, &info), FASTLORA_STATUS_INVALID_ARGUMENT, "index", "kernel -1");
    expect(fastlora_kernel_info(fastlora_kernel_count(), &info), FASTLORA_STATUS_INVALID_ARGUMENT, "index",
           "kernel past the end");
    expect(fastlora_kernel_info(0, NULL), FASTLORA_STATUS_INVALID_ARGUMENT, "info", "info NULL");
    expect(fastlora_kernel_info(0, &info), FASTLORA_STATUS_OK, NULL, "kernel 0");
    CHECK(strcmp(fastlora_last_error(), "") == 0, "a success clears the last error, got %s", fastlora_last_error());
    return failures ? 1 : 0;
}

static int test_no_driver(void) {
    expect(fastlora_driver_status(), FASTLORA_STATUS_NO_CUDA_DRIVER, "no CUDA driver", "driver status");
    CHECK(strstr(fastlora_status_string(FASTLORA_STATUS_NO_CUDA_DRIVER), "no CUDA driver") != NULL, "status string");
    expect(forward(0, 4, 128, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_NO_CUDA_DRIVER, "libcuda",
           "one-pass forward");
    expect(forward(1, 1000, 128, 64, 8, DEV(1), 64, 64, 128, DEV(9), 1 << 20), FASTLORA_STATUS_NO_CUDA_DRIVER,
           "dlopen", "split forward");
    size_t ws = 0;
    fastlora_lora_backward_workspace_size(FASTLORA_DTYPE_FP16, 5000, 128, 64, 8, &ws);
    expect(fastlora_lora_backward(NULL, FASTLORA_DTYPE_FP16, 5000, 128, 64, 8, DEV(1), 128, DEV(2), 64, DEV(3), 64,
                                  DEV(4), DEV(5), 1.f, DEV(6), 64, DEV(7), DEV(8), DEV(9), ws),
           FASTLORA_STATUS_NO_CUDA_DRIVER, "no CUDA driver", "backward");
    fastlora_batch_meta meta = {8, 1, 8, 16, 4, DEV(10), DEV(11), DEV(12), DEV(13), DEV(14), NULL};
    expect(fastlora_multi_lora_shrink(NULL, FASTLORA_DTYPE_BF16, &meta, 64, 16, DEV(1), 64, DEV(2), DEV(3), 16),
           FASTLORA_STATUS_NO_CUDA_DRIVER, "no CUDA driver", "multi-adapter shrink");
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_BF16, &meta, 128, 16, DEV(1), 16, DEV(2), DEV(3), 128),
           FASTLORA_STATUS_NO_CUDA_DRIVER, "no CUDA driver", "multi-adapter expand");
    /* The failure is remembered, not retried into a crash. */
    expect(forward(0, 4, 128, 64, 8, DEV(1), 64, 64, 128, NULL, 0), FASTLORA_STATUS_NO_CUDA_DRIVER, "libcuda",
           "second call");
    return failures ? 1 : 0;
}

static const char *dtype_name(int dtype) { return dtype == 0 ? "fp16" : dtype == 1 ? "bf16" : "fp32"; }

static int test_manifest(const char *path) {
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "cannot open %s\n", path);
        return 1;
    }
    char line[512];
    int i = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        char name[128], dtype[16], op[32], site[32], config[64];
        int arch, params, scratch, rank_tile;
        char *fields[9];
        int n = 0;
        for (char *tok = strtok(line, "\t\n"); tok != NULL && n < 9; tok = strtok(NULL, "\t\n")) {
            fields[n++] = tok;
        }
        if (n != 9) {
            CHECK(0, "line %d of %s has %d fields", i + 1, path, n);
            break;
        }
        snprintf(name, sizeof name, "%s", fields[0]);
        arch = atoi(fields[1]);
        snprintf(dtype, sizeof dtype, "%s", fields[2]);
        snprintf(op, sizeof op, "%s", fields[3]);
        snprintf(site, sizeof site, "%s", fields[4]);
        snprintf(config, sizeof config, "%s", fields[5]);
        params = atoi(fields[6]);
        scratch = atoi(fields[7]);
        rank_tile = atoi(fields[8]);
        fastlora_kernel_desc k;
        if (fastlora_kernel_info(i, &k) != FASTLORA_STATUS_OK) {
            CHECK(0, "manifest line %d has no kernel in the library", i + 1);
            break;
        }
        CHECK(strcmp(k.name, name) == 0 && strcmp(k.op, op) == 0 && strcmp(k.site, site) == 0 &&
                  strcmp(k.config, config) == 0 && strcmp(dtype_name(k.dtype), dtype) == 0 && k.arch == arch &&
                  k.num_params == params + scratch && k.rank_tile == rank_tile,
              "kernel %d is %s %s/%s %s %s sm_%d (%d params), declared %s %s/%s %s %s sm_%d (%d + %d)", i, k.name,
              k.op, k.site, dtype_name(k.dtype), k.config, k.arch, k.num_params, name, op, site, dtype, config, arch,
              params, scratch);
        CHECK(k.elf_arch == arch, "kernel %d (%s): the cubin is for sm_%d, declared sm_%d", i, name, k.elf_arch, arch);
        CHECK(k.elf_has_kernel == 1, "kernel %d: the cubin's symbol table does not define %s", i, name);
        CHECK(k.cubin_bytes > 1024, "kernel %d: cubin of %zu bytes", i, k.cubin_bytes);
        i++;
    }
    fclose(f);
    CHECK(i == fastlora_kernel_count(), "the manifest declares %d kernels, the library embeds %d", i,
          fastlora_kernel_count());
    CHECK(i > 0, "no kernels");
    printf("%d embedded kernels match the manifest (ELF architecture and kernel symbol checked)\n", i);
    return failures ? 1 : 0;
}

/* ------------------------------------------------------------------------------------------------ fake driver */

static fake_cuda_log *fake_log;

static const fastlora_kernel_desc *desc_of(const void *image) {
    static fastlora_kernel_desc d;
    for (int i = 0; i < fastlora_kernel_count(); i++) {
        if (fastlora_kernel_info(i, &d) == FASTLORA_STATUS_OK && d.cubin == image) {
            return &d;
        }
    }
    return NULL;
}

/* The recorded value of parameter `name` of launch `i` (its low 4 bytes for i32 / f32 parameters). */
static uint64_t param(int i, const char *name) {
    const fake_cuda_launch *l = &fake_log->launches[i];
    const fastlora_kernel_desc *d = desc_of(l->image);
    if (d == NULL) {
        CHECK(0, "launch %d ran an image that is not an embedded cubin", i);
        return 0;
    }
    char list[1024];
    snprintf(list, sizeof list, "%s", d->params);
    int index = 0;
    for (char *tok = strtok(list, ","); tok != NULL; tok = strtok(NULL, ","), index++) {
        if (strcmp(tok, name) == 0) {
            return l->params[index];
        }
    }
    CHECK(0, "launch %d (%s) has no parameter %s", i, l->name, name);
    return 0;
}

static int32_t param_i32(int i, const char *name) { return (int32_t)(uint32_t)param(i, name); }

static float param_f32(int i, const char *name) {
    uint32_t bits = (uint32_t)param(i, name);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void expect_launch(int i, const char *name, int arch, const char *site, unsigned g0, unsigned g1, unsigned g2) {
    CHECK(i < fake_log->num_launches, "launch %d missing (%d launches)", i, fake_log->num_launches);
    if (i >= fake_log->num_launches) {
        return;
    }
    const fake_cuda_launch *l = &fake_log->launches[i];
    const fastlora_kernel_desc *d = desc_of(l->image);
    CHECK(d != NULL && strcmp(l->name, name) == 0 && d->arch == arch && strcmp(d->site, site) == 0,
          "launch %d is %s (sm_%d %s), want %s sm_%d %s", i, l->name, d ? d->arch : -1, d ? d->site : "?", name, arch,
          site);
    CHECK(l->grid[0] == g0 && l->grid[1] == g1 && l->grid[2] == g2,
          "launch %d (%s) grid (%u, %u, %u), want (%u, %u, %u)", i, name, l->grid[0], l->grid[1], l->grid[2], g0, g1,
          g2);
    if (d != NULL) {
        CHECK(l->block[0] == 32u * (unsigned)d->num_warps && l->block[1] == 1 && l->shared == (unsigned)d->shared_bytes,
              "launch %d: block %u, shared %u for %d warps and %d bytes", i, l->block[0], l->shared, d->num_warps,
              d->shared_bytes);
        CHECK(l->num_params == d->num_params, "launch %d: %d parameters recorded, %d declared", i, l->num_params,
              d->num_params);
        CHECK(strstr(d->params, "scratch") == NULL || l->params[d->num_params - 1] == 0,
              "launch %d: the scratch pointer is not null", i);
    }
}

static int test_fake_driver(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "cannot load the fake driver %s: %s\n", path, dlerror());
        return 1;
    }
    fake_cuda_log_fn get_log;
    fake_cuda_param_counts_fn set_counts;
    void *sym = dlsym(lib, "fake_cuda_get_log");
    memcpy(&get_log, &sym, sizeof sym);
    sym = dlsym(lib, "fake_cuda_set_param_counts");
    memcpy(&set_counts, &sym, sizeof sym);
    if (get_log == NULL || set_counts == NULL) {
        fprintf(stderr, "%s is not the fake driver\n", path);
        return 1;
    }
    fake_log = get_log();
    int n = fastlora_kernel_count();
    const void **images = calloc((size_t)n, sizeof *images);
    int *counts = calloc((size_t)n, sizeof *counts);
    for (int i = 0; i < n; i++) {
        fastlora_kernel_desc d;
        fastlora_kernel_info(i, &d);
        images[i] = d.cubin;
        counts[i] = d.num_params;
    }
    set_counts(images, counts, n);
    setenv("FAKE_CUDA_CC", "90", 1);
    expect(fastlora_driver_status(), FASTLORA_STATUS_OK, NULL, "fake driver loads");

    /* One pass: M = 5, N = 96 -> 1 x 2 tiles of 16 x 64; rank 8 takes the rank-16 kernel. */
    void *stream = (void *)(uintptr_t)0x5eed;
    expect(fastlora_lora_forward(stream, FASTLORA_DTYPE_BF16, 5, 96, 64, 8, DEV(1), 80, DEV(2), 64, DEV(6), DEV(3),
                                 DEV(4), 0.5f, DEV(5), 96, NULL, 0),
           FASTLORA_STATUS_OK, NULL, "one-pass forward");
    expect_launch(0, "_lora_onepass_kernel", 90, "fwd", 2, 1, 1);
    CHECK(desc_of(fake_log->launches[0].image)->rank_tile == 16 && desc_of(fake_log->launches[0].image)->dtype == 1,
          "one-pass variant");
    CHECK(fake_log->launches[0].stream == stream, "the caller's stream");
    CHECK(param(0, "x_ptr") == (uintptr_t)DEV(1) && param(0, "wt_ptr") == (uintptr_t)DEV(2) &&
              param(0, "at_ptr") == (uintptr_t)DEV(3) && param(0, "bt_ptr") == (uintptr_t)DEV(4) &&
              param(0, "y_ptr") == (uintptr_t)DEV(5) && param(0, "bias_ptr") == (uintptr_t)DEV(6),
          "one-pass pointers");
    CHECK(param_i32(0, "M") == 5 && param_i32(0, "N") == 96 && param_i32(0, "K") == 64 && param_i32(0, "R") == 8,
          "one-pass sizes");
    CHECK(param_i32(0, "stride_xm") == 80 && param_i32(0, "stride_wn") == 64 && param_i32(0, "stride_ar") == 64 &&
              param_i32(0, "stride_bn") == 8 && param_i32(0, "stride_ym") == 96,
          "one-pass strides");
    CHECK(param_f32(0, "scaling") == 0.5f && param_f32(0, "keep_scale") == 1.0f &&
              param_i32(0, "threshold") == INT32_MIN,
          "one-pass scalars (no dropout)");
    int loads = fake_log->module_loads;
    expect(fastlora_lora_forward(stream, FASTLORA_DTYPE_BF16, 7, 96, 64, 8, DEV(1), 80, DEV(2), 64, DEV(6), DEV(3),
                                 DEV(4), 0.5f, DEV(5), 96, NULL, 0),
           FASTLORA_STATUS_OK, NULL, "second one-pass forward");
    CHECK(fake_log->module_loads == loads, "a kernel is loaded once per context (%d loads, then %d)", loads,
          fake_log->module_loads);

    /* Rank 40 takes the rank-64 one-pass kernel, whose 72 KiB of shared memory need the opt-in. */
    fake_log->num_launches = 0;
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 33, 160, 128, 40, DEV(1), 128, DEV(2), 128, NULL, DEV(3),
                                 DEV(4), 1.f, DEV(5), 160, NULL, 0),
           FASTLORA_STATUS_OK, NULL, "rank-64 one-pass forward");
    expect_launch(0, "_lora_onepass_kernel", 90, "fwd_nobias", 3 * 3, 1, 1);
    CHECK(fake_log->shared_optins > 0 && fake_log->last_optin_bytes > 49152, "shared-memory opt-in (%d, %d bytes)",
          fake_log->shared_optins, fake_log->last_optin_bytes);

    /* Shrink, then GEMM: M = 1000 -> 16 row tiles; N = 128 with 64 x 64 tiles (too few 128 x 128 tiles). */
    fake_log->num_launches = 0;
    size_t ws = 0;
    fastlora_lora_forward_workspace_size(FASTLORA_DTYPE_FP16, 1000, 128, 64, 8, &ws);
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 1000, 128, 64, 8, DEV(1), 64, DEV(2), 64, NULL, DEV(3),
                                 DEV(4), 0.25f, DEV(5), 128, DEV(9), ws),
           FASTLORA_STATUS_OK, NULL, "split forward");
    CHECK(fake_log->num_launches == 2, "split forward: %d launches", fake_log->num_launches);
    expect_launch(0, "_lora_shrink_kernel", 90, "fwd", 16, 1, 1);
    expect_launch(1, "_lora_expand_kernel", 90, "fwd_nobias", 16 * 2, 1, 1);
    CHECK(param(0, "out_ptr") == (uintptr_t)DEV(9) && param(1, "l_ptr") == (uintptr_t)DEV(9),
          "xs goes through the workspace");
    CHECK(param_f32(0, "scale") == 0.25f && param_i32(0, "stride_wr") == 64 && param_i32(1, "stride_rn") == 8,
          "split forward arguments");
    /* Large M and N take the 128 x 128 tiles. */
    fake_log->num_launches = 0;
    fastlora_lora_forward_workspace_size(FASTLORA_DTYPE_FP16, 4096, 4096, 4096, 16, &ws);
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 4096, 4096, 4096, 16, DEV(1), 4096, DEV(2), 4096, DEV(6),
                                 DEV(3), DEV(4), 1.f, DEV(5), 4096, DEV(9), ws),
           FASTLORA_STATUS_OK, NULL, "large forward");
    expect_launch(1, "_lora_expand_kernel", 90, "fwd", 32 * 32, 1, 1);

    /* Backward at M = 300: xs, dxa, dx, then dA and dB split over 3 chunks of 128 tokens and reduced. */
    fake_log->num_launches = 0;
    int memsets = fake_log->memsets;
    fastlora_lora_backward_workspace_size(FASTLORA_DTYPE_FP16, 300, 160, 128, 24, &ws);
    expect(fastlora_lora_backward(NULL, FASTLORA_DTYPE_FP16, 300, 160, 128, 24, DEV(1), 160, DEV(2), 128, DEV(3), 128,
                                  DEV(4), DEV(5), 2.f, DEV(6), 128, DEV(7), DEV(8), DEV(9), ws),
           FASTLORA_STATUS_OK, NULL, "backward");
    CHECK(fake_log->num_launches == 7, "backward: %d launches", fake_log->num_launches);
    expect_launch(0, "_lora_shrink_kernel", 90, "fwd", 5, 1, 1);
    expect_launch(1, "_lora_shrink_kernel", 90, "bwd", 5, 1, 1);
    expect_launch(2, "_lora_expand_kernel", 90, "bwd", 3, 1, 1); /* only 128 x 128 tiles are built for it */
    expect_launch(3, "_lora_wgrad_kernel", 90, "dA", 2, 1, 3);
    expect_launch(4, "_lora_wgrad_kernel", 90, "dB", 3, 1, 3);
    expect_launch(5, "_lora_wgrad_kernel", 90, "reduce", (24 * 128 + 63) / 64, 1, 1);
    expect_launch(6, "_lora_wgrad_kernel", 90, "reduce", (160 * 24 + 63) / 64, 1, 1);
    CHECK(param_i32(1, "K") == 160 && param_i32(1, "stride_wk") == 24, "dxa = s·dy·B reads B [N, r]");
    CHECK(param_i32(2, "N") == 128 && param_i32(2, "K") == 160 && param_i32(2, "stride_wk") == 128 &&
              param(2, "out_ptr") == (uintptr_t)DEV(6),
          "dx = dy·W0 + dxa·A");
    CHECK(param_i32(3, "chunk") == 128 && param_i32(4, "stride_oq") == 24 && param(5, "out_ptr") == (uintptr_t)DEV(7) &&
              param(6, "out_ptr") == (uintptr_t)DEV(8),
          "weight gradients");
    CHECK(param(3, "out_ptr") == param(5, "v_ptr") && param(4, "out_ptr") == param(6, "v_ptr") &&
              param(5, "u_ptr") == fake_log->memset_dst && fake_log->memset_value == 0x3f800000u &&
              fake_log->memset_count == 3 && fake_log->launches[5].memsets_before > memsets,
          "the split partials are reduced as onesᵀ·P with ones filled first");

    /* Many adapters: 3 segments, the longest of 40 tokens (2 blocks of 32), max rank 24 (the rank-64 tile). */
    fake_log->num_launches = 0;
    fastlora_batch_meta meta = {100, 3, 40, 24, 6, DEV(10), DEV(11), DEV(12), DEV(13), DEV(14), NULL};
    expect(fastlora_multi_lora_shrink(NULL, FASTLORA_DTYPE_BF16, &meta, 256, 32, DEV(1), 256, DEV(2), DEV(3), 27),
           FASTLORA_STATUS_OK, NULL, "multi-adapter shrink");
    expect_launch(0, "_multi_shrink_kernel", 90, "seg", 3, 2, 1);
    CHECK(desc_of(fake_log->launches[0].image)->rank_tile == 64, "rank tile 64 for max rank 24");
    CHECK(param(0, "sorted_ids_ptr") == (uintptr_t)DEV(10) && param(0, "seg_offsets_ptr") == (uintptr_t)DEV(11) &&
              param(0, "seg_slots_ptr") == (uintptr_t)DEV(12) && param(0, "ranks_ptr") == (uintptr_t)DEV(13) &&
              param(0, "xa_ptr") == (uintptr_t)DEV(3),
          "multi-adapter shrink metadata");
    CHECK(param_i32(0, "K") == 256 && param_i32(0, "R") == 24 && param_i32(0, "stride_as") == 32 * 256 &&
              param_i32(0, "stride_ar") == 256 && param_i32(0, "stride_om") == 27,
          "multi-adapter shrink sizes and strides");
    meta.token_scales = DEV(15);
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_BF16, &meta, 512, 32, DEV(3), 27, DEV(4), DEV(5), 512),
           FASTLORA_STATUS_OK, NULL, "multi-adapter expand");
    expect_launch(1, "_multi_expand_kernel", 90, "seg_scales", 3, 2, 4);
    CHECK(param(1, "scalings_ptr") == (uintptr_t)DEV(14) && param(1, "token_scales_ptr") == (uintptr_t)DEV(15) &&
              param(1, "y_ptr") == (uintptr_t)DEV(5) && param_i32(1, "stride_bs") == 512 * 32 &&
              param_i32(1, "stride_bn") == 32 && param_i32(1, "stride_ym") == 512 && param_i32(1, "N") == 512,
          "multi-adapter expand arguments");
    meta.token_scales = NULL;
    meta.max_rank = 16;
    expect(fastlora_multi_lora_shrink(NULL, FASTLORA_DTYPE_BF16, &meta, 256, 32, DEV(1), 256, DEV(2), DEV(3), 16),
           FASTLORA_STATUS_OK, NULL, "multi-adapter shrink, rank 16");
    expect(fastlora_multi_lora_expand(NULL, FASTLORA_DTYPE_BF16, &meta, 512, 32, DEV(3), 16, DEV(4), DEV(5), 512),
           FASTLORA_STATUS_OK, NULL, "multi-adapter expand without token scales");
    CHECK(desc_of(fake_log->launches[2].image)->rank_tile == 16, "rank tile 16 for max rank 16");
    expect_launch(3, "_multi_expand_kernel", 90, "seg", 3, 2, 4);

    /* sm_86 runs the sm_80 cubins; sm_75 has none; no current context is an error that says so. */
    fake_log->num_launches = 0;
    setenv("FAKE_CUDA_CC", "86", 1);
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 5, 96, 64, 8, DEV(1), 64, DEV(2), 64, NULL, DEV(3), DEV(4),
                                 1.f, DEV(5), 96, NULL, 0),
           FASTLORA_STATUS_OK, NULL, "sm_86");
    expect_launch(0, "_lora_onepass_kernel", 80, "fwd_nobias", 2, 1, 1);
    setenv("FAKE_CUDA_CC", "75", 1);
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 5, 96, 64, 8, DEV(1), 64, DEV(2), 64, NULL, DEV(3), DEV(4),
                                 1.f, DEV(5), 96, NULL, 0),
           FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE, "7.5", "sm_75");
    setenv("FAKE_CUDA_CC", "0", 1);
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 5, 96, 64, 8, DEV(1), 64, DEV(2), 64, NULL, DEV(3), DEV(4),
                                 1.f, DEV(5), 96, NULL, 0),
           FASTLORA_STATUS_CUDA_ERROR, "no CUDA context", "no context");
    setenv("FAKE_CUDA_CC", "90", 1);
    setenv("FAKE_CUDA_FAIL_LAUNCH", "1", 1);
    expect(fastlora_lora_forward(NULL, FASTLORA_DTYPE_FP16, 5, 96, 64, 8, DEV(1), 64, DEV(2), 64, NULL, DEV(3), DEV(4),
                                 1.f, DEV(5), 96, NULL, 0),
           FASTLORA_STATUS_CUDA_ERROR, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "launch failure");
    unsetenv("FAKE_CUDA_FAIL_LAUNCH");
    free(images);
    free(counts);
    return failures ? 1 : 0;
}

/* ------------------------------------------------------------------------------------------------ GPU */

typedef struct gpu {
    int (*cuInit)(unsigned);
    int (*cuDeviceGetCount)(int *);
    int (*cuDeviceGet)(int *, int);
    int (*cuDevicePrimaryCtxRetain)(void **, int);
    int (*cuCtxSetCurrent)(void *);
    int (*cuMemAlloc)(unsigned long long *, size_t);
    int (*cuMemFree)(unsigned long long);
    int (*cuMemcpyHtoD)(unsigned long long, const void *, size_t);
    int (*cuMemcpyDtoH)(void *, unsigned long long, size_t);
    int (*cuCtxSynchronize)(void);
} gpu;

static gpu cu;

static float half_to_float(uint16_t h) {
    int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v = exp == 0 ? ldexpf((float)man, -24) : exp == 31 ? INFINITY : ldexpf((float)(man | 0x400), exp - 25);
    return sign ? -v : v;
}

static uint16_t float_to_half(float f) { /* round to nearest even; inputs here are small and normal */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    float a = fabsf(f);
    if (a < ldexpf(1.f, -14)) {
        return (uint16_t)(sign | (uint32_t)lrintf(a * ldexpf(1.f, 24)));
    }
    int e;
    float m = frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    uint32_t man = (uint32_t)lrintf((m * 2.f - 1.f) * 1024.f);
    int exp = e - 1 + 15;
    if (man == 1024) {
        man = 0;
        exp++;
    }
    return (uint16_t)(sign | (uint32_t)exp << 10 | man);
}

static float bf16_to_float(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static uint16_t float_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

static float to_float(int dtype, uint16_t v) { return dtype == 0 ? half_to_float(v) : bf16_to_float(v); }

static uint16_t from_float(int dtype, float f) { return dtype == 0 ? float_to_half(f) : float_to_bf16(f); }

static float round_to(int dtype, double v) { return to_float(dtype, from_float(dtype, (float)v)); }

static uint32_t rng = 12345;

static float uniform(void) { /* in [-1, 1) */
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) / 8388608.f - 1.f;
}

/* A host matrix in the activation dtype, filled with uniform(-scale, scale), and its float values. */
static void fill(int dtype, uint16_t *h, float *f, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) {
        h[i] = from_float(dtype, uniform() * scale);
        f[i] = to_float(dtype, h[i]);
    }
}

static unsigned long long upload(const void *h, size_t bytes) {
    unsigned long long d = 0;
    if (cu.cuMemAlloc(&d, bytes ? bytes : 16) || (bytes && cu.cuMemcpyHtoD(d, h, bytes))) {
        fprintf(stderr, "device allocation / copy of %zu bytes failed\n", bytes);
        exit(1);
    }
    return d;
}

static int close_enough(const char *what, const float *got, const double *want, size_t n, double tol) {
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs(got[i] - want[i]) / (tol + tol * fabs(want[i]));
        if (!(err <= worst)) {
            worst = err;
            at = i;
        }
    }
    CHECK(worst <= 1.0, "%s: element %zu is %g, reference %g (tolerance %g)", what, at, got[at], want[at], tol);
    return worst <= 1.0;
}

/* One forward and one backward at (M, N, K, r) against a double-precision reference that rounds the
 * intermediates the kernels round (xs and dxa are stored in the activation dtype). */
static void gpu_case(int dtype, int64_t M, int64_t N, int64_t K, int64_t r, int with_bias) {
    char what[128];
    snprintf(what, sizeof what, "%s M=%lld N=%lld K=%lld r=%lld%s", dtype_name(dtype), (long long)M, (long long)N,
             (long long)K, (long long)r, with_bias ? " bias" : "");
    const float s = 2.0f;
    size_t nx = (size_t)(M * K), nw = (size_t)(N * K), na = (size_t)(r * K), nb = (size_t)(N * r), ny = (size_t)(M * N);
    uint16_t *hx = malloc(nx * 2), *hw = malloc(nw * 2), *ha = malloc(na * 2), *hb = malloc(nb * 2);
    uint16_t *hbias = malloc((size_t)N * 2), *hdy = malloc(ny * 2), *hy = malloc(ny * 2), *hdx = malloc(nx * 2);
    float *x = malloc(nx * 4), *w = malloc(nw * 4), *a = malloc(na * 4), *b = malloc(nb * 4);
    float *bias = malloc((size_t)N * 4), *dy = malloc(ny * 4), *got = malloc((nx > ny ? nx : ny) * 4);
    float *dA = malloc(na * 4), *dB = malloc(nb * 4);
    double *ref = malloc((nx > ny ? nx : ny) * 8);
    double *xs = malloc((size_t)(M * r) * 8), *dxa = malloc((size_t)(M * r) * 8);
    double *refA = malloc(na * 8), *refB = malloc(nb * 8);
    fill(dtype, hx, x, nx, 1.f);
    fill(dtype, hw, w, nw, 1.f / sqrtf((float)K));
    fill(dtype, ha, a, na, 1.f / sqrtf((float)K));
    fill(dtype, hb, b, nb, 1.f / sqrtf((float)r));
    fill(dtype, hbias, bias, (size_t)N, 1.f);
    fill(dtype, hdy, dy, ny, 1.f);

    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < r; j++) {
            double acc = 0, accd = 0;
            for (int64_t k = 0; k < K; k++) {
                acc += (double)x[m * K + k] * a[j * K + k];
            }
            for (int64_t n = 0; n < N; n++) {
                accd += (double)dy[m * N + n] * b[n * r + j];
            }
            xs[m * r + j] = round_to(dtype, s * acc);
            dxa[m * r + j] = round_to(dtype, s * accd);
        }
    }
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n++) {
            double acc = with_bias ? bias[n] : 0;
            for (int64_t k = 0; k < K; k++) {
                acc += (double)x[m * K + k] * w[n * K + k];
            }
            for (int64_t j = 0; j < r; j++) {
                acc += xs[m * r + j] * b[n * r + j];
            }
            ref[m * N + n] = acc;
        }
    }
    unsigned long long dx_ = upload(hx, nx * 2), dw_ = upload(hw, nw * 2), da_ = upload(ha, na * 2);
    unsigned long long db_ = upload(hb, nb * 2), dbias_ = upload(hbias, (size_t)N * 2), ddy_ = upload(hdy, ny * 2);
    unsigned long long dy_out = upload(NULL, ny * 2), ddx = upload(NULL, nx * 2);
    unsigned long long ddA = upload(NULL, na * 4), ddB = upload(NULL, nb * 4);
    size_t ws_f = 0, ws_b = 0;
    fastlora_lora_forward_workspace_size((fastlora_dtype)dtype, M, N, K, r, &ws_f);
    fastlora_lora_backward_workspace_size((fastlora_dtype)dtype, M, N, K, r, &ws_b);
    unsigned long long ws = upload(NULL, ws_f > ws_b ? ws_f : ws_b);

    fastlora_status st = fastlora_lora_forward(
        NULL, (fastlora_dtype)dtype, M, N, K, r, (void *)(uintptr_t)dx_, K, (void *)(uintptr_t)dw_, K,
        with_bias ? (void *)(uintptr_t)dbias_ : NULL, (void *)(uintptr_t)da_, (void *)(uintptr_t)db_, s,
        (void *)(uintptr_t)dy_out, N, (void *)(uintptr_t)ws, ws_f);
    CHECK(st == FASTLORA_STATUS_OK, "%s forward: %s (%s)", what, fastlora_status_string(st), fastlora_last_error());
    CHECK(cu.cuCtxSynchronize() == 0, "%s forward: synchronize", what);
    cu.cuMemcpyDtoH(hy, dy_out, ny * 2);
    for (size_t i = 0; i < ny; i++) {
        got[i] = to_float(dtype, hy[i]);
    }
    double tol = dtype == 0 ? 1e-2 : 4e-2;
    char label[160];
    snprintf(label, sizeof label, "%s forward y", what);
    close_enough(label, got, ref, ny, tol);

    /* Backward. */
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) {
            double acc = 0;
            for (int64_t n = 0; n < N; n++) {
                acc += (double)dy[m * N + n] * w[n * K + k];
            }
            for (int64_t j = 0; j < r; j++) {
                acc += dxa[m * r + j] * a[j * K + k];
            }
            ref[m * K + k] = acc;
        }
    }
    for (int64_t j = 0; j < r; j++) {
        for (int64_t k = 0; k < K; k++) {
            double acc = 0;
            for (int64_t m = 0; m < M; m++) {
                acc += dxa[m * r + j] * x[m * K + k];
            }
            refA[j * K + k] = acc;
        }
        for (int64_t n = 0; n < N; n++) {
            double acc = 0;
            for (int64_t m = 0; m < M; m++) {
                acc += (double)dy[m * N + n] * xs[m * r + j];
            }
            refB[n * r + j] = acc;
        }
    }
    st = fastlora_lora_backward(NULL, (fastlora_dtype)dtype, M, N, K, r, (void *)(uintptr_t)ddy_, N,
                                (void *)(uintptr_t)dx_, K, (void *)(uintptr_t)dw_, K, (void *)(uintptr_t)da_,
                                (void *)(uintptr_t)db_, s, (void *)(uintptr_t)ddx, K, (float *)(uintptr_t)ddA,
                                (float *)(uintptr_t)ddB, (void *)(uintptr_t)ws, ws_b);
    CHECK(st == FASTLORA_STATUS_OK, "%s backward: %s (%s)", what, fastlora_status_string(st), fastlora_last_error());
    CHECK(cu.cuCtxSynchronize() == 0, "%s backward: synchronize", what);
    cu.cuMemcpyDtoH(hdx, ddx, nx * 2);
    for (size_t i = 0; i < nx; i++) {
        got[i] = to_float(dtype, hdx[i]);
    }
    snprintf(label, sizeof label, "%s backward dx", what);
    close_enough(label, got, ref, nx, tol);
    cu.cuMemcpyDtoH(dA, ddA, na * 4);
    cu.cuMemcpyDtoH(dB, ddB, nb * 4);
    /* fp32 sums over M tokens of products of rounded values: error grows with sqrt(M). */
    double wtol = 2e-3 * sqrt((double)M);
    snprintf(label, sizeof label, "%s backward dA", what);
    close_enough(label, dA, refA, na, wtol);
    snprintf(label, sizeof label, "%s backward dB", what);
    close_enough(label, dB, refB, nb, wtol);

    unsigned long long bufs[] = {dx_, dw_, da_, db_, dbias_, ddy_, dy_out, ddx, ddA, ddB, ws};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        cu.cuMemFree(bufs[i]);
    }
    void *host[] = {hx, hw, ha, hb, hbias, hdy, hy, hdx, x, w, a, b, bias, dy, got, dA, dB, ref, xs, dxa, refA, refB};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) {
        free(host[i]);
    }
    printf("%s: %s\n", what, failures ? "FAILED so far" : "ok");
}

/* Many adapters: T tokens over a pool of 4 slots (ranks 8, 24, unused, 16), some tokens without an adapter. */
static void gpu_multi_case(int dtype, int64_t T, int with_token_scales) {
    char what[128];
    snprintf(what, sizeof what, "%s multi-adapter T=%lld%s", dtype_name(dtype), (long long)T,
             with_token_scales ? " token scales" : "");
    enum { SLOTS = 4, R_MAX = 32, K = 128, N = 96 };
    const int32_t ranks[SLOTS] = {8, 24, 0, 16};
    const float scalings[SLOTS] = {0.5f, 2.0f, 1.0f, 1.5f};
    const int choices[] = {-1, 0, 1, 3, 0, 3};
    size_t nx = (size_t)T * K, na = (size_t)SLOTS * R_MAX * K, nb = (size_t)SLOTS * N * R_MAX, ny = (size_t)T * N;
    uint16_t *hx = malloc(nx * 2), *ha = malloc(na * 2), *hb = malloc(nb * 2), *hy = malloc(ny * 2);
    float *x = malloc(nx * 4), *a = malloc(na * 4), *b = malloc(nb * 4), *y0 = malloc(ny * 4), *got = malloc(ny * 4);
    float *token_scales = malloc((size_t)T * 4);
    double *ref = malloc(ny * 8);
    int32_t *slots = malloc((size_t)T * 4), *sorted = malloc((size_t)T * 4), offsets[SLOTS + 1], seg_slots[SLOTS];
    fill(dtype, hx, x, nx, 1.f);
    fill(dtype, ha, a, na, 1.f / sqrtf((float)K));
    fill(dtype, hb, b, nb, 0.25f);
    fill(dtype, hy, y0, ny, 1.f);
    for (int64_t t = 0; t < T; t++) {
        slots[t] = choices[(unsigned)(uniform() * 3.f + 3.f) % 6];
        token_scales[t] = with_token_scales ? 0.5f + (uniform() + 1.f) : 1.f;
    }
    /* BatchMeta.build: tokens with an adapter, stably grouped by slot, one segment per slot in use. */
    int64_t count = 0, segments = 0, max_len = 0, max_rank = 0;
    offsets[0] = 0;
    for (int s = 0; s < SLOTS; s++) {
        int64_t start = count;
        for (int64_t t = 0; t < T; t++) {
            if (slots[t] == s) {
                sorted[count++] = (int32_t)t;
            }
        }
        if (count > start) {
            seg_slots[segments] = s;
            offsets[++segments] = (int32_t)count;
            max_len = count - start > max_len ? count - start : max_len;
            max_rank = ranks[s] > max_rank ? ranks[s] : max_rank;
        }
    }
    for (int64_t t = 0; t < T; t++) {
        for (int64_t n = 0; n < N; n++) {
            ref[t * N + n] = y0[t * N + n];
        }
        int s = slots[t];
        if (s < 0) {
            continue;
        }
        for (int j = 0; j < ranks[s]; j++) {
            double acc = 0;
            for (int64_t k = 0; k < K; k++) {
                acc += (double)x[t * K + k] * a[((size_t)s * R_MAX + j) * K + k];
            }
            double xs = round_to(dtype, (double)(scalings[s] * token_scales[t]) * (float)acc);
            for (int64_t n = 0; n < N; n++) {
                ref[t * N + n] += xs * b[((size_t)s * N + n) * R_MAX + j];
            }
        }
    }
    unsigned long long dx = upload(hx, nx * 2), da = upload(ha, na * 2), db = upload(hb, nb * 2);
    unsigned long long dy = upload(hy, ny * 2), dxa = upload(NULL, (size_t)T * (size_t)max_rank * 4);
    unsigned long long dsorted = upload(sorted, (size_t)count * 4), doffsets = upload(offsets, sizeof offsets);
    unsigned long long dsegs = upload(seg_slots, sizeof seg_slots), dranks = upload(ranks, sizeof ranks);
    unsigned long long dscalings = upload(scalings, sizeof scalings);
    unsigned long long dtscales = upload(token_scales, (size_t)T * 4);
    fastlora_batch_meta meta = {T, segments, max_len, max_rank, SLOTS,
                                (const int32_t *)(uintptr_t)dsorted, (const int32_t *)(uintptr_t)doffsets,
                                (const int32_t *)(uintptr_t)dsegs, (const int32_t *)(uintptr_t)dranks,
                                (const float *)(uintptr_t)dscalings,
                                with_token_scales ? (const float *)(uintptr_t)dtscales : NULL};
    fastlora_status st = fastlora_multi_lora_shrink(NULL, (fastlora_dtype)dtype, &meta, K, R_MAX,
                                                    (void *)(uintptr_t)dx, K, (void *)(uintptr_t)da,
                                                    (void *)(uintptr_t)dxa, max_rank);
    CHECK(st == FASTLORA_STATUS_OK, "%s shrink: %s (%s)", what, fastlora_status_string(st), fastlora_last_error());
    st = fastlora_multi_lora_expand(NULL, (fastlora_dtype)dtype, &meta, N, R_MAX, (void *)(uintptr_t)dxa, max_rank,
                                    (void *)(uintptr_t)db, (void *)(uintptr_t)dy, N);
    CHECK(st == FASTLORA_STATUS_OK, "%s expand: %s (%s)", what, fastlora_status_string(st), fastlora_last_error());
    CHECK(cu.cuCtxSynchronize() == 0, "%s: synchronize", what);
    cu.cuMemcpyDtoH(hy, dy, ny * 2);
    for (size_t i = 0; i < ny; i++) {
        got[i] = to_float(dtype, hy[i]);
    }
    char label[160];
    snprintf(label, sizeof label, "%s y", what);
    close_enough(label, got, ref, ny, dtype == 0 ? 1e-2 : 4e-2);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t n = 0; slots[t] < 0 && n < N; n++) {
            CHECK(got[t * N + n] == y0[t * N + n], "%s: token %lld has no adapter but its row changed", what,
                  (long long)t);
        }
    }
    unsigned long long bufs[] = {dx, da, db, dy, dxa, dsorted, doffsets, dsegs, dranks, dscalings, dtscales};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        cu.cuMemFree(bufs[i]);
    }
    void *host[] = {hx, ha, hb, hy, x, a, b, y0, got, token_scales, ref, slots, sorted};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) {
        free(host[i]);
    }
    printf("%s: %s\n", what, failures ? "FAILED so far" : "ok");
}

#define SKIP 77

static int test_gpu(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        printf("SKIP: no CUDA driver on this machine (%s)\n", dlerror());
        return SKIP;
    }
    /* dlsym returns an object pointer; copying it into the function pointer's bytes is the portable way. */
#define LOAD(field, symbol)                                                                                            \
    do {                                                                                                               \
        void *sym = dlsym(lib, symbol);                                                                                \
        if (sym == NULL) {                                                                                             \
            fprintf(stderr, "the CUDA driver lacks %s\n", symbol);                                                     \
            return 1;                                                                                                  \
        }                                                                                                              \
        memcpy(&cu.field, &sym, sizeof sym);                                                                           \
    } while (0)
    LOAD(cuInit, "cuInit");
    LOAD(cuDeviceGetCount, "cuDeviceGetCount");
    LOAD(cuDeviceGet, "cuDeviceGet");
    LOAD(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    LOAD(cuCtxSetCurrent, "cuCtxSetCurrent");
    LOAD(cuMemAlloc, "cuMemAlloc_v2");
    LOAD(cuMemFree, "cuMemFree_v2");
    LOAD(cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    LOAD(cuMemcpyDtoH, "cuMemcpyDtoH_v2");
    LOAD(cuCtxSynchronize, "cuCtxSynchronize");
#undef LOAD
    int count = 0, device = 0;
    if (cu.cuInit(0) != 0 || cu.cuDeviceGetCount(&count) != 0 || count == 0) {
        printf("SKIP: a CUDA driver but no usable GPU\n");
        return SKIP;
    }
    void *ctx = NULL;
    if (cu.cuDeviceGet(&device, 0) || cu.cuDevicePrimaryCtxRetain(&ctx, device) || cu.cuCtxSetCurrent(ctx)) {
        fprintf(stderr, "cannot make the primary context of device 0 current\n");
        return 1;
    }
    fastlora_status st = fastlora_driver_status();
    CHECK(st == FASTLORA_STATUS_OK, "driver status %s (%s)", fastlora_status_string(st), fastlora_last_error());
    for (int dtype = 0; dtype < 2; dtype++) {
        gpu_case(dtype, 5, 96, 64, 8, 1);     /* one pass, rank tile 16 */
        gpu_case(dtype, 33, 160, 128, 40, 0); /* one pass, rank tile 64, no bias */
        gpu_case(dtype, 3, 64, 64, 80, 1);    /* r > 64: shrink + GEMM even for a few tokens */
        gpu_case(dtype, 300, 160, 128, 24, 1); /* shrink + GEMM; the weight gradients split over 3 chunks */
        gpu_case(dtype, 2100, 512, 256, 16, 0); /* 128x128 tiles, more splits */
        gpu_multi_case(dtype, 37, 0);
        gpu_multi_case(dtype, 300, 1);
        if (failures) {
            break;
        }
    }
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "arguments") == 0) {
        return test_arguments();
    }
    if (argc >= 2 && strcmp(argv[1], "no-driver") == 0) {
        return test_no_driver();
    }
    if (argc >= 3 && strcmp(argv[1], "manifest") == 0) {
        return test_manifest(argv[2]);
    }
    if (argc >= 3 && strcmp(argv[1], "fake-driver") == 0) {
        return test_fake_driver(argv[2]);
    }
    if (argc >= 2 && strcmp(argv[1], "gpu") == 0) {
        return test_gpu();
    }
    fprintf(stderr, "usage: %s arguments | no-driver | manifest FILE | fake-driver LIB | gpu\n", argv[0]);
    return 2;
}
