/* Whole-buffer pipelines: chunk tasks on the pool, per-worker scratch, first failure wins. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pipeline.h"

/* Scratch space of each thread, kept across calls: a fresh 4 MiB buffer per call would cost a
 * page fault per 4 KiB on every call. At most two chunk-sized buffers per thread. */
static _Thread_local ckg_scratch tls_scratch, tls_recbuf, tls_aad;

/* Per-call state shared by all tasks: per-task status, an abort flag. */
typedef struct {
    int nworkers;
    int *rc;  /* [ntasks]: 0 ok, >0 error, -1 not run */
    int *err; /* [ntasks]: errno for CKG_E_IO */
    atomic_int abort;
} common_t;

static int common_init(common_t *c, int threads, size_t ntasks) {
    if (threads < 1) threads = 1;
    c->nworkers = threads;
    c->rc = malloc((ntasks ? ntasks : 1) * sizeof *c->rc);
    c->err = calloc(ntasks ? ntasks : 1, sizeof *c->err);
    atomic_init(&c->abort, 0);
    if (!c->rc || !c->err) return CKG_E_NOMEM;
    for (size_t i = 0; i < ntasks; i++) c->rc[i] = -1;
    return CKG_OK;
}

static void common_free(common_t *c) {
    free(c->rc);
    free(c->err);
}

/* The lowest-index failure (tasks are handed out in order, so every lower index has run). */
static int common_result(const common_t *c, size_t ntasks, ckg_failure *fail) {
    for (size_t i = 0; i < ntasks; i++) {
        if (c->rc[i] > 0) {
            fail->code = c->rc[i];
            fail->err = c->err[i];
            fail->index = i;
            return c->rc[i];
        }
    }
    for (size_t i = 0; i < ntasks; i++) {
        if (c->rc[i] < 0) { /* cannot happen without an error above; be safe */
            fail->code = CKG_E_NOMEM;
            fail->err = 0;
            fail->index = i;
            return CKG_E_NOMEM;
        }
    }
    fail->code = CKG_OK;
    fail->err = 0;
    fail->index = 0;
    return CKG_OK;
}

/* Tasks 0..ntasks-1 of fn on up to ``threads`` threads; ``ctx`` begins with ``c``. The
 * lowest-index failure goes to *fail and is returned (CKG_OK when every task succeeded). */
static int run_all(common_t *c, int threads, size_t ntasks, ckg_task_fn fn, void *ctx,
                   ckg_failure *fail) {
    int rc = common_init(c, threads, ntasks);
    if (rc) {
        *fail = (ckg_failure){rc, 0, 0};
    } else {
        ckg_parallel(threads, ntasks, fn, ctx);
        rc = common_result(c, ntasks, fail);
    }
    common_free(c);
    return rc;
}

static void fail_task(common_t *c, size_t t, int code, int err) {
    c->rc[t] = code;
    c->err[t] = err;
    atomic_store(&c->abort, 1);
}

/* ---- encode --------------------------------------------------------------------------- */

typedef struct {
    common_t c;
    const uint8_t *buf;
    size_t len, chunk;
    unsigned elem;
    int codec, level;
    uint8_t *const *outs;
    ckg_rec_info *res;
} enc_t;

static void enc_task(void *ctx, size_t t, int w) {
    (void)w;
    enc_t *e = ctx;
    if (atomic_load(&e->c.abort)) return;
    size_t off = t * e->chunk, n = e->len - off < e->chunk ? e->len - off : e->chunk;
    ckg_chunk ch;
    int rc = ckg_encode_chunk(e->buf + off, n, e->elem, e->codec, e->level, 0, e->outs[t],
                              ckg_encode_bound(n), &tls_scratch, &ch);
    if (rc) {
        fail_task(&e->c, t, rc, 0);
        return;
    }
    ckg_rec_info *r = &e->res[t];
    r->codec = ch.codec;
    r->raw_len = n;
    r->stored_len = ch.stored_len;
    r->offset = 0;
    memcpy(r->hash, ch.hash, 16);
    e->c.rc[t] = 0;
}

int ckg_encode_buffer(const uint8_t *buf, size_t len, unsigned elem, size_t chunk, int codec,
                      int level, int threads, uint8_t *const *outs, ckg_rec_info *res,
                      ckg_failure *fail) {
    size_t n = ckg_nchunks(len, chunk);
    enc_t e = {.buf = buf,
               .len = len,
               .chunk = chunk,
               .elem = elem,
               .codec = codec,
               .level = level,
               .outs = outs,
               .res = res};
    return run_all(&e.c, threads, n, enc_task, &e, fail);
}

/* ---- encode + write ------------------------------------------------------------------- */

/* One chunk of a batch: where it lies and what writing it measured. */
typedef struct {
    size_t seg, off, n;
    uint64_t enc_ns, write_ns, bytes;
    int direct; /* its record went through the O_DIRECT descriptor */
} wr_chunk;

typedef struct {
    common_t c;
    const ckg_batch_args *a;
    wr_chunk *chunks;
    ckg_rec_info *res;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t turn;       /* the chunk whose record is written next */
    uint64_t pos;      /* the next record offset */
    atomic_int direct; /* 1 while the O_DIRECT descriptor is usable */
} wr_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Wait until every earlier chunk's record is written; then *off is where ours goes. 0 if the
 * job was aborted. Only the thread whose turn it is writes, so records go out one at a time. */
static int wait_turn(wr_t *w, size_t t, uint64_t *off) {
    pthread_mutex_lock(&w->mu);
    while (w->turn != t && !atomic_load(&w->c.abort)) pthread_cond_wait(&w->cv, &w->mu);
    int ok = w->turn == t && !atomic_load(&w->c.abort);
    *off = w->pos;
    pthread_mutex_unlock(&w->mu);
    return ok;
}

static void pass_turn(wr_t *w, size_t extent) {
    pthread_mutex_lock(&w->mu);
    w->pos += extent;
    w->turn++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void wr_abort(wr_t *w, size_t t, int code, int err) {
    pthread_mutex_lock(&w->mu);
    fail_task(&w->c, t, code, err);
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

#ifdef SYNC_FILE_RANGE_WRITE
/* Buffered records: start writeback early and bound what is dirty. The disk works while later
 * chunks are encoded and the one fsync at the end has little left. Writeback goes by whole
 * windows of the file, started by the record that ends past a window (one call per record
 * started 10,000 tiny I/Os for 10,000 small tensors); the same windows CKG_WRITEBACK_LAG behind
 * are awaited. Waiting collects the file's writeback error (a later fsync would not see it
 * again), so an error here fails the write; a file that cannot sync ranges is not an error. */
static int writeback(int fd, uint64_t pos, size_t extent) {
    uint64_t mask = ~(uint64_t)(CKG_WRITEBACK_WINDOW - 1);
    uint64_t lo = pos & mask, hi = (pos + extent) & mask;
    if (hi == lo) return 0;
    (void)sync_file_range(fd, (off_t)lo, (off_t)(hi - lo), SYNC_FILE_RANGE_WRITE);
    if (hi <= CKG_WRITEBACK_LAG) return 0;
    lo = lo > CKG_WRITEBACK_LAG ? lo - CKG_WRITEBACK_LAG : 0;
    hi -= CKG_WRITEBACK_LAG;
    unsigned flags =
        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (sync_file_range(fd, (off_t)lo, (off_t)(hi - lo), flags) == 0) return 0;
    int err = errno;
    return err == EINVAL || err == ENOSYS || err == ESPIPE || err == EOPNOTSUPP ? 0 : err;
}

int ckg_wait_written(int fd, uint64_t off, uint64_t len) {
    unsigned flags =
        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (sync_file_range(fd, (off_t)off, (off_t)len, flags) == 0) return 0;
    int err = errno;
    return err == EINVAL || err == ENOSYS || err == ESPIPE || err == EOPNOTSUPP ? 0 : err;
}
#else
static int writeback(int fd, uint64_t pos, size_t extent) {
    (void)fd;
    (void)pos;
    (void)extent;
    return 0;
}

int ckg_wait_written(int fd, uint64_t off, uint64_t len) {
    (void)fd;
    (void)off;
    (void)len;
    return 0;
}
#endif

/* Write one whole record (header, payload and padding in one aligned buffer); *via_direct says
 * whether it went through the O_DIRECT descriptor. */
static int write_record(wr_t *w, int direct, const uint8_t *rec, size_t extent, uint64_t pos,
                        int *via_direct) {
    const ckg_batch_args *a = w->a;
    *via_direct = 0;
    if (direct && atomic_load(&w->direct)) {
        int err = ckg_pwrite_all(a->dfd, rec, extent, (off_t)pos);
        if (err != EINVAL) {
            *via_direct = !err;
            return err;
        }
        atomic_store(&w->direct, 0); /* the file system refuses O_DIRECT here: buffered now */
    }
    int err = ckg_pwrite_all(a->fd, rec, extent, (off_t)pos);
    return err ? err : writeback(a->fd, pos, extent);
}

static void put_u(uint8_t **p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) *(*p)++ = (uint8_t)(v >> (8 * i));
}

/* Seal chunk k's encoded payload (ch->stored_len bytes at payload, with room for the tag after
 * it) in place: header h becomes the sealed record's (flag, nonce, stored length, the xxh3-128
 * of the stored bytes); ch->hash becomes the row's fingerprint and, with digests, ch->digest
 * the SHA-256 of the stored bytes (docs/format.md section 4.4). */
static int seal_record(wr_t *w, const wr_chunk *k, uint8_t *payload, ckg_rec_header *h,
                       ckg_chunk *ch) {
    const ckg_batch_args *a = w->a;
    const ckg_seal_args *s = a->segs[k->seg].seal;
    ckg_scratch *ab = &tls_aad;
    size_t one_row = 8 + 8 + 4 + 8;
    int rc = ckg_scratch_reserve(ab, 62 + (s->nrows ? 0 : one_row) + s->rows_len);
    if (rc) return rc;
    uint8_t *p = ab->buf;
    memcpy(p, "CKGSEAL1", 8);
    p += 8;
    memcpy(p, a->uuid, 16);
    p += 16;
    put_u(&p, a->rank, 4);
    put_u(&p, h->seq, 4);
    memcpy(p, s->key_id, 16);
    p += 16;
    put_u(&p, (uint64_t)h->codec, 1);
    put_u(&p, h->elem, 1);
    put_u(&p, h->raw_len, 8);
    put_u(&p, s->nrows ? s->nrows : 1, 4);
    if (!s->nrows) { /* a stretch: its chunk's one row, then the row's shard and key */
        uint64_t chunk = s->first + k->off / a->chunk;
        put_u(&p, 0, 8);
        put_u(&p, h->raw_len, 8);
        put_u(&p, chunk, 4);
        put_u(&p, chunk * a->chunk, 8);
    }
    memcpy(p, s->rows, s->rows_len);
    p += s->rows_len;
    uint8_t *nonce = h->nonce, *q = nonce;
    memset(nonce, 0, CKG_NONCE);
    put_u(&q, h->seq, 4);
    rc = ckg_seal_payload(s->rkey, nonce, ab->buf, (size_t)(p - ab->buf), payload, ch->stored_len,
                          payload + ch->stored_len);
    if (rc) return rc;
    h->flags = CKG_SEALED;
    h->stored_len = ch->stored_len + CKG_TAG;
    ckg_hash128(payload, h->stored_len, h->hash);
    if (a->digest && (rc = ckg_sha256_with(&tls_scratch, payload, h->stored_len, ch->digest)))
        return rc;
    uint8_t fp[16];
    if ((rc = ckg_fingerprint(s->fkey, ch->hash, fp))) return rc;
    memcpy(ch->hash, fp, 16);
    return CKG_OK;
}

static void wr_task(void *ctx, size_t t, int wk) {
    (void)wk;
    wr_t *w = ctx;
    if (atomic_load(&w->c.abort)) return;
    uint64_t t0 = now_ns();
    wr_chunk *k = &w->chunks[t];
    const ckg_segment *sg = &w->a->segs[k->seg];
    size_t n = k->n;
    ckg_scratch *rb = &tls_recbuf;
    size_t cap = ckg_encode_bound(n);
    int rc = ckg_scratch_reserve(rb, ckg_align_up(CKG_REC_HDR + cap + CKG_TAG));
    ckg_chunk ch;
    if (!rc)
        rc = ckg_encode_chunk(sg->buf + k->off, n, sg->elem, sg->codec, sg->level, w->a->digest,
                              rb->buf + CKG_REC_HDR, cap, &tls_scratch, &ch);
    if (rc) {
        wr_abort(w, t, rc, 0);
        return;
    }
    ckg_rec_header h = {ch.codec, sg->elem, n, ch.stored_len, {0}, w->a->seq0 + (uint32_t)t,
                        0,        {0}};
    memcpy(h.hash, ch.hash, 16);
    if (sg->seal && (rc = seal_record(w, k, rb->buf + CKG_REC_HDR, &h, &ch))) {
        wr_abort(w, t, rc, 0);
        return;
    }
    ckg_pack_record_header(rb->buf, &h);
    size_t used = CKG_REC_HDR + h.stored_len, extent = ckg_align_up(used);
    memset(rb->buf + used, 0, extent - used);
    uint64_t t1 = now_ns(), pos;
    k->enc_ns = t1 - t0;
    if (!wait_turn(w, t, &pos)) return;
    uint64_t t2 = now_ns();
    int err = write_record(w, sg->direct, rb->buf, extent, pos, &k->direct);
    if (err) {
        wr_abort(w, t, CKG_E_IO, err);
        return;
    }
    k->write_ns = now_ns() - t2;
    k->bytes = extent;
    ckg_rec_info *r = &w->res[t];
    r->codec = ch.codec;
    r->raw_len = n;
    r->stored_len = h.stored_len;
    r->offset = pos;
    memcpy(r->hash, ch.hash, 16); /* of a sealed record: the fingerprint (seal_record) */
    if (w->a->digest) memcpy(r->digest, ch.digest, CKG_DIGEST);
    w->c.rc[t] = 0;
    pass_turn(w, extent);
}

/* The chunks of every segment, in order (NULL if out of memory); *n is their count. */
static wr_chunk *cut_segments(const ckg_batch_args *a, size_t *n) {
    size_t total = 0;
    for (size_t s = 0; s < a->nsegs; s++) total += ckg_nchunks(a->segs[s].len, a->chunk);
    wr_chunk *ks = calloc(total ? total : 1, sizeof *ks);
    if (!ks) return NULL;
    size_t t = 0;
    for (size_t s = 0; s < a->nsegs; s++) {
        size_t len = a->segs[s].len;
        for (size_t off = 0; off < len; off += a->chunk, t++) {
            ks[t].seg = s;
            ks[t].off = off;
            ks[t].n = len - off < a->chunk ? len - off : a->chunk;
        }
    }
    *n = total;
    return ks;
}

/* Each segment's sums of what its chunks measured. */
static void segment_stats(const wr_t *w, size_t n, ckg_segment_stats *stats) {
    const ckg_batch_args *a = w->a;
    for (size_t s = 0; s < a->nsegs; s++)
        stats[s] = (ckg_segment_stats){{0, 0, 0}, a->segs[s].direct && a->dfd >= 0};
    for (size_t t = 0; t < n; t++) {
        const wr_chunk *k = &w->chunks[t];
        ckg_segment_stats *st = &stats[k->seg];
        st->st.enc_ns += k->enc_ns;
        st->st.write_ns += k->write_ns;
        st->st.bytes += k->bytes;
        st->direct_used = st->direct_used && k->direct;
    }
}

int ckg_write_segments(const ckg_batch_args *a, int threads, ckg_rec_info *res,
                       ckg_segment_stats *stats, uint64_t *end, ckg_failure *fail) {
    size_t n = 0;
    wr_t w = {.a = a, .res = res, .turn = 0, .pos = a->pos};
    *end = a->pos;
    w.chunks = cut_segments(a, &n);
    if (!w.chunks) {
        *fail = (ckg_failure){CKG_E_NOMEM, 0, 0};
        return CKG_E_NOMEM;
    }
    atomic_init(&w.direct, a->dfd >= 0);
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    int rc = run_all(&w.c, threads, n, wr_task, &w, fail);
    pthread_cond_destroy(&w.cv);
    pthread_mutex_destroy(&w.mu);
    if (!rc) {
        *end = w.pos;
        segment_stats(&w, n, stats);
    }
    free(w.chunks);
    return rc;
}

int ckg_write_buffer(const ckg_write_args *a, int threads, ckg_rec_info *res, uint64_t *end,
                     int *direct_used, ckg_failure *fail) {
    ckg_segment seg = {a->buf, a->len, a->elem, a->codec, a->level, a->dfd >= 0, NULL};
    ckg_batch_args b = {a->fd, a->dfd, a->chunk, a->pos, a->seq0, &seg, 1, a->digest, NULL, 0};
    ckg_segment_stats st = {{0, 0, 0}, 0};
    int rc = ckg_write_segments(&b, threads, res, &st, end, fail);
    if (a->stats) *a->stats = st.st;
    *direct_used = rc ? 0 : st.direct_used;
    return rc;
}

/* ---- decode --------------------------------------------------------------------------- */

typedef struct {
    common_t c;
    const ckg_decode_item *items;
} dec_t;

static void dec_task(void *ctx, size_t t, int w) {
    (void)w;
    dec_t *d = ctx;
    if (atomic_load(&d->c.abort)) return;
    const ckg_decode_item *it = &d->items[t];
    int rc = ckg_decode_chunk(it->codec, it->payload, it->stored_len, it->raw_len, it->elem,
                              it->dst, &tls_scratch, it->hash, NULL);
    if (rc)
        fail_task(&d->c, t, rc, 0);
    else
        d->c.rc[t] = 0;
}

int ckg_decode_many(const ckg_decode_item *items, size_t n, int threads, ckg_failure *fail) {
    dec_t d = {.items = items};
    return run_all(&d.c, threads, n, dec_task, &d, fail);
}

/* ---- read + decode -------------------------------------------------------------------- */

typedef struct {
    common_t c;
    int fd;
    int verify;
    size_t n;
    const ckg_read_item *items;
} rd_t;

static void rd_task(void *ctx, size_t t, int w) {
    (void)w;
    rd_t *r = ctx;
    if (atomic_load(&r->c.abort)) return;
    const ckg_read_item *it = &r->items[t];
    ckg_scratch *rb = &tls_recbuf;
    int rc = ckg_scratch_reserve(rb, it->extent);
    if (rc) {
        fail_task(&r->c, t, rc, 0);
        return;
    }
    size_t ahead = t + (size_t)r->c.nworkers; /* start reading what a worker takes next */
    if (ahead < r->n)
        (void)posix_fadvise(r->fd, (off_t)r->items[ahead].offset, (off_t)r->items[ahead].extent,
                            POSIX_FADV_WILLNEED);
    size_t got = 0;
    int err = ckg_pread_all(r->fd, rb->buf, it->extent, (off_t)it->offset, &got);
    if (err) {
        fail_task(&r->c, t, CKG_E_IO, err);
        return;
    }
    if (got != it->extent) {
        fail_task(&r->c, t, CKG_E_TRUNCATED, 0);
        return;
    }
    if (it->seal.rkey)
        rc = ckg_open_record(rb->buf, it->extent, &it->want, it->check_seq, &it->seal, it->dst,
                             &tls_scratch, r->verify, it->digest);
    else
        rc = ckg_decode_record(rb->buf, it->extent, &it->want, it->check_seq, it->dst, &tls_scratch,
                               r->verify, it->digest);
    if (rc)
        fail_task(&r->c, t, rc, 0);
    else
        r->c.rc[t] = 0;
}

int ckg_read_records(int fd, const ckg_read_item *items, size_t n, int threads, int verify,
                     ckg_failure *fail) {
    for (size_t i = 0; i < n; i++) { /* cheap structural checks before any I/O */
        const ckg_read_item *it = &items[i];
        if (it->offset % CKG_ALIGN || it->extent % CKG_ALIGN || it->extent < CKG_REC_HDR ||
            it->want.stored_len > it->extent - CKG_REC_HDR ||
            it->offset > (uint64_t)INT64_MAX - it->extent) {
            *fail = (ckg_failure){CKG_E_MISMATCH, 0, i};
            return CKG_E_MISMATCH;
        }
    }
    if (n) {
        uint64_t lo = items[0].offset, hi = items[0].offset + items[0].extent;
        for (size_t i = 1; i < n; i++) {
            if (items[i].offset < lo) lo = items[i].offset;
            if (items[i].offset + items[i].extent > hi) hi = items[i].offset + items[i].extent;
        }
        (void)posix_fadvise(fd, (off_t)lo, (off_t)(hi - lo), POSIX_FADV_SEQUENTIAL);
    }
    rd_t r = {.fd = fd, .verify = verify, .n = n, .items = items};
    return run_all(&r.c, threads, n, rd_task, &r, fail);
}

ckg_scratch *ckg_thread_scratch(void) { return &tls_scratch; }

void ckg_release_thread_buffers(void) {
    ckg_scratch_free(&tls_scratch);
    ckg_scratch_free(&tls_recbuf);
    ckg_scratch_free(&tls_aad);
}
