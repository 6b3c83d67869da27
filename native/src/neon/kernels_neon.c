/* kernels_neon.c -- NEON (AdvSIMD) versions of the hot loops; bit-identical to kernels_ref.c.
 * Built only for aarch64, where every core has AdvSIMD (no run-time check, no extra flags).
 * Same structure as kernels_avx2.c: 32-bit lanes with wrap-around multiplies (vmulq_u32,
 * vmlaq_u32 keep the low 32 bits, as C's uint32_t arithmetic does), logical shifts on the
 * unsigned hash words, arithmetic shifts (vshrq_n_s32) where qes_update.h shifts a signed value;
 * the tails go through the shared inline functions of qes_noise.h / qes_blocks.h. */
#include <arm_neon.h>
#include "../qes_internal.h"

static inline uint32x4_t mix32_x4(uint32x4_t x) {
    x = veorq_u32(x, vshrq_n_u32(x, 16));
    x = vmulq_u32(x, vdupq_n_u32(0x7feb352du));
    x = veorq_u32(x, vshrq_n_u32(x, 15));
    x = vmulq_u32(x, vdupq_n_u32(0x846ca68bu));
    return veorq_u32(x, vshrq_n_u32(x, 16));
}

/* qes_perm on four draw indices */
static inline uint32x4_t perm_x4(const qes_chunk_key *k, uint32x4_t x) {
    const uint32x4_t mask = vdupq_n_u32(QES_CHUNK_MASK);
    x = vandq_u32(vmlaq_u32(vdupq_n_u32(k->b), x, vdupq_n_u32(k->a)), mask);  /* (x*a + b) & mask */
    x = veorq_u32(x, vshrq_n_u32(x, 7));
    x = vandq_u32(vmlaq_u32(vdupq_n_u32(k->d), x, vdupq_n_u32(k->c)), mask);  /* (x*c + d) & mask */
    x = veorq_u32(x, vshrq_n_u32(x, 6));
    x = vandq_u32(vmulq_u32(x, vdupq_n_u32(0x2c1b3c6du)), mask);
    return veorq_u32(x, vshrq_n_u32(x, 7));
}

/* all ones where the draw's sign bit (top bit of mix32(x ^ sign_key)) is set */
static inline uint32x4_t sign_set_x4(uint32x4_t x, uint32x4_t skey) {
    return vreinterpretq_u32_s32(vshrq_n_s32(vreinterpretq_s32_u32(mix32_x4(veorq_u32(x, skey))), 31));
}

static uint32_t gen_chunk_neon(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                               int seed_sign, uint16_t *off_out, int8_t *sign_out, uint16_t *slot_out) {
    uint32_t m = 0, j = 0;
    if (n_valid == QES_CHUNK) { /* every draw lands inside the tensor: 16 draws a round */
        static const uint32_t lane_init[4] = {0, 1, 2, 3};
        static const uint16_t lane16_init[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        const uint32x4_t lane = vld1q_u32(lane_init);
        const uint16x8_t lane16 = vld1q_u16(lane16_init);
        const uint32x4_t skey = vdupq_n_u32(k->sign_key);
        /* bit set -> +seed_sign, clear -> -seed_sign */
        const int8x16_t pos = vdupq_n_s8((int8_t)seed_sign), neg = vdupq_n_s8((int8_t)-seed_sign);
        for (; j + 16 <= n_draws; j += 16) {
            uint32x4_t x0 = perm_x4(k, vaddq_u32(lane, vdupq_n_u32(j)));
            uint32x4_t x1 = perm_x4(k, vaddq_u32(lane, vdupq_n_u32(j + 4)));
            uint32x4_t x2 = perm_x4(k, vaddq_u32(lane, vdupq_n_u32(j + 8)));
            uint32x4_t x3 = perm_x4(k, vaddq_u32(lane, vdupq_n_u32(j + 12)));
            /* offsets are < 2^14: narrowing to 16 bits is exact */
            vst1q_u16(off_out + m, vcombine_u16(vmovn_u32(x0), vmovn_u32(x1)));
            vst1q_u16(off_out + m + 8, vcombine_u16(vmovn_u32(x2), vmovn_u32(x3)));
            /* sign masks (0 or all ones) narrowed 32 -> 16 -> 8 bits stay 0 or all ones */
            uint16x8_t s01 = vcombine_u16(vmovn_u32(sign_set_x4(x0, skey)), vmovn_u32(sign_set_x4(x1, skey)));
            uint16x8_t s23 = vcombine_u16(vmovn_u32(sign_set_x4(x2, skey)), vmovn_u32(sign_set_x4(x3, skey)));
            uint8x16_t s = vcombine_u8(vmovn_u16(s01), vmovn_u16(s23));
            vst1q_s8(sign_out + m, vbslq_s8(s, pos, neg));
            uint16x8_t slot = vaddq_u16(lane16, vdupq_n_u16((uint16_t)j)); /* j < 2^14 */
            vst1q_u16(slot_out + m, slot);
            vst1q_u16(slot_out + m + 8, vaddq_u16(slot, vdupq_n_u16(8)));
            m += 16;
        }
    }
    /* tail, and the partial last chunk */
    return qes_gen_draws(k, j, n_draws, n_valid, seed_sign, off_out, sign_out, slot_out, m);
}

static void scatter_chunk_neon(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                               int32_t signed_coef, int32_t *acc) {
    uint32_t j = 0;
    if (n_valid == QES_CHUNK) {
        static const uint32_t lane_init[4] = {0, 1, 2, 3};
        const uint32x4_t lane = vld1q_u32(lane_init);
        const uint32x4_t skey = vdupq_n_u32(k->sign_key);
        const int32x4_t pos = vdupq_n_s32(signed_coef), neg = vdupq_n_s32(-signed_coef);
        for (; j + 8 <= n_draws; j += 8) {
            uint32x4_t x0 = perm_x4(k, vaddq_u32(lane, vdupq_n_u32(j)));
            uint32x4_t x1 = perm_x4(k, vaddq_u32(lane, vdupq_n_u32(j + 4)));
            int32x4_t v0 = vbslq_s32(sign_set_x4(x0, skey), pos, neg); /* top bit set -> +coef */
            int32x4_t v1 = vbslq_s32(sign_set_x4(x1, skey), pos, neg);
            uint32_t xs[8];
            int32_t vs[8];
            vst1q_u32(xs, x0);
            vst1q_u32(xs + 4, x1);
            vst1q_s32(vs, v0);
            vst1q_s32(vs + 4, v1);
            /* no scatter store in NEON; the draws of a chunk never collide, any order is fine */
            for (int l = 0; l < 8; ++l) acc[xs[l]] += vs[l];
        }
    }
    qes_scatter_draws(k, j, n_draws, n_valid, signed_coef, acc);
}

static void dense_step_neon(const qes_dense_args *a, int32_t *acc, int32_t *r, qes_update_stats *st) {
    const int32x4_t beta = vdupq_n_s32(a->beta_q14), half14 = vdupq_n_s32(1 << 13);
    const int32x4_t half16 = vdupq_n_s32(1 << 15), zero = vdupq_n_s32(0);
    const int32x4_t hi = vdupq_n_s32(a->clamp_q16), lo = vdupq_n_s32(-a->clamp_q16);
    /* where every delta of 8 lanes is zero (nearly always), step lies in [-2^15, 2^15): with a
       clamp of at least 2^15 it needs no clamping, and r = step */
    const int no_clamp_when_zero = a->clamp_q16 >= (1 << 15);
    uint32_t i = 0;
    for (; i + 8 <= a->n; i += 8) {
        int32x4_t r0 = vld1q_s32(r + i), r1 = vld1q_s32(r + i + 4);
        /* step = acc + asr(beta*r + 2^13, 14): vshrq_n_s32 is an arithmetic shift */
        int32x4_t s0 = vaddq_s32(vld1q_s32(acc + i), vshrq_n_s32(vmlaq_s32(half14, beta, r0), 14));
        int32x4_t s1 = vaddq_s32(vld1q_s32(acc + i + 4), vshrq_n_s32(vmlaq_s32(half14, beta, r1), 14));
        vst1q_s32(acc + i, zero); /* ready for the next step's scatter */
        vst1q_s32(acc + i + 4, zero);
        int32x4_t d0 = vshrq_n_s32(vaddq_s32(s0, half16), 16);
        int32x4_t d1 = vshrq_n_s32(vaddq_s32(s1, half16), 16);
        int all_zero = vmaxvq_u32(vreinterpretq_u32_s32(vorrq_s32(d0, d1))) == 0;
        if (all_zero && no_clamp_when_zero) {
            vst1q_s32(r + i, s0);
            vst1q_s32(r + i + 4, s1);
            continue;
        }
        if (!all_zero) { /* rare: gate the nonzero deltas against the codes */
            int32_t dl[8];
            vst1q_s32(dl, d0);
            vst1q_s32(dl + 4, d1);
            qes_gate_lanes(a, a->base + i, dl, 8, st);
            d0 = vld1q_s32(dl);
            d1 = vld1q_s32(dl + 4);
        }
        /* res = step - d*65536 (|d| is small: the shift is the multiply), clamped to +-clamp */
        int32x4_t e0 = vsubq_s32(s0, vshlq_n_s32(d0, 16));
        int32x4_t e1 = vsubq_s32(s1, vshlq_n_s32(d1, 16));
        vst1q_s32(r + i, vminq_s32(vmaxq_s32(e0, lo), hi));
        vst1q_s32(r + i + 4, vminq_s32(vmaxq_s32(e1, lo), hi));
    }
    if (i < a->n) { /* tail through the reference */
        qes_dense_args t = *a;
        t.base += i; t.n -= i;
        qes_kernels_ref.dense_step(&t, acc + i, r + i, st);
    }
}

const qes_kernels qes_kernels_neon = {"neon", gen_chunk_neon, scatter_chunk_neon, dense_step_neon};
