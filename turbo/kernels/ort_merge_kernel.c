/* turbo::TurboMerge as one ONNX Runtime CPU kernel (float and float16).

   The exported graph computes the weighted merge with ~26 small nodes per layer, each costing
   ONNX Runtime a few microseconds; this kernel does it in one pass. It computes what the node's
   ONNX function computes (turbo/graph/merge_functions.py, turbo/merging/merge.py), with the row merge of
   merge_core.c:
     x (B, N, C), size (B, N, 1), index (B, Na + r) int64 = [src (r), dst (r), unm (Na - r)]
     -> x (B, N - r, C), size (B, N - r, 1), tokens ordered [CLS, unmerged A, B];
   A-side index i is token 2i + 2, B-side index j is token 2j + 1, Na = (N - 1) / 2.
   B-side tokens become (x·size + Σ src_x·src_size) / (size + Σ src_size).

   Built by turbo/kernels/cpu_kernels.py with the system C compiler and loaded with
   SessionOptions.register_custom_ops_library. No ONNX Runtime header is needed: the C API is a
   table of function pointers that only grows between releases, so the few entries used here
   are called by their fixed position in it, and OrtCustomOp is declared with its documented
   layout (version 16: CreateKernelV2 / KernelComputeV2 return a status). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef void *const *OrtApiTable;

enum { API_VERSION = 16, ELEMENT_FLOAT = 1, ELEMENT_INT64 = 7, ELEMENT_FLOAT16 = 10, INVALID_ARGUMENT = 2 };

/* Positions in OrtApi (those of API version 1, unchanged since). */
enum {
    CREATE_STATUS = 0,
    CREATE_CUSTOM_OP_DOMAIN = 26,
    CUSTOM_OP_DOMAIN_ADD = 27,
    ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51,
    GET_DIMENSIONS_COUNT = 61,
    GET_DIMENSIONS = 62,
    GET_TENSOR_TYPE_AND_SHAPE = 65,
    KERNEL_CONTEXT_GET_INPUT = 90,
    KERNEL_CONTEXT_GET_OUTPUT = 91,
    RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};

typedef struct {
    OrtApiTable (*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

typedef struct CustomOp CustomOp;
struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const CustomOp *, const void *, const void *);
    const char *(*GetName)(const CustomOp *);
    const char *(*GetExecutionProviderType)(const CustomOp *);
    int (*GetInputType)(const CustomOp *, size_t);
    size_t (*GetInputTypeCount)(const CustomOp *);
    int (*GetOutputType)(const CustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const CustomOp *);
    void (*KernelCompute)(void *, void *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const CustomOp *, size_t);
    int (*GetOutputCharacteristic)(const CustomOp *, size_t);
    int (*GetInputMemoryType)(const CustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const CustomOp *);
    int (*GetVariadicInputHomogeneity)(const CustomOp *);
    int (*GetVariadicOutputMinArity)(const CustomOp *);
    int (*GetVariadicOutputHomogeneity)(const CustomOp *);
    OrtStatus *(*CreateKernelV2)(const CustomOp *, const void *, const void *, void **);
    OrtStatus *(*KernelComputeV2)(void *, void *);
    void *later_entries[8]; /* read by ONNX Runtime only for versions above 16 */
    int element_type;       /* ours, after the layout ONNX Runtime reads */
};

static OrtApiTable api;

#define API(slot, ret, ...) ((ret(*)(__VA_ARGS__))api[slot])

static OrtStatus *error(const char *message) {
    return API(CREATE_STATUS, OrtStatus *, int, const char *)(INVALID_ARGUMENT, message);
}

/* Dimensions of a tensor value into dims (at most 4); returns the rank, or -1. */
static int shape_of(const OrtValue *value, int64_t *dims) {
    void *info = NULL;
    size_t rank = 0;
    if (API(GET_TENSOR_TYPE_AND_SHAPE, OrtStatus *, const OrtValue *, void **)(value, &info)) return -1;
    int ok = !API(GET_DIMENSIONS_COUNT, OrtStatus *, const void *, size_t *)(info, &rank) && rank <= 4 &&
             !API(GET_DIMENSIONS, OrtStatus *, const void *, int64_t *, size_t)(info, dims, rank);
    API(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, void, void *)(info);
    return ok ? (int)rank : -1;
}

static void *data_of(const OrtValue *value) {
    void *data = NULL;
    API(GET_TENSOR_MUTABLE_DATA, OrtStatus *, const OrtValue *, void **)(value, &data);
    return data;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (!mantissa) {
        bits = sign;
    } else { /* subnormal: shift the mantissa up to the implicit bit */
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest, ties to even. */
static uint16_t float_to_half(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t sign = (bits >> 16) & 0x8000, magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) return (uint16_t)(sign | 0x7e00);
    if (magnitude >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* 65520 and above round to inf */
    if (magnitude >= 0x38800000) {                                  /* a normal half */
        magnitude += 0xfff + ((magnitude >> 13) & 1);
        return (uint16_t)(sign | ((magnitude - 0x38000000) >> 13));
    }
    if (magnitude < 0x33000000) return (uint16_t)sign; /* below 2^-25: zero */
    uint32_t shift = 126 - (magnitude >> 23), mantissa = (magnitude & 0x7fffff) | 0x800000;
    uint32_t kept = mantissa >> shift, rest = mantissa & ((1u << shift) - 1), half_way = 1u << (shift - 1);
    kept += rest > half_way || (rest == half_way && (kept & 1));
    return (uint16_t)(sign | kept);
}

/* merge_core.c: one batch row in float, out_x (N - r, C) and out_size (N - r). */
void turbo_merge_row(const float *x, const float *size, const int64_t *index, int64_t tokens, int64_t channels,
                     int64_t r, float *out_x, float *out_size);

static void to_float(const uint16_t *from, float *to, int64_t count) {
    for (int64_t i = 0; i < count; i++) to[i] = half_to_float(from[i]);
}

static void to_half(const float *from, uint16_t *to, int64_t count) {
    for (int64_t i = 0; i < count; i++) to[i] = float_to_half(from[i]);
}

static OrtStatus *compute(void *kernel, void *context) {
    const CustomOp *op = kernel;
    const OrtValue *inputs[3];
    int64_t x_dims[4], size_dims[4], index_dims[4];
    for (size_t i = 0; i < 3; i++) {
        if (API(KERNEL_CONTEXT_GET_INPUT, OrtStatus *, const void *, size_t, const OrtValue **)(context, i, &inputs[i]))
            return error("TurboMerge: cannot read its inputs");
    }
    if (shape_of(inputs[0], x_dims) != 3 || shape_of(inputs[1], size_dims) != 3 || shape_of(inputs[2], index_dims) != 2)
        return error("TurboMerge: expects x (B, N, C), size (B, N, 1) and index (B, K)");
    int64_t batch = x_dims[0], tokens = x_dims[1], channels = x_dims[2], num_a = (tokens - 1) / 2;
    int64_t width = index_dims[1], r = width - num_a, merged = tokens - r, num_b = tokens - 1 - num_a;
    if (size_dims[0] != batch || size_dims[1] != tokens || size_dims[2] != 1 || index_dims[0] != batch || r < 0 || r > num_a)
        return error("TurboMerge: size must be (B, N, 1) and index (B, Na + r) with 0 <= r <= Na = (N - 1) / 2");
    const int64_t *index = data_of(inputs[2]);
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t k = 0; k < width; k++) {
            int64_t value = index[b * width + k], limit = (k >= r && k < 2 * r) ? num_b : num_a;
            if (value < 0 || value >= limit) return error("TurboMerge: an index is out of range");
        }
    }
    int64_t out_x_dims[3] = {batch, merged, channels}, out_size_dims[3] = {batch, merged, 1};
    OrtValue *outputs[2];
    if (API(KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *, void *, size_t, const int64_t *, size_t, OrtValue **)(
            context, 0, out_x_dims, 3, &outputs[0]) ||
        API(KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *, void *, size_t, const int64_t *, size_t, OrtValue **)(
            context, 1, out_size_dims, 3, &outputs[1]))
        return error("TurboMerge: cannot allocate its outputs");
    void *x = data_of(inputs[0]), *size = data_of(inputs[1]), *out_x = data_of(outputs[0]), *out_size = data_of(outputs[1]);
    if (op->element_type == ELEMENT_FLOAT) {
        for (int64_t b = 0; b < batch; b++)
            turbo_merge_row((const float *)x + b * tokens * channels, (const float *)size + b * tokens, index + b * width,
                      tokens, channels, r, (float *)out_x + b * merged * channels, (float *)out_size + b * merged);
        return NULL;
    }
    /* float16: widen one row, merge in float, round once */
    float *row = malloc((size_t)(tokens * (channels + 1) + merged * (channels + 1)) * sizeof *row);
    if (!row) return error("TurboMerge: out of memory");
    float *row_size = row + tokens * channels, *out_row = row_size + tokens, *out_row_size = out_row + merged * channels;
    for (int64_t b = 0; b < batch; b++) {
        to_float((const uint16_t *)x + b * tokens * channels, row, tokens * channels);
        to_float((const uint16_t *)size + b * tokens, row_size, tokens);
        turbo_merge_row(row, row_size, index + b * width, tokens, channels, r, out_row, out_row_size);
        to_half(out_row, (uint16_t *)out_x + b * merged * channels, merged * channels);
        to_half(out_row_size, (uint16_t *)out_size + b * merged, merged);
    }
    free(row);
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const void *unused_api, const void *info, void **kernel) {
    (void)unused_api;
    (void)info;
    *kernel = (void *)op;
    return NULL;
}

static void destroy_kernel(void *kernel) { (void)kernel; }
static const char *op_name(const CustomOp *op) { (void)op; return "TurboMerge"; }
static const char *cpu_provider(const CustomOp *op) { (void)op; return NULL; }
static size_t input_count(const CustomOp *op) { (void)op; return 3; }
static size_t output_count(const CustomOp *op) { (void)op; return 2; }
static int input_type(const CustomOp *op, size_t i) { return i == 2 ? ELEMENT_INT64 : op->element_type; }
static int output_type(const CustomOp *op, size_t i) { (void)i; return op->element_type; }
static int required(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int default_memory(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int one(const CustomOp *op) { (void)op; return 1; }

#define TURBO_MERGE_OP(type)                                                                              \
    {                                                                                                     \
        .version = API_VERSION, .GetName = op_name, .GetExecutionProviderType = cpu_provider,             \
        .GetInputType = input_type, .GetInputTypeCount = input_count, .GetOutputType = output_type,       \
        .GetOutputTypeCount = output_count, .KernelDestroy = destroy_kernel,                              \
        .GetInputCharacteristic = required, .GetOutputCharacteristic = required,                          \
        .GetInputMemoryType = default_memory, .GetVariadicInputMinArity = one,                            \
        .GetVariadicInputHomogeneity = one, .GetVariadicOutputMinArity = one,                             \
        .GetVariadicOutputHomogeneity = one, .CreateKernelV2 = create_kernel, .KernelComputeV2 = compute, \
        .element_type = type                                                                              \
    }

static CustomOp turbo_merge_ops[2] = {TURBO_MERGE_OP(ELEMENT_FLOAT), TURBO_MERGE_OP(ELEMENT_FLOAT16)};

/* The entry point SessionOptions.register_custom_ops_library looks for. */
OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base) {
    api = base->GetApi(API_VERSION);
    if (!api) { /* older than 1.16: report it through version 1 of the API */
        OrtApiTable first = base->GetApi(1);
        return first ? ((OrtStatus * (*)(int, const char *)) first[CREATE_STATUS])(
                           INVALID_ARGUMENT, "the TurboMerge kernel needs onnxruntime >= 1.16")
                     : NULL;
    }
    void *domain = NULL;
    OrtStatus *status = API(CREATE_CUSTOM_OP_DOMAIN, OrtStatus *, const char *, void **)("turbo", &domain);
    for (size_t i = 0; !status && i < 2; i++)
        status = API(CUSTOM_OP_DOMAIN_ADD, OrtStatus *, void *, CustomOp *)(domain, &turbo_merge_ops[i]);
    if (!status) status = API(ADD_CUSTOM_OP_DOMAIN, OrtStatus *, void *, void *)(options, domain);
    return status;
}
