/*
 * qes_blocks.h -- the GGUF block layouts and the integer code of every element.
 *
 * One header for every backend (portable C, AVX2, NEON, CUDA, Metal): the byte
 * offsets below are llama.cpp's block formats (ggml-common.h), read as bytes so
 * that the result does not depend on alignment or endianness.  Each codec is a
 * pair get/set of the element's integer code; the code range is [cmin, cmax].
 *
 * Value of an element (what ggml dequantizes):
 *   Q4_0  d*(q-8)          Q4_1  d*q+m        Q5_0 d*(q-16)   Q5_1 d*q+m
 *   Q8_0  d*q (q signed)   Q2_K  d*sc*q-dmin*mn                Q3_K d*(sc-32)*(q-4)
 *   Q4_K  d*sc*q-dmin*mn   Q5_K  d*sc*q-dmin*mn                Q6_K d*sc*(q-32)
 * so code +1 moves the value by exactly one level (d, or d times the sub-block scale).
 */
#ifndef QES_BLOCKS_H
#define QES_BLOCKS_H

#if defined(__METAL_VERSION__)
/* Metal Shading Language: the fixed-width types are built in; a pointer names its address
 * space (block bytes in device memory, small structs in the thread's own) */
#define QES_INLINE static inline
#define QES_DEVICE device
#define QES_THREAD thread
#else
#include <stdint.h>
#if defined(__CUDACC__)
#define QES_INLINE static __host__ __device__ __forceinline__
#else
#define QES_INLINE static inline
#endif
#define QES_DEVICE
#define QES_THREAD
#endif

/* ggml type ids (enum ggml_type) */
enum {
    QES_F32 = 0, QES_F16 = 1,
    QES_Q4_0 = 2, QES_Q4_1 = 3, QES_Q5_0 = 6, QES_Q5_1 = 7, QES_Q8_0 = 8,
    QES_Q2_K = 10, QES_Q3_K = 11, QES_Q4_K = 12, QES_Q5_K = 13, QES_Q6_K = 14,
};

/* block sizes in bytes, with the layout they stand for */
#define QES_QK 32     /* elements per block, legacy quants */
#define QES_QK_K 256  /* elements per super-block, K-quants */
enum {
    QES_BYTES_Q4_0 = 2 + 16,             /* d, qs[16] */
    QES_BYTES_Q4_1 = 2 + 2 + 16,         /* d, m, qs[16] */
    QES_BYTES_Q5_0 = 2 + 4 + 16,         /* d, qh[4], qs[16] */
    QES_BYTES_Q5_1 = 2 + 2 + 4 + 16,     /* d, m, qh[4], qs[16] */
    QES_BYTES_Q8_0 = 2 + 32,             /* d, qs[32] (int8) */
    QES_BYTES_Q2_K = 16 + 64 + 2 + 2,    /* scales[16], qs[64], d, dmin */
    QES_BYTES_Q3_K = 32 + 64 + 12 + 2,   /* hmask[32], qs[64], scales[12], d */
    QES_BYTES_Q4_K = 2 + 2 + 12 + 128,   /* d, dmin, scales[12], qs[128] */
    QES_BYTES_Q5_K = 2 + 2 + 12 + 32 + 128, /* d, dmin, scales[12], qh[32], qs[128] */
    QES_BYTES_Q6_K = 128 + 64 + 16 + 2,  /* ql[128], qh[64], scales[16], d */
};
#if !defined(__CUDACC__) && !defined(__METAL_VERSION__) && !defined(__cplusplus)
_Static_assert(QES_BYTES_Q4_0 == 18, "Q4_0 block");
_Static_assert(QES_BYTES_Q4_1 == 20, "Q4_1 block");
_Static_assert(QES_BYTES_Q5_0 == 22, "Q5_0 block");
_Static_assert(QES_BYTES_Q5_1 == 24, "Q5_1 block");
_Static_assert(QES_BYTES_Q8_0 == 34, "Q8_0 block");
_Static_assert(QES_BYTES_Q2_K == 84, "Q2_K block");
_Static_assert(QES_BYTES_Q3_K == 110, "Q3_K block");
_Static_assert(QES_BYTES_Q4_K == 144, "Q4_K block");
_Static_assert(QES_BYTES_Q5_K == 176, "Q5_K block");
_Static_assert(QES_BYTES_Q6_K == 210, "Q6_K block");
#endif

/* --- nibble / bit helpers ------------------------------------------------- */
/* branch-free: which nibble is random across draws, and a mispredicted branch costs more
   than the whole update of a code */
QES_INLINE int qes_nib_get(QES_DEVICE const uint8_t *b, int hi) { return (*b >> (hi << 2)) & 0xF; }
QES_INLINE void qes_nib_set(QES_DEVICE uint8_t *b, int hi, int v) {
    int sh = hi << 2;
    *b = (uint8_t)((*b & ~(0xF << sh)) | ((v & 0xF) << sh));
}
QES_INLINE int qes_bit_get(QES_DEVICE const uint8_t *bits, int i) { return (bits[i >> 3] >> (i & 7)) & 1; }
QES_INLINE void qes_bit_set(QES_DEVICE uint8_t *bits, int i, int v) {
    bits[i >> 3] = (uint8_t)((bits[i >> 3] & ~(1u << (i & 7))) | ((unsigned)v << (i & 7)));
}

/* Legacy blocks of 32: element i (<32) lives in nibble (i & 15) of qs, high nibble if i >= 16;
 * for Q5 the fifth bit is bit i of the little-endian qh word. */
QES_INLINE int qes_legacy4_get(QES_DEVICE const uint8_t *qs, int i) { return qes_nib_get(qs + (i & 15), i >> 4); }
QES_INLINE void qes_legacy4_set(QES_DEVICE uint8_t *qs, int i, int v) { qes_nib_set(qs + (i & 15), i >> 4, v); }

/* --- the codecs ------------------------------------------------------------ *
 * blk points at the block holding the element, i is its index inside the block. */
QES_INLINE int qes_code_get(int type, QES_DEVICE const uint8_t *blk, int i) {
    switch (type) {
    case QES_Q4_0: return qes_legacy4_get(blk + 2, i);
    case QES_Q4_1: return qes_legacy4_get(blk + 4, i);
    case QES_Q5_0: return qes_legacy4_get(blk + 6, i) | (qes_bit_get(blk + 2, i) << 4);
    case QES_Q5_1: return qes_legacy4_get(blk + 8, i) | (qes_bit_get(blk + 4, i) << 4);
    case QES_Q8_0: return (int)(int8_t)blk[2 + i];
    case QES_Q2_K: { /* qs @16: byte (i/128)*32 + i%32, bits 2*((i%128)/32) */
        int byte = ((i >> 7) << 5) + (i & 31), sh = ((i >> 5) & 3) << 1;
        return (blk[16 + byte] >> sh) & 3;
    }
    case QES_Q3_K: { /* low 2 bits as Q2_K in qs @32, third bit in hmask @0: byte i%32, bit i/32 */
        int byte = ((i >> 7) << 5) + (i & 31), sh = ((i >> 5) & 3) << 1;
        return ((blk[32 + byte] >> sh) & 3) | (((blk[i & 31] >> (i >> 5)) & 1) << 2);
    }
    case QES_Q4_K: /* qs @16: byte (i/64)*32 + i%32, high nibble if i%64 >= 32 */
        return qes_nib_get(blk + 16 + ((i >> 6) << 5) + (i & 31), (i >> 5) & 1);
    case QES_Q5_K: /* low nibble as Q4_K in qs @48, fifth bit in qh @16: byte i%32, bit i/32 */
        return qes_nib_get(blk + 48 + ((i >> 6) << 5) + (i & 31), (i >> 5) & 1)
             | (((blk[16 + (i & 31)] >> (i >> 5)) & 1) << 4);
    case QES_Q6_K: { /* ql @0: byte (i/128)*64 + i%32 + 32*((i/32)&1), high nibble if (i%128)>=64;
                        qh @128: byte (i/128)*32 + i%32, bits 2*((i%128)/32) */
        int half = i >> 7, quad = (i >> 5) & 3, l = i & 31;
        int lo = qes_nib_get(blk + (half << 6) + l + ((quad & 1) << 5), quad >> 1);
        int hi = (blk[128 + (half << 5) + l] >> (quad << 1)) & 3;
        return lo | (hi << 4);
    }
    default: return 0;
    }
}

QES_INLINE void qes_code_set(int type, QES_DEVICE uint8_t *blk, int i, int v) {
    switch (type) {
    case QES_Q4_0: qes_legacy4_set(blk + 2, i, v); break;
    case QES_Q4_1: qes_legacy4_set(blk + 4, i, v); break;
    case QES_Q5_0: qes_legacy4_set(blk + 6, i, v); qes_bit_set(blk + 2, i, (v >> 4) & 1); break;
    case QES_Q5_1: qes_legacy4_set(blk + 8, i, v); qes_bit_set(blk + 4, i, (v >> 4) & 1); break;
    case QES_Q8_0: blk[2 + i] = (uint8_t)(int8_t)v; break;
    case QES_Q2_K: {
        int byte = ((i >> 7) << 5) + (i & 31), sh = ((i >> 5) & 3) << 1;
        blk[16 + byte] = (uint8_t)((blk[16 + byte] & ~(3u << sh)) | ((unsigned)(v & 3) << sh));
        break;
    }
    case QES_Q3_K: {
        int byte = ((i >> 7) << 5) + (i & 31), sh = ((i >> 5) & 3) << 1, hb = i >> 5;
        blk[32 + byte] = (uint8_t)((blk[32 + byte] & ~(3u << sh)) | ((unsigned)(v & 3) << sh));
        blk[i & 31] = (uint8_t)((blk[i & 31] & ~(1u << hb)) | ((unsigned)((v >> 2) & 1) << hb));
        break;
    }
    case QES_Q4_K: qes_nib_set(blk + 16 + ((i >> 6) << 5) + (i & 31), (i >> 5) & 1, v); break;
    case QES_Q5_K: {
        int hb = i >> 5;
        qes_nib_set(blk + 48 + ((i >> 6) << 5) + (i & 31), hb & 1, v);
        blk[16 + (i & 31)] = (uint8_t)((blk[16 + (i & 31)] & ~(1u << hb)) | ((unsigned)((v >> 4) & 1) << hb));
        break;
    }
    case QES_Q6_K: {
        int half = i >> 7, quad = (i >> 5) & 3, l = i & 31, sh = quad << 1;
        QES_DEVICE uint8_t *qh = blk + 128 + (half << 5) + l;
        qes_nib_set(blk + (half << 6) + l + ((quad & 1) << 5), quad >> 1, v & 0xF);
        *qh = (uint8_t)((*qh & ~(3u << sh)) | ((unsigned)((v >> 4) & 3) << sh));
        break;
    }
    default: break;
    }
}

/* --- per-type facts -------------------------------------------------------- */
typedef struct {
    int type;
    int block_elems;   /* elements per block (a power of two) */
    int block_shift;   /* log2(block_elems) */
    int block_bytes;   /* bytes per block */
    int cmin, cmax;    /* code range */
} qes_type_traits;

QES_INLINE int qes_traits(int type, QES_THREAD qes_type_traits *t) {
    t->type = type;
    t->block_shift = 0;
    switch (type) {
    case QES_Q4_0: t->block_elems = QES_QK;   t->block_shift = 5; t->block_bytes = QES_BYTES_Q4_0; t->cmin = 0; t->cmax = 15; return 1;
    case QES_Q4_1: t->block_elems = QES_QK;   t->block_shift = 5; t->block_bytes = QES_BYTES_Q4_1; t->cmin = 0; t->cmax = 15; return 1;
    case QES_Q5_0: t->block_elems = QES_QK;   t->block_shift = 5; t->block_bytes = QES_BYTES_Q5_0; t->cmin = 0; t->cmax = 31; return 1;
    case QES_Q5_1: t->block_elems = QES_QK;   t->block_shift = 5; t->block_bytes = QES_BYTES_Q5_1; t->cmin = 0; t->cmax = 31; return 1;
    case QES_Q8_0: t->block_elems = QES_QK;   t->block_shift = 5; t->block_bytes = QES_BYTES_Q8_0; t->cmin = -128; t->cmax = 127; return 1;
    case QES_Q2_K: t->block_elems = QES_QK_K; t->block_shift = 8; t->block_bytes = QES_BYTES_Q2_K; t->cmin = 0; t->cmax = 3; return 1;
    case QES_Q3_K: t->block_elems = QES_QK_K; t->block_shift = 8; t->block_bytes = QES_BYTES_Q3_K; t->cmin = 0; t->cmax = 7; return 1;
    case QES_Q4_K: t->block_elems = QES_QK_K; t->block_shift = 8; t->block_bytes = QES_BYTES_Q4_K; t->cmin = 0; t->cmax = 15; return 1;
    case QES_Q5_K: t->block_elems = QES_QK_K; t->block_shift = 8; t->block_bytes = QES_BYTES_Q5_K; t->cmin = 0; t->cmax = 31; return 1;
    case QES_Q6_K: t->block_elems = QES_QK_K; t->block_shift = 8; t->block_bytes = QES_BYTES_Q6_K; t->cmin = 0; t->cmax = 63; return 1;
    default: t->block_elems = 0; t->block_bytes = 0; t->cmin = 0; t->cmax = 0; return 0;
    }
}

/* Element e of a tensor: block e >> block_shift, index e & (block_elems - 1). */
QES_INLINE int qes_elem_get(QES_THREAD const qes_type_traits *t, QES_DEVICE const uint8_t *data, uint64_t e) {
    uint64_t b = e >> t->block_shift;
    return qes_code_get(t->type, data + b * (uint64_t)t->block_bytes, (int)(e & (uint64_t)(t->block_elems - 1)));
}
QES_INLINE void qes_elem_set(QES_THREAD const qes_type_traits *t, QES_DEVICE uint8_t *data, uint64_t e, int v) {
    uint64_t b = e >> t->block_shift;
    qes_code_set(t->type, data + b * (uint64_t)t->block_bytes, (int)(e & (uint64_t)(t->block_elems - 1)), v);
}

#endif /* QES_BLOCKS_H */
