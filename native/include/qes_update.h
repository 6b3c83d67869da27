/*
 * qes_update.h -- the per-element arithmetic of the error-feedback update, shared by every
 * backend (portable C, AVX2 and NEON tails, CUDA, Metal) so that none has its own copy:
 *
 *   step = acc + floor((beta_q14 * r + 2^13) / 2^14)
 *   d    = floor((step + 2^15) / 2^16)                     (round half up)
 *   d is gated against the code: anti-windup drops a delta that leaves [cmin, cmax], otherwise
 *        it is cut at the range end
 *   r    = clamp(step - d * 2^16, +-clamp_q16)
 * `>>` of a negative value must shift arithmetically (qes_internal.h asserts it for C builds;
 * CUDA and Apple GPUs do).
 */
#ifndef QES_UPDATE_H
#define QES_UPDATE_H

#include "qes_blocks.h"

/* gate one delta: returns the delta actually applied (0 when dropped) */
QES_INLINE int32_t qes_gate(QES_THREAD const qes_type_traits *tr, int code, int32_t d, int anti_windup) {
    int32_t nc = code + d;
    if (nc >= tr->cmin && nc <= tr->cmax) return d;
    if (anti_windup) return 0;
    return (nc < tr->cmin ? tr->cmin : tr->cmax) - code;
}

/* The three steps of one element, for backends that split them (a GPU that defers the code
 * writes): the step from the accumulator and the residual, its rounded delta, the residual
 * left once delta (after gating) is taken out. */
QES_INLINE int32_t qes_update_step(int32_t acc, int32_t r, int32_t beta_q14) {
    return acc + ((beta_q14 * r + (1 << 13)) >> 14);
}
QES_INLINE int32_t qes_update_delta(int32_t step) { return (step + (1 << 15)) >> 16; }
QES_INLINE int32_t qes_update_residual(int32_t step, int32_t d, int32_t clamp_q16) {
    int32_t res = step - d * 65536;
    return res > clamp_q16 ? clamp_q16 : (res < -clamp_q16 ? -clamp_q16 : res);
}

/* One element: returns its new residual; applies the gated delta to element e when apply,
 * counting changed codes and dropped or cut deltas. */
QES_INLINE int32_t qes_update_elem(QES_THREAD const qes_type_traits *tr, QES_DEVICE uint8_t *data, uint64_t e,
                                   int32_t acc, int32_t r, int32_t beta_q14, int32_t clamp_q16, int anti_windup,
                                   int apply, QES_THREAD uint32_t *changed, QES_THREAD uint32_t *dropped) {
    int32_t step = qes_update_step(acc, r, beta_q14);
    int32_t d = qes_update_delta(step);
    if (d) {
        int code = qes_elem_get(tr, data, e);
        int32_t g = qes_gate(tr, code, d, anti_windup);
        if (apply) {
            if (g != d) ++*dropped;
            if (g) { qes_elem_set(tr, data, e, code + g); ++*changed; }
        }
        d = g;
    }
    return qes_update_residual(step, d, clamp_q16);
}

#endif /* QES_UPDATE_H */
