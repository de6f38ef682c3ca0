/* The Turbo merge step on the CPU, in float: the weighted merge that ONNX Runtime's TurboMerge
   kernel runs (ort_merge_kernel.c), and the whole step of one layer for eager PyTorch (scores,
   selection and merge in one call; turbo/kernels/torch_merge_kernel.py).

   Tokens: CLS at 0, A side = positions 2, 4, … (index i is token 2i + 2), B side = positions
   1, 3, … (index j is token 2j + 1); Na = (N - 1) / 2, Nb = N - 1 - Na. What is computed is
   turbo/merging/matching.py (information degree, selection) and turbo/merging/merge.py (weighted merge). */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { METHOD_TOME = 0, METHOD_SEMANTIC = 1, METHOD_TURBO_S1 = 2, METHOD_TURBO_S2 = 3 };

/* One batch row: x (N, C), size (N), index (Na + r) = [src (r), dst (r), unm (Na - r)]
   -> out_x (N - r, C), out_size (N - r), tokens ordered [CLS, unmerged A, B]. B-side tokens become
   (x·size + Σ src_x·src_size) / (size + Σ src_size): the merged-in tokens are accumulated first,
   then each B-side token's own x·size added, like the graph's b_x·b_size + onehot @ src_x. */
void turbo_merge_row(const float *x, const float *size, const int64_t *index, int64_t tokens, int64_t channels,
                     int64_t r, float *out_x, float *out_size) {
    int64_t num_a = (tokens - 1) / 2, num_b = tokens - 1 - num_a, kept = num_a - r;
    const int64_t *src = index, *dst = index + r, *unm = index + 2 * r;
    memcpy(out_x, x, channels * sizeof *x);
    out_size[0] = size[0];
    for (int64_t k = 0; k < kept; k++) {
        int64_t token = 2 * unm[k] + 2;
        memcpy(out_x + (1 + k) * channels, x + token * channels, channels * sizeof *x);
        out_size[1 + k] = size[token];
    }
    float *b_x = out_x + (1 + kept) * channels, *b_size = out_size + 1 + kept;
    memset(b_x, 0, num_b * channels * sizeof *b_x);
    memset(b_size, 0, num_b * sizeof *b_size);
    for (int64_t i = 0; i < r; i++) {
        int64_t token = 2 * src[i] + 2;
        float weight = size[token], *into = b_x + dst[i] * channels;
        const float *from = x + token * channels;
        for (int64_t c = 0; c < channels; c++) into[c] += from[c] * weight;
        b_size[dst[i]] += weight;
    }
    for (int64_t j = 0; j < num_b; j++) {
        int64_t token = 2 * j + 1;
        float weight = size[token], total = weight + b_size[j], *into = b_x + j * channels;
        const float *from = x + token * channels;
        for (int64_t c = 0; c < channels; c++) into[c] = (from[c] * weight + into[c]) / total;
        b_size[j] = total;
    }
}

/* Four floats as one value: one SSE or NEON register. Loads go through memcpy, so no alignment is
   assumed. */
typedef float Lanes __attribute__((vector_size(16)));

static Lanes load(const float *from) {
    Lanes lanes;
    memcpy(&lanes, from, sizeof lanes);
    return lanes;
}

static float lane_sum(Lanes v) {
    return (v[0] + v[2]) + (v[1] + v[3]);
}

static float dot(const float *a, const float *b, int64_t count) {
    Lanes lanes = {0};
    int64_t e = 0;
    for (; e + 4 <= count; e += 4) lanes += load(a + e) * load(b + e);
    float sum = lane_sum(lanes);
    for (; e < count; e++) sum += a[e] * b[e];
    return sum;
}

/* Each A-side token's largest cosine similarity to a B-side token and that token's index. metric
   rows are `pitch` floats apart, zero-padded to a multiple of 4; four A rows are done at a time so
   that every B-side value loaded serves four dot products. */
static void best_matches(const float *metric, int64_t pitch, int64_t num_a, int64_t num_b, float *redundancy,
                         int64_t *best) {
    for (int64_t i = 0; i < num_a; i += 4) {
        int64_t rows = num_a - i < 4 ? num_a - i : 4;
        const float *a[4]; /* a short last block repeats row i */
        for (int64_t k = 0; k < 4; k++) a[k] = metric + (2 * (i + (k < rows ? k : 0)) + 2) * pitch;
        for (int64_t k = 0; k < rows; k++) redundancy[i + k] = -INFINITY;
        for (int64_t j = 0; j < num_b; j++) {
            const float *b = metric + (2 * j + 1) * pitch;
            Lanes sums[4] = {{0}};
            for (int64_t e = 0; e < pitch; e += 4) {
                Lanes value = load(b + e);
                for (int k = 0; k < 4; k++) sums[k] += load(a[k] + e) * value;
            }
            for (int64_t k = 0; k < rows; k++) {
                float similarity = lane_sum(sums[k]);
                if (similarity > redundancy[i + k]) redundancy[i + k] = similarity, best[i + k] = j;
            }
        }
    }
}

typedef struct {
    float degree;
    int64_t index;
} Ranked;

static int larger_degree_first(const void *left, const void *right) {
    const Ranked *a = left, *b = right;
    if (a->degree != b->degree) return a->degree > b->degree ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

static int ascending(const void *left, const void *right) {
    int64_t a = *(const int64_t *)left, b = *(const int64_t *)right;
    return (a > b) - (a < b);
}

/* Head-averaged keys of one batch row, each token's vector scaled to unit length: metric (N, pitch). */
static void unit_metric(const float *keys, const int64_t *strides, int64_t heads, int64_t tokens, int64_t dim,
                        int64_t pitch, float *metric) {
    for (int64_t n = 0; n < tokens; n++) {
        float *row = metric + n * pitch;
        memset(row, 0, pitch * sizeof *row);
        for (int64_t h = 0; h < heads; h++) {
            const float *key = keys + h * strides[1] + n * strides[2];
            for (int64_t e = 0; e < dim; e++) row[e] += key[e];
        }
        for (int64_t e = 0; e < dim; e++) row[e] /= (float)heads;
        float norm = sqrtf(dot(row, row, dim));
        for (int64_t e = 0; e < dim; e++) row[e] /= norm;
    }
}

/* The CLS query's attention over the N keys with +log(size), averaged over heads: cls_attn (N). */
static void cls_row_attention(const float *query, const int64_t *query_strides, const float *keys,
                              const int64_t *key_strides, const float *size, int64_t heads, int64_t tokens,
                              int64_t dim, float scale, float *log_size, float *logits, float *cls_attn) {
    memset(cls_attn, 0, tokens * sizeof *cls_attn);
    for (int64_t n = 0; n < tokens; n++) log_size[n] = size ? logf(size[n]) : 0.0f;
    for (int64_t h = 0; h < heads; h++) {
        const float *cls_query = query + h * query_strides[1];
        float largest = -INFINITY, total = 0.0f;
        for (int64_t n = 0; n < tokens; n++) {
            logits[n] = dot(keys + h * key_strides[1] + n * key_strides[2], cls_query, dim) * scale + log_size[n];
            if (logits[n] > largest) largest = logits[n];
        }
        for (int64_t n = 0; n < tokens; n++) total += logits[n] = expf(logits[n] - largest);
        for (int64_t n = 0; n < tokens; n++) cls_attn[n] += logits[n] / total;
    }
    for (int64_t n = 0; n < tokens; n++) cls_attn[n] /= (float)heads;
}

/* The whole step for a batch, float32 (turbo/merging/module.py TokenMerge.forward):
   x (B, N, C) and size (B, N) contiguous, size NULL when every token is one patch; keys and
   query (B, H, N, d) with unit stride along d and the given (batch, head, token) strides, query
   NULL for METHOD_TOME; alpha already multiplied by matching.ALPHA_SCALE. Writes out_x (B, N - r, C)
   and out_size (B, N - r). Returns 0, or -1 when out of memory. */
int turbo_step(const float *x, const float *size, const float *keys, const int64_t *key_strides,
               const float *query, const int64_t *query_strides, int64_t batch, int64_t tokens, int64_t channels,
               int64_t heads, int64_t dim, int64_t r, int method, float alpha, float scale, float *out_x,
               float *out_size) {
    int64_t num_a = (tokens - 1) / 2, num_b = tokens - 1 - num_a, merged = tokens - r, pitch = (dim + 3) / 4 * 4;
    float *metric = malloc((size_t)(tokens * pitch + 4 * tokens + num_a) * sizeof *metric);
    Ranked *ranked = malloc((size_t)num_a * sizeof *ranked);
    int64_t *best = malloc((size_t)(2 * num_a + r) * sizeof *best);
    if (!metric || !ranked || !best) {
        free(metric), free(ranked), free(best);
        return -1;
    }
    float *ones = metric + tokens * pitch, *log_size = ones + tokens, *logits = log_size + tokens;
    float *cls_attn = logits + tokens, *redundancy = cls_attn + tokens;
    int64_t *index = best + num_a; /* [src (r), dst (r), unm (Na - r)] */
    for (int64_t n = 0; n < tokens; n++) ones[n] = 1.0f;
    for (int64_t b = 0; b < batch; b++) {
        const float *row_size = size ? size + b * tokens : NULL;
        unit_metric(keys + b * key_strides[0], key_strides, heads, tokens, dim, pitch, metric);
        if (method != METHOD_TOME)
            cls_row_attention(query + b * query_strides[0], query_strides, keys + b * key_strides[0], key_strides,
                              row_size, heads, tokens, dim, scale, log_size, logits, cls_attn);
        best_matches(metric, pitch, num_a, num_b, redundancy, best);
        for (int64_t i = 0; i < num_a; i++) {
            float semantic = method == METHOD_TOME ? 0.0f : cls_attn[2 * i + 2];
            ranked[i].index = i;
            ranked[i].degree = method == METHOD_TOME       ? redundancy[i]
                               : method == METHOD_SEMANTIC ? -semantic
                               : method == METHOD_TURBO_S2 ? redundancy[i] / fmaxf(semantic, FLT_MIN)
                                                           : redundancy[i] - alpha * semantic;
        }
        qsort(ranked, num_a, sizeof *ranked, larger_degree_first);
        for (int64_t i = 0; i < r; i++) index[i] = ranked[i].index, index[r + i] = best[ranked[i].index];
        for (int64_t k = r; k < num_a; k++) index[r + k] = ranked[k].index;
        qsort(index + 2 * r, num_a - r, sizeof *index, ascending);
        turbo_merge_row(x + b * tokens * channels, row_size ? row_size : ones, index, tokens, channels, r,
                        out_x + b * merged * channels, out_size + b * merged);
    }
    free(metric), free(ranked), free(best);
    return 0;
}
