/* The row type of the kernel table that python -m fastlora.aot generates (fastlora_kernels_data.c). */
#ifndef FASTLORA_KERNEL_TABLE_H
#define FASTLORA_KERNEL_TABLE_H

#include <stddef.h>

/* How a kernel parameter is passed to cuLaunchKernel: 64-bit pointer, 32-bit int, 32-bit float. */
enum { FL_PARAM_PTR = 0, FL_PARAM_I32 = 1, FL_PARAM_F32 = 2 };

/* Grid rules, matching the Python launchers:
 *   FL_GRID_TILES_MN     (cdiv(M, block_m) * cdiv(N, block_n), 1, 1)      onepass, expand
 *   FL_GRID_ROWS_BY_RANK (cdiv(M, block_m), cdiv(R, block_r), 1)          shrink
 *   FL_GRID_WGRAD        (cdiv(Q, block_n), cdiv(R, block_r), split)      wgrad
 *   FL_GRID_SEGMENTS_BY_RANK (S, cdiv(max_segment_len, block_m), cdiv(R, block_r))   multi-adapter shrink
 *   FL_GRID_SEGMENTS_BY_COLS (S, cdiv(max_segment_len, block_m), cdiv(N, block_n))   multi-adapter expand */
enum {
    FL_GRID_TILES_MN = 0,
    FL_GRID_ROWS_BY_RANK = 1,
    FL_GRID_WGRAD = 2,
    FL_GRID_SEGMENTS_BY_RANK = 3,
    FL_GRID_SEGMENTS_BY_COLS = 4
};

/* Argument index 255 in `params` marks a trailing scratch pointer that Triton appends; it is passed as null. */
#define FL_SCRATCH_PARAM 255

typedef struct fl_kernel {
    const char *op;
    const char *site;
    const char *name; /* entry symbol in the cubin */
    const char *config;
    int arch;
    int dtype;
    int rank_tile;
    int has_bias;
    int grid;
    int block_m;
    int block_n; /* BLOCK_N, or BLOCK_Q for wgrad */
    int block_r; /* BLOCK_R, or R_PAD for onepass */
    int group_m;
    int num_warps;
    int shared;
    const unsigned char *image;
    size_t image_size;
    int num_params;
    const unsigned char *params; /* per kernel parameter: index of the argument in the @triton.jit signature */
    const unsigned char *types;  /* per kernel parameter: FL_PARAM_* */
    int num_unit;
    const unsigned char *unit; /* arguments compiled as constexpr 1: the runtime value must be 1 */
    int num_div16;
    const unsigned char *div16; /* integer arguments compiled as divisible by 16 */
    const char *const *arg_names;
    const char *param_list; /* the parameter names, comma-separated ("scratch" for the trailing pointers) */
} fl_kernel;

extern const fl_kernel fl_kernels[];
extern const int fl_num_kernels;

#endif
