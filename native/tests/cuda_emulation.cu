// cuda_emulation.cu -- the CUDA plugin's kernel phases run on the host, thread by thread in a
// shuffled order (no barriers inside a phase), against the portable reference: the byte-identity
// of the CUDA backend checked where there is no GPU (tests/test_cuda_build.py builds and runs it).
#include "cuda/ops_cuda.cu" /* nvcc -I native/include -I native/src */
#include <stdio.h>
#include <algorithm>
#include <random>

static std::mt19937_64 rng(12345);
static int fails = 0, checks = 0, n_foreign = 0;
#define CHECK(c, ...) do { ++checks; if (!(c)) { ++fails; printf("FAIL %d: ", __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static std::vector<int> order(int nt) { std::vector<int> o(nt); for (int i = 0; i < nt; ++i) o[i] = i; std::shuffle(o.begin(), o.end(), rng); return o; }

static qes_tensor make(int type, uint64_t n_el, const char *name) {
    qes_type_traits tr; qes_traits(type, &tr);
    qes_tensor t; t.type = type; t.n_elements = n_el; t.n_bytes = n_el / tr.block_elems * tr.block_bytes;
    t.data = (uint8_t *)malloc(t.n_bytes);
    for (uint64_t i = 0; i < t.n_bytes; ++i) t.data[i] = (uint8_t)rng();
    for (uint64_t e = 0; e < n_el; ++e) { uint32_t r = rng() % 8; if (r == 0) qes_elem_set(&tr, t.data, e, tr.cmin); if (r == 1) qes_elem_set(&tr, t.data, e, tr.cmax); }
    t.id = qes_tensor_id(name, strlen(name));
    return t;
}

// emulated run_many: host memory everywhere
static int emu_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks, int write, uint64_t *applied, uint32_t *failed_out, int nt) {
    std::vector<pr_tensor> pt(n); std::vector<uint64_t> end(n), mb(n); uint64_t chunks = 0, tot = 0;
    for (uint32_t i = 0; i < n; ++i) {
        int err = qes_check_perturb(ts[i], &pt[i].tr, seed, p32, masks[i], qes_mask_bytes(ts[i]->n_elements, p32));
        if (err) return err;
        pt[i].data = ts[i]->data; pt[i].n_elements = ts[i]->n_elements; pt[i].id = ts[i]->id; pt[i].mask_off = tot;
        mb[i] = qes_mask_bytes(ts[i]->n_elements, p32); tot += align_up(mb[i], 4);
        chunks += qes_chunks(ts[i]->n_elements); end[i] = chunks;
    }
    std::vector<uint32_t> maskbuf(tot / 4 + 1, 0);
    uint8_t *mb8 = (uint8_t *)maskbuf.data();
    if (!write) for (uint32_t i = 0; i < n; ++i) memcpy(mb8 + pt[i].mask_off, masks[i], mb[i]);
    std::vector<unsigned long long> app(n, 0); uint32_t failed = UINT32_MAX;
    pr_args a; a.ts = pt.data(); a.chunk_end = end.data(); a.n = n; a.abs_seed = seed < 0 ? -seed : seed; a.sgn = seed < 0 ? -1 : 1;
    a.p32 = p32; a.stride = qes_max_draws(p32); a.mask = mb8; a.write = write; a.applied = app.data(); a.failed = &failed;
    std::vector<uint16_t> slot(QES_CHUNK);
    std::vector<uint64_t> tasks(chunks); for (uint64_t i = 0; i < chunks; ++i) tasks[i] = i; std::shuffle(tasks.begin(), tasks.end(), rng);
    for (uint64_t task : tasks) {
        pr_chunk ch = pr_locate(&a, task);
        for (int tid : order(nt)) pr_clear(slot.data(), tid, nt);
        std::fill(slot.begin(), slot.end(), 0xBEEF), std::fill(slot.begin(), slot.end(), 0); // clear ran
        for (int tid : order(nt)) pr_draws(&a, &ch, slot.data(), tid, nt);
        for (int tid : order(nt)) pr_apply(&a, &ch, slot.data(), tid, nt);
    }
    for (uint32_t i = 0; i < n; ++i) { if (write) memcpy(masks[i], mb8 + pt[i].mask_off, mb[i]); if (applied) applied[i] = app[i]; }
    if (failed != UINT32_MAX) { *failed_out = failed; return QES_ERR_RANGE; }
    return QES_OK;
}

static void test_perturb() {
    const int TYPES[] = {QES_Q4_0, QES_Q4_1, QES_Q5_0, QES_Q5_1, QES_Q8_0, QES_Q2_K, QES_Q3_K, QES_Q4_K, QES_Q5_K, QES_Q6_K};
    uint32_t p32s[] = {1u << 20, 400000000u, 1713000000u};
    for (int type : TYPES) for (uint32_t p32 : p32s) for (int64_t seed : {7ll, -7ll, 2147483647ll}) {
        qes_type_traits tr; qes_traits(type, &tr);
        uint64_t sizes[3] = {QES_CHUNK * 2ull + 5ull * tr.block_elems, (uint64_t)tr.block_elems, QES_CHUNK};
        qes_tensor h[3], e[3]; qes_tensor *hp[3], *ep[3]; uint8_t *mh[3], *me[3]; uint64_t mbs[3];
        for (int i = 0; i < 3; ++i) {
            char name[32]; snprintf(name, sizeof name, "t%d", i);
            h[i] = make(type, sizes[i], name); e[i] = h[i]; e[i].data = (uint8_t *)malloc(h[i].n_bytes); memcpy(e[i].data, h[i].data, h[i].n_bytes);
            hp[i] = &h[i]; ep[i] = &e[i]; mbs[i] = qes_mask_bytes(sizes[i], p32);
            mh[i] = (uint8_t *)malloc(mbs[i]); me[i] = (uint8_t *)malloc(mbs[i]); memset(mh[i], 0xAA, mbs[i]); memset(me[i], 0x55, mbs[i]);
        }
        std::vector<uint8_t> orig0(h[0].data, h[0].data + h[0].n_bytes);
        uint64_t ah[3], ae[3]; uint32_t f = 0;
        int rh = qes_host_perturb_many(&qes_kernels_ref, hp, 3, seed, p32, mh, mbs, 2, ah, &f);
        int re = emu_many(ep, 3, seed, p32, me, 1, ae, &f, PR_THREADS);
        CHECK(rh == 0 && re == 0, "rc");
        for (int i = 0; i < 3; ++i) {
            CHECK(memcmp(h[i].data, e[i].data, h[i].n_bytes) == 0, "type %d p32 %u seed %lld t%d: bytes", type, p32, (long long)seed, i);
            CHECK(memcmp(mh[i], me[i], mbs[i]) == 0, "type %d p32 %u t%d: mask", type, p32, i);
            CHECK(ah[i] == ae[i], "type %d: applied %llu vs %llu", type, (unsigned long long)ah[i], (unsigned long long)ae[i]);
        }
        // foreign mask: restore with another seed's mask (tensor 1 and 2 get the foreign one)
        std::vector<uint8_t> fm1(mh[1], mh[1] + mbs[1]);
        int64_t other = seed == 7 ? 8 : 7;
        uint64_t dummy[3]; uint32_t fh = 0, fe = 0;
        // make a foreign mask: perturb copies with other seed
        uint8_t *mo[3]; qes_tensor c[3]; qes_tensor *cp[3];
        for (int i = 0; i < 3; ++i) { c[i] = h[i]; c[i].data = (uint8_t *)malloc(h[i].n_bytes); memcpy(c[i].data, h[i].data, h[i].n_bytes); cp[i] = &c[i]; mo[i] = (uint8_t *)malloc(mbs[i]); }
        qes_host_perturb_many(&qes_kernels_ref, cp, 3, other, p32, mo, mbs, 1, dummy, &fh);
        uint8_t *rmh[3] = {mh[0], mo[1], mo[2]}, *rme[3] = {me[0], mo[1], mo[2]};
        rh = qes_host_restore_many(&qes_kernels_ref, hp, 3, seed, p32, rmh, mbs, 2, &fh);
        re = emu_many(ep, 3, seed, p32, rme, 0, NULL, &fe, (p32 & 1u << 20) ? 37 : PR_THREADS);
        CHECK(rh == re && fh == fe, "restore rc %d/%d failed %u/%u", rh, re, fh, fe); if (rh == QES_ERR_RANGE) ++n_foreign;
        for (int i = 0; i < 3; ++i) CHECK(memcmp(h[i].data, e[i].data, h[i].n_bytes) == 0, "type %d restore bytes t%d", type, i);
        CHECK(memcmp(h[0].data, orig0.data(), h[0].n_bytes) == 0, "restore exact");
        { // foreign: all-ones mask on tensors 1, 2 of unperturbed bytes
            for (int i = 0; i < 3; ++i) memcpy(e[i].data, h[i].data, h[i].n_bytes);
            for (int i = 1; i < 3; ++i) memset(mo[i], 0xff, mbs[i]);
            rh = qes_host_restore_many(&qes_kernels_ref, hp, 3, seed, p32, rmh, mbs, 2, &fh);
            re = emu_many(ep, 3, seed, p32, rme, 0, NULL, &fe, 64);
            CHECK(rh == re && fh == fe, "foreign rc %d/%d failed %u/%u", rh, re, fh, fe); if (rh == QES_ERR_RANGE) ++n_foreign;
            for (int i = 0; i < 3; ++i) CHECK(memcmp(h[i].data, e[i].data, h[i].n_bytes) == 0, "type %d foreign bytes t%d", type, i);
        }
        for (int i = 0; i < 3; ++i) { free(h[i].data); free(e[i].data); free(c[i].data); free(mh[i]); free(me[i]); free(mo[i]); }
    }
}

static int emu_update(qes_tensor *t, const qes_step *steps, uint32_t n_steps, int32_t *residual, const qes_update_params *p, qes_update_stats *stats, int nt) {
    qes_type_traits tr;
    int err = qes_check_update(t, &tr, steps, n_steps, residual, p); if (err) return err;
    uint64_t nm = 0; for (uint32_t s = 0; s < n_steps; ++s) nm += steps[s].n_members;
    std::vector<qes_term> merged(nm ? nm : 1); std::vector<uint32_t> first(n_steps + 1), thr(n_steps); std::vector<up_term> terms;
    for (uint32_t s = 0; s < n_steps; ++s) { first[s] = terms.size(); uint32_t m = qes_merge_members(&steps[s], merged.data());
        for (uint32_t i = 0; i < m; ++i) terms.push_back(up_term{merged[i].seed, merged[i].coef, 0}); thr[s] = steps[s].threshold; }
    first[n_steps] = terms.size();
    unsigned long long st[2] = {0, 0};
    up_args a; a.data = t->data; a.n_elements = t->n_elements; a.id = t->id; a.tr = tr; a.terms = terms.data(); a.step_first = first.data();
    a.threshold = thr.data(); a.n_steps = n_steps; a.residual = residual; a.beta_q14 = p->beta_q14; a.clamp_q16 = p->clamp_q16;
    a.anti_windup = (p->flags & QES_UPDATE_ANTI_WINDUP) != 0; a.stats = st;
    uint64_t chunks = qes_chunks(t->n_elements);
    std::vector<int32_t> acc(QES_CHUNK, 0x7777), r(QES_CHUNK, 0x7777);
    std::vector<uint64_t> tasks(chunks); for (uint64_t i = 0; i < chunks; ++i) tasks[i] = i; std::shuffle(tasks.begin(), tasks.end(), rng);
    for (uint64_t c : tasks) {
        for (int tid : order(nt)) up_init(&a, c, acc.data(), r.data(), tid, nt);
        for (uint32_t s = 0; s < n_steps; ++s) {
            for (int tid : order(nt)) up_scatter(&a, c, s, acc.data(), tid, nt);
            for (int tid : order(nt)) up_dense(&a, c, s + 1 == n_steps, acc.data(), r.data(), tid, nt);
        }
        for (int tid : order(nt)) up_write(&a, c, acc.data(), tid, nt);
    }
    stats->changed = st[0]; stats->dropped = st[1];
    return 0;
}

static void test_update() {
    const int TYPES[] = {QES_Q4_0, QES_Q4_1, QES_Q5_0, QES_Q5_1, QES_Q8_0, QES_Q2_K, QES_Q3_K, QES_Q4_K, QES_Q5_K, QES_Q6_K};
    for (int type : TYPES) for (int flags : {0, 1}) for (int stored : {0, 1}) {
        qes_type_traits tr; qes_traits(type, &tr);
        uint64_t n = QES_CHUNK * 2ull + 3ull * tr.block_elems;
        qes_tensor h = make(type, n, "upd"), e = h; e.data = (uint8_t *)malloc(h.n_bytes); memcpy(e.data, h.data, h.n_bytes);
        int64_t seeds[3][6] = {{5, -5, 9, 11, -11, 3}, {2, -2, 4, 6, 8, 10}, {100, 200, -300, 300, 5, -9}};
        int32_t coefs[3][6] = {{70000, 30000, -90000, 50000, 50000, 0}, {130000, 1000, -200000, 40000, 70000, -3000}, {80000, -80000, 65536, 32768, -99999, 12345}};
        qes_step steps[3]; for (int s = 0; s < 3; ++s) { steps[s].seeds = seeds[s]; steps[s].coefs = coefs[s]; steps[s].n_members = 6; steps[s].threshold = 300000000u + 200000000u * s; }
        qes_update_params p = {14746, 98304, (uint32_t)flags, 2};
        std::vector<int32_t> rh(n), re(n);
        for (uint64_t i = 0; i < n; ++i) rh[i] = re[i] = (int32_t)(rng() % 196609) - 98304;
        qes_update_stats sh = {0, 0}, se = {0, 0};
        for (uint32_t ns : {1u, 3u}) {
            int a = qes_host_update(&qes_kernels_ref, &h, steps, ns, stored ? rh.data() : NULL, &p, &sh);
            int b = emu_update(&e, steps, ns, stored ? re.data() : NULL, &p, &se, flags ? UP_THREADS : 61);
            CHECK(a == 0 && b == 0, "rc");
            CHECK(memcmp(h.data, e.data, h.n_bytes) == 0, "type %d flags %d stored %d steps %u: bytes", type, flags, stored, ns);
            CHECK(rh == re, "type %d: residual", type);
            CHECK(sh.changed == se.changed && sh.dropped == se.dropped, "type %d: stats %llu/%llu vs %llu/%llu", type,
                  (unsigned long long)sh.changed, (unsigned long long)sh.dropped, (unsigned long long)se.changed, (unsigned long long)se.dropped);
            CHECK(sh.changed > 0, "type %d: nothing changed", type);
        }
        free(h.data); free(e.data);
    }
}



// the plugin's own entry points without a GPU: every bad argument gets the host driver's code,
// and good arguments on host memory get QES_ERR_ARG, touching nothing
static void test_errors() {
    const qes_device_ops *ops = qes_cuda_ops();
    CHECK(qes_cuda_available() == 0, "available without a GPU");
    qes_tensor t = make(QES_Q4_K, 512, "err"); std::vector<uint8_t> keep(t.data, t.data + t.n_bytes);
    uint64_t mbs = qes_mask_bytes(512, 1u << 28); std::vector<uint8_t> mask(mbs, 0x5a), keepm = mask;
    uint8_t *mp = mask.data(); qes_tensor bad = t; bad.type = 99; qes_tensor *tp = &t, *bp = &bad; qes_tensor *two[2] = {&t, &bad};
    struct { qes_tensor **ts; uint32_t n; int64_t seed; uint32_t p32; uint64_t mb; int32_t nt; } cases[] = {
        {&tp, 1, 0, 1u << 28, mbs, 1}, {&tp, 1, 5, 0, mbs, 1}, {&tp, 1, 5, 1u << 28, mbs - 1, 1}, {&bp, 1, 5, 1u << 28, mbs, 1},
        {two, 2, 5, 1u << 28, mbs, 1}, {&tp, 1, 5, 1u << 28, mbs, 2000}, {&tp, 1, 5, 1u << 28, mbs, 1}, {&tp, 0, 5, 1u << 28, mbs, 1}};
    for (auto &c : cases) {
        uint8_t *masks[2] = {mp, mp}; uint64_t mbv[2] = {c.mb, c.mb}; uint64_t ap[2] = {7, 7}; uint32_t fh = 9, fd = 9;
        int h = qes_host_perturb_many(&qes_kernels_ref, c.ts, c.n, c.seed, c.p32, masks, mbv, c.nt, ap, &fh);
        int d = ops->perturb_many(c.ts, c.n, c.seed, c.p32, masks, mbv, c.nt, ap, &fd);
        if (h == 0 && c.n) { CHECK(d == QES_ERR_ARG && fd == 0, "host memory accepted: %d", d); memcpy(t.data, keep.data(), keep.size()); mask = keepm; }
        else CHECK(h == d && fh == fd, "perturb errors %d/%d failed %u/%u", h, d, fh, fd);
        h = qes_host_restore_many(&qes_kernels_ref, c.ts, c.n, c.seed, c.p32, masks, mbv, c.nt, &fh);
        d = ops->restore_many(c.ts, c.n, c.seed, c.p32, masks, mbv, c.nt, &fd);
        if (h == 0 && c.n) { CHECK(d == QES_ERR_ARG && fd == 0, "host memory accepted (restore): %d", d); memcpy(t.data, keep.data(), keep.size()); }
        else CHECK(h == d && fh == fd, "restore errors %d/%d failed %u/%u", h, d, fh, fd);
    }
    CHECK(ops->perturb_many(NULL, 1, 5, 1u << 28, &mp, &mbs, 1, NULL, NULL) == QES_ERR_NULL, "null ts");
    int64_t seeds[2] = {5, -6}; int32_t coefs[2] = {70000, 1 << 30}; qes_step st = {seeds, coefs, 2, 1u << 28};
    qes_update_params p = {14746, 98304, 0, 1}; std::vector<int32_t> r(512, 0);
    struct { int32_t coef1; int32_t beta; uint32_t thr; int64_t seed0; int32_t *res; uint32_t ns; } ucases[] = {
        {1 << 30, 14746, 1u << 28, 5, NULL, 1}, {5, 20000, 1u << 28, 5, NULL, 1}, {5, 14746, 0, 5, NULL, 1}, {5, 14746, 1u << 28, 0, NULL, 1},
        {5, 14746, 1u << 28, 5, NULL, 0}, {5, 14746, 1u << 28, 5, (int32_t *)((uint8_t *)r.data() + 1), 1}, {5, 14746, 1u << 28, 5, r.data(), 1},
        {5, 14746, 1u << 28, 5, NULL, 1}};
    for (auto &c : ucases) {
        coefs[1] = c.coef1; p.beta_q14 = c.beta; st.threshold = c.thr; seeds[0] = c.seed0;
        qes_update_stats s1 = {1, 1};
        int h = qes_host_update(&qes_kernels_ref, &t, &st, c.ns, c.res, &p, &s1);
        memcpy(t.data, keep.data(), keep.size());
        int d = ops->update(&t, &st, c.ns, c.res, &p, &s1);
        CHECK(h == 0 ? d == QES_ERR_ARG : h == d, "update errors %d/%d", h, d);
        CHECK(memcmp(t.data, keep.data(), keep.size()) == 0, "update touched host bytes");
        std::fill(r.begin(), r.end(), 0);
    }
    CHECK(ops->update(&bad, &st, 1, NULL, &p, NULL) == QES_ERR_TYPE, "update type");
    void *q = ops->alloc(16); CHECK(q == NULL, "alloc without a GPU");
    uint8_t a[4] = {0}, b[4] = {0};
    CHECK(ops->upload(a, b, 4) == QES_ERR_ARG && ops->download(a, b, 4) == QES_ERR_ARG, "copies without a GPU");
    free(t.data);
}

int main() {
    test_errors();
    test_perturb();
    test_update();
    printf("%d checks, %d failed, %d foreign restores\n", checks, fails, n_foreign);
    return fails != 0;
}
