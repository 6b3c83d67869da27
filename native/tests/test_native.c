/* test_native.c -- C-level tests of libqes, run under AddressSanitizer and UBSan in CI.
 * Prints "N passed, N failed" at the end. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qes.h"
#include "qes_blocks.h"
#include "qes_internal.h" /* the SHA-256 of the digest, tested directly */

static int passed = 0, failed = 0;
#define CHECK(cond, ...) do { if (cond) ++passed; else { ++failed; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static const int TYPES[] = {QES_Q4_0, QES_Q4_1, QES_Q5_0, QES_Q5_1, QES_Q8_0,
                            QES_Q2_K, QES_Q3_K, QES_Q4_K, QES_Q5_K, QES_Q6_K};
#define NTYPES (int)(sizeof TYPES / sizeof TYPES[0])

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)rng; }

static qes_tensor make_tensor(int type, uint64_t blocks, const char *name) {
    qes_type_info ti;
    qes_type_query(type, &ti);
    qes_tensor t;
    t.type = type;
    t.n_elements = blocks * (uint64_t)ti.block_elems;
    t.n_bytes = blocks * (uint64_t)ti.block_bytes;
    t.data = (uint8_t *)malloc(t.n_bytes);
    for (uint64_t i = 0; i < t.n_bytes; ++i) t.data[i] = (uint8_t)rnd();
    t.id = qes_tensor_id(name, strlen(name));
    return t;
}

/* set/get round trip; a set touches only its own element; re-setting every code read keeps every byte */
static void test_codecs(void) {
    for (int ti = 0; ti < NTYPES; ++ti) {
        qes_type_info info;
        qes_type_query(TYPES[ti], &info);
        qes_tensor t = make_tensor(TYPES[ti], 3, "codec");
        uint8_t *orig = (uint8_t *)malloc(t.n_bytes);
        memcpy(orig, t.data, t.n_bytes);
        int32_t *codes = (int32_t *)malloc(sizeof(int32_t) * t.n_elements);
        CHECK(qes_codes_get(&t, 0, t.n_elements, codes) == QES_OK, "get");
        CHECK(qes_codes_set(&t, 0, t.n_elements, codes) == QES_OK, "set");
        CHECK(memcmp(orig, t.data, t.n_bytes) == 0, "type %d: set(get()) changed bytes", TYPES[ti]);
        int ok = 1;
        for (uint64_t e = 0; e < t.n_elements && ok; ++e) {
            for (int v = info.cmin; v <= info.cmax; v += (info.cmax - info.cmin) / 7 + 1) {
                int32_t val = v, back = 0;
                qes_codes_set(&t, e, 1, &val);
                qes_codes_get(&t, e, 1, &back);
                if (back != v) { ok = 0; break; }
                int32_t *now = (int32_t *)malloc(sizeof(int32_t) * t.n_elements);
                qes_codes_get(&t, 0, t.n_elements, now);
                for (uint64_t o = 0; o < t.n_elements; ++o) if (o != e && now[o] != codes[o]) ok = 0;
                free(now);
            }
            qes_codes_set(&t, e, 1, &codes[e]);
        }
        CHECK(ok, "type %d: codec round trip / isolation", TYPES[ti]);
        CHECK(memcmp(orig, t.data, t.n_bytes) == 0, "type %d: bytes not restored", TYPES[ti]);
        int32_t bad = info.cmax + 1;
        CHECK(qes_codes_set(&t, 0, 1, &bad) == QES_ERR_RANGE, "out of range code accepted");
        CHECK(qes_codes_get(&t, t.n_elements, 1, codes) == QES_ERR_RANGE, "index past end accepted");
        free(codes); free(orig); free(t.data);
    }
}

/* A tensor's bytes in a backend's memory (host backends: a malloc'd copy), and back. */
static qes_tensor on_backend(int b, const qes_tensor *host) {
    qes_tensor t = *host;
    t.data = (uint8_t *)qes_backend_alloc(b, host->n_bytes);
    CHECK(t.data != NULL, "backend %s: alloc", qes_backend_name(b));
    CHECK(qes_backend_upload(b, t.data, host->data, host->n_bytes) == QES_OK, "upload");
    return t;
}

static void to_host(int b, qes_tensor *dev, uint8_t *out) {
    CHECK(qes_backend_download(b, out, dev->data, dev->n_bytes) == QES_OK, "download");
}

/* perturb then restore gives every byte back, on every backend, with codes pushed to the ends;
 * and every backend writes the bytes and masks of portable */
static void test_perturb_restore(void) {
    uint32_t p32;
    CHECK(qes_sigma_threshold(0.2, &p32) == QES_OK, "threshold");
    for (int b = 0; b < qes_backend_count(); ++b) {
        if (!qes_backend_available(b)) { printf("backend %s: not available here\n", qes_backend_name(b)); continue; }
        for (int ti = 0; ti < NTYPES; ++ti) {
            qes_type_info info;
            qes_type_query(TYPES[ti], &info);
            uint64_t blocks = (40000 / info.block_elems) + 1; /* > 2 chunks, last one partial */
            qes_tensor h = make_tensor(TYPES[ti], blocks, "blk.0.ffn_up.weight");
            int32_t *codes = (int32_t *)malloc(sizeof(int32_t) * h.n_elements);
            qes_codes_get(&h, 0, h.n_elements, codes);
            for (uint64_t e = 0; e < h.n_elements; e += 3) codes[e] = (e % 2) ? info.cmax : info.cmin;
            qes_codes_set(&h, 0, h.n_elements, codes);
            uint8_t *orig = (uint8_t *)malloc(h.n_bytes), *got = (uint8_t *)malloc(h.n_bytes);
            memcpy(orig, h.data, h.n_bytes);
            qes_tensor t = on_backend(b, &h);
            uint64_t mb = qes_mask_bytes(h.n_elements, p32), applied = 0, applied_ref = 0;
            uint8_t *mask = (uint8_t *)malloc(mb), *mask_ref = (uint8_t *)malloc(mb);
            for (int64_t seed = -3; seed <= 3; ++seed) {
                if (!seed) continue;
                qes_set_backend(QES_BACKEND_PORTABLE);
                CHECK(qes_perturb(&h, seed, p32, mask_ref, mb, &applied_ref) == QES_OK, "perturb portable");
                CHECK(qes_set_backend(b) == QES_OK, "set backend %s", qes_backend_name(b));
                CHECK(qes_perturb(&t, seed, p32, mask, mb, &applied) == QES_OK, "perturb");
                to_host(b, &t, got);
                CHECK(applied == applied_ref && applied > 0 && memcmp(got, h.data, h.n_bytes) == 0 &&
                      memcmp(mask, mask_ref, mb) == 0, "backend %s type %d seed %lld: perturb differs from portable",
                      qes_backend_name(b), TYPES[ti], (long long)seed);
                CHECK(qes_restore(&t, seed, p32, mask, mb) == QES_OK, "restore");
                to_host(b, &t, got);
                CHECK(memcmp(orig, got, h.n_bytes) == 0, "backend %s type %d seed %lld: restore not exact",
                      qes_backend_name(b), TYPES[ti], (long long)seed);
                qes_set_backend(QES_BACKEND_PORTABLE);
                qes_restore(&h, seed, p32, mask_ref, mb);
            }
            qes_backend_free(b, t.data);
            free(mask); free(mask_ref); free(orig); free(got); free(codes); free(h.data);
        }
    }
    qes_set_backend(QES_BACKEND_AUTO);
}

/* every backend gives the update bytes, residuals and counts of portable (replay and stored) */
static void test_backends_agree(void) {
    uint32_t p32;
    qes_sigma_threshold(0.01, &p32);
    for (int b = 0; b < qes_backend_count(); ++b) {
        if (b == QES_BACKEND_PORTABLE || !qes_backend_available(b)) continue;
        for (int ti = 0; ti < NTYPES; ++ti) {
            qes_tensor h = make_tensor(TYPES[ti], 70000 / (TYPES[ti] >= QES_Q2_K ? 256 : 32), "blk.3.attn_q.weight");
            uint8_t *start = (uint8_t *)malloc(h.n_bytes), *out0 = (uint8_t *)malloc(h.n_bytes);
            uint8_t *out1 = (uint8_t *)malloc(h.n_bytes);
            memcpy(start, h.data, h.n_bytes);
            int64_t seeds[3][8];
            int32_t coefs[3][8];
            qes_step steps[3];
            for (int s = 0; s < 3; ++s) {
                for (int i = 0; i < 8; ++i) {
                    seeds[s][i] = (i & 1 ? -1 : 1) * (int64_t)(1 + rnd() % 2000000000u);
                    coefs[s][i] = (int32_t)(rnd() % 400000) - 200000;
                }
                steps[s].seeds = seeds[s]; steps[s].coefs = coefs[s]; steps[s].n_members = 8; steps[s].threshold = p32;
            }
            qes_update_params prm = {14746, 98304, QES_UPDATE_ANTI_WINDUP, 2};
            size_t rb = h.n_elements * 4;
            int32_t *res0 = (int32_t *)calloc(h.n_elements, 4), *res1 = (int32_t *)calloc(h.n_elements, 4);
            for (uint64_t e = 0; e < h.n_elements; ++e) /* a residual carried from earlier steps: beta's rounding matters */
                res0[e] = res1[e] = (int32_t)(rnd() % (2 * 98304 + 1)) - 98304;
            qes_update_stats st0, st1, sr0, sr1;
            qes_set_backend(QES_BACKEND_PORTABLE);
            CHECK(qes_update(&h, steps, 3, NULL, &prm, &st0) == QES_OK, "update portable");
            CHECK(qes_update(&h, steps, 1, res0, &prm, &sr0) == QES_OK, "stored update portable");
            CHECK(qes_update(&h, steps + 1, 2, res0, &prm, NULL) == QES_OK, "stored update portable");
            memcpy(out0, h.data, h.n_bytes);
            memcpy(h.data, start, h.n_bytes);
            qes_tensor t = on_backend(b, &h);
            int32_t *dres = (int32_t *)qes_backend_alloc(b, rb);
            qes_backend_upload(b, dres, res1, rb);
            CHECK(qes_set_backend(b) == QES_OK, "set backend");
            CHECK(qes_update(&t, steps, 3, NULL, &prm, &st1) == QES_OK, "update %s", qes_backend_name(b));
            CHECK(qes_update(&t, steps, 1, dres, &prm, &sr1) == QES_OK, "stored update %s", qes_backend_name(b));
            CHECK(qes_update(&t, steps + 1, 2, dres, &prm, NULL) == QES_OK, "stored update %s", qes_backend_name(b));
            to_host(b, &t, out1);
            qes_backend_download(b, res1, dres, rb);
            CHECK(memcmp(out0, out1, h.n_bytes) == 0, "type %d: %s update bytes differ", TYPES[ti], qes_backend_name(b));
            CHECK(memcmp(res0, res1, rb) == 0, "type %d: %s residual differs", TYPES[ti], qes_backend_name(b));
            CHECK(st0.changed == st1.changed && st0.changed > 0 && st0.dropped == st1.dropped &&
                  sr0.changed == sr1.changed, "type %d: %s changed %llu vs %llu", TYPES[ti], qes_backend_name(b),
                  (unsigned long long)st0.changed, (unsigned long long)st1.changed);
            qes_set_backend(QES_BACKEND_AUTO);
            qes_backend_free(b, t.data);
            qes_backend_free(b, dres);
            free(res0); free(res1); free(start); free(out0); free(out1); free(h.data);
        }
    }
    qes_set_backend(QES_BACKEND_AUTO);
}

/* the registry: names and ids agree, unknown ids and names are refused, auto is a host backend */
static void test_registry(void) {
    CHECK(qes_backend_count() == QES_BACKEND_STANDIN + 1, "count %d", qes_backend_count());
    for (int b = 0; b < qes_backend_count(); ++b) {
        CHECK(qes_backend_name(b) && qes_backend_by_name(qes_backend_name(b)) == b, "name of %d", b);
        CHECK(!qes_backend_available(b) || qes_backend_compiled(b), "%s available but not compiled", qes_backend_name(b));
        CHECK(qes_backend_available(b) || qes_set_backend(b) == QES_ERR_BACKEND, "%s set while unavailable",
              qes_backend_name(b));
    }
    CHECK(qes_backend_name(-1) == NULL && qes_backend_name(qes_backend_count()) == NULL, "unknown ids");
    CHECK(qes_backend_by_name("tpu") == QES_ERR_BACKEND, "unknown name");
    CHECK(qes_backend_available(QES_BACKEND_PORTABLE) && !qes_backend_is_device(QES_BACKEND_PORTABLE), "portable");
    CHECK(qes_backend_is_device(QES_BACKEND_CUDA) && qes_backend_is_device(QES_BACKEND_METAL) &&
          qes_backend_is_device(QES_BACKEND_STANDIN), "device backends");
    CHECK(qes_backend_available(QES_BACKEND_STANDIN), "the stand-in device with QES_EDGE_STANDIN_DEVICE=1");
    qes_set_backend(QES_BACKEND_AUTO);
    CHECK(!qes_backend_is_device(qes_get_backend()), "auto picked a device backend");
}

/* SHA-256 test vectors of FIPS 180-4 (streamed in uneven pieces), and the digest of tensors
 * = SHA-256 of each name then its bytes, on every backend (through its memory) */
static void hexof(const uint8_t *d, char *out) { for (int k = 0; k < 32; ++k) snprintf(out + 2 * k, 3, "%02x", d[k]); }

static void test_digest(void) {
    static const char *want[4] = {
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"};  /* 10^6 x 'a' */
    const char *msgs[3] = {"", "abc", "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"};
    uint8_t out[32];
    char got[65];
    for (int i = 0; i < 4; ++i) {
        qes_sha256_ctx c;
        qes_sha256_init(&c);
        if (i < 3) {
            for (size_t at = 0, step = 1; at < strlen(msgs[i]); at += step, step += 2)
                qes_sha256_update(&c, (const uint8_t *)msgs[i] + at, at + step > strlen(msgs[i]) ? strlen(msgs[i]) - at : step);
        } else {
            uint8_t a[1001];
            memset(a, 'a', sizeof a);
            for (int k = 0; k < 1000; ++k) qes_sha256_update(&c, a, k % 2 ? 999 : 1001);
        }
        qes_sha256_final(&c, out);
        hexof(out, got);
        CHECK(strcmp(got, want[i]) == 0, "sha256 vector %d: %s", i, got);
    }
    qes_tensor h[2] = {make_tensor(QES_Q4_K, 300, "blk.0.attn_k.weight"), make_tensor(QES_Q8_0, 5, "output_norm")};
    const char *names[2] = {"blk.0.attn_k.weight", "x"};
    uint64_t lens[2] = {strlen(names[0]), 1};
    qes_sha256_ctx c;
    qes_sha256_init(&c);
    for (int i = 0; i < 2; ++i) {
        qes_sha256_update(&c, (const uint8_t *)names[i], lens[i]);
        qes_sha256_update(&c, h[i].data, h[i].n_bytes);
    }
    uint8_t ref[32];
    qes_sha256_final(&c, ref);
    for (int b = 0; b < qes_backend_count(); ++b) {
        if (!qes_backend_available(b)) continue;
        qes_tensor t[2] = {on_backend(b, &h[0]), on_backend(b, &h[1])};
        qes_tensor *tp[2] = {&t[0], &t[1]};
        qes_set_backend(b);
        CHECK(qes_digest(tp, 2, names, lens, out) == QES_OK && memcmp(out, ref, 32) == 0, "digest on %s",
              qes_backend_name(b));
        qes_backend_free(b, t[0].data);
        qes_backend_free(b, t[1].data);
    }
    qes_set_backend(QES_BACKEND_AUTO);
    free(h[0].data);
    free(h[1].data);
}

static void test_bad_input(void) {
    qes_tensor t = make_tensor(QES_Q4_1, 4, "bad");
    uint32_t p32;
    uint8_t mask[64];
    CHECK(qes_sigma_threshold(0.0, &p32) == QES_ERR_SIGMA, "sigma 0");
    CHECK(qes_sigma_threshold(-1.0, &p32) == QES_ERR_SIGMA, "sigma < 0");
    CHECK(qes_sigma_threshold(1.0 / 0.0, &p32) == QES_ERR_SIGMA, "sigma inf");
    CHECK(qes_sigma_threshold(0.0 / 0.0, &p32) == QES_ERR_SIGMA, "sigma nan");
    qes_sigma_threshold(0.01, &p32);
    CHECK(qes_perturb(&t, 0, p32, mask, sizeof mask, NULL) == QES_ERR_SEED, "seed 0");
    CHECK(qes_perturb(&t, 1ll << 31, p32, mask, sizeof mask, NULL) == QES_ERR_SEED, "seed 2^31");
    CHECK(qes_perturb(&t, 5, p32, NULL, sizeof mask, NULL) == QES_ERR_NULL, "null mask");
    CHECK(qes_perturb(&t, 5, p32, mask, 0, NULL) == QES_ERR_SIZE, "short mask");
    qes_tensor u = t;
    u.n_bytes -= 1;
    CHECK(qes_perturb(&u, 5, p32, mask, sizeof mask, NULL) == QES_ERR_SIZE, "byte length mismatch");
    u = t; u.n_elements += 1; 
    CHECK(qes_tensor_check(&u) == QES_ERR_SIZE, "partial block");
    u = t; u.type = QES_F16;
    CHECK(qes_tensor_check(&u) == QES_ERR_TYPE, "F16 as codes");
    u = t; u.type = 20; /* IQ4_NL */
    CHECK(qes_tensor_check(&u) == QES_ERR_TYPE, "IQ4_NL");
    u = t; u.data = NULL;
    CHECK(qes_tensor_check(&u) == QES_ERR_NULL, "null data");
    int32_t res[129];
    int64_t seed = 7; int32_t coef = 1000;
    qes_step st = {&seed, &coef, 1, p32};
    qes_update_params prm = {14746, 98304, QES_UPDATE_ANTI_WINDUP, 1};
    CHECK(qes_update(&t, &st, 1, (int32_t *)((uint8_t *)res + 1), &prm, NULL) == QES_ERR_ALIGN, "misaligned residual");
    coef = 1 << 30; coef += 1;
    CHECK(qes_update(&t, &st, 1, NULL, &prm, NULL) == QES_ERR_COEF, "coef overflow guard");
    free(t.data);
}

/* all tensors in one call on several threads: the bytes and masks of one call per tensor */
static void test_perturb_many(void) {
    uint32_t p32;
    qes_sigma_threshold(0.05, &p32);
    enum { N = 5 };
    const uint64_t elems[N] = {256, 8 * 16384, 8 * 16384 + 512, 17 * 16384 - 256, 3 * 16384};
    qes_tensor ts[N], copies[N];
    qes_tensor *ptrs[N];
    uint8_t *masks[N], *single[N], *orig[N];
    uint64_t mb[N], applied[N], one;
    for (int i = 0; i < N; ++i) {
        int type = TYPES[(i * 3) % NTYPES];
        qes_type_info info;
        qes_type_query(type, &info);
        char name[32];
        snprintf(name, sizeof name, "blk.%d.ffn_up.weight", i);
        ts[i] = make_tensor(type, elems[i] / info.block_elems, name);
        copies[i] = ts[i];
        copies[i].data = (uint8_t *)malloc(ts[i].n_bytes);
        memcpy(copies[i].data, ts[i].data, ts[i].n_bytes);
        orig[i] = (uint8_t *)malloc(ts[i].n_bytes);
        memcpy(orig[i], ts[i].data, ts[i].n_bytes);
        ptrs[i] = &ts[i];
        mb[i] = qes_mask_bytes(ts[i].n_elements, p32);
        masks[i] = (uint8_t *)malloc(mb[i]);
        single[i] = (uint8_t *)malloc(mb[i]);
    }
    for (int threads = 1; threads <= 4; ++threads) {
        for (int64_t seed = -2; seed <= 2; seed += 4) {
            CHECK(qes_perturb_many(ptrs, N, seed, p32, masks, mb, threads, applied, NULL) == QES_OK, "perturb_many");
            for (int i = 0; i < N; ++i) {
                CHECK(qes_perturb(&copies[i], seed, p32, single[i], mb[i], &one) == QES_OK, "perturb");
                CHECK(one == applied[i] && memcmp(single[i], masks[i], mb[i]) == 0 &&
                      memcmp(copies[i].data, ts[i].data, ts[i].n_bytes) == 0,
                      "threads %d tensor %d: perturb_many differs from perturb", threads, i);
                qes_restore(&copies[i], seed, p32, single[i], mb[i]);
            }
            CHECK(qes_restore_many(ptrs, N, seed, p32, masks, mb, threads, NULL) == QES_OK, "restore_many");
            for (int i = 0; i < N; ++i)
                CHECK(memcmp(orig[i], ts[i].data, ts[i].n_bytes) == 0, "threads %d tensor %d: not restored", threads, i);
        }
    }
    uint32_t bad = 99;
    mb[3] -= 1;
    CHECK(qes_perturb_many(ptrs, N, 1, p32, masks, mb, 2, applied, &bad) == QES_ERR_SIZE && bad == 3,
          "a short mask is refused and named");
    for (int i = 0; i < N; ++i)
        CHECK(memcmp(orig[i], ts[i].data, ts[i].n_bytes) == 0, "a refused call touched tensor %d", i);
    for (int i = 0; i < N; ++i) { free(ts[i].data); free(copies[i].data); free(orig[i]); free(masks[i]); free(single[i]); }
}

int main(void) {
    /* the stand-in device (host memory behind the device interface) joins every comparison of
       the backends, so the device path of the dispatch is exercised on a machine without a GPU */
    setenv("QES_EDGE_STANDIN_DEVICE", "1", 1);
    test_codecs();
    test_perturb_restore();
    test_perturb_many();
    test_backends_agree();
    test_registry();
    test_digest();
    test_bad_input();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
