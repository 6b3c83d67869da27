/*
 * qes_perturb.h -- the per-element step of perturb and restore, shared by every backend (the host
 * drivers of portable C, AVX2 and NEON, CUDA, Metal) so that none has its own copy:
 *
 *   perturb  code + sign, unless that leaves [cmin, cmax] (gated at the range ends: the element
 *            is left alone and its mask bit stays 0); an applied draw sets its mask bit
 *   restore  for a draw whose mask bit is set: code - sign; a code that would leave the range is
 *            a mask this seed did not write (QES_ERR_RANGE), and nothing is written
 *
 * Mask bit (chunk * max_draws + j) belongs to draw j of a chunk.  Work is split into groups of
 * QES_GROUP_CHUNKS chunks: group g owns mask bytes [g * stride, (g + 1) * stride) with stride =
 * qes_max_draws (bytes, since a group holds 8 chunks of stride bits each), so threads that own
 * whole groups never share a mask byte.
 */
#ifndef QES_PERTURB_H
#define QES_PERTURB_H

#include "qes_blocks.h"
#include "qes_noise.h"

#define QES_GROUP_CHUNKS 8

QES_INLINE int qes_mask_test(QES_DEVICE const uint8_t *mask, uint64_t bit) { return (mask[bit >> 3] >> (bit & 7)) & 1; }
QES_INLINE void qes_mask_set(QES_DEVICE uint8_t *mask, uint64_t bit) {
    mask[bit >> 3] = (uint8_t)(mask[bit >> 3] | (1u << (bit & 7)));
}

/* Perturb element e by sign (+-1): 1 when applied (the caller sets the draw's mask bit), 0 when
 * gated. */
QES_INLINE int qes_perturb_elem(QES_THREAD const qes_type_traits *tr, QES_DEVICE uint8_t *data, uint64_t e, int sign) {
    int nc = qes_elem_get(tr, data, e) + sign;
    if (nc < tr->cmin || nc > tr->cmax) return 0;
    qes_elem_set(tr, data, e, nc);
    return 1;
}

/* Restore element e, whose draw's mask bit is set: 1 when restored, 0 for a foreign mask. */
QES_INLINE int qes_restore_elem(QES_THREAD const qes_type_traits *tr, QES_DEVICE uint8_t *data, uint64_t e, int sign) {
    int oc = qes_elem_get(tr, data, e) - sign;
    if (oc < tr->cmin || oc > tr->cmax) return 0;
    qes_elem_set(tr, data, e, oc);
    return 1;
}

#endif /* QES_PERTURB_H */
