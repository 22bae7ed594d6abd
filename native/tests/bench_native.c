/* Thread-scaling benchmark of the native pipeline alone (no Python), for machines without the
 * Python stack (e.g. a GPU node reached with only a binary). Model-like data: normal(0, 0.02)
 * values as bf16 or fp32. Prints one JSON object per measurement.
 *
 *   bench_native [MiB] [threads,threads,...] [reps] [scratch file]
 *
 * With a scratch file it also times durable writes: the raw buffer written in 4 MiB pwrites +
 * fsync (what an uncompressed checkpoint costs) against encode + aligned record writes + fsync.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../ckg.h"
#include "../pipeline.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t st = 88172645463325252ull;
static double unif(void) {
    st ^= st << 13;
    st ^= st >> 7;
    st ^= st << 17;
    return ((double)(st >> 11) + 0.5) / 9007199254740992.0;
}

static void model_like(uint8_t *buf, size_t len, unsigned elem) {
    size_t n = len / elem;
    for (size_t i = 0; i < n; i++) {
        float v = (float)(0.02 * sqrt(-2.0 * log(unif())) * cos(6.283185307179586 * unif()));
        uint32_t bits;
        memcpy(&bits, &v, 4);
        if (elem == 2) { /* bf16: round to nearest even, like torch */
            uint32_t r = bits + 0x7FFF + ((bits >> 16) & 1);
            uint16_t h = (uint16_t)(r >> 16);
            memcpy(buf + 2 * i, &h, 2);
        } else {
            memcpy(buf + 4 * i, &bits, 4);
        }
    }
}

/* One measurement as a JSON line: ``len`` bytes in ``secs`` seconds. */
static void report(const char *data, const char *op, int threads, size_t len, double secs) {
    printf("{\"data\":\"%s\",\"op\":\"%s\",\"threads\":%d,\"gbps\":%.3f}\n", data, op, threads,
           (double)len / secs / 1e9);
}

typedef struct {
    const uint8_t *buf;
    uint8_t *dst;
    size_t len;
} span_t;

static void op_memcpy(const span_t *s) { memcpy(s->dst, s->buf, s->len); }

static void op_hash(const span_t *s) {
    uint8_t h[16];
    ckg_hash128(s->buf, s->len, h);
}

/* The fastest of ``reps`` runs of ``op``, in seconds. */
static double best_of(int reps, void (*op)(const span_t *), const span_t *s) {
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        double t = now();
        op(s);
        t = now() - t;
        if (t < best) best = t;
    }
    return best;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 256;
    const char *tlist = argc > 2 ? argv[2] : "1,2,4,8,16";
    int reps = argc > 3 ? atoi(argv[3]) : 3;
    const char *path = argc > 4 ? argv[4] : NULL;
    if (mib < 4 || mib > (1u << 20) || reps < 1) return 1;
    size_t len = mib << 20, chunk = 4u << 20, n = ckg_nchunks(len, chunk);
    uint8_t *buf = malloc(len), *dst = malloc(len), **outs = malloc(n * sizeof *outs);
    ckg_rec_info *res = malloc(n * sizeof *res);
    ckg_decode_item *items = malloc(n * sizeof *items);
    if (!buf || !dst || !outs || !res || !items) return 1;
    for (size_t i = 0; i < n; i++) outs[i] = malloc(ckg_encode_bound(chunk));
    memset(dst, 1, len);
    for (size_t i = 0; i < n; i++) memset(outs[i], 1, ckg_encode_bound(chunk));
    ckg_failure f;
    unsigned elems[] = {2, 4};
    const char *names[] = {"bf16", "fp32"};
    for (int e = 0; e < 2; e++) {
        model_like(buf, len, elems[e]);
        span_t whole = {buf, dst, len};
        report(names[e], "memcpy", 1, len, best_of(reps, op_memcpy, &whole));
        report(names[e], "hash", 1, len, best_of(reps, op_hash, &whole));
        char tl[256];
        snprintf(tl, sizeof tl, "%s", tlist);
        for (char *tok = strtok(tl, ","); tok; tok = strtok(NULL, ",")) {
            int threads = atoi(tok);
            double be = 1e9, bd = 1e9;
            size_t stored = 0;
            for (int r = 0; r < reps; r++) {
                double t = now();
                if (ckg_encode_buffer(buf, len, elems[e], chunk, 1, 0, threads, outs, res, &f))
                    return 1;
                t = now() - t;
                if (t < be) be = t;
                stored = 0;
                for (size_t i = 0; i < n; i++) {
                    stored += res[i].stored_len;
                    items[i] = (ckg_decode_item){res[i].codec,      elems[e],       outs[i],
                                                 res[i].stored_len, res[i].raw_len, res[i].hash,
                                                 dst + i * chunk};
                }
                t = now();
                if (ckg_decode_many(items, n, threads, &f)) return 1;
                t = now() - t;
                if (t < bd) bd = t;
            }
            if (memcmp(dst, buf, len)) return 2;
            printf("{\"data\":\"%s\",\"op\":\"encode\",\"threads\":%d,\"gbps\":%.3f,"
                   "\"stored_ratio\":%.4f}\n",
                   names[e], threads, len / be / 1e9, (double)stored / (double)len);
            report(names[e], "decode", threads, len, bd);
            if (!path) continue;
            double bw = 1e9, braw = 1e9;
            for (int r = 0; r < reps; r++) {
                int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
                if (fd < 0) return 3;
                double t = now();
                for (size_t off = 0; off < len; off += chunk)
                    if (ckg_pwrite_all(fd, buf + off, len - off < chunk ? len - off : chunk,
                                       (off_t)off))
                        return 3;
                fsync(fd);
                t = now() - t;
                if (t < braw) braw = t;
                close(fd);
                fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
                ckg_write_args a = {fd, -1, buf, len, elems[e], chunk, 1, 0, 0, 0, NULL, 0};
                uint64_t end;
                int used;
                t = now();
                if (ckg_write_buffer(&a, threads, res, &end, &used, &f)) return 3;
                fsync(fd);
                t = now() - t;
                if (t < bw) bw = t;
                close(fd);
            }
            unlink(path);
            report(names[e], "durable_write_raw", threads, len, braw);
            report(names[e], "durable_write_encoded", threads, len, bw);
        }
    }
    return 0;
}
