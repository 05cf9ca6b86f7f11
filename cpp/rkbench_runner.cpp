// rkbench C++ on-device runner: drives librknnrt directly (no Python on the board), reading the same spec
// file as rkbench/device/runner.py and writing the same kinds of results.
//
//   rkbench_runner --spec spec.json --mode latency|eval|throughput --model m.rknn --out result.json
//                  [--lib librknnrt.so] [--inputs inputs.txt] [--input tensor.bin] [--detections d.json]
//                  [--where board] [--warmup N] [--iterations N] [--min-seconds S]
// The spec's "measure" section also says how to take the outputs: outputs float|int8 (default float),
// zero_copy true|false (default false): io memory from rknn_create_mem bound with rknn_set_io_mem, the input
// copied into it and the outputs read out of it, instead of rknn_inputs_set / rknn_outputs_get; and
// pass_through true|false (default false): the input quantised to what the input attr says before the clock
// and handed over with pass_through=1. Throughput: cores (one core mask per worker thread) and frames.
//
// librknnrt is opened at run time (dlopen), so one binary runs against any runtime version, or against
// rkbench's replay stand-in (cpp/fake_librknnrt.c) on a machine without an NPU.
// Inputs are pre-processed by the host: raw uint8 NHWC letterboxed tensors (C = 3 RGB, or 1 gray: as many
// channels as the spec's mean/std) listed in the inputs file as
//   image_id<TAB>path<TAB>orig_w<TAB>orig_h<TAB>scale<TAB>pad_x<TAB>pad_y   (model_xy = orig_xy * scale + pad)
// On failure: stderr ends with one line `runner: error: ...`, the result says "complete": false, exit 1.
#include "rknn_api_subset.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

const char *RUNNER_VERSION = "cpp-1";
const char *STANDIN_MARK = "rkbench replay stand-in";

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------ JSON: a reader for the spec file

struct Json {
    enum Kind { Null, Bool, Num, Str, Arr, Obj } kind = Null;
    double num = 0;
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;  // key order kept, for the unknown-key check
    const Json *get(const std::string &key) const {
        for (const auto &kv : obj)
            if (kv.first == key) return &kv.second;
        return nullptr;
    }
};

struct Parser {
    const std::string &s;
    size_t i = 0;
    explicit Parser(const std::string &text) : s(text) {}
    void ws() { while (i < s.size() && std::strchr(" \t\r\n", s[i])) i++; }
    [[noreturn]] void bad() { throw Error("spec file is not valid JSON near byte " + std::to_string(i) + ": write it with rkbench"); }
    bool lit(const char *w) {
        size_t n = std::strlen(w);
        if (s.compare(i, n, w) != 0) return false;
        i += n;
        return true;
    }
    std::string string() {
        std::string out;
        if (s[i++] != '"') bad();
        while (i < s.size() && s[i] != '"') {
            char c = s[i++];
            if (c == '\\') {
                if (i >= s.size()) bad();
                char e = s[i++];
                if (e == 'n') c = '\n'; else if (e == 't') c = '\t'; else if (e == 'u') { i += 4; c = '?'; }  // not in specs
                else c = e;
            }
            out += c;
        }
        if (i++ >= s.size()) bad();
        return out;
    }
    Json value() {
        ws();
        if (i >= s.size()) bad();
        Json v;
        char c = s[i];
        if (c == '{') {
            v.kind = Json::Obj;
            i++; ws();
            if (s[i] == '}') { i++; return v; }
            for (;;) {
                ws();
                std::string key = string();
                ws();
                if (s[i++] != ':') bad();
                v.obj.emplace_back(key, value());
                ws();
                if (s[i] == ',') { i++; continue; }
                if (s[i++] != '}') bad();
                return v;
            }
        }
        if (c == '[') {
            v.kind = Json::Arr;
            i++; ws();
            if (s[i] == ']') { i++; return v; }
            for (;;) {
                v.arr.push_back(value());
                ws();
                if (s[i] == ',') { i++; continue; }
                if (s[i++] != ']') bad();
                return v;
            }
        }
        if (c == '"') { v.kind = Json::Str; v.str = string(); return v; }
        if (lit("true")) { v.kind = Json::Bool; v.num = 1; return v; }
        if (lit("false")) { v.kind = Json::Bool; return v; }
        if (lit("null")) return v;
        char *end = nullptr;
        v.num = std::strtod(s.c_str() + i, &end);
        if (end == s.c_str() + i) bad();
        v.kind = Json::Num;
        i = end - s.c_str();
        return v;
    }
};

std::string read_file(const std::string &path, const char *what) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(std::string(what) + " " + path + " not found: push it first");
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// ------------------------------------------------------------------ JSON: writing results

std::string quote(const std::string &s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') { out += '\\'; out += c; }
        else if ((unsigned char)c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); out += b; }
        else out += c;
    }
    return out + "\"";
}

std::string num(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.17g", v);
    return b;
}

// ------------------------------------------------------------------ the spec

struct Spec {
    int input_size = 0, num_classes = 0, reg_max = 16, batch = 1, max_det = 300;
    std::string head, runtime, core_mask = "auto";
    std::vector<int> category_ids;
    double conf = 0.001, iou = 0.7;
    int warmup = 5, iterations = 50;
    double min_seconds = 2.0;
    std::string outputs = "float";  // measure.outputs: float (the library dequantises) | int8 (the runner does)
    bool zero_copy = false;         // measure.zero_copy: rknn_create_mem + rknn_set_io_mem instead of inputs_set/outputs_get
    bool pass_through = false;      // measure.pass_through: the input quantised here, handed over with pass_through=1
    std::vector<float> anchors;     // yolov5: 3 rows of (w, h) pairs in pixels, flattened
    float mean[3] = {0, 0, 0}, std_[3] = {255, 255, 255};  // the normalisation the .rknn folds in (pass-through needs it)
    int channels = 3;               // input channels, as many as mean/std have: 3 (RGB) or 1 (gray model)
    std::vector<std::string> cores; // measure.cores: the core mask of each throughput worker ("0,1,2")
    int frames = 30;                // measure.frames: frames through the throughput workers
    std::string inference_json;  // echoed into the result as read
};

// Keys the Python InferenceSpec knows (rkbench/models/detect.py) and the runner's measure settings.
const char *INFERENCE_KEYS[] = {"input_size", "head", "num_classes", "category_ids", "reg_max", "anchors", "batch",
                                "conf", "iou", "max_det", "runtime", "core_mask", "threads", "mean", "std", "version"};
const char *MEASURE_KEYS[] = {"warmup", "iterations", "min_seconds", "frames", "cores", "frame_size", "overlap",
                              "sample_interval", "outputs", "zero_copy", "pass_through"};

std::string dump(const Json &v) {
    switch (v.kind) {
    case Json::Null: return "null";
    case Json::Bool: return v.num ? "true" : "false";
    case Json::Num: return num(v.num);
    case Json::Str: return quote(v.str);
    case Json::Arr: {
        std::string o = "[";
        for (size_t k = 0; k < v.arr.size(); k++) o += (k ? ", " : "") + dump(v.arr[k]);
        return o + "]";
    }
    default: {
        std::string o = "{";
        for (size_t k = 0; k < v.obj.size(); k++) o += (k ? ", " : "") + quote(v.obj[k].first) + ": " + dump(v.obj[k].second);
        return o + "}";
    }
    }
}

template <size_t N> void check_keys(const Json &obj, const char *(&known)[N], const char *section) {
    for (const auto &kv : obj.obj)
        if (std::find_if(known, known + N, [&](const char *k) { return kv.first == k; }) == known + N)
            throw Error(std::string("unknown ") + section + " spec key " + kv.first + ": push the runner that matches this rkbench");
}

Spec load_spec(const std::string &path) {
    std::string text_ = read_file(path, "spec file");  // the parser reads it in place
    Parser p(text_);
    Json root = p.value();
    const Json *inf = root.get("inference");
    if (root.kind != Json::Obj || !inf || inf->kind != Json::Obj) throw Error("spec file has no \"inference\" object: write it with rkbench");
    check_keys(*inf, INFERENCE_KEYS, "inference");
    Spec s;
    auto number = [&](const Json &o, const char *key, double fallback, bool required) {
        const Json *v = o.get(key);
        if (!v) {
            if (required) throw Error(std::string("inference spec incomplete (no ") + key + "): write it with rkbench");
            return fallback;
        }
        if (v->kind != Json::Num) throw Error(std::string("spec key ") + key + " is not a number: write it with rkbench");
        return v->num;
    };
    auto text = [&](const char *key, const std::string &fallback) {
        const Json *v = inf->get(key);
        return v && v->kind == Json::Str ? v->str : fallback;
    };
    if (number(*inf, "version", 1, false) != 1) throw Error("spec version != 1: push the matching runner");
    s.input_size = (int)number(*inf, "input_size", 0, true);
    s.num_classes = (int)number(*inf, "num_classes", 0, true);
    s.reg_max = (int)number(*inf, "reg_max", 16, false);
    s.batch = (int)number(*inf, "batch", 1, false);
    s.conf = number(*inf, "conf", 0.001, false);
    s.iou = number(*inf, "iou", 0.7, false);
    s.max_det = (int)number(*inf, "max_det", 300, false);
    s.head = text("head", "");
    s.runtime = text("runtime", "rknnlite");
    s.core_mask = text("core_mask", "auto");
    if (const Json *ids = inf->get("category_ids"))
        for (const Json &v : ids->arr) s.category_ids.push_back((int)v.num);
    if ((int)s.category_ids.size() != s.num_classes)
        throw Error("the model has " + std::to_string(s.num_classes) + " classes but " + std::to_string(s.category_ids.size()) +
                    " category ids were given: evaluate on a dataset with the model's classes");
    if (s.head != "rknn" && s.head != "ultralytics" && s.head != "yolov5")
        throw Error("head " + s.head + " is not decoded by the C++ runner (rknn, ultralytics, yolov5): use the Python runner");
    if (const Json *rows = inf->get("anchors"))
        for (const Json &row : rows->arr)
            for (const Json &v : row.arr) s.anchors.push_back((float)v.num);
    if (s.head == "yolov5" && (s.anchors.empty() || s.anchors.size() % 6))
        throw Error("a yolov5 head needs 3 rows of anchors (w, h pairs per scale) in the spec: write it with rkbench");
    const Json *mv = inf->get("mean"), *sv = inf->get("std");
    if (mv) s.channels = (int)mv->arr.size();
    if ((s.channels != 1 && s.channels != 3) || (sv && (int)sv->arr.size() != s.channels))
        throw Error("mean/std of " + std::to_string(s.channels) + " and " + std::to_string(sv ? sv->arr.size() : 3) +
                    " channels: the spec needs one value per input channel (3 RGB or 1 gray): write it with rkbench");
    for (int c = 0; c < s.channels; c++) {
        if (mv) s.mean[c] = (float)mv->arr[c].num;
        if (sv) s.std_[c] = (float)sv->arr[c].num;
    }
    if (s.batch < 1) throw Error("batch " + std::to_string(s.batch) + " must be >= 1: write the spec with rkbench");
    if (s.input_size <= 0 || s.input_size % 32) throw Error("input_size " + std::to_string(s.input_size) + " is not a positive multiple of 32: re-export the model");
    if (const Json *m = root.get("measure")) {
        check_keys(*m, MEASURE_KEYS, "measure");
        s.warmup = (int)number(*m, "warmup", s.warmup, false);
        s.iterations = (int)number(*m, "iterations", s.iterations, false);
        s.min_seconds = number(*m, "min_seconds", s.min_seconds, false);
        if (const Json *o = m->get("outputs")) s.outputs = o->kind == Json::Str ? o->str : "?";
        if (s.outputs != "float" && s.outputs != "int8")
            throw Error("measure setting outputs=" + s.outputs + " unknown: use float or int8 (config measure.cpp_outputs)");
        if (const Json *z = m->get("zero_copy")) {
            if (z->kind != Json::Bool) throw Error("measure setting zero_copy is not true or false: write it with rkbench (config measure.cpp_zero_copy)");
            s.zero_copy = z->num != 0;
        }
        if (const Json *z = m->get("pass_through")) {
            if (z->kind != Json::Bool) throw Error("measure setting pass_through is not true or false: write it with rkbench (config measure.cpp_pass_through)");
            s.pass_through = z->num != 0;
        }
        s.frames = (int)number(*m, "frames", s.frames, false);
        if (const Json *c = m->get("cores"); c && c->kind == Json::Str) {
            std::istringstream list(c->str);
            for (std::string mask; std::getline(list, mask, ',');) if (!mask.empty()) s.cores.push_back(mask);
        }
    }
    s.inference_json = dump(*inf);
    return s;
}

// ------------------------------------------------------------------ librknnrt, opened at run time

struct Rknn {
    void *handle = nullptr;
    rknn_init_fn init; rknn_destroy_fn destroy; rknn_query_fn query; rknn_set_core_mask_fn set_core_mask;
    rknn_inputs_set_fn inputs_set; rknn_run_fn run; rknn_outputs_get_fn outputs_get; rknn_outputs_release_fn outputs_release;
    // zero-copy io memory: looked up only, a library without them fails when zero_copy is asked for
    rknn_create_mem_fn create_mem = nullptr; rknn_set_io_mem_fn set_io_mem = nullptr; rknn_destroy_mem_fn destroy_mem = nullptr;

    template <typename F> void sym(F &f, const char *name, const std::string &lib) {
        f = reinterpret_cast<F>(dlsym(handle, name));
        if (!f) throw Error(lib + " has no symbol " + name + ": install an rknpu2 runtime (librknnrt >= 1.5) or pass --lib PATH");
    }
    explicit Rknn(const std::string &lib) {
        handle = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle) {
            const char *why = dlerror();
            throw Error("cannot load " + lib + " (" + (why ? why : "?") + "): install librknnrt.so on the board or pass --lib PATH");
        }
        sym(init, "rknn_init", lib); sym(destroy, "rknn_destroy", lib); sym(query, "rknn_query", lib);
        sym(set_core_mask, "rknn_set_core_mask", lib); sym(inputs_set, "rknn_inputs_set", lib); sym(run, "rknn_run", lib);
        sym(outputs_get, "rknn_outputs_get", lib); sym(outputs_release, "rknn_outputs_release", lib);
        create_mem = reinterpret_cast<rknn_create_mem_fn>(dlsym(handle, "rknn_create_mem"));
        set_io_mem = reinterpret_cast<rknn_set_io_mem_fn>(dlsym(handle, "rknn_set_io_mem"));
        destroy_mem = reinterpret_cast<rknn_destroy_mem_fn>(dlsym(handle, "rknn_destroy_mem"));
    }
};

void check(int rc, const char *call) {
    if (rc != RKNN_SUCC) throw Error(std::string(call) + " failed with code " + std::to_string(rc) + ": see librknnrt's message above");
}

rknn_core_mask core_mask_of(const std::string &m) {
    static const std::map<std::string, rknn_core_mask> masks = {
        {"auto", RKNN_NPU_CORE_AUTO}, {"0", RKNN_NPU_CORE_0}, {"1", RKNN_NPU_CORE_1}, {"2", RKNN_NPU_CORE_2},
        {"0_1", RKNN_NPU_CORE_0_1}, {"0_1_2", RKNN_NPU_CORE_0_1_2}, {"all", RKNN_NPU_CORE_ALL}};
    auto it = masks.find(m);
    if (it == masks.end()) throw Error("core_mask " + m + " unknown: use auto, 0, 1, 2, 0_1, 0_1_2 or all");
    return it->second;
}

// One model context: attrs queried once, outputs handed out as float (dequantised here on the int8 path).
// zero_copy: the input and every output live in io memory from rknn_create_mem, bound once with
// rknn_set_io_mem; set_input copies into the input memory, get_outputs copies out of the output memories.
// pass_through: the input is handed over as the NPU takes it (type, layout, zp/scale of the input attr),
// converted by prepare() before any clock runs, like a camera pipeline that produces the tensor itself.
struct Model {
    Rknn &api;
    rknn_context ctx = 0;
    rknn_tensor_attr in{};
    std::vector<rknn_tensor_attr> outs;
    rknn_sdk_version version{};
    bool want_float = true;
    std::vector<rknn_output> got;
    bool zero_copy = false, pass_through = false;
    int batch = 1;
    uint32_t channels = 3;  // of the uint8 NHWC images: the spec's, checked against the input attr
    rknn_tensor_mem *in_mem = nullptr;
    std::vector<rknn_tensor_mem *> out_mems;
    std::vector<std::vector<uint8_t>> copied;  // zero_copy: each output read out of its memory

    Model(Rknn &a, const std::string &path, const std::string &mask, const Spec &s)
        : api(a), want_float(s.outputs == "float"), zero_copy(s.zero_copy), pass_through(s.pass_through), batch(s.batch),
          channels((uint32_t)s.channels) {
        // size 0: librknnrt reads the model from the path itself
        check(api.init(&ctx, const_cast<char *>(path.c_str()), 0, 0, nullptr), "rknn_init");
        if (mask != "auto") check(api.set_core_mask(ctx, core_mask_of(mask)), "rknn_set_core_mask");
        rknn_input_output_num io{};
        check(api.query(ctx, RKNN_QUERY_IN_OUT_NUM, &io, sizeof io), "rknn_query(IN_OUT_NUM)");
        if (io.n_input != 1) throw Error("the model has " + std::to_string(io.n_input) + " inputs, rkbench feeds 1: re-export the model");
        in.index = 0;
        check(api.query(ctx, RKNN_QUERY_INPUT_ATTR, &in, sizeof in), "rknn_query(INPUT_ATTR)");
        if (in.n_dims == 4 && (int)in.dims[0] != batch)
            throw Error("the model takes batches of " + std::to_string(in.dims[0]) + ", the spec says batch " + std::to_string(batch) +
                        ": build the .rknn with rknn_batch_size = batch");
        if (in.n_dims == 4 && (in.fmt == RKNN_TENSOR_NHWC ? in.dims[3] : in.dims[1]) != channels)
            throw Error("the model takes " + std::to_string(in.fmt == RKNN_TENSOR_NHWC ? in.dims[3] : in.dims[1]) + "-channel input, the spec has " +
                        "mean/std of " + std::to_string(channels) + ": write the spec with rkbench from this model (channels=1 for a gray one)");
        outs.resize(io.n_output);
        for (uint32_t k = 0; k < io.n_output; k++) {
            outs[k] = rknn_tensor_attr{};
            outs[k].index = k;
            check(api.query(ctx, RKNN_QUERY_OUTPUT_ATTR, &outs[k], sizeof outs[k]), "rknn_query(OUTPUT_ATTR)");
        }
        check(api.query(ctx, RKNN_QUERY_SDK_VERSION, &version, sizeof version), "rknn_query(SDK_VERSION)");
        got.resize(io.n_output);
        if (zero_copy) bind_io_mem();
    }
    ~Model() {
        if (in_mem) api.destroy_mem(ctx, in_mem);
        for (rknn_tensor_mem *m : out_mems) if (m) api.destroy_mem(ctx, m);
        if (ctx) api.destroy(ctx);
    }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    size_t input_bytes(int size) const { return (size_t)size * size * channels; }  // one image, uint8 NHWC
    uint32_t input_w() const { return in.n_dims == 4 ? (in.fmt == RKNN_TENSOR_NHWC ? in.dims[2] : in.dims[3]) : 0; }

    // RKNN_QUERY_MEM_SIZE: what the library allocated for this context (after the io memory, if any).
    std::string memory_json() const {
        rknn_mem_size mem{};
        int rc = api.query(ctx, RKNN_QUERY_MEM_SIZE, &mem, sizeof mem);
        if (rc != RKNN_SUCC) return "{\"reported\": false, \"code\": " + num(rc) + ", \"why\": \"rknn_query(RKNN_QUERY_MEM_SIZE) failed\"}";
        return "{\"reported\": true, \"by\": " + quote(version.api_version) + ", \"weight_bytes\": " + num(mem.total_weight_size) +
               ", \"internal_bytes\": " + num(mem.total_internal_size) + ", \"dma_allocated_bytes\": " + num((double)mem.total_dma_allocated_size) +
               ", \"sram_total_bytes\": " + num(mem.total_sram_size) + ", \"sram_free_bytes\": " + num(mem.free_sram_size) + "}";
    }

    void bind_io_mem() {
        if (!api.create_mem || !api.set_io_mem || !api.destroy_mem)
            throw Error("this librknnrt has no rknn_create_mem/rknn_set_io_mem: install librknnrt >= 1.5 or set measure.cpp_zero_copy=false");
        rknn_tensor_attr a = in;  // uint8 NHWC as with rknn_inputs_set; pass-through: the attr as queried
        if (!pass_through) {
            a.type = RKNN_TENSOR_UINT8;
            a.fmt = RKNN_TENSOR_NHWC;
        }
        in_mem = api.create_mem(ctx, std::max(a.size_with_stride, a.size));
        if (!in_mem) throw Error("rknn_create_mem failed for the input: free NPU memory or set measure.cpp_zero_copy=false");
        check(api.set_io_mem(ctx, in_mem, &a), "rknn_set_io_mem(input)");
        out_mems.assign(outs.size(), nullptr);
        copied.resize(outs.size());
        for (size_t k = 0; k < outs.size(); k++) {
            rknn_tensor_attr o = outs[k];
            if (want_float) o.type = RKNN_TENSOR_FLOAT32;  // the library writes float32 into the memory
            uint32_t bytes = want_float ? o.n_elems * 4 : std::max(o.size_with_stride, o.size);
            out_mems[k] = api.create_mem(ctx, bytes);
            if (!out_mems[k]) throw Error("rknn_create_mem failed for output " + std::to_string(k) + ": free NPU memory or set measure.cpp_zero_copy=false");
            check(api.set_io_mem(ctx, out_mems[k], &o), "rknn_set_io_mem(output)");
            copied[k].resize(bytes);
        }
    }

    // The bytes set_input hands over for a batch of uint8 NHWC images: themselves, or with pass_through the
    // tensor the NPU takes: q = round(((x - mean) / std) / scale) + zp in the attr's type and layout, rows
    // padded to w_stride (rkbench.cpp.pass_through_bytes computes the same on the host, float32 alike).
    std::vector<uint8_t> prepare(const std::vector<uint8_t> &nhwc, const Spec &s) const {
        if (!pass_through) return nhwc;
        if (in.type != RKNN_TENSOR_INT8 && in.type != RKNN_TENSOR_UINT8)
            throw Error("pass-through of an input of tensor type " + std::to_string(in.type) + " (int8/uint8 only): set measure.cpp_pass_through=false");
        if (in.n_dims != 4) throw Error("pass-through needs a 4-D input attr: set measure.cpp_pass_through=false");
        bool nhwc_fmt = in.fmt == RKNN_TENSOR_NHWC;
        uint32_t c = nhwc_fmt ? in.dims[3] : in.dims[1], h = nhwc_fmt ? in.dims[1] : in.dims[2], w = input_w();
        if (c != channels || (size_t)in.dims[0] * h * w * c != nhwc.size())
            throw Error("pass-through: the input attr's dims do not match the " + std::to_string(s.input_size) + " px uint8 images: rebuild the spec with the model");
        uint32_t stride = nhwc_fmt && in.w_stride > w ? in.w_stride : w;
        bool affine = in.qnt_type == RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC;
        float lo = in.type == RKNN_TENSOR_INT8 ? -128.f : 0.f, hi = in.type == RKNN_TENSOR_INT8 ? 127.f : 255.f;
        std::vector<uint8_t> out((size_t)in.dims[0] * h * stride * c, 0);
        for (size_t b = 0; b < in.dims[0]; b++)
            for (uint32_t y = 0; y < h; y++)
                for (uint32_t x = 0; x < w; x++)
                    for (uint32_t ch = 0; ch < c; ch++) {
                        float v = (float)nhwc[((b * h + y) * w + x) * c + ch];
                        if (affine) v = std::nearbyint(((v - s.mean[ch]) / s.std_[ch]) / in.scale) + (float)in.zp;
                        v = std::min(std::max(v, lo), hi);
                        size_t at = nhwc_fmt ? ((b * h + y) * stride + x) * c + ch : ((b * c + ch) * h + y) * w + x;
                        out[at] = in.type == RKNN_TENSOR_INT8 ? (uint8_t)(int8_t)v : (uint8_t)v;
                    }
        return out;
    }

    void set_input(const std::vector<uint8_t> &bytes) {
        if (zero_copy) {  // uint8 NHWC rows padded to w_stride pixels where the library asks for it
            uint32_t w = input_w();
            uint32_t stride = in.w_stride > w ? in.w_stride : w;
            if (pass_through || w == 0 || stride == w) { std::memcpy(in_mem->virt_addr, bytes.data(), bytes.size()); return; }
            size_t row = (size_t)w * channels;
            for (size_t y = 0; y < bytes.size() / row; y++)
                std::memcpy((uint8_t *)in_mem->virt_addr + (size_t)y * stride * channels, bytes.data() + y * row, row);
            return;
        }
        rknn_input x{};
        x.index = 0;
        x.buf = const_cast<uint8_t *>(bytes.data());
        x.size = (uint32_t)bytes.size();
        x.pass_through = pass_through ? 1 : 0;
        x.type = pass_through ? in.type : RKNN_TENSOR_UINT8;
        x.fmt = pass_through ? in.fmt : RKNN_TENSOR_NHWC;
        check(api.inputs_set(ctx, 1, &x), "rknn_inputs_set");
    }
    void run() { check(api.run(ctx, nullptr), "rknn_run"); }
    void get_outputs() {
        if (zero_copy) {  // read each output out of its memory (what rknn_outputs_get does on the other path)
            for (size_t k = 0; k < copied.size(); k++) std::memcpy(copied[k].data(), out_mems[k]->virt_addr, copied[k].size());
            return;
        }
        for (size_t k = 0; k < got.size(); k++) {
            got[k] = rknn_output{};
            got[k].index = (uint32_t)k;
            got[k].want_float = want_float ? 1 : 0;
        }
        check(api.outputs_get(ctx, (uint32_t)got.size(), got.data(), nullptr), "rknn_outputs_get");
    }
    // Output k as float32 (a copy: the library's buffers go back at release).
    std::vector<float> output(size_t k) const {
        const rknn_tensor_attr &a = outs[k];
        const void *buf = zero_copy ? (const void *)copied[k].data() : got[k].buf;
        std::vector<float> v(a.n_elems);
        if (want_float || a.type == RKNN_TENSOR_FLOAT32) {
            std::memcpy(v.data(), buf, a.n_elems * sizeof(float));
        } else if (a.type == RKNN_TENSOR_INT8) {
            const int8_t *q = static_cast<const int8_t *>(buf);
            for (uint32_t e = 0; e < a.n_elems; e++) v[e] = ((float)q[e] - (float)a.zp) * a.scale;
        } else {
            throw Error("output " + std::to_string(k) + " has tensor type " + std::to_string(a.type) + ": use measure.cpp_outputs=float");
        }
        return v;
    }
    void release() {
        if (zero_copy) return;  // the memories stay bound until the model goes
        check(api.outputs_release(ctx, (uint32_t)got.size(), got.data()), "rknn_outputs_release"); }
};

// ------------------------------------------------------------------ decode + select (rkbench.models.prepost)

struct Det { float x1, y1, x2, y2, score; int cls; };

// Image i of a batch in output k: channel c at cell (row-major y*w+x), whatever layout the library reported.
struct Map {
    const std::vector<float> *v; size_t base; uint32_t c, h, w; bool nhwc;
    float at(uint32_t ch, uint32_t cell) const { return nhwc ? (*v)[base + (size_t)cell * c + ch] : (*v)[base + (size_t)ch * h * w + cell]; }
};

Map map_of(const rknn_tensor_attr &a, const std::vector<float> &v, int i) {
    if (a.n_dims != 4) throw Error(std::string("output ") + a.name + " is not 4-D: re-export the model with its head");
    bool nhwc = a.fmt == RKNN_TENSOR_NHWC;
    size_t base = (size_t)i * (a.n_elems / a.dims[0]);
    return nhwc ? Map{&v, base, a.dims[3], a.dims[1], a.dims[2], true} : Map{&v, base, a.dims[1], a.dims[2], a.dims[3], false};
}

// The best class of a candidate; false when it does not reach conf (select's filter, first maximum wins
// like numpy's argmax).
template <typename Score> bool best_class(int nc, float conf, Score score, float &best, int &k) {
    best = score(0);
    k = 0;
    for (int c = 1; c < nc; c++) {
        float v = score(c);
        if (v > best) { best = v; k = c; }
    }
    return best >= conf;
}

// rknn_model_zoo YOLOv8 layout per scale: DFL box [1, 4*reg_max, H, W], class scores [1, nc, H, W], score
// sum [1, 1, H, W]. A cell is decoded only when its score sum and best class score reach conf: the sum is
// never below the best score (sigmoids are >= 0), so on float outputs this drops nothing select() keeps.
std::vector<Det> decode_rknn(const Model &m, const std::vector<std::vector<float>> &outs, const Spec &s, int i) {
    if (outs.size() % 3) throw Error("rknn head expects 3 outputs per scale, got " + std::to_string(outs.size()) + ": re-export with the rknn head");
    std::vector<Det> dets;
    float input_h = (float)map_of(m.outs[0], outs[0], i).h * 8;  // stride 8 on the first scale, as prepost does
    std::vector<float> e(s.reg_max);
    for (size_t o = 0; o < outs.size(); o += 3) {
        Map box = map_of(m.outs[o], outs[o], i), cls = map_of(m.outs[o + 1], outs[o + 1], i), sum = map_of(m.outs[o + 2], outs[o + 2], i);
        if (box.c != 4u * s.reg_max || (int)cls.c != s.num_classes)
            throw Error("outputs of scale " + std::to_string(o / 3) + " do not match reg_max/num_classes of the spec: rebuild the spec with the model");
        float stride = input_h / box.h;
        for (uint32_t cell = 0; cell < box.h * box.w; cell++) {
            float best;
            int k;
            if (sum.at(0, cell) < s.conf || !best_class(s.num_classes, (float)s.conf, [&](int c) { return cls.at(c, cell); }, best, k)) continue;
            float ltrb[4];
            for (int side = 0; side < 4; side++) {  // DFL: softmax over the bins, then its expectation
                float mx = box.at(side * s.reg_max, cell);
                for (int b = 1; b < s.reg_max; b++) mx = std::max(mx, box.at(side * s.reg_max + b, cell));
                float num_ = 0, den = 0;
                for (int b = 0; b < s.reg_max; b++) {
                    e[b] = std::exp(box.at(side * s.reg_max + b, cell) - mx);
                    num_ += b * e[b];
                    den += e[b];
                }
                ltrb[side] = num_ / den;
            }
            float gx = (float)(cell % box.w) + 0.5f, gy = (float)(cell / box.w) + 0.5f;
            dets.push_back({(gx - ltrb[0]) * stride, (gy - ltrb[1]) * stride, (gx + ltrb[2]) * stride, (gy + ltrb[3]) * stride, best, k});
        }
    }
    return dets;
}

// prepost.decode_ultralytics_head: one output [1, 4+nc, A], xywh in pixels and sigmoid class scores.
std::vector<Det> decode_ultralytics(const Model &m, const std::vector<std::vector<float>> &outs, const Spec &s, int i) {
    const rknn_tensor_attr &a = m.outs[0];
    if (outs.size() != 1 || a.n_dims < 3 || (int)a.dims[1] != 4 + s.num_classes)
        throw Error("the official head has one output [1, 4+nc, anchors]: re-export with export=ultralytics or fix num_classes");
    size_t per = a.n_elems / a.dims[0], anchors = per / a.dims[1];
    const float *o = outs[0].data() + (size_t)i * per;
    std::vector<Det> dets;
    for (size_t j = 0; j < anchors; j++) {
        float best;
        int k;
        if (!best_class(s.num_classes, (float)s.conf, [&](int c) { return o[(4 + c) * anchors + j]; }, best, k)) continue;
        float x = o[j], y = o[anchors + j], hw = o[2 * anchors + j] / 2, hh = o[3 * anchors + j] / 2;
        dets.push_back({x - hw, y - hh, x + hw, y + hh, best, k});
    }
    return dets;
}

// prepost.decode_yolov5: raw head convs [1, na*(5+nc), H, W] per scale; xy = (2*sig - 0.5 + grid) * stride,
// wh = (2*sig)^2 * anchor, scores = obj * cls; candidates anchor by anchor, then cell by cell.
std::vector<Det> decode_yolov5(const Model &m, const std::vector<std::vector<float>> &outs, const Spec &s, int i) {
    size_t na = s.anchors.size() / 2 / outs.size();
    if (outs.size() != 3 || na == 0) throw Error("a yolov5 head has 3 outputs with anchors for each: re-export the model");
    auto sig = [](float v) { return 1.f / (1.f + std::exp(-v)); };
    std::vector<Det> dets;
    std::vector<float> p(5 + s.num_classes), sc(s.num_classes);
    for (size_t level = 0; level < outs.size(); level++) {
        Map o = map_of(m.outs[level], outs[level], i);
        if (o.c != na * (5 + s.num_classes)) throw Error("yolov5 output " + std::to_string(level) + " does not match anchors/num_classes of the spec: rebuild the spec with the model");
        float stride = (float)s.input_size / (float)o.h;
        for (size_t an = 0; an < na; an++)
            for (uint32_t cell = 0; cell < o.h * o.w; cell++) {
                for (size_t c = 0; c < p.size(); c++) p[c] = sig(o.at((uint32_t)(an * p.size() + c), cell));
                for (int c = 0; c < s.num_classes; c++) sc[c] = p[5 + c] * p[4];
                float best;
                int k;
                if (!best_class(s.num_classes, (float)s.conf, [&](int c) { return sc[c]; }, best, k)) continue;
                float gx = (float)(cell % o.w), gy = (float)(cell / o.w);
                float cx = (p[0] * 2 - 0.5f + gx) * stride, cy = (p[1] * 2 - 0.5f + gy) * stride;
                float bw = (p[2] * 2) * (p[2] * 2) * s.anchors[(level * na + an) * 2], bh = (p[3] * 2) * (p[3] * 2) * s.anchors[(level * na + an) * 2 + 1];
                dets.push_back({cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, best, k});
            }
    }
    return dets;
}

std::vector<Det> decode(const Model &m, const std::vector<std::vector<float>> &outs, const Spec &s, int i) {
    if (s.head == "ultralytics") return decode_ultralytics(m, outs, s, i);
    if (s.head == "yolov5") return decode_yolov5(m, outs, s, i);
    return decode_rknn(m, outs, s, i);
}

// prepost.select: candidates by score (stable), greedy per-class NMS (IoU > iou suppresses), max_det.
std::vector<Det> select(std::vector<Det> c, const Spec &s) {
    std::stable_sort(c.begin(), c.end(), [](const Det &a, const Det &b) { return a.score > b.score; });
    if (c.size() > 30000) c.resize(30000);  // prepost._MAX_CANDIDATES
    std::vector<Det> keep;
    std::map<int, std::vector<size_t>> by_class;  // indices into keep
    for (const Det &d : c) {
        if ((int)keep.size() >= s.max_det) break;
        bool suppressed = false;
        float area = std::max(d.x2 - d.x1, 0.f) * std::max(d.y2 - d.y1, 0.f);
        for (size_t j : by_class[d.cls]) {
            const Det &k = keep[j];
            float iw = std::max(std::min(d.x2, k.x2) - std::max(d.x1, k.x1), 0.f);
            float ih = std::max(std::min(d.y2, k.y2) - std::max(d.y1, k.y1), 0.f);
            float inter = iw * ih, ka = std::max(k.x2 - k.x1, 0.f) * std::max(k.y2 - k.y1, 0.f);
            if (inter / (area + ka - inter + 1e-9f) > (float)s.iou) { suppressed = true; break; }
        }
        if (suppressed) continue;
        by_class[d.cls].push_back(keep.size());
        keep.push_back(d);
    }
    return keep;
}

// ------------------------------------------------------------------ statistics (rkbench/stats.py)

std::string summarize(std::vector<double> v) {
    if (v.empty()) return "{\"count\": 0}";
    std::vector<double> s = v;
    std::sort(s.begin(), s.end());
    auto pct = [&](double q) {  // numpy's default (linear) percentile
        double pos = q / 100.0 * (s.size() - 1);
        size_t lo = (size_t)pos, hi = std::min(lo + 1, s.size() - 1);
        return s[lo] + (s[hi] - s[lo]) * (pos - lo);
    };
    double mean = 0;
    for (double x : v) mean += x;
    mean /= v.size();
    double var = 0;
    for (double x : v) var += (x - mean) * (x - mean);
    double sd = v.size() > 1 ? std::sqrt(var / (v.size() - 1)) : 0.0;
    return "{\"count\": " + num(v.size()) + ", \"min\": " + num(s[0]) + ", \"p50\": " + num(pct(50)) + ", \"p90\": " + num(pct(90)) +
           ", \"p99\": " + num(pct(99)) + ", \"mean\": " + num(mean) + ", \"std\": " + num(sd) + ", \"cv\": " + num(mean > 0 ? sd / mean : 0) + "}";
}

std::string parts_json(const std::vector<std::string> &names, const std::vector<std::vector<double>> &ms) {
    std::string o, samples;
    std::vector<double> total(ms.empty() ? 0 : ms[0].size(), 0.0);
    for (size_t p = 0; p < names.size(); p++) {
        o += quote(names[p]) + ": " + summarize(ms[p]) + ", ";
        samples += (p ? ", " : "") + quote(names[p]) + ": [";
        for (size_t k = 0; k < ms[p].size(); k++) {
            samples += (k ? ", " : "") + num(std::round(ms[p][k] * 1e4) / 1e4);
            total[k] += ms[p][k];
        }
        samples += "]";
    }
    return o + "\"total\": " + summarize(total) + ", \"samples_ms\": {" + samples + "}";
}

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// ------------------------------------------------------------------ inputs

struct Item { long long image_id; std::string path; double orig_w, orig_h, scale, pad_x, pad_y; };

std::vector<Item> read_inputs(const std::string &path) {
    std::string text = read_file(path, "inputs file");
    std::string base = path.find('/') == std::string::npos ? "" : path.substr(0, path.rfind('/') + 1);
    std::vector<Item> items;
    std::istringstream lines(text);
    std::string line;
    for (int n = 1; std::getline(lines, line); n++) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        std::vector<std::string> f;
        std::istringstream cols(line);
        for (std::string c; std::getline(cols, c, '\t');) f.push_back(c);
        Item it{};
        char *end = nullptr;
        bool ok = f.size() == 7;
        double v[5] = {0};
        for (int k = 0; ok && k < 5; k++) { v[k] = std::strtod(f[2 + k].c_str(), &end); ok = *end == '\0' || *end == '\r'; }
        if (ok) { it.image_id = std::strtoll(f[0].c_str(), &end, 10); ok = *end == '\0'; }
        if (!ok) throw Error(path + ":" + std::to_string(n) + ": expected image_id<TAB>path<TAB>orig_w<TAB>orig_h<TAB>scale<TAB>pad_x<TAB>pad_y: write it with rkbench");
        it.path = f[1][0] == '/' ? f[1] : base + f[1];
        it.orig_w = v[0]; it.orig_h = v[1]; it.scale = v[2]; it.pad_x = v[3]; it.pad_y = v[4];
        items.push_back(it);
    }
    if (items.empty()) throw Error("inputs file " + path + " lists no inputs: write one line per pre-processed image");
    return items;
}

std::vector<uint8_t> read_tensor(const std::string &path, size_t bytes) {
    std::string raw = read_file(path, "input tensor");
    if (raw.size() != bytes) throw Error("input tensor " + path + " has " + std::to_string(raw.size()) + " bytes, the model takes " +
                                         std::to_string(bytes) + " (uint8 NHWC): prepare it for this input size");
    return std::vector<uint8_t>(raw.begin(), raw.end());
}

// ------------------------------------------------------------------ modes

struct Args { std::map<std::string, std::string> kv; std::string get(const std::string &k, const std::string &d = "") const {
    auto it = kv.find(k); return it == kv.end() ? d : it->second; } };

// Images start.. of the inputs as one batch of spec.batch uint8 NHWC images (the last one repeated to fill,
// like Detector.prepare), then what the model takes (Model::prepare).
std::vector<uint8_t> batch_of(const std::vector<Item> &items, size_t start, const Model &m, const Spec &s) {
    std::vector<uint8_t> raw;
    for (int j = 0; j < s.batch; j++) {
        std::vector<uint8_t> x = read_tensor(items[std::min(start + j, items.size() - 1)].path, m.input_bytes(s.input_size));
        raw.insert(raw.end(), x.begin(), x.end());
    }
    return m.prepare(raw, s);
}

std::vector<Item> inputs_of(const Args &a) {
    if (!a.get("input").empty()) return {Item{0, a.get("input"), 0, 0, 1, 0, 0}};
    if (a.get("inputs").empty()) throw Error("this mode needs --input TENSOR or --inputs FILE: pass a pre-processed input");
    return read_inputs(a.get("inputs"));
}

// init_ms: rknn_init (+ core mask) and rknn_query of the attrs and version, timed once per run in main.
std::string run_latency(Model &m, const Spec &s, const Args &a, double init_ms) {
    std::vector<Item> items = inputs_of(a);
    std::vector<uint8_t> x = batch_of(items, 0, m, s);
    for (int k = 0; k < s.warmup; k++) { m.set_input(x); m.run(); m.get_outputs(); m.release(); }
    std::vector<std::vector<double>> ms(3);
    auto start = Clock::now();
    for (int k = 0; k < s.iterations || ms_since(start) < s.min_seconds * 1e3; k++) {
        auto t = Clock::now();
        m.set_input(x);
        ms[0].push_back(ms_since(t)); t = Clock::now();
        m.run();
        ms[1].push_back(ms_since(t)); t = Clock::now();
        m.get_outputs();
        m.release();
        ms[2].push_back(ms_since(t));
    }
    double timed = ms_since(start) / 1e3, busy = 0;
    std::vector<double> frame(ms[0].size(), 0.0);  // an iteration's total per image of its batch
    for (auto &p : ms) for (size_t k = 0; k < p.size(); k++) { busy += p[k]; frame[k] += p[k] / s.batch; }
    return "{\"unit\": \"ms\", \"per\": \"iteration of batch " + num(s.batch) + "\", \"batch\": " + num(s.batch) + ", \"warmup\": " + num(s.warmup) +
           ", \"iterations\": " + num(ms[0].size()) + ", \"timed_s\": " + num(timed) + ", \"source\": " + quote(items[0].path) +
           ", \"fps\": " + num(s.batch * ms[0].size() / (busy / 1e3)) + ", \"frame\": " + summarize(frame) + ", \"init\": {\"ms\": " + num(init_ms) +
           ", \"covers\": \"rknn_init, rknn_set_core_mask, rknn_query of the attrs" +
           (m.zero_copy ? ", rknn_create_mem + rknn_set_io_mem of the input and outputs" : "") + ", once per run\"}, " +
           parts_json({m.zero_copy ? "input_copy" : "inputs_set", "run", m.zero_copy ? "output_read" : "outputs_get"}, ms) + "}";
}

// The outputs of the batch just run, as float, then released.
std::vector<std::vector<float>> take_outputs(Model &m) {
    m.get_outputs();
    std::vector<std::vector<float>> outs;
    for (size_t k = 0; k < m.outs.size(); k++) outs.push_back(m.output(k));
    m.release();
    return outs;
}

std::string run_eval(Model &m, const Spec &s, const Args &a, const std::string &det_path) {
    if (a.get("inputs").empty()) throw Error("--mode eval needs --inputs FILE (lines: image_id<TAB>path<TAB>orig_w<TAB>orig_h<TAB>scale<TAB>pad_x<TAB>pad_y)");
    std::vector<Item> items = read_inputs(a.get("inputs"));
    std::vector<std::vector<double>> ms(5);
    std::string dets = "[";
    size_t count = 0;
    for (size_t start = 0; start < items.size(); start += s.batch) {
        auto t = Clock::now();
        std::vector<uint8_t> x = batch_of(items, start, m, s);
        ms[0].push_back(ms_since(t)); t = Clock::now();
        m.set_input(x);
        ms[1].push_back(ms_since(t)); t = Clock::now();
        m.run();
        ms[2].push_back(ms_since(t)); t = Clock::now();
        std::vector<std::vector<float>> outs = take_outputs(m);
        ms[3].push_back(ms_since(t)); t = Clock::now();
        for (size_t j = 0; j < (size_t)s.batch && start + j < items.size(); j++) {
            const Item &it = items[start + j];
            for (const Det &d : select(decode(m, outs, s, (int)j), s)) {
                // prepost.to_original: undo the letterbox in float32, clip to the image
                auto ox = [&](float v) { return std::min(std::max((v - (float)it.pad_x) / (float)it.scale, 0.f), (float)it.orig_w); };
                auto oy = [&](float v) { return std::min(std::max((v - (float)it.pad_y) / (float)it.scale, 0.f), (float)it.orig_h); };
                double x1 = ox(d.x1), y1 = oy(d.y1), x2 = ox(d.x2), y2 = oy(d.y2);
                char b[256];  // COCO results, rounded like Detector.records
                std::snprintf(b, sizeof b, "%s{\"image_id\": %lld, \"category_id\": %d, \"bbox\": [%.2f, %.2f, %.2f, %.2f], \"score\": %.5f}",
                              count ? ", " : "", it.image_id, s.category_ids[d.cls], x1, y1, x2 - x1, y2 - y1, (double)d.score);
                dets += b;
                count++;
            }
        }
        ms[4].push_back(ms_since(t));
    }
    std::ofstream f(det_path + ".tmp");
    f << dets << "]";
    f.close();
    if (!f || std::rename((det_path + ".tmp").c_str(), det_path.c_str()) != 0) throw Error("cannot write " + det_path + ": free space or fix the path");
    return "{\"images\": " + num(items.size()) + ", \"detections\": " + num(count) + ", \"detections_file\": " + quote(det_path) +
           ", \"batch\": " + num(s.batch) + ", \"unit\": \"ms\", \"per\": \"batch of " + num(s.batch) + "\", " +
           parts_json({"read", m.zero_copy ? "input_copy" : "inputs_set", "run", m.zero_copy ? "output_read" : "outputs_get", "post"}, ms) + "}";
}

// Throughput: one rknn context per worker (measure.cores: a core mask each, round robin as rkbench chose
// them), every worker pulling the next batch of frames until measure.frames are done (the thread-pool
// pattern of rknn-multi-threaded, without its reorder queue: each frame's result is stored at its index).
// A frame's latency here is its batch's inputs_set .. select on its worker (no queueing in front).
// `first` is worker 0's model (opened by main with masks[0]); the others are opened here, before the clock.
std::string run_throughput(Model &first, const std::vector<std::string> &masks, const Spec &s, const Args &a) {
    std::vector<std::unique_ptr<Model>> owned;
    std::vector<Model *> models{&first};
    for (size_t w = 1; w < masks.size(); w++) {
        owned.emplace_back(new Model(first.api, a.get("model"), masks[w], s));
        models.push_back(owned.back().get());
    }
    std::vector<Item> items = inputs_of(a);
    size_t distinct = std::min<size_t>(items.size(), 16);  // like the Python runner's MAX_DISTINCT_FRAMES
    std::vector<std::vector<uint8_t>> batches;
    for (size_t start = 0; start < distinct; start += s.batch) batches.push_back(batch_of(items, start, *models[0], s));
    size_t jobs = ((size_t)std::max(s.frames, 1) + s.batch - 1) / s.batch;
    std::vector<double> job_ms(jobs, 0.0);
    std::vector<int> job_dets(jobs, 0);
    std::vector<size_t> frames_of(masks.size(), 0);
    std::vector<double> busy_of(masks.size(), 0.0);
    std::vector<std::string> failed(masks.size());
    std::atomic<size_t> next{0};
    std::atomic<int> ready{0};
    std::atomic<bool> go{false}, abort{false};
    auto work = [&](size_t w) {
        Model &m = *models[w];
        try {
            for (int k = 0; k < s.warmup; k++) { m.set_input(batches[0]); m.run(); take_outputs(m); }
        } catch (const std::exception &e) { failed[w] = std::string("in warmup: ") + e.what(); abort = true; }
        ready++;
        while (!go && !abort) std::this_thread::yield();
        while (!abort) {
            size_t j = next++;
            if (j >= jobs) return;
            try {
                auto t = Clock::now();
                m.set_input(batches[j % batches.size()]);
                m.run();
                std::vector<std::vector<float>> outs = take_outputs(m);
                size_t n = std::min<size_t>(s.batch, s.frames - j * s.batch);
                for (size_t i = 0; i < n; i++) job_dets[j] += (int)select(decode(m, outs, s, (int)i), s).size();
                job_ms[j] = ms_since(t);
                frames_of[w] += n;
                busy_of[w] += job_ms[j] / 1e3;
            } catch (const std::exception &e) { failed[w] = e.what(); abort = true; }
        }
    };
    std::vector<std::thread> threads;
    for (size_t w = 0; w < masks.size(); w++) threads.emplace_back(work, w);
    while (ready < (int)masks.size()) std::this_thread::yield();
    auto start = Clock::now();
    go = true;
    for (std::thread &t : threads) t.join();
    double wall = ms_since(start) / 1e3;
    for (size_t w = 0; w < masks.size(); w++)
        if (!failed[w].empty()) throw Error("worker " + std::to_string(w) + " (core mask " + masks[w] + ") failed: " + failed[w]);
    std::string workers, counts;
    for (size_t w = 0; w < masks.size(); w++)
        workers += (w ? ", " : "") + std::string("{\"core_mask\": ") + quote(masks[w]) + ", \"frames\": " + num(frames_of[w]) +
                   ", \"busy_s\": " + num(busy_of[w]) + ", \"share\": " + num((double)frames_of[w] / s.frames) + "}";
    std::vector<double> frame_ms;
    for (size_t j = 0; j < jobs; j++) {
        counts += (j ? ", " : "") + num(job_dets[j]);
        for (size_t i = 0; i < std::min<size_t>(s.batch, s.frames - j * s.batch); i++) frame_ms.push_back(job_ms[j]);
    }
    return "{\"workers\": [" + workers + "], \"contexts\": \"one rknn context per worker\", \"frames\": " + num(s.frames) +
           ", \"batch\": " + num(s.batch) + ", \"warmup_per_worker\": " + num(s.warmup) + ", \"wall_s\": " + num(wall) +
           ", \"fps\": " + num(s.frames / wall) + ", \"distinct_images\": " + num(distinct) +
           ", \"source\": \"host-prepared tensors, read before the clock starts\", \"in_order\": true, \"batch_detections\": [" + counts +
           "], \"frame_latency_ms\": " + summarize(frame_ms) + ", \"frame_latency_covers\": \"inputs_set .. select of its batch on its worker\"}";
}

void write_atomic(const std::string &path, const std::string &text) {
    std::string tmp = path + ".tmp";
    FILE *f = std::fopen(tmp.c_str(), "w");
    if (!f) throw Error("cannot write " + tmp + ": fix --out");
    bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    ok = std::fflush(f) == 0 && ok;
    ok = std::fclose(f) == 0 && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot write " + path + ": free space or fix --out");
}

std::string now_text() {
    char b[32];
    std::time_t t = std::time(nullptr);
    std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%S", std::localtime(&t));
    return b;
}

}  // namespace

int main(int argc, char **argv) {
    Args a;
    const char *flags[] = {"spec", "mode", "model", "out", "lib", "where", "inputs", "input", "detections",
                           "warmup", "iterations", "min-seconds"};
    for (int k = 1; k < argc; k++) {
        std::string f = argv[k];
        bool known = f.rfind("--", 0) == 0 && std::find(std::begin(flags), std::end(flags), f.substr(2)) != std::end(flags);
        if (!known || k + 1 >= argc) {
            std::fprintf(stderr, "runner: error: bad argument %s: see the usage at the top of cpp/rkbench_runner.cpp\n", f.c_str());
            return 2;
        }
        a.kv[f.substr(2)] = argv[++k];
    }
    for (const char *req : {"spec", "mode", "model", "out"})
        if (a.get(req).empty()) { std::fprintf(stderr, "runner: error: --%s is required\n", req); return 2; }
    std::string out = a.get("out"), mode = a.get("mode"), where = a.get("where", "board"), lib = a.get("lib", "librknnrt.so");
    auto started = Clock::now();
    std::string options = "{";
    for (const auto &kv : a.kv) options += (options.size() > 1 ? ", " : "") + quote(kv.first) + ": " + quote(kv.second);
    options += "}";
    std::string header = "{\"schema\": 1, \"runner\": \"cpp\", \"mode\": " + quote(mode) + ", \"where\": " + quote(where) +
                         ", \"options\": " + options + ", \"started\": " + quote(now_text());
    try {
        if (mode != "latency" && mode != "eval" && mode != "throughput")
            throw Error("mode " + mode + " is not in the C++ runner (latency, eval, throughput): use the Python runner");
        Spec s = load_spec(a.get("spec"));
        if (!a.get("warmup").empty()) s.warmup = std::atoi(a.get("warmup").c_str());
        if (!a.get("iterations").empty()) s.iterations = std::atoi(a.get("iterations").c_str());
        if (!a.get("min-seconds").empty()) s.min_seconds = std::atof(a.get("min-seconds").c_str());
        if (s.warmup < 0 || s.iterations < 1) throw Error("warmup must be >= 0 and iterations >= 1");
        std::string outputs = s.outputs;
        if (mode == "throughput" && s.frames < 1) throw Error("measure frames must be >= 1 for throughput (config measure.frames)");
        Rknn api(lib);
        auto init_start = Clock::now();
        std::vector<std::string> masks = s.cores.empty() ? std::vector<std::string>{s.core_mask} : s.cores;
        Model m(api, a.get("model"), mode == "throughput" ? masks[0] : s.core_mask, s);
        double init_ms = ms_since(init_start);
        std::string memory = m.memory_json(), masks_json = quote(s.core_mask);
        if (mode == "throughput")
            for (size_t w = 0; w < masks.size(); w++) masks_json = (w ? masks_json + ", " : "") + quote(masks[w]);
        std::string api_v = m.version.api_version, drv_v = m.version.drv_version;
        bool replayed = api_v.find(STANDIN_MARK) != std::string::npos;
        std::string det_path = a.get("detections", out.substr(0, out.rfind('.') == std::string::npos ? out.size() : out.rfind('.')) + ".detections.json");
        std::string body = mode == "latency" ? run_latency(m, s, a, init_ms) : mode == "eval" ? run_eval(m, s, a, det_path)
                                                                                               : run_throughput(m, masks, s, a);
        std::string text = header + ", \"versions\": {\"runner\": " + quote(RUNNER_VERSION) + ", \"librknnrt\": " + quote(api_v) +
                           ", \"driver\": " + quote(drv_v) + "}, \"replayed\": " + (replayed ? "true" : "false") +
                           ", \"spec\": " + s.inference_json + ", \"runtime\": {\"kind\": \"librknnrt\", \"lib\": " + quote(lib) +
                           ", \"version\": " + quote(api_v) + ", \"driver\": " + quote(drv_v) + ", \"core_masks\": [" + masks_json + "], \"outputs\": " + quote(outputs) + ", \"zero_copy\": " + (s.zero_copy ? "true" : "false") +
                           ", \"pass_through\": " + (s.pass_through ? "true" : "false") + ", \"batch\": " + num(s.batch) + "}, \"memory\": " + memory +
                           ", " + quote(mode) + ": " + body +
                           ", \"model\": {\"path\": " + quote(a.get("model")) + "}, \"wall_s\": " + num(ms_since(started) / 1e3) +
                           ", \"finished\": " + quote(now_text()) + ", \"complete\": true}";
        write_atomic(out, text);
    } catch (const std::exception &e) {
        std::string msg = e.what();
        try { write_atomic(out, header + ", \"complete\": false, \"error\": " + quote(msg) + "}"); } catch (...) {}
        std::fprintf(stderr, "runner: error: %s\n", msg.c_str());
        return 1;
    }
    return 0;
}
