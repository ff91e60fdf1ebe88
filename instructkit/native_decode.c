/*
 * One batch-1 decode step in C, for the CPU: a GPT-2 model in the book's layout
 * (`gpt_decode_step`), or a Llama 3 / Qwen3 model of instructkit/llama3.py and qwen3.py
 * (`llama_decode_step`).
 *
 * Why: at batch 1 a token reads every weight once, so the step should take the weights'
 * bytes divided by the memory bandwidth. From Python each layer costs ~40 small torch calls
 * (layer norms, views, the cache writes, attention for one query, GELU) of a few to tens of
 * microseconds each: 5 ms a gpt2-small token on a 2-core machine, a quarter of the step. Here
 * the whole step is one call: one OpenMP parallel region in which the threads split the rows
 * of every weight (each thread streams its own contiguous run of rows) and meet at a barrier
 * between the stages; the small stages (the norms) run on one thread.
 *
 * The arithmetic is the book's: pre-LayerNorm blocks, attention with a 1/sqrt(head_dim)
 * scale and a softmax over the cached positions, GELU's tanh form, residual additions, final
 * LayerNorm and the output head. Only the order of the additions in each dot product differs
 * from the library's, so logits agree to float32 rounding (tests/test_native_decode.py).
 *
 * instructkit/native_decode.py compiles this file with the machine's C compiler and calls
 * `gpt_decode_step` through ctypes; the structs below must match its ctypes.Structure
 * classes field by field.
 */
#include <math.h>
#include <stddef.h>

typedef struct {
    const float *norm1_scale, *norm1_shift;  /* (emb) */
    const float *w_query, *b_query, *w_key, *b_key, *w_value, *b_value;  /* (emb, emb), (emb) */
    const float *w_out, *b_out;  /* (emb, emb), (emb) */
    const float *norm2_scale, *norm2_shift;  /* (emb) */
    const float *w_fc1, *b_fc1;  /* (hidden, emb), (hidden) */
    const float *w_fc2, *b_fc2;  /* (emb, hidden), (emb) */
    float *keys, *values;  /* the KV cache of this layer: (heads, max_len, head_dim) */
    float norm1_eps, norm2_eps;
} gpt_layer;  /* a bias pointer may be NULL: no bias */

typedef struct {
    int n_layers, emb_dim, n_heads, head_dim, hidden_dim, vocab_size, max_len, n_threads;
    const gpt_layer *layers;
    const float *final_scale, *final_shift, *w_head, *b_head;  /* (emb), (emb), (vocab, emb) */
    float final_eps;
} gpt_model;

typedef struct {
    const float *norm1_scale;  /* (emb) */
    const float *w_query, *w_key, *w_value;  /* (heads * hd, emb), (kv_heads * hd, emb) twice */
    const float *q_norm, *k_norm;  /* (hd) Qwen3's QK-norm scales, or NULL (Llama) */
    const float *w_out;  /* (emb, heads * hd) */
    const float *norm2_scale;  /* (emb) */
    const float *w_gate, *w_up, *w_down;  /* (hidden, emb) twice, (emb, hidden) */
    float *keys, *values;  /* the KV cache of this layer: (kv_heads, max_len, hd) */
    float norm1_eps, norm2_eps, qk_eps;
} llama_layer;  /* no biases: neither family has any */

typedef struct {
    int n_layers, emb_dim, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size, max_len,
        n_threads;
    const llama_layer *layers;
    const float *final_scale, *w_head;  /* (emb), (vocab, emb): the embedding itself if tied */
    const float *cos, *sin;  /* RoPE's tables, (context, hd) */
    float final_eps, scaling;  /* scaling: the attention scores' factor, hd^-0.5 */
} llama_model;

/* Eight floats in one vector register (AVX) or two (NEON); GCC and Clang both know it. */
typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) {
    vec8 v;
    __builtin_memcpy(&v, p, sizeof v);  /* no alignment assumed */
    return v;
}

static inline float sum8(vec8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* out[r - r0] = W[r] . x for the rows r0 <= r < r1 of W (n_in floats a row). Four rows at a
 * time share each load of x; the rows are streamed front to back, the prefetcher's pattern. */
static void dot_rows(const float *w, int n_in, const float *x, int r0, int r1, float *out) {
    int r = r0;
    int n8 = n_in - n_in % 8;
    for (; r + 4 <= r1; r += 4) {
        const float *a = w + (size_t)r * n_in, *b = a + n_in, *c = b + n_in, *d = c + n_in;
        vec8 sa = {0}, sb = {0}, sc = {0}, sd = {0};
        for (int i = 0; i < n8; i += 8) {
            vec8 xv = load8(x + i);
            sa += load8(a + i) * xv;
            sb += load8(b + i) * xv;
            sc += load8(c + i) * xv;
            sd += load8(d + i) * xv;
        }
        float ta = sum8(sa), tb = sum8(sb), tc = sum8(sc), td = sum8(sd);
        for (int i = n8; i < n_in; i++) {
            ta += a[i] * x[i]; tb += b[i] * x[i]; tc += c[i] * x[i]; td += d[i] * x[i];
        }
        out[r - r0] = ta; out[r + 1 - r0] = tb; out[r + 2 - r0] = tc; out[r + 3 - r0] = td;
    }
    for (; r < r1; r++) {
        const float *a = w + (size_t)r * n_in;
        vec8 sa = {0};
        for (int i = 0; i < n8; i += 8) sa += load8(a + i) * load8(x + i);
        float ta = sum8(sa);
        for (int i = n8; i < n_in; i++) ta += a[i] * x[i];
        out[r - r0] = ta;
    }
}

/* Rows are handed out in chunks of this many: whole chunks to each thread, in order. */
#define CHUNK 16

enum epilogue { STORE, ADD_TO, GELU, TIMES_SILU };

/* y = W x + b for the rows of W, split over the threads of the enclosing parallel region
 * (no barrier at the end: the caller adds one where the next stage needs all rows).
 * STORE: y[r] = W[r].x + b[r]; ADD_TO: y[r] += W[r].x + b[r] (a residual addition);
 * GELU: y[r] = gelu(W[r].x + b[r]), the tanh approximation; TIMES_SILU: y[r] = silu(y[r]) *
 * (W[r].x + b[r]), SwiGLU, where y[r] holds the gate this thread stored with the same split
 * (OpenMP gives a static loop of the same length the same rows). b may be NULL. */
static void linear_rows(const float *w, const float *b, int n_out, int n_in, const float *x,
                        float *y, enum epilogue how) {
    int n_chunks = (n_out + CHUNK - 1) / CHUNK;
#pragma omp for schedule(static) nowait
    for (int c = 0; c < n_chunks; c++) {
        int r0 = c * CHUNK, r1 = r0 + CHUNK < n_out ? r0 + CHUNK : n_out;
        float out[CHUNK];
        dot_rows(w, n_in, x, r0, r1, out);
        for (int r = r0; r < r1; r++) {
            float v = out[r - r0] + (b ? b[r] : 0.0f);
            if (how == ADD_TO) {
                y[r] += v;
            } else if (how == TIMES_SILU) {
                y[r] = y[r] / (1.0f + expf(-y[r])) * v;
            } else if (how == GELU) {
                const float k = 0.7978845608028654f;  /* sqrt(2 / pi) */
                y[r] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
            } else {
                y[r] = v;
            }
        }
    }
}

/* y = (x - mean) / sqrt(var + eps) * scale + shift, the biased variance (one thread). */
static void layer_norm(const float *x, int n, const float *scale, const float *shift, float eps,
                       float *y) {
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= n;
    float inv = (float)(1.0 / sqrt(var + eps)), m = (float)mean;
    for (int i = 0; i < n; i++) y[i] = (x[i] - m) * inv * scale[i] + shift[i];
}

/* out (hd) = softmax(scale * keys[0..pos] . q) . values[0..pos] for one head; keys, values:
 * (max_len, hd) rows; s: pos + 1 floats of scratch. */
static void attend_head(const float *q, const float *keys, const float *values, int hd, int pos,
                        float scale, float *s, float *out) {
    dot_rows(keys, hd, q, 0, pos + 1, s);
    float top = -INFINITY, total = 0.0f;
    for (int t = 0; t <= pos; t++) {
        s[t] *= scale;
        top = s[t] > top ? s[t] : top;
    }
    for (int t = 0; t <= pos; t++) {
        s[t] = expf(s[t] - top);
        total += s[t];
    }
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int t = 0; t <= pos; t++) {
        float p = s[t] / total;
        const float *v = values + (size_t)t * hd;
        for (int i = 0; i < hd; i++) out[i] += p * v[i];
    }
}

/* Attention of one new query over positions 0..pos of every head, after storing this
 * position's key and value in the cache. qkv: the new query, key and value (3 * emb, heads
 * side by side); context: (emb) out; scores: (n_heads * max_len) scratch. */
static void attend(const gpt_model *m, const gpt_layer *layer, const float *qkv, int pos,
                   float *scores, float *context) {
    int hd = m->head_dim, emb = m->emb_dim;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(static)
    for (int h = 0; h < m->n_heads; h++) {
        const float *q = qkv + h * hd;
        float *keys = layer->keys + (size_t)h * m->max_len * hd;
        float *values = layer->values + (size_t)h * m->max_len * hd;
        for (int i = 0; i < hd; i++) {
            keys[(size_t)pos * hd + i] = qkv[emb + h * hd + i];
            values[(size_t)pos * hd + i] = qkv[2 * emb + h * hd + i];
        }
        attend_head(q, keys, values, hd, pos, scale, scores + (size_t)h * m->max_len,
                    context + h * hd);
    }  /* the barrier here: out_proj reads every head's context */
}

/* x (emb): the new token's embedding (token + position), replaced by the last block's
 * output; pos: its position (the cached positions before it); logits (vocab) out;
 * work: 5 * emb + hidden + n_heads * max_len floats of scratch. Returns 0. */
int gpt_decode_step(const gpt_model *m, float *x, int pos, float *logits, float *work) {
    int emb = m->emb_dim;
    float *normed = work, *qkv = normed + emb, *context = qkv + 3 * emb;
    float *hidden = context + emb, *scores = hidden + m->hidden_dim;
#pragma omp parallel num_threads(m->n_threads)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const gpt_layer *layer = m->layers + l;
#pragma omp single
            layer_norm(x, emb, layer->norm1_scale, layer->norm1_shift, layer->norm1_eps, normed);
            linear_rows(layer->w_query, layer->b_query, emb, emb, normed, qkv, STORE);
            linear_rows(layer->w_key, layer->b_key, emb, emb, normed, qkv + emb, STORE);
            linear_rows(layer->w_value, layer->b_value, emb, emb, normed, qkv + 2 * emb, STORE);
#pragma omp barrier
            attend(m, layer, qkv, pos, scores, context);
            linear_rows(layer->w_out, layer->b_out, emb, emb, context, x, ADD_TO);
#pragma omp barrier
#pragma omp single
            layer_norm(x, emb, layer->norm2_scale, layer->norm2_shift, layer->norm2_eps, normed);
            linear_rows(layer->w_fc1, layer->b_fc1, m->hidden_dim, emb, normed, hidden, GELU);
#pragma omp barrier
            linear_rows(layer->w_fc2, layer->b_fc2, emb, m->hidden_dim, hidden, x, ADD_TO);
#pragma omp barrier
        }
#pragma omp single
        layer_norm(x, emb, m->final_scale, m->final_shift, m->final_eps, normed);
        linear_rows(m->w_head, m->b_head, m->vocab_size, emb, normed, logits, STORE);
    }
    return 0;
}

/* y = x / sqrt(mean(x^2) + eps) * scale (llama3.RMSNorm in float32; one thread). y may be x. */
static void rms_norm(const float *x, int n, const float *scale, float eps, float *y) {
    double squares = 0.0;
    for (int i = 0; i < n; i++) squares += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(squares / n) + eps);
    for (int i = 0; i < n; i++) y[i] = scale[i] * (x[i] * inv);
}

/* v (hd) turned by RoPE's angles of one position: v * cos + rotate_half(v) * sin, where
 * rotate_half(v) = (-v2, v1) for v's halves (v1, v2). */
static void rope(float *v, int hd, const float *cos, const float *sin) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* As gpt_decode_step, for llama_model: x (emb) the new token's embedding; work: emb +
 * 2 * (heads + kv_heads) * hd + hidden + heads * max_len floats of scratch. */
int llama_decode_step(const llama_model *m, float *x, int pos, float *logits, float *work) {
    int emb = m->emb_dim, hd = m->head_dim, q_dim = m->n_heads * hd, kv_dim = m->n_kv_heads * hd;
    int group = m->n_heads / m->n_kv_heads;  /* query heads per key/value head */
    float *normed = work, *qkv = normed + emb, *context = qkv + q_dim + 2 * kv_dim;
    float *gated = context + q_dim, *scores = gated + m->hidden_dim;
    const float *cos = m->cos + (size_t)pos * hd, *sin = m->sin + (size_t)pos * hd;
#pragma omp parallel num_threads(m->n_threads)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const llama_layer *layer = m->layers + l;
#pragma omp single
            rms_norm(x, emb, layer->norm1_scale, layer->norm1_eps, normed);
            linear_rows(layer->w_query, NULL, q_dim, emb, normed, qkv, STORE);
            linear_rows(layer->w_key, NULL, kv_dim, emb, normed, qkv + q_dim, STORE);
            linear_rows(layer->w_value, NULL, kv_dim, emb, normed, qkv + q_dim + kv_dim, STORE);
#pragma omp barrier
            /* QK-norm and RoPE on every query head; the first of each group also stores its
             * key/value head's new position in the cache */
#pragma omp for schedule(static)
            for (int h = 0; h < m->n_heads; h++) {
                float *q = qkv + h * hd;
                if (layer->q_norm) rms_norm(q, hd, layer->q_norm, layer->qk_eps, q);
                rope(q, hd, cos, sin);
                if (h % group == 0) {
                    int g = h / group;
                    float *k = qkv + q_dim + g * hd, *v = qkv + q_dim + kv_dim + g * hd;
                    if (layer->k_norm) rms_norm(k, hd, layer->k_norm, layer->qk_eps, k);
                    rope(k, hd, cos, sin);
                    size_t at = ((size_t)g * m->max_len + pos) * hd;
                    for (int i = 0; i < hd; i++) {
                        layer->keys[at + i] = k[i];
                        layer->values[at + i] = v[i];
                    }
                }
            }
#pragma omp for schedule(static)
            for (int h = 0; h < m->n_heads; h++) {
                size_t head = (size_t)(h / group) * m->max_len * hd;
                attend_head(qkv + h * hd, layer->keys + head, layer->values + head, hd, pos,
                            m->scaling, scores + (size_t)h * m->max_len, context + h * hd);
            }
            linear_rows(layer->w_out, NULL, emb, q_dim, context, x, ADD_TO);
#pragma omp barrier
#pragma omp single
            rms_norm(x, emb, layer->norm2_scale, layer->norm2_eps, normed);
            linear_rows(layer->w_gate, NULL, m->hidden_dim, emb, normed, gated, STORE);
            linear_rows(layer->w_up, NULL, m->hidden_dim, emb, normed, gated, TIMES_SILU);
#pragma omp barrier
            linear_rows(layer->w_down, NULL, emb, m->hidden_dim, gated, x, ADD_TO);
#pragma omp barrier
        }
#pragma omp single
        rms_norm(x, emb, m->final_scale, m->final_eps, normed);
        linear_rows(m->w_head, NULL, m->vocab_size, emb, normed, logits, STORE);
    }
    return 0;
}
