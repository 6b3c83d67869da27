/* golden_check.c -- docs/noise-golden.json, every vector, on every available backend of libqes.
 *
 *   golden_check noise-golden.txt        (the text is written by tests/golden_text.py)
 *
 * Every case runs on every available backend through the public API of qes.h, tensor data
 * (and a stored residual) in the backend's memory (qes_backend_alloc/upload/download), so
 * device backends are checked too: noise draws (count and digest of the draw records),
 * codecs (codes, levels, bytes after a set), perturb (mask, applied count, bytes, and restore
 * from the golden mask gives every byte back), update (bytes, changed, dropped, residual) and
 * the weights digest.  Prints "N cases passed on <backends>" and exits 1 on any mismatch. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qes.h"
#include "qes_internal.h" /* qes_sha256_* */

static int failures = 0;
static const char *cur_backend = "";
static int cur_line = 0;

#define FAIL(...) do { fprintf(stderr, "golden_check: line %d on %s: ", cur_line, cur_backend); \
                       fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); failures++; } while (0)
#define MUST(cond, ...) do { if (!(cond)) { FAIL(__VA_ARGS__); goto done; } } while (0)

/* -- the text -------------------------------------------------------------------------------- */

typedef struct { char *tok[4096]; int n, at; } fields;

static void split(char *line, fields *f) {
    char *save = NULL;
    f->n = f->at = 0;
    for (char *t = strtok_r(line, " \t\r\n", &save); t && f->n < 4096; t = strtok_r(NULL, " \t\r\n", &save))
        f->tok[f->n++] = t;
}

static int bad_text = 0;
static const char *next(fields *f) {
    if (f->at >= f->n) { bad_text = 1; return "-"; }
    return f->tok[f->at++];
}

static long long num(fields *f) {
    long long v = 0;
    if (sscanf(next(f), "%lld", &v) != 1) bad_text = 1;
    return v;
}

/* hex -> malloc'd bytes ("-": none); *n gets the length */
static uint8_t *hexbytes(const char *s, uint64_t *n) {
    size_t len = strcmp(s, "-") == 0 ? 0 : strlen(s);
    if (len % 2) { bad_text = 1; len = 0; }
    uint8_t *b = (uint8_t *)malloc(len / 2 + 1);
    for (size_t i = 0; i < len / 2; ++i) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) bad_text = 1;
        b[i] = (uint8_t)v;
    }
    *n = len / 2;
    return b;
}

/* "1,-2,3" -> malloc'd int64s ("-": none); hex32: 8-hex-digit words */
static int64_t *list(const char *s, uint64_t *n, int hex32) {
    uint64_t cap = 1;
    for (const char *p = s; *p; ++p) cap += *p == ',';
    int64_t *v = (int64_t *)malloc(cap * sizeof *v);
    *n = 0;
    if (strcmp(s, "-") == 0) return v;
    const char *p = s;
    while (*p) {
        long long x = 0;
        unsigned u = 0;
        int used = 0;
        if (hex32 ? sscanf(p, "%8x%n", &u, &used) != 1 : sscanf(p, "%lld%n", &x, &used) != 1) { bad_text = 1; break; }
        v[(*n)++] = hex32 ? (int64_t)u : x;
        p += used;
        if (*p == ',') ++p;
    }
    return v;
}

static void hex32(const uint8_t *d, char *out) { for (int k = 0; k < 32; ++k) snprintf(out + 2 * k, 3, "%02x", d[k]); }

static void sha_hex(const uint8_t *p, uint64_t n, char *out) {
    qes_sha256_ctx c;
    uint8_t d[32];
    qes_sha256_init(&c);
    qes_sha256_update(&c, p, n);
    qes_sha256_final(&c, d);
    hex32(d, out);
}

/* residuals are hashed as little-endian int32, whatever the machine's byte order */
static void res_sha_hex(const int32_t *r, uint64_t n, char *out) {
    uint8_t *b = (uint8_t *)malloc(n * 4 + 1);
    for (uint64_t i = 0; i < n; ++i) {
        uint32_t u = (uint32_t)r[i];
        b[4 * i] = (uint8_t)u; b[4 * i + 1] = (uint8_t)(u >> 8); b[4 * i + 2] = (uint8_t)(u >> 16); b[4 * i + 3] = (uint8_t)(u >> 24);
    }
    sha_hex(b, n * 4, out);
    free(b);
}

static qes_tensor host_tensor(int type, uint64_t n, uint8_t *data, uint64_t n_bytes, const uint8_t *name, uint64_t name_len) {
    qes_tensor t = {type, n, data, n_bytes, qes_tensor_id((const char *)name, (size_t)name_len)};
    return t;
}

/* the tensor's bytes in backend b's memory (NULL data on failure) */
static qes_tensor on_backend(int b, const qes_tensor *h) {
    qes_tensor t = *h;
    t.data = (uint8_t *)qes_backend_alloc(b, h->n_bytes);
    if (t.data && qes_backend_upload(b, t.data, h->data, h->n_bytes) != QES_OK) { qes_backend_free(b, t.data); t.data = NULL; }
    return t;
}

/* -- the cases ------------------------------------------------------------------------------- */

static void noise_case(fields *f) {
    uint64_t nl;
    uint8_t *name = hexbytes(next(f), &nl);
    uint64_t n = (uint64_t)num(f);
    int64_t seed = num(f);
    uint32_t p32 = (uint32_t)num(f);
    uint64_t count = (uint64_t)num(f);
    const char *want = next(f);
    uint64_t *pos = (uint64_t *)malloc((count + 1) * sizeof *pos), got = 0;
    int8_t *sign = (int8_t *)malloc(count + 1);
    char hex[65];
    MUST(!bad_text, "bad noise line");
    MUST(qes_noise(qes_tensor_id((const char *)name, (size_t)nl), n, seed, p32, pos, sign, count + 1, &got) == QES_OK,
         "qes_noise failed");
    MUST(got == count, "noise count %llu, want %llu", (unsigned long long)got, (unsigned long long)count);
    {
        qes_sha256_ctx c;
        uint8_t d[32];
        qes_sha256_init(&c);
        for (uint64_t i = 0; i < got; ++i) { /* record: le u64 pos, i8 sign */
            uint8_t rec[9];
            for (int k = 0; k < 8; ++k) rec[k] = (uint8_t)(pos[i] >> (8 * k));
            rec[8] = (uint8_t)sign[i];
            qes_sha256_update(&c, rec, 9);
        }
        qes_sha256_final(&c, d);
        hex32(d, hex);
        MUST(strcmp(hex, want) == 0, "noise digest %s, want %s", hex, want);
    }
done:
    free(name); free(pos); free(sign);
}

static void codec_case(fields *f) {
    int type = (int)num(f);
    uint64_t n = (uint64_t)num(f), nb, nc, nlv, ns, na;
    uint8_t *data = hexbytes(next(f), &nb);
    int64_t *codes = list(next(f), &nc, 0);
    int64_t *levels = list(next(f), &nlv, 1);
    int64_t *set = list(next(f), &ns, 0);
    uint8_t *after = hexbytes(next(f), &na);
    int32_t *buf = (int32_t *)malloc((n + 1) * sizeof *buf);
    float *lv = (float *)malloc((n + 1) * sizeof *lv);
    qes_tensor t = host_tensor(type, n, data, nb, (const uint8_t *)"golden", 6);
    MUST(!bad_text && nc == n && nlv == n && ns == n && na == nb, "bad codec line");
    MUST(qes_codes_get(&t, 0, n, buf) == QES_OK, "type %d: codes_get failed", type);
    for (uint64_t i = 0; i < n; ++i) MUST(buf[i] == codes[i], "type %d element %llu: code %d, want %lld", type,
                                          (unsigned long long)i, buf[i], (long long)codes[i]);
    MUST(qes_levels(&t, 0, n, lv) == QES_OK, "type %d: levels failed", type);
    for (uint64_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, &lv[i], 4);
        MUST(bits == (uint32_t)levels[i], "type %d element %llu: level %08x, want %08x", type, (unsigned long long)i,
             bits, (unsigned)levels[i]);
    }
    for (uint64_t i = 0; i < n; ++i) buf[i] = (int32_t)set[i];
    MUST(qes_codes_set(&t, 0, n, buf) == QES_OK, "type %d: codes_set failed", type);
    MUST(memcmp(data, after, nb) == 0, "type %d: bytes after set differ", type);
    MUST(qes_codes_get(&t, 0, n, buf) == QES_OK, "codes_get");
    for (uint64_t i = 0; i < n; ++i) MUST(buf[i] == set[i], "type %d element %llu: code after set", type, (unsigned long long)i);
done:
    free(data); free(codes); free(levels); free(set); free(after); free(buf); free(lv);
}

static void perturb_case(fields *f, int b) {
    int type = (int)num(f);
    uint64_t nl, nb, nm;
    uint8_t *name = hexbytes(next(f), &nl);
    uint64_t n = (uint64_t)num(f);
    int64_t seed = num(f);
    uint32_t p32 = (uint32_t)num(f);
    uint8_t *data = hexbytes(next(f), &nb);
    uint64_t draws = (uint64_t)num(f), mask_bytes = (uint64_t)num(f);
    uint8_t *want_mask = hexbytes(next(f), &nm);
    uint64_t want_applied = (uint64_t)num(f), applied = 0, got_draws = 0;
    const char *want_sha = next(f);
    qes_tensor h = host_tensor(type, n, data, nb, name, nl), t = {0};
    uint8_t *mask = (uint8_t *)calloc(1, mask_bytes + 1), *out = (uint8_t *)malloc(nb + 1);
    char hex[65];
    MUST(!bad_text && nm == mask_bytes, "bad perturb line");
    MUST(qes_noise(h.id, n, seed, p32, NULL, NULL, 0, &got_draws) == QES_OK && got_draws == draws,
         "draws %llu, want %llu", (unsigned long long)got_draws, (unsigned long long)draws);
    MUST(qes_mask_bytes(n, p32) == mask_bytes, "mask bytes %llu, want %llu",
         (unsigned long long)qes_mask_bytes(n, p32), (unsigned long long)mask_bytes);
    t = on_backend(b, &h);
    MUST(t.data, "alloc/upload");
    MUST(qes_perturb(&t, seed, p32, mask, mask_bytes, &applied) == QES_OK, "type %d seed %lld: perturb failed", type,
         (long long)seed);
    MUST(memcmp(mask, want_mask, mask_bytes) == 0, "type %d seed %lld: mask differs", type, (long long)seed);
    MUST(applied == want_applied, "type %d seed %lld: applied %llu, want %llu", type, (long long)seed,
         (unsigned long long)applied, (unsigned long long)want_applied);
    MUST(qes_backend_download(b, out, t.data, nb) == QES_OK, "download");
    sha_hex(out, nb, hex);
    MUST(strcmp(hex, want_sha) == 0, "type %d seed %lld: bytes after perturb %s, want %s", type, (long long)seed, hex, want_sha);
    /* restore with the golden mask (not our own) gives every byte back */
    MUST(qes_restore(&t, seed, p32, want_mask, mask_bytes) == QES_OK, "restore failed");
    MUST(qes_backend_download(b, out, t.data, nb) == QES_OK, "download");
    MUST(memcmp(out, data, nb) == 0, "type %d seed %lld: restore is not exact", type, (long long)seed);
done:
    if (t.data) qes_backend_free(b, t.data);
    free(name); free(data); free(want_mask); free(mask); free(out);
}

static void update_case(fields *f, int b) {
    int type = (int)num(f);
    uint64_t nl, nb, nr;
    uint8_t *name = hexbytes(next(f), &nl);
    uint64_t n = (uint64_t)num(f);
    uint8_t *data = hexbytes(next(f), &nb);
    qes_update_params prm = {0};
    prm.beta_q14 = (int32_t)num(f);
    prm.clamp_q16 = (int32_t)num(f);
    prm.flags = num(f) ? QES_UPDATE_ANTI_WINDUP : 0;
    prm.n_threads = 2; /* more than one tile worker where the tensor has several tiles */
    const char *res_text = next(f);
    int64_t *res_in = list(res_text, &nr, 0);
    int stored = strcmp(res_text, "-") != 0;
    uint32_t n_steps = (uint32_t)num(f);
    qes_step *steps = (qes_step *)calloc(n_steps + 1, sizeof *steps);
    int64_t **seeds = (int64_t **)calloc(n_steps + 1, sizeof *seeds);
    int32_t **coefs = (int32_t **)calloc(n_steps + 1, sizeof *coefs);
    for (uint32_t s = 0; s < n_steps && !bad_text; ++s) {
        uint64_t ns, ncf;
        steps[s].threshold = (uint32_t)num(f);
        seeds[s] = list(next(f), &ns, 0);
        int64_t *c = list(next(f), &ncf, 0);
        coefs[s] = (int32_t *)malloc((ncf + 1) * sizeof(int32_t));
        for (uint64_t i = 0; i < ncf; ++i) coefs[s][i] = (int32_t)c[i];
        free(c);
        if (ns != ncf) bad_text = 1;
        steps[s].seeds = seeds[s];
        steps[s].coefs = coefs[s];
        steps[s].n_members = (uint32_t)ns;
    }
    const char *want_sha = next(f);
    uint64_t want_changed = (uint64_t)num(f), want_dropped = (uint64_t)num(f);
    const char *want_res = next(f);
    qes_tensor h = host_tensor(type, n, data, nb, name, nl), t = {0};
    int32_t *res = (int32_t *)malloc((n + 1) * sizeof *res), *dres = NULL;
    uint8_t *out = (uint8_t *)malloc(nb + 1);
    qes_update_stats st = {0, 0};
    char hex[65];
    MUST(!bad_text && (!stored || nr == n), "bad update line");
    for (uint64_t i = 0; stored && i < n; ++i) res[i] = (int32_t)res_in[i];
    t = on_backend(b, &h);
    MUST(t.data, "alloc/upload");
    if (stored) {
        dres = (int32_t *)qes_backend_alloc(b, n * sizeof *res);
        MUST(dres && qes_backend_upload(b, dres, res, n * sizeof *res) == QES_OK, "residual alloc/upload");
    }
    MUST(qes_update(&t, steps, n_steps, dres, &prm, &st) == QES_OK, "type %d: update failed", type);
    MUST(qes_backend_download(b, out, t.data, nb) == QES_OK, "download");
    sha_hex(out, nb, hex);
    MUST(strcmp(hex, want_sha) == 0, "type %d %s: bytes after update %s, want %s", type, stored ? "stored" : "replay",
         hex, want_sha);
    MUST(st.changed == want_changed && st.dropped == want_dropped, "type %d %s: changed/dropped %llu/%llu, want %llu/%llu",
         type, stored ? "stored" : "replay", (unsigned long long)st.changed, (unsigned long long)st.dropped,
         (unsigned long long)want_changed, (unsigned long long)want_dropped);
    if (stored) {
        MUST(qes_backend_download(b, res, dres, n * sizeof *res) == QES_OK, "residual download");
        res_sha_hex(res, n, hex);
        MUST(strcmp(hex, want_res) == 0, "type %d stored: residual after %s, want %s", type, hex, want_res);
    } else {
        MUST(strcmp(want_res, "-") == 0, "a residual digest for a seed-replay case");
    }
done:
    if (t.data) qes_backend_free(b, t.data);
    if (dres) qes_backend_free(b, dres);
    for (uint32_t s = 0; s < n_steps; ++s) { free(seeds[s]); free(coefs[s]); }
    free(seeds); free(coefs); free(steps); free(name); free(data); free(res_in); free(res); free(out);
}

static void digest_case(fields *f, int b) {
    uint32_t nt = (uint32_t)num(f);
    qes_tensor host[8], dev[8], *ts[8];
    uint8_t *names[8] = {0}, *bytes[8] = {0};
    uint64_t name_lens[8];
    uint8_t d[32];
    char hex[65];
    uint32_t made = 0;
    MUST(!bad_text && nt <= 8, "bad digest line");
    for (; made < nt; ++made) {
        uint64_t nb;
        names[made] = hexbytes(next(f), &name_lens[made]);
        int type = (int)num(f);
        uint64_t n = (uint64_t)num(f);
        bytes[made] = hexbytes(next(f), &nb);
        host[made] = host_tensor(type, n, bytes[made], nb, names[made], name_lens[made]);
        dev[made] = on_backend(b, &host[made]);
        ts[made] = &dev[made];
        if (!dev[made].data) { ++made; FAIL("alloc/upload"); goto done; }
    }
    const char *want = next(f);
    MUST(!bad_text, "bad digest line");
    MUST(qes_digest(ts, nt, (const char **)names, name_lens, d) == QES_OK, "digest failed");
    hex32(d, hex);
    MUST(strcmp(hex, want) == 0, "weights digest %s, want %s", hex, want);
done:
    for (uint32_t i = 0; i < made; ++i) { if (dev[i].data) qes_backend_free(b, dev[i].data); }
    for (uint32_t i = 0; i < nt && i < 8; ++i) { free(names[i]); free(bytes[i]); }
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: golden_check noise-golden.txt  (python tests/golden_text.py writes it)\n"); return 2; }
    FILE *fp = fopen(argv[1], "r");
    if (!fp) { perror(argv[1]); return 2; }
    char *line = NULL;
    size_t cap = 0;
    /* the text once into memory: every backend reads the same lines */
    char **text = NULL;
    int n_lines = 0, n_cases = 0, declared = -1;
    while (getline(&line, &cap, fp) >= 0) {
        text = (char **)realloc(text, (size_t)(n_lines + 1) * sizeof *text);
        text[n_lines++] = strdup(line);
        if (line[0] == '#') sscanf(line, "# cases %d", &declared);
        else if (line[0] != '\n') ++n_cases;
    }
    free(line);
    fclose(fp);
    if (declared != n_cases || n_cases == 0) {
        fprintf(stderr, "golden_check: %s holds %d cases, its header says %d\n", argv[1], n_cases, declared);
        return 1;
    }
    char used[256] = "";
    int n_backends = 0;
    static fields f;
    for (int b = 0; b < qes_backend_count(); ++b) {
        if (!qes_backend_available(b)) { printf("backend %s: not available here\n", qes_backend_name(b)); continue; }
        if (qes_set_backend(b) != QES_OK) { fprintf(stderr, "golden_check: cannot set backend %s\n", qes_backend_name(b)); return 1; }
        cur_backend = qes_backend_name(b);
        int before = failures, ran = 0;
        for (int i = 0; i < n_lines; ++i) {
            if (text[i][0] == '#' || text[i][0] == '\n') continue;
            char *copy = strdup(text[i]);
            cur_line = i + 1;
            bad_text = 0;
            split(copy, &f);
            const char *kind = next(&f);
            if (strcmp(kind, "noise") == 0) noise_case(&f);
            else if (strcmp(kind, "codec") == 0) codec_case(&f);
            else if (strcmp(kind, "perturb") == 0) perturb_case(&f, b);
            else if (strcmp(kind, "update") == 0) update_case(&f, b);
            else if (strcmp(kind, "digest") == 0) digest_case(&f, b);
            else FAIL("unknown case kind %s", kind);
            if (bad_text || f.at != f.n) FAIL("malformed line (%d fields, %d read)", f.n, f.at);
            free(copy);
            ++ran;
        }
        printf("backend %s: %d cases, %s\n", cur_backend, ran, failures == before ? "all match" : "MISMATCH");
        fflush(stdout);
        snprintf(used + strlen(used), sizeof used - strlen(used), "%s%s", n_backends ? ", " : "", cur_backend);
        ++n_backends;
    }
    qes_set_backend(QES_BACKEND_AUTO);
    for (int i = 0; i < n_lines; ++i) free(text[i]);
    free(text);
    if (failures) { printf("golden_check: %d mismatches\n", failures); return 1; }
    printf("%d cases passed on %s\n", n_cases, used);
    return 0;
}
