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

/* One element: returns its new residual; applies the gated delta to element e when apply,
 * counting changed codes and dropped or cut deltas. */
QES_INLINE int32_t qes_update_elem(QES_THREAD const qes_type_traits *tr, QES_DEVICE uint8_t *data, uint64_t e,
                                   int32_t acc, int32_t r, int32_t beta_q14, int32_t clamp_q16, int anti_windup,
                                   int apply, QES_THREAD uint32_t *changed, QES_THREAD uint32_t *dropped) {
    int32_t step = acc + ((beta_q14 * r + (1 << 13)) >> 14);
    int32_t d = (step + (1 << 15)) >> 16;
    if (d) {
        int code = qes_elem_get(tr, data, e);
        int32_t g = qes_gate(tr, code, d, anti_windup);
        if (apply) {
            if (g != d) ++*dropped;
            if (g) { qes_elem_set(tr, data, e, code + g); ++*changed; }
        }
        d = g;
    }
    int32_t res = step - d * 65536;
    return res > clamp_q16 ? clamp_q16 : (res < -clamp_q16 ? -clamp_q16 : res);
}

#endif /* QES_UPDATE_H */
