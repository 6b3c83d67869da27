/* errors.c -- error strings and version. */
#include "qes_internal.h"

const char *qes_strerror(int err) {
    switch (err) {
    case QES_OK: return "ok";
    case QES_ERR_NULL: return "a required buffer is NULL";
    case QES_ERR_TYPE: return "tensor type has no ordered integer code (supported: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K)";
    case QES_ERR_SIZE: return "element count, byte length and block size disagree";
    case QES_ERR_RANGE: return "index or code out of range";
    case QES_ERR_SEED: return "seed must be nonzero with |seed| <= 2^31-1";
    case QES_ERR_SIGMA: return "sigma must be finite, > 0 and <= 0.5 (and large enough to move a code)";
    case QES_ERR_ALIGN: return "buffer is misaligned for its element type";
    case QES_ERR_COEF: return "coefficients too large (sum of |coef| per step must stay below 2^30)";
    case QES_ERR_ARG: return "argument out of range";
    case QES_ERR_BACKEND: return "backend not available in this build or on this CPU";
    case QES_ERR_NOMEM: return "out of memory";
    default: return "unknown error";
    }
}

const char *qes_version(void) { return "0.1.0"; }
int qes_noise_spec_version(void) { return QES_NOISE_SPEC_VERSION; }
