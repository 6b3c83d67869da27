/*
 * qes.h -- public API of libqes, the QES engine on GGUF quantization blocks.
 *
 * Everything between BEGIN CDEF and END CDEF is read by the Python binding (cffi, ABI
 * mode): keep it plain C declarations, no preprocessor lines.
 *
 * Conventions: functions return QES_OK (0) or a negative error code (qes_strerror);
 * they validate every argument first and write nothing when they fail.
 * Fixed point: coefficients and residuals are Q16 (1.0 = 65536) in int32, beta is Q14.
 */
#ifndef QES_H
#define QES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* BEGIN CDEF */
enum {
    QES_OK = 0,
    QES_ERR_NULL = -1,          /* a required pointer is NULL */
    QES_ERR_TYPE = -2,          /* the tensor type has no ordered integer code here */
    QES_ERR_SIZE = -3,          /* element count / byte length / block size disagree */
    QES_ERR_RANGE = -4,         /* an index or a code is outside its range */
    QES_ERR_SEED = -5,          /* seed is 0 or |seed| > 2^31-1 */
    QES_ERR_SIGMA = -6,         /* sigma not finite, <= 0, or > QES_SIGMA_MAX */
    QES_ERR_ALIGN = -7,         /* a buffer is not aligned for its element type */
    QES_ERR_COEF = -8,          /* coefficients out of range (overflow guard) */
    QES_ERR_ARG = -9,           /* another argument out of range */
    QES_ERR_BACKEND = -10,      /* the requested backend is not available */
    QES_ERR_NOMEM = -11         /* out of memory */
};

/* Backend ids: the rows of the registry in backend.c, which is the one list (names, what is
 * compiled in, what is available, the operations).  Callers enumerate it with
 * qes_backend_count/qes_backend_name rather than copying these numbers. */
enum { QES_BACKEND_PORTABLE = 0, QES_BACKEND_AVX2 = 1, QES_BACKEND_NEON = 2, QES_BACKEND_CUDA = 3,
       QES_BACKEND_METAL = 4, QES_BACKEND_STANDIN = 5, QES_BACKEND_AUTO = -1 };

enum { QES_UPDATE_ANTI_WINDUP = 1 };

typedef struct {
    int32_t type;         /* ggml type id */
    uint64_t n_elements;  /* number of elements (codes) */
    uint8_t *data;        /* raw block bytes */
    uint64_t n_bytes;     /* must equal n_elements / block_elems * block_bytes */
    uint64_t id;          /* qes_tensor_id(name): keys the noise */
} qes_tensor;

typedef struct {
    int32_t block_elems;
    int32_t block_bytes;
    int32_t cmin;
    int32_t cmax;
} qes_type_info;

/* One optimisation step as recorded in the ledger: its members and their coefficients. */
typedef struct {
    const int64_t *seeds;    /* n_members signed seeds (mirrored pairs are s, -s) */
    const int32_t *coefs;    /* Q16: alpha/sigma * c_i, quantized once when recorded */
    uint32_t n_members;
    uint32_t threshold;      /* noise threshold p32 of the step (qes_sigma_threshold) */
} qes_step;

typedef struct {
    int32_t beta_q14;        /* residual decay, Q14 (0.9 -> 14746); 0..16384 */
    int32_t clamp_q16;       /* residual clamp, Q16 (1.5 -> 98304); 0..2^17-1 (update.c refuses more) */
    uint32_t flags;          /* QES_UPDATE_ANTI_WINDUP: drop a delta that leaves the range */
    int32_t n_threads;       /* <= 0: all cores */
} qes_update_params;

typedef struct {
    uint64_t changed;        /* codes changed by the applied step */
    uint64_t dropped;        /* deltas dropped or cut at the range ends in the applied step */
} qes_update_stats;

const char *qes_strerror(int err);
const char *qes_version(void);
int qes_noise_spec_version(void);

/* The backend registry.  A host backend (portable, avx2, neon) runs the engine's chunk kernels
 * on host memory; a device backend (cuda, metal) implements whole operations -- perturb/restore
 * over a set of tensors, the update, the weights digest -- on tensors whose data lives in its
 * own memory (llama.cpp's offloaded weights), without copying them to the host.  Every backend
 * computes the same bytes as portable (tests compare them). */
int qes_backend_count(void);                 /* ids are 0 .. count-1 */
const char *qes_backend_name(int backend);   /* "portable", "avx2", ...; NULL for an unknown id */
int qes_backend_by_name(const char *name);   /* the id, or QES_ERR_BACKEND */
int qes_backend_compiled(int backend);       /* built into this library */
int qes_backend_available(int backend);      /* compiled and usable here (CPU feature, a device) */
int qes_backend_is_device(int backend);      /* 1: tensor data must be in the backend's memory */
/* "standin": a device backend over host memory (malloc, memcpy, the portable kernels behind the
 * device interface), so that the placement of tensors on a device and the split of a step
 * between host and device tensors are tested where no GPU is.  Available only while the
 * environment has QES_EDGE_STANDIN_DEVICE=1; never picked by auto. */
int qes_set_backend(int backend);      /* QES_BACKEND_AUTO picks the best available host backend */
int qes_get_backend(void);
int qes_default_threads(void);

/* A backend's memory, for callers that hold host bytes (tests, benchmarks): host backends use
 * malloc and memcpy.  alloc returns NULL on failure. */
void *qes_backend_alloc(int backend, uint64_t n_bytes);
void qes_backend_free(int backend, void *p);
int qes_backend_upload(int backend, void *dst, const void *src, uint64_t n_bytes);
int qes_backend_download(int backend, void *dst, const void *src, uint64_t n_bytes);

/* SHA-256 of the tensors' names and bytes in order (name bytes, then data bytes, no framing):
 * the ledger's weights hash, computed where the data is (a device backend streams it through
 * a small host buffer: SHA-256 is serial).  names[i] has name_lens[i] bytes. */
int qes_digest(qes_tensor **ts, uint32_t n, const char **names, const uint64_t *name_lens, uint8_t *out32);

int qes_type_query(int32_t type, qes_type_info *out);
uint64_t qes_tensor_id(const char *name, size_t len);
int qes_tensor_check(const qes_tensor *t);

/* Codes of elements [start, start+count). */
int qes_codes_get(const qes_tensor *t, uint64_t start, uint64_t count, int32_t *out);
int qes_codes_set(qes_tensor *t, uint64_t start, uint64_t count, const int32_t *in);
/* Dequantization step (one level) of each element: value(code+1) - value(code). */
int qes_levels(const qes_tensor *t, uint64_t start, uint64_t count, float *out);

/* sigma -> p32 = floor(sigma * sqrt(2/pi) * 2^32), computed once on the host. */
int qes_sigma_threshold(double sigma, uint32_t *p32_out);

/* The noise of (tensor, seed) in draw order: element index and +-1; returns the count via
 * *n_out (at most cap entries written; *n_out may exceed cap: call again larger). */
int qes_noise(uint64_t tensor_id, uint64_t n_elements, int64_t seed, uint32_t p32,
              uint64_t *pos_out, int8_t *sign_out, uint64_t cap, uint64_t *n_out);
uint64_t qes_mask_bytes(uint64_t n_elements, uint32_t p32);

/* Perturb with boundary gating: mask (qes_mask_bytes) records which draws were applied.
 * restore takes the same seed, threshold and mask and returns every byte. */
int qes_perturb(qes_tensor *t, int64_t seed, uint32_t p32, uint8_t *mask, uint64_t mask_bytes,
                uint64_t *applied_out);
int qes_restore(qes_tensor *t, int64_t seed, uint32_t p32, const uint8_t *mask, uint64_t mask_bytes);
/* The same over n distinct tensors in one call, on n_threads (<= 0: all cores): the same bytes
 * and masks as n single calls.  Arguments are checked for every tensor before any is touched; on an error
 * *failed_out (may be NULL) names the tensor's index.  applied_out: n counts, or NULL. */
int qes_perturb_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                     const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out, uint32_t *failed_out);
int qes_restore_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                     const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out);

/* Error-feedback update.  steps[0..n_steps-2] are replayed (residual only), steps[n_steps-1]
 * is applied to the codes.  residual: NULL for seed replay (starts from zero) or a per-element
 * int32 Q16 buffer (stored-residual mode: read, then written back). */
int qes_update(qes_tensor *t, const qes_step *steps, uint32_t n_steps, int32_t *residual,
               const qes_update_params *params, qes_update_stats *stats);
/* END CDEF */

#define QES_SIGMA_MAX 0.5

#ifdef __cplusplus
}
#endif
#endif /* QES_H */
