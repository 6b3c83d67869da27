/* codecs.c -- tensor checks, code get/set over element ranges, dequantization levels. */
#include <string.h>
#include "qes_internal.h"

int qes_type_query(int32_t type, qes_type_info *out) {
    qes_type_traits tr;
    if (!out) return QES_ERR_NULL;
    if (!qes_traits(type, &tr)) return QES_ERR_TYPE;
    out->block_elems = tr.block_elems;
    out->block_bytes = tr.block_bytes;
    out->cmin = tr.cmin;
    out->cmax = tr.cmax;
    return QES_OK;
}

uint64_t qes_tensor_id(const char *name, size_t len) {
    return name ? qes_fnv1a64((const uint8_t *)name, len) : 0;
}

int qes_check_tensor_traits(const qes_tensor *t, qes_type_traits *tr) {
    if (!t) return QES_ERR_NULL;
    if (!qes_traits(t->type, tr)) return QES_ERR_TYPE;
    if (!t->data) return QES_ERR_NULL;
    if (t->n_elements == 0 || t->n_elements % (uint64_t)tr->block_elems) return QES_ERR_SIZE;
    uint64_t blocks = t->n_elements / (uint64_t)tr->block_elems;
    if (blocks > UINT64_MAX / (uint64_t)tr->block_bytes) return QES_ERR_SIZE;
    if (blocks * (uint64_t)tr->block_bytes != t->n_bytes) return QES_ERR_SIZE;
    return QES_OK;
}

int qes_tensor_check(const qes_tensor *t) {
    qes_type_traits tr;
    return qes_check_tensor_traits(t, &tr);
}

static int check_span(const qes_tensor *t, qes_type_traits *tr, uint64_t start, uint64_t count,
                      const void *buf, size_t align) {
    int err = qes_check_tensor_traits(t, tr);
    if (err) return err;
    if (!buf && count) return QES_ERR_NULL;
    if (((uintptr_t)buf) % align) return QES_ERR_ALIGN;
    if (start > t->n_elements || count > t->n_elements - start) return QES_ERR_RANGE;
    return QES_OK;
}

int qes_codes_get(const qes_tensor *t, uint64_t start, uint64_t count, int32_t *out) {
    qes_type_traits tr;
    int err = check_span(t, &tr, start, count, out, sizeof(int32_t));
    if (err) return err;
    for (uint64_t i = 0; i < count; ++i) out[i] = qes_elem_get(&tr, t->data, start + i);
    return QES_OK;
}

int qes_codes_set(qes_tensor *t, uint64_t start, uint64_t count, const int32_t *in) {
    qes_type_traits tr;
    int err = check_span(t, &tr, start, count, in, sizeof(int32_t));
    if (err) return err;
    for (uint64_t i = 0; i < count; ++i)  /* validate all before writing any */
        if (in[i] < tr.cmin || in[i] > tr.cmax) return QES_ERR_RANGE;
    for (uint64_t i = 0; i < count; ++i) qes_elem_set(&tr, t->data, start + i, in[i]);
    return QES_OK;
}

/* IEEE half -> float, exact, without relying on hardware conversion. */
static float f16_to_f32(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: normalise */
            int e = -1;
            do { ++e; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* 6-bit scale of sub-block s in a Q4_K/Q5_K scales[12] array */
static int k4_scale(const uint8_t *q, int s) {
    return s < 4 ? (q[s] & 63) : ((q[s + 4] & 0xF) | ((q[s - 4] >> 6) << 4));
}

/* 6-bit scale (minus 32) of sub-block s in a Q3_K scales[12] array */
static int q3k_scale(const uint8_t *q, int s) {
    int low = s < 8 ? (q[s] & 0xF) : (q[s - 8] >> 4);
    int high = (q[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
    return (low | (high << 4)) - 32;
}

static float level_of(int type, const uint8_t *b, int i) {
    switch (type) {
    case QES_Q4_0: case QES_Q4_1: case QES_Q5_0: case QES_Q5_1: case QES_Q8_0:
        return f16_to_f32(b);
    case QES_Q2_K: { /* scales[16] @0; sub-block of 16 in ggml's order */
        int sub = ((i >> 7) << 3) + (((i >> 5) & 3) << 1) + ((i >> 4) & 1);
        return f16_to_f32(b + 80) * (float)(b[sub] & 0xF);
    }
    case QES_Q3_K: {
        int sub = ((i >> 7) << 3) + (((i >> 5) & 3) << 1) + ((i >> 4) & 1);
        return f16_to_f32(b + 108) * (float)q3k_scale(b + 96, sub);
    }
    case QES_Q4_K: case QES_Q5_K:
        return f16_to_f32(b) * (float)k4_scale(b + 4, i >> 5);
    case QES_Q6_K: {
        int half = i >> 7, quad = (i >> 5) & 3, l = i & 31;
        return f16_to_f32(b + 208) * (float)(int8_t)b[192 + (half << 3) + (l >> 4) + (quad << 1)];
    }
    default: return 0.0f;
    }
}

int qes_levels(const qes_tensor *t, uint64_t start, uint64_t count, float *out) {
    qes_type_traits tr;
    int err = check_span(t, &tr, start, count, out, sizeof(float));
    if (err) return err;
    for (uint64_t i = 0; i < count; ++i) {
        uint64_t e = start + i, blk = e / (uint64_t)tr.block_elems;
        out[i] = level_of(tr.type, t->data + blk * (uint64_t)tr.block_bytes, (int)(e % (uint64_t)tr.block_elems));
    }
    return QES_OK;
}
