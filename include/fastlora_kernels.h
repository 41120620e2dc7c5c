/*
 * fastlora_kernels: fastlora's Triton kernels as a C library, for C and C++ inference engines.
 *
 * The kernels are compiled ahead of time (python -m fastlora.aot) for sm_80 and sm_90 and embedded as cubins.
 * Each entry point validates its arguments, picks the specialisation for the current device and shape, and
 * launches it on the caller's stream through the CUDA driver API. The driver (libcuda.so.1) is opened with
 * dlopen at the first call that needs it, so the library builds, links and loads on machines without CUDA;
 * calls there return FASTLORA_STATUS_NO_CUDA_DRIVER. The first attempt decides for the process. $FASTLORA_LIBCUDA,
 * read then, names another driver library (a path that does not exist behaves as a machine without CUDA).
 * sm_80 kernels run on every compute capability 8.x device, sm_90 ones (sm_90a) on 9.0 only; other devices get
 * FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE. Built by default with CUDA 12's ptxas, the cubins load on any CUDA 12 driver.
 *
 * Conventions, for every entry point:
 *  - Matrices are row-major with unit column stride; ld* is the row stride in elements (ld >= columns).
 *  - Activations and weights share one dtype (fp16 or bf16): the LoRA weights A and B are in the activation dtype
 *    (convert fp32 adapters once at load time). Accumulation is fp32.
 *  - Shapes: x [M, K], W0 [N, K] (nn.Linear's layout), A [r, K] and B [N, r] contiguous (PEFT's lora_A / lora_B),
 *    bias [N] or NULL, y [M, N].
 *  - The compiled specialisations assume what LLM layers satisfy: K, N and every ld* (but the fp32 ldxa)
 *    multiples of 16 elements and 16-byte aligned pointers. Other values return FASTLORA_STATUS_UNSUPPORTED;
 *    fastlora_last_error() names the argument. M, r and r_max may be anything >= 1.
 *  - Launches are asynchronous on `stream` (a CUstream / cudaStream_t; NULL is the legacy default stream), in the
 *    CUDA context current on the calling thread (the runtime API's primary context after cudaSetDevice).
 *  - Workspaces are caller-provided device memory (engines own their allocators): query the size first; 0 means
 *    none is needed and workspace may be NULL. A workspace may be reused once the stream has passed the call.
 *  - Thread-safe. Kernels are loaded into each context at their first use and stay loaded for the process's life.
 */
#ifndef FASTLORA_KERNELS_H
#define FASTLORA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define FASTLORA_API
#else
#define FASTLORA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define FASTLORA_KERNELS_VERSION_MAJOR 0
#define FASTLORA_KERNELS_VERSION_MINOR 1
#define FASTLORA_KERNELS_VERSION_PATCH 0
#define FASTLORA_KERNELS_VERSION "0.1.0"

typedef enum fastlora_status {
    FASTLORA_STATUS_OK = 0,
    FASTLORA_STATUS_INVALID_ARGUMENT = 1,     /* a null pointer, a size < 1, ld < columns, a bad dtype, short workspace */
    FASTLORA_STATUS_UNSUPPORTED = 2,          /* valid, but outside the compiled specialisations */
    FASTLORA_STATUS_NO_CUDA_DRIVER = 3,       /* libcuda.so.1 could not be loaded or initialised */
    FASTLORA_STATUS_NO_KERNEL_FOR_DEVICE = 4, /* the current device's architecture is not in this build */
    FASTLORA_STATUS_CUDA_ERROR = 5            /* a driver call failed (no current context, launch failure, ...) */
} fastlora_status;

typedef enum fastlora_dtype {
    FASTLORA_DTYPE_FP16 = 0,
    FASTLORA_DTYPE_BF16 = 1
} fastlora_dtype;

/* A constant, human-readable name for a status ("FASTLORA_STATUS_NO_CUDA_DRIVER: ..."). Never NULL. */
FASTLORA_API const char *fastlora_status_string(fastlora_status status);

/* The detail of the calling thread's last failed call (which argument, which driver error), "" after success. */
FASTLORA_API const char *fastlora_last_error(void);

/* "MAJOR.MINOR.PATCH" of the library. */
FASTLORA_API const char *fastlora_version(void);

/* Loads the CUDA driver if needed: OK when calls can launch kernels on this machine. */
FASTLORA_API fastlora_status fastlora_driver_status(void);

/*
 * LoRA forward:  y = x·W0ᵀ + bias + scaling·(x·Aᵀ)·Bᵀ.
 *
 * M <= 64 with r <= 64 runs one kernel (x streamed once, the LoRA product in the epilogue; no workspace). Other
 * shapes run a shrink kernel writing xs = scaling·x·Aᵀ [M, r] into the workspace, then the base GEMM with xs·Bᵀ
 * added as an extra K-chunk. y is written once in both. y must not overlap x.
 */
FASTLORA_API fastlora_status fastlora_lora_forward_workspace_size(fastlora_dtype dtype, int64_t M, int64_t N,
                                                                  int64_t K, int64_t r, size_t *bytes);

FASTLORA_API fastlora_status fastlora_lora_forward(void *stream, fastlora_dtype dtype, int64_t M, int64_t N,
                                                   int64_t K, int64_t r, const void *x, int64_t ldx, const void *w,
                                                   int64_t ldw, const void *bias, const void *a, const void *b,
                                                   float scaling, void *y, int64_t ldy, void *workspace,
                                                   size_t workspace_size);

/*
 * LoRA backward, from the upstream gradient dy [M, N] (ld lddy) and the forward's input x:
 *   dx = dy·W0 + scaling·(dy·B)·A        [M, K], activation dtype, written when dx is not NULL
 *   dA = scaling·(dy·B)ᵀ·x               [r, K], fp32, contiguous
 *   dB = scaling·dyᵀ·(x·Aᵀ)              [N, r], fp32, contiguous
 * The weight gradients are reductions over M computed without atomics: the tokens are split into chunks fixed by
 * the shape, and the fp32 partial sums added in index order, so two calls give bitwise-equal results.
 */
FASTLORA_API fastlora_status fastlora_lora_backward_workspace_size(fastlora_dtype dtype, int64_t M, int64_t N,
                                                                   int64_t K, int64_t r, size_t *bytes);

FASTLORA_API fastlora_status fastlora_lora_backward(void *stream, fastlora_dtype dtype, int64_t M, int64_t N,
                                                    int64_t K, int64_t r, const void *dy, int64_t lddy,
                                                    const void *x, int64_t ldx, const void *w, int64_t ldw,
                                                    const void *a, const void *b, float scaling, void *dx,
                                                    int64_t lddx, float *dA, float *dB, void *workspace,
                                                    size_t workspace_size);

/*
 * Multi-adapter batches: every token may use a different adapter (or none) from a pool of slots,
 *   a_pool [num_slots, r_max, K] and b_pool [num_slots, N, r_max], contiguous, in the activation dtype;
 * slot s holds an adapter of rank slot_ranks[s] <= r_max in a_pool[s, :rank] and b_pool[s, :, :rank].
 * The layer is y = x·W0ᵀ + b (the engine's own GEMM) followed by
 *   fastlora_multi_lora_shrink:  xa[t, :rank] = x[t]·A_sᵀ              (fp32, unscaled)
 *   fastlora_multi_lora_expand:  y[t] += round(c[t]·xa[t, :rank])·B_sᵀ  c[t] = slot_scalings[s]·token_scales[t]
 * for every token t whose slot s is not -1; other rows of xa and y are not touched, and an adapter of rank 8 costs
 * rank-8 work whatever r_max is. The metadata is fastlora.serving.BatchMeta as plain device arrays (int32 / fp32,
 * 16-byte aligned), built once per batch and shared by every layer; its counts are host integers, so no call
 * synchronises. Deterministic: every output element is written by one program, without atomics.
 */
typedef struct fastlora_batch_meta {
    int64_t num_tokens;              /* T: rows of x / y */
    int64_t num_segments;            /* S: distinct adapters used by the batch */
    int64_t max_segment_len;         /* the longest segment, in tokens (sizes the grid) */
    int64_t max_rank;                /* the largest rank among the slots used */
    int64_t num_slots;               /* slots in the pools */
    const int32_t *sorted_token_ids; /* [T_active] tokens that use an adapter, grouped by slot */
    const int32_t *seg_offsets;      /* [S + 1] segment s is sorted_token_ids[seg_offsets[s] : seg_offsets[s+1]] */
    const int32_t *seg_slots;        /* [S] the slot of each segment */
    const int32_t *slot_ranks;       /* [num_slots] each slot's rank (<= r_max); a layer may pass its own */
    const float *slot_scalings;      /* [num_slots] each slot's lora_alpha / r */
    const float *token_scales;       /* [T] per-token multiplier of the LoRA term, or NULL */
} fastlora_batch_meta;

/* xa [T, ldxa] fp32, ldxa >= meta->max_rank (the batch's largest rank; wider ranks are clamped to it). */
FASTLORA_API fastlora_status fastlora_multi_lora_shrink(void *stream, fastlora_dtype dtype,
                                                        const fastlora_batch_meta *meta, int64_t K, int64_t r_max,
                                                        const void *x, int64_t ldx, const void *a_pool, void *xa,
                                                        int64_t ldxa);

/* y [T, N] (ld ldy) holds the base output and is updated in place; xa is the shrink's output. */
FASTLORA_API fastlora_status fastlora_multi_lora_expand(void *stream, fastlora_dtype dtype,
                                                        const fastlora_batch_meta *meta, int64_t N, int64_t r_max,
                                                        const void *xa, int64_t ldxa, const void *b_pool, void *y,
                                                        int64_t ldy);

/*
 * Introspection of the embedded kernels (no driver needed). fastlora_kernel_info fills *info for kernel i in
 * [0, fastlora_kernel_count()). elf_arch and elf_has_kernel come from parsing the embedded cubin itself (ELF
 * e_machine EM_CUDA, SM from e_flags, the kernel's symbol in .symtab), so they check the declared fields.
 */
typedef struct fastlora_kernel_desc {
    const char *name;      /* the kernel's entry symbol, e.g. "_lora_onepass_kernel" */
    const char *op;        /* onepass, shrink, expand, wgrad */
    const char *site;      /* the call it serves: fwd, fwd_nobias, bwd, dA, dB, reduce */
    const char *config;    /* tile config, e.g. "64x64x64 w4 s4" */
    int arch;              /* declared SM architecture, e.g. 80 or 90 */
    int dtype;             /* 0 fp16, 1 bf16, 2 fp32 */
    int rank_tile;         /* R_PAD of the one-pass kernel, else 0 */
    int num_warps;
    int shared_bytes;      /* dynamic shared memory per block */
    int num_params;        /* kernel parameters, scratch pointers included */
    const char *params;    /* their names in launch order, comma-separated; "scratch" = a null scratch pointer */
    const void *cubin;     /* the embedded cubin (e.g. to load it yourself or inspect it with cuobjdump) */
    size_t cubin_bytes;
    int elf_arch;          /* SM read from the cubin's ELF header, -1 if it is not a CUDA ELF */
    int elf_has_kernel;    /* 1 if the cubin's symbol table defines `name` */
} fastlora_kernel_desc;

FASTLORA_API int fastlora_kernel_count(void);
FASTLORA_API fastlora_status fastlora_kernel_info(int i, fastlora_kernel_desc *info);

#ifdef __cplusplus
}
#endif

#endif /* FASTLORA_KERNELS_H */
