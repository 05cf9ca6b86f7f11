/* rkbench replay stand-in for librknnrt.so, for machines without an NPU. Not Rockchip's library.
 *
 * It serves REAL model outputs recorded on the host: rkbench.cpp.write_replay runs the ONNX model with
 * ONNX Runtime on exactly the input tensors it prepared and stores the outputs in a replay folder, keyed
 * by the FNV-1a 64 hash of the input bytes. rknn_inputs_set hashes the bytes it gets, rknn_run loads the
 * matching outputs (an input never recorded fails with RKNN_ERR_INPUT_INVALID), rknn_outputs_get hands
 * them out (float32, or quantised with the attr's zero point and scale when want_float is 0).
 * Zero-copy: memory bound with rknn_set_io_mem replaces both; rknn_run hashes the input memory and writes
 * each bound output memory (float32 where the attr given to rknn_set_io_mem says FLOAT32, else quantised).
 *
 * Replay folder: model.replay (the "model" passed to rknn_init by path, size 0) describes the tensors:
 *   rkbench-replay 1
 *   input <name> <n_dims> <dims...> <int8|uint8|float32> <nhwc|nchw> <zero point> <scale>  (as an int8 .rknn reports it)
 *   output <name> <n_dims> <dims...> <float32|int8> <nchw|nhwc> <zero point> <scale>     (one per output)
 *   record <hash as 16 hex digits> <path>        (optional, any number: where that input's outputs lie,
 *                                                 relative to this file; rkbench's board deploy writes them)
 *   null                                         (optional: NULL MODE, see below)
 * and, without record lines, <hash as 16 hex digits>.out next to it holds the outputs of that input,
 * float32, concatenated in order.
 *
 * Pass-through (rknn_input.pass_through = 1): the bytes must be the input attr's size and are hashed as given,
 * so they replay only where the host recorded the pass-through tensor too (rkbench.cpp.write_replay).
 * RKNN_QUERY_MEM_SIZE reports what this stand-in itself allocated: no weights, the output buffer as internal
 * memory, io memory from rknn_create_mem on top in the dma total, no SRAM (its version string says whose).
 *
 * Null mode (a `null` line): no hashing, no files; every run serves zeros. Only for measuring a runner's own
 * overhead (bench/bench_runner.py): its numbers are never NPU latency and never reported as such. */
#include "rknn_api_subset.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TENSORS 32
#define STANDIN_VERSION "rkbench replay stand-in, not librknnrt"
#define NULL_VERSION "rkbench replay stand-in in NULL mode (zeros, overhead only), not librknnrt"

typedef struct {
    uint64_t hash;
    char path[1024];          /* relative to the description's folder, or absolute */
} record;

typedef struct {
    char folder[1024];
    uint32_t n_in, n_out;
    rknn_tensor_attr in[MAX_TENSORS], out[MAX_TENSORS];
    uint64_t hash;            /* of the bytes given to rknn_inputs_set (or the input io mem) */
    int have_input;
    uint64_t loaded;          /* hash whose outputs are in `values` (a latency loop reloads nothing) */
    int have_outputs;
    float *values;            /* all outputs, float32, in order */
    rknn_tensor_mem *in_mem, *out_mem[MAX_TENSORS];
    rknn_tensor_type out_mem_type[MAX_TENSORS];  /* what rknn_set_io_mem asked for: float32, or the output's int8 */
    uint64_t io_mem_bytes;    /* rknn_create_mem so far, for RKNN_QUERY_MEM_SIZE */
    record *records;          /* from `record` lines; none: <folder>/<hash>.out */
    size_t n_records;
    int null_mode;            /* a `null` line: zeros, no hashing */
} standin;

static int read_record(FILE *f, standin *s) {
    record *more = (record *)realloc(s->records, (s->n_records + 1) * sizeof(record));
    if (!more) return -1;
    s->records = more;
    unsigned long long hash;
    if (fscanf(f, "%llx %1023s", &hash, more[s->n_records].path) != 2) return -1;
    more[s->n_records++].hash = hash;
    return 0;
}

static uint64_t fnv1a64(const uint8_t *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static uint32_t elem_bytes(rknn_tensor_type t) {
    return t == RKNN_TENSOR_FLOAT32 ? 4 : t == RKNN_TENSOR_FLOAT16 ? 2 : 1;
}

static int read_attr(FILE *f, rknn_tensor_attr *a, uint32_t index) {
    char type[16], fmt[16];
    memset(a, 0, sizeof(*a));
    a->index = index;
    if (fscanf(f, "%255s %u", a->name, &a->n_dims) != 2 || a->n_dims < 1 || a->n_dims > RKNN_MAX_DIMS) return -1;
    a->n_elems = 1;
    for (uint32_t d = 0; d < a->n_dims; d++) {
        if (fscanf(f, "%u", &a->dims[d]) != 1) return -1;
        a->n_elems *= a->dims[d];
    }
    if (fscanf(f, "%15s %15s", type, fmt) != 2) return -1;
    a->type = !strcmp(type, "float32") ? RKNN_TENSOR_FLOAT32 : !strcmp(type, "int8") ? RKNN_TENSOR_INT8 : RKNN_TENSOR_UINT8;
    a->fmt = !strcmp(fmt, "nhwc") ? RKNN_TENSOR_NHWC : RKNN_TENSOR_NCHW;
    if (fscanf(f, "%d %f", &a->zp, &a->scale) != 2) return -1;
    a->qnt_type = a->type == RKNN_TENSOR_INT8 ? RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC : RKNN_TENSOR_QNT_NONE;
    a->size = a->n_elems * elem_bytes(a->type);
    a->size_with_stride = a->size;
    return 0;
}

static size_t total_elems(const standin *s) {
    size_t n = 0;
    for (uint32_t i = 0; i < s->n_out; i++) n += s->out[i].n_elems;
    return n;
}

int rknn_init(rknn_context *ctx, void *model, uint32_t size, uint32_t flag, rknn_init_extend *ext) {
    (void)flag; (void)ext;
    if (!ctx || !model || size != 0) {
        fprintf(stderr, "replay stand-in: pass the path of model.replay (size 0), not model bytes\n");
        return RKNN_ERR_PARAM_INVALID;
    }
    const char *path = (const char *)model;
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "replay stand-in: cannot open %s: write the replay folder with rkbench.cpp.write_replay\n", path);
        return RKNN_ERR_MODEL_INVALID;
    }
    standin *s = (standin *)calloc(1, sizeof(standin));
    char word[64], kind[16];
    int version = 0, ok = fscanf(f, "%63s %d", word, &version) == 2 && !strcmp(word, "rkbench-replay") && version == 1;
    while (ok && fscanf(f, "%15s", kind) == 1) {
        if (!strcmp(kind, "input") && s->n_in < MAX_TENSORS) ok = read_attr(f, &s->in[s->n_in], s->n_in) == 0, s->n_in++;
        else if (!strcmp(kind, "output") && s->n_out < MAX_TENSORS) ok = read_attr(f, &s->out[s->n_out], s->n_out) == 0, s->n_out++;
        else if (!strcmp(kind, "record")) ok = read_record(f, s) == 0;
        else if (!strcmp(kind, "null")) s->null_mode = 1;
        else ok = 0;
    }
    fclose(f);
    if (!ok || s->n_in != 1 || s->n_out == 0) {
        fprintf(stderr, "replay stand-in: %s is not a replay description: write it with rkbench.cpp.write_replay\n", path);
        free(s->records);
        free(s);
        return RKNN_ERR_MODEL_INVALID;
    }
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 1;
    if (n >= sizeof(s->folder)) n = sizeof(s->folder) - 1;
    memcpy(s->folder, slash ? path : ".", n);
    s->values = (float *)calloc(total_elems(s), sizeof(float));  /* the outputs' home for the context's life */
    if (!s->values) {
        free(s->records);
        free(s);
        return RKNN_ERR_MALLOC_FAIL;
    }
    *ctx = (rknn_context)(uintptr_t)s;
    return RKNN_SUCC;
}

static standin *get(rknn_context ctx) { return (standin *)(uintptr_t)ctx; }

int rknn_destroy(rknn_context ctx) {
    standin *s = get(ctx);
    if (!s) return RKNN_ERR_CTX_INVALID;
    free(s->values);
    free(s->records);
    free(s);
    return RKNN_SUCC;
}

int rknn_query(rknn_context ctx, rknn_query_cmd cmd, void *info, uint32_t size) {
    standin *s = get(ctx);
    if (!s || !info) return RKNN_ERR_PARAM_INVALID;
    if (cmd == RKNN_QUERY_IN_OUT_NUM && size >= sizeof(rknn_input_output_num)) {
        rknn_input_output_num *io = (rknn_input_output_num *)info;
        io->n_input = s->n_in;
        io->n_output = s->n_out;
        return RKNN_SUCC;
    }
    if ((cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_OUTPUT_ATTR) && size >= sizeof(rknn_tensor_attr)) {
        rknn_tensor_attr *a = (rknn_tensor_attr *)info;
        uint32_t n = cmd == RKNN_QUERY_INPUT_ATTR ? s->n_in : s->n_out;
        if (a->index >= n) return RKNN_ERR_PARAM_INVALID;
        *a = cmd == RKNN_QUERY_INPUT_ATTR ? s->in[a->index] : s->out[a->index];
        return RKNN_SUCC;
    }
    if (cmd == RKNN_QUERY_MEM_SIZE && size >= sizeof(rknn_mem_size)) {
        rknn_mem_size *m = (rknn_mem_size *)info;
        memset(m, 0, sizeof(*m));
        m->total_internal_size = (uint32_t)(total_elems(s) * sizeof(float));
        m->total_dma_allocated_size = m->total_internal_size + s->io_mem_bytes;
        return RKNN_SUCC;
    }
    if (cmd == RKNN_QUERY_SDK_VERSION && size >= sizeof(rknn_sdk_version)) {
        rknn_sdk_version *v = (rknn_sdk_version *)info;
        snprintf(v->api_version, sizeof(v->api_version), "%s", s->null_mode ? NULL_VERSION : STANDIN_VERSION);
        snprintf(v->drv_version, sizeof(v->drv_version), "%s", "none (replay)");
        return RKNN_SUCC;
    }
    return RKNN_ERR_PARAM_INVALID;
}

/* NPU cores of the emulated SoC, from the emulated board's device tree ($RKBENCH_BOARD_ROOT; 3 without one). */
static unsigned emulated_npu_cores(void) {
    const char *root = getenv("RKBENCH_BOARD_ROOT");
    char path[1100], text[512] = {0};
    if (!root) return 3;
    snprintf(path, sizeof path, "%s/proc/device-tree/compatible", root);
    FILE *f = fopen(path, "rb");
    if (!f) return 3;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    for (size_t i = 0; i < n; i++) text[i] = text[i] ? text[i] : ';';
    if (strstr(text, "rockchip,rk3588;")) return 3;
    if (strstr(text, "rockchip,rk3576;")) return 2;
    return 1;
}

int rknn_set_core_mask(rknn_context ctx, rknn_core_mask mask) {
    if (!get(ctx)) return RKNN_ERR_CTX_INVALID;
    /* like librknnrt: a mask naming a core the SoC lacks is not an error, it falls back to auto with a warning */
    unsigned m = (unsigned)mask;
    if (m != 0 && m != 0xffff && (m >> emulated_npu_cores()) != 0)
        fprintf(stderr, "E RKNN: Not support core mask: %u, fallback to single core auto mode\n", m);
    return RKNN_SUCC;  /* there is no NPU: nothing else to set */
}

int rknn_inputs_set(rknn_context ctx, uint32_t n_inputs, rknn_input inputs[]) {
    standin *s = get(ctx);
    if (!s || n_inputs != 1 || !inputs || !inputs[0].buf) return RKNN_ERR_PARAM_INVALID;
    /* converted by the library: uint8 NHWC, one byte per element; pass-through: the attr's own bytes */
    uint32_t want = inputs[0].pass_through ? s->in[0].size_with_stride : s->in[0].n_elems;
    if (!inputs[0].pass_through && (inputs[0].type != RKNN_TENSOR_UINT8 || inputs[0].fmt != RKNN_TENSOR_NHWC)) {
        fprintf(stderr, "replay stand-in: converts uint8 NHWC inputs only (got type %d fmt %d)\n", inputs[0].type, inputs[0].fmt);
        return RKNN_ERR_INPUT_INVALID;
    }
    if (inputs[0].size != want) {
        fprintf(stderr, "replay stand-in: input of %u bytes, the model takes %u%s\n", inputs[0].size, want,
                inputs[0].pass_through ? " (pass-through: the input attr's size_with_stride)" : "");
        return RKNN_ERR_INPUT_INVALID;
    }
    if (!s->null_mode) s->hash = fnv1a64((const uint8_t *)inputs[0].buf, inputs[0].size, 14695981039346656037ULL);
    s->have_input = 1;
    return RKNN_SUCC;
}

/* int8, as the NPU hands out a quantised output: q = round(x / scale) + zp, clamped */
static void quantise(int8_t *q, const float *src, const rknn_tensor_attr *a) {
    for (uint32_t e = 0; e < a->n_elems; e++) {
        float v = roundf(src[e] / a->scale) + (float)a->zp;
        q[e] = (int8_t)(v < -128.f ? -128.f : v > 127.f ? 127.f : v);
    }
}

int rknn_run(rknn_context ctx, rknn_run_extend *ext) {
    (void)ext;
    standin *s = get(ctx);
    if (!s) return RKNN_ERR_CTX_INVALID;
    if (s->in_mem) {  /* zero-copy input: hash what is in the buffer now (null mode: nothing to look up) */
        if (!s->null_mode) s->hash = fnv1a64((const uint8_t *)s->in_mem->virt_addr, s->in[0].size, 14695981039346656037ULL);
        s->have_input = 1;
    }
    if (!s->have_input) return RKNN_ERR_INPUT_INVALID;
    if (s->null_mode) s->have_outputs = 1;  /* the zeros calloc'd at init */
    if (!s->null_mode && (!s->have_outputs || s->loaded != s->hash)) {
        char path[2100];
        const char *where = NULL;
        for (size_t i = 0; i < s->n_records && !where; i++)
            if (s->records[i].hash == s->hash) where = s->records[i].path;
        if (!where) snprintf(path, sizeof(path), "%s/%016llx.out", s->folder, (unsigned long long)s->hash);
        else if (where[0] == '/') snprintf(path, sizeof(path), "%s", where);
        else snprintf(path, sizeof(path), "%s/%s", s->folder, where);
        FILE *f = fopen(path, "rb");
        if (!f) {
            fprintf(stderr, "replay stand-in: no recorded outputs for input %016llx (%s): record this input "
                    "with rkbench.cpp.write_replay\n", (unsigned long long)s->hash, path);
            return RKNN_ERR_INPUT_INVALID;
        }
        size_t n = total_elems(s);
        size_t got = fread(s->values, sizeof(float), n, f);
        fclose(f);
        if (got != n) {
            s->have_outputs = 0;
            fprintf(stderr, "replay stand-in: %s holds %zu values, the outputs need %zu\n", path, got, n);
            return RKNN_ERR_OUTPUT_INVALID;
        }
        s->loaded = s->hash;
        s->have_outputs = 1;
    }
    size_t at = 0;
    for (uint32_t i = 0; i < s->n_out; i++) {  /* zero-copy outputs: written into their memory as bound */
        const rknn_tensor_attr *a = &s->out[i];
        rknn_tensor_mem *m = s->out_mem[i];
        if (m) {
            int as_float = s->out_mem_type[i] == RKNN_TENSOR_FLOAT32;
            if (m->size < a->n_elems * (as_float ? 4u : 1u)) {
                fprintf(stderr, "replay stand-in: output memory %u holds %u bytes, too small\n", i, m->size);
                return RKNN_ERR_PARAM_INVALID;
            }
            if (as_float) memcpy(m->virt_addr, s->values + at, a->n_elems * 4);
            else quantise((int8_t *)m->virt_addr, s->values + at, a);
        }
        at += a->n_elems;
    }
    return RKNN_SUCC;
}

int rknn_outputs_get(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *ext) {
    (void)ext;
    standin *s = get(ctx);
    if (!s || !outputs || n_outputs > s->n_out) return RKNN_ERR_PARAM_INVALID;
    if (!s->have_outputs || s->loaded != s->hash) return RKNN_ERR_OUTPUT_INVALID;
    for (uint32_t k = 0; k < n_outputs; k++) {
        uint32_t i = outputs[k].index;
        if (i >= s->n_out) return RKNN_ERR_PARAM_INVALID;
        const rknn_tensor_attr *a = &s->out[i];
        size_t at = 0;
        for (uint32_t j = 0; j < i; j++) at += s->out[j].n_elems;
        const float *src = s->values + at;
        int as_float = outputs[k].want_float || a->type == RKNN_TENSOR_FLOAT32;
        uint32_t bytes = a->n_elems * (as_float ? 4 : 1);
        if (s->null_mode && as_float && !outputs[k].is_prealloc) {  /* null: the zeros themselves, no copy */
            outputs[k].buf = (void *)src;
            outputs[k].size = bytes;
            continue;
        }
        if (!outputs[k].is_prealloc) outputs[k].buf = malloc(bytes);
        else if (outputs[k].size < bytes) return RKNN_ERR_PARAM_INVALID;
        outputs[k].size = bytes;
        if (as_float) {
            memcpy(outputs[k].buf, src, bytes);
        } else {
            quantise((int8_t *)outputs[k].buf, src, a);
        }
    }
    return RKNN_SUCC;
}

int rknn_outputs_release(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[]) {
    standin *s = get(ctx);
    if (!s || !outputs) return RKNN_ERR_PARAM_INVALID;
    for (uint32_t k = 0; k < n_outputs; k++) {
        const float *buf = (const float *)outputs[k].buf;
        int shared = s->values && buf >= s->values && buf < s->values + total_elems(s);  /* null mode's zeros */
        if (!outputs[k].is_prealloc && !shared) {
            free(outputs[k].buf);
            outputs[k].buf = NULL;
        }
    }
    return RKNN_SUCC;
}

rknn_tensor_mem *rknn_create_mem(rknn_context ctx, uint32_t size) {
    if (!get(ctx)) return NULL;
    rknn_tensor_mem *m = (rknn_tensor_mem *)calloc(1, sizeof(rknn_tensor_mem));
    m->virt_addr = calloc(1, size);
    m->size = size;
    m->fd = -1;
    get(ctx)->io_mem_bytes += size;
    return m;
}

int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr) {
    standin *s = get(ctx);
    if (!s || !mem || !attr) return RKNN_ERR_PARAM_INVALID;
    /* an attr naming an input tensor binds the input, one naming an output binds that output */
    if (!strcmp(attr->name, s->in[0].name)) {
        s->in_mem = mem;
        return RKNN_SUCC;
    }
    if (attr->index < s->n_out) {
        s->out_mem[attr->index] = mem;
        s->out_mem_type[attr->index] = attr->type == RKNN_TENSOR_FLOAT32 ? RKNN_TENSOR_FLOAT32 : s->out[attr->index].type;
        return RKNN_SUCC;
    }
    return RKNN_ERR_PARAM_INVALID;
}

int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem *mem) {
    (void)ctx;
    if (!mem) return RKNN_ERR_PARAM_INVALID;
    free(mem->virt_addr);
    free(mem);
    return RKNN_SUCC;
}
