/* The subset of Rockchip's public librknnrt C API (rknpu2, rknn_api.h) that rkbench's C++ runner and its
 * replay stand-in use. Written for rkbench from the published facts: field order, types, array sizes and
 * enum values follow Rockchip's rknn_api.h (rknpu2 runtime, 1.5 - 2.x); tests/unit/test_cpp.py checks
 * every size and offset used here against the numbers taken from that header.
 * Only what rkbench calls is declared; the runner resolves the functions with dlsym, so nothing here
 * is linked against. */
#ifndef RKBENCH_RKNN_API_SUBSET_H
#define RKBENCH_RKNN_API_SUBSET_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* error codes returned by every call */
#define RKNN_SUCC 0
#define RKNN_ERR_FAIL -1
#define RKNN_ERR_MALLOC_FAIL -4
#define RKNN_ERR_PARAM_INVALID -5
#define RKNN_ERR_MODEL_INVALID -6
#define RKNN_ERR_CTX_INVALID -7
#define RKNN_ERR_INPUT_INVALID -8
#define RKNN_ERR_OUTPUT_INVALID -9

#define RKNN_MAX_DIMS 16
#define RKNN_MAX_NAME_LEN 256

/* 32-bit ARM builds of librknnrt use a 32-bit handle; rkbench builds for aarch64 and x86_64 only */
#ifdef __arm__
typedef uint32_t rknn_context;
#else
typedef uint64_t rknn_context;
#endif

typedef enum {
    RKNN_QUERY_IN_OUT_NUM = 0,
    RKNN_QUERY_INPUT_ATTR = 1,
    RKNN_QUERY_OUTPUT_ATTR = 2,
    RKNN_QUERY_SDK_VERSION = 5,
    RKNN_QUERY_MEM_SIZE = 6
} rknn_query_cmd;

typedef enum {
    RKNN_TENSOR_FLOAT32 = 0,
    RKNN_TENSOR_FLOAT16 = 1,
    RKNN_TENSOR_INT8 = 2,
    RKNN_TENSOR_UINT8 = 3
} rknn_tensor_type;

typedef enum {
    RKNN_TENSOR_QNT_NONE = 0,
    RKNN_TENSOR_QNT_DFP = 1,
    RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC = 2
} rknn_tensor_qnt_type;

typedef enum {
    RKNN_TENSOR_NCHW = 0,
    RKNN_TENSOR_NHWC = 1
} rknn_tensor_format;

typedef enum {
    RKNN_NPU_CORE_AUTO = 0,
    RKNN_NPU_CORE_0 = 1,
    RKNN_NPU_CORE_1 = 2,
    RKNN_NPU_CORE_2 = 4,
    RKNN_NPU_CORE_0_1 = 3,
    RKNN_NPU_CORE_0_1_2 = 7,
    RKNN_NPU_CORE_ALL = 0xffff
} rknn_core_mask;

typedef struct {
    uint32_t n_input;
    uint32_t n_output;
} rknn_input_output_num;

typedef struct {
    uint32_t index;                  /* set by the caller before rknn_query */
    uint32_t n_dims;
    uint32_t dims[RKNN_MAX_DIMS];
    char name[RKNN_MAX_NAME_LEN];
    uint32_t n_elems;
    uint32_t size;                   /* bytes */
    rknn_tensor_format fmt;
    rknn_tensor_type type;
    rknn_tensor_qnt_type qnt_type;
    int8_t fl;
    int32_t zp;                      /* affine: real = (q - zp) * scale */
    float scale;
    uint32_t w_stride;
    uint32_t size_with_stride;
    uint8_t pass_through;
    uint32_t h_stride;
} rknn_tensor_attr;

typedef struct {
    char api_version[256];
    char drv_version[256];
} rknn_sdk_version;

typedef struct {
    uint32_t total_weight_size;
    uint32_t total_internal_size;    /* excludes inputs and outputs */
    uint64_t total_dma_allocated_size;
    uint32_t total_sram_size;        /* system SRAM reserved for the NPU */
    uint32_t free_sram_size;
    uint32_t reserved[10];
} rknn_mem_size;

typedef struct {
    void *virt_addr;
    uint64_t phys_addr;
    int32_t fd;
    int32_t offset;
    uint32_t size;
    uint32_t flags;
    void *priv_data;
} rknn_tensor_mem;

typedef struct {
    uint32_t index;
    void *buf;
    uint32_t size;
    uint8_t pass_through;            /* 1: buf is already what the NPU takes (type, fmt, zp/scale of the input attr) */
    rknn_tensor_type type;
    rknn_tensor_format fmt;
} rknn_input;

typedef struct {
    uint8_t want_float;              /* 1: the library dequantises to float32 */
    uint8_t is_prealloc;
    uint32_t index;
    void *buf;                       /* owned by the library until rknn_outputs_release */
    uint32_t size;
} rknn_output;

/* The extension structs are passed as NULL by rkbench: declared opaque. */
typedef struct rknn_init_extend rknn_init_extend;
typedef struct rknn_run_extend rknn_run_extend;
typedef struct rknn_output_extend rknn_output_extend;

/* Function pointer types, one per symbol the runner resolves. */
typedef int (*rknn_init_fn)(rknn_context *ctx, void *model, uint32_t size, uint32_t flag, rknn_init_extend *ext);
typedef int (*rknn_destroy_fn)(rknn_context ctx);
typedef int (*rknn_query_fn)(rknn_context ctx, rknn_query_cmd cmd, void *info, uint32_t size);
typedef int (*rknn_set_core_mask_fn)(rknn_context ctx, rknn_core_mask mask);
typedef int (*rknn_inputs_set_fn)(rknn_context ctx, uint32_t n_inputs, rknn_input inputs[]);
typedef int (*rknn_run_fn)(rknn_context ctx, rknn_run_extend *ext);
typedef int (*rknn_outputs_get_fn)(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *ext);
typedef int (*rknn_outputs_release_fn)(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[]);
typedef rknn_tensor_mem *(*rknn_create_mem_fn)(rknn_context ctx, uint32_t size);
typedef int (*rknn_set_io_mem_fn)(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr);
typedef int (*rknn_destroy_mem_fn)(rknn_context ctx, rknn_tensor_mem *mem);

/* The declarations themselves, for the stand-in that defines them. */
int rknn_init(rknn_context *ctx, void *model, uint32_t size, uint32_t flag, rknn_init_extend *ext);
int rknn_destroy(rknn_context ctx);
int rknn_query(rknn_context ctx, rknn_query_cmd cmd, void *info, uint32_t size);
int rknn_set_core_mask(rknn_context ctx, rknn_core_mask mask);
int rknn_inputs_set(rknn_context ctx, uint32_t n_inputs, rknn_input inputs[]);
int rknn_run(rknn_context ctx, rknn_run_extend *ext);
int rknn_outputs_get(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *ext);
int rknn_outputs_release(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[]);
rknn_tensor_mem *rknn_create_mem(rknn_context ctx, uint32_t size);
int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr);
int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem *mem);

#ifdef __cplusplus
}
#endif

#endif
