/* C tests of the native chunk pipeline, built with -fsanitize=address,undefined by
 * `make test-native`: round trips, the keep-raw rule, record checks, every pipeline at several
 * thread counts, and malformed input (typed status codes, no out-of-bounds access).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../ckg.h"
#include "../pipeline.h"

static int failures, checks;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        checks++;                                                                                  \
        if (!(cond)) {                                                                             \
            failures++;                                                                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

/* Model-like data: elements whose high bytes repeat (compressible) and low bytes are noise. */
static void fill(uint8_t *p, size_t n, unsigned elem, int kind) {
    for (size_t i = 0; i < n; i++) {
        switch (kind) {
        case 0: p[i] = (uint8_t)rnd(); break; /* random */
        case 1: p[i] = 0; break;              /* zeros */
        case 2:
            p[i] = (i % elem == elem - 1) ? (uint8_t)(0x3C + (rnd() & 1)) : (uint8_t)rnd();
            break;                                   /* bf16/fp32-like */
        default: p[i] = (uint8_t)(rnd() & 3); break; /* low entropy */
        }
    }
}

static void test_shuffle(void) {
    for (unsigned w = 1; w <= 16; w++) {
        for (size_t n = 0; n < 300; n += 37) {
            size_t len = n * w;
            uint8_t *a = malloc(len + 1), *b = malloc(len + 1), *c = malloc(len + 1);
            fill(a, len, w, 0);
            ckg_shuffle(b, a, n, w);
            for (size_t i = 0; i < n; i++)
                for (size_t j = 0; j < w; j++) CHECK(b[j * n + i] == a[i * w + j]);
            ckg_unshuffle(c, b, n, w);
            CHECK(len == 0 || memcmp(a, c, len) == 0);
            free(a);
            free(b);
            free(c);
        }
    }
}

/* SHA-256 known answers (FIPS 180-2 examples). */
static void test_sha256(void) {
    static const uint8_t abc[32] = {0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea,
                                    0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
                                    0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c,
                                    0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad};
    static const uint8_t empty[32] = {0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14,
                                      0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
                                      0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c,
                                      0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55};
    uint8_t d[CKG_DIGEST];
    CHECK(ckg_sha256("abc", 3, d) == CKG_OK && memcmp(d, abc, 32) == 0);
    CHECK(ckg_sha256("", 0, d) == CKG_OK && memcmp(d, empty, 32) == 0);
}

static void test_chunk_roundtrip(void) {
    ckg_scratch s = {0}, s2 = {0};
    unsigned elems[] = {1, 2, 4, 8, 16};
    size_t lens[] = {0, 16, 48, 64, 4096, 65536, 65536 * 3 + 48, 1 << 20};
    for (int codec = CKG_SHUFFLE_LZ4; codec <= CKG_SHUFFLE_ZSTD; codec++) {
        for (size_t e = 0; e < 5; e++) {
            for (size_t l = 0; l < 8; l++) {
                for (int kind = 0; kind < 4; kind++) {
                    unsigned elem = elems[e];
                    size_t len = lens[l] / elem * elem;
                    uint8_t *raw = malloc(len + 1), *back = malloc(len + 1);
                    size_t cap = ckg_encode_bound(len);
                    uint8_t *out = malloc(cap + 1);
                    fill(raw, len, elem, kind);
                    ckg_chunk ch;
                    CHECK(ckg_encode_chunk(raw, len, elem, codec, 0, 1, out, cap, &s, &ch) ==
                          CKG_OK);
                    uint8_t h[16], d[CKG_DIGEST];
                    ckg_hash128(raw, len, h);
                    CHECK(memcmp(h, ch.hash, 16) == 0);
                    CHECK(ckg_sha256(raw, len, d) == CKG_OK);
                    CHECK(memcmp(d, ch.digest, CKG_DIGEST) == 0);
                    if (ch.codec == codec) {
                        CHECK(ch.stored_len * 20 <= len * 19);
                        CHECK(ch.payload == out);
                    } else {
                        CHECK(ch.stored_len == len && ch.payload == out);
                        CHECK(len == 0 || memcmp(out, raw, len) == 0);
                    }
                    if (kind == 1 && len >= 4096) CHECK(ch.codec == codec);
                    if (kind == 0 && len >= 4096) CHECK(ch.codec == CKG_RAW);
                    if (len < CKG_MIN_COMPRESS) CHECK(ch.codec == CKG_RAW);
                    CHECK(ckg_decode_chunk(ch.codec, ch.payload, ch.stored_len, len, elem, back,
                                           &s2, ch.hash, ch.digest) == CKG_OK);
                    CHECK(len == 0 || memcmp(raw, back, len) == 0);
                    /* a wrong digest is reported, with or without the hash checked */
                    uint8_t bad_d[CKG_DIGEST];
                    memcpy(bad_d, d, CKG_DIGEST);
                    bad_d[31] ^= 0x80;
                    CHECK(ckg_decode_chunk(ch.codec, ch.payload, ch.stored_len, len, elem, back,
                                           &s2, ch.hash, bad_d) == CKG_E_DIGEST);
                    CHECK(ckg_decode_chunk(ch.codec, ch.payload, ch.stored_len, len, elem, back,
                                           &s2, NULL, bad_d) == CKG_E_DIGEST);
                    /* a wrong hash is reported */
                    uint8_t bad[16];
                    memcpy(bad, h, 16);
                    bad[7] ^= 1;
                    CHECK(ckg_decode_chunk(ch.codec, ch.payload, ch.stored_len, len, elem, back,
                                           &s2, bad, NULL) == CKG_E_HASH);
                    /* compress off: always raw, a copy in out, same hash */
                    ckg_chunk ch2;
                    CHECK(ckg_encode_chunk(raw, len, elem, 0, 0, 1, out, cap, &s, &ch2) == CKG_OK);
                    CHECK(ch2.codec == CKG_RAW && memcmp(ch2.hash, h, 16) == 0);
                    CHECK(memcmp(ch2.digest, d, CKG_DIGEST) == 0);
                    CHECK(ch2.payload == out && (len == 0 || memcmp(out, raw, len) == 0));
                    free(raw);
                    free(back);
                    free(out);
                }
            }
        }
    }
    ckg_scratch_free(&s);
    ckg_scratch_free(&s2);
}

static void test_decode_malformed(void) {
    ckg_scratch s = {0};
    size_t len = 65536;
    uint8_t *raw = malloc(len), *out = malloc(ckg_encode_bound(len)), *dst = malloc(len);
    fill(raw, len, 4, 3);
    ckg_chunk ch;
    CHECK(ckg_encode_chunk(raw, len, 4, 1, 0, 0, out, ckg_encode_bound(len), &s, &ch) == CKG_OK);
    CHECK(ch.codec == CKG_SHUFFLE_LZ4);
    const uint8_t *p = ch.payload;
    size_t sl = ch.stored_len;
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_LZ4, p, sl / 2, len, 4, dst, &s, NULL, NULL) ==
          CKG_E_PAYLOAD);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_LZ4, p, 0, len, 4, dst, &s, NULL, NULL) == CKG_E_PAYLOAD);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_LZ4, p, sl, len - 4, 4, dst, &s, NULL, NULL) ==
          CKG_E_PAYLOAD);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_LZ4, p, sl, len, 3, dst, &s, NULL, NULL) == CKG_E_ELEM);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_LZ4, p, sl, len, 0, dst, &s, NULL, NULL) == CKG_E_ELEM);
    CHECK(ckg_decode_chunk(3, p, sl, len, 4, dst, &s, NULL, NULL) == CKG_E_CODEC);
    CHECK(ckg_decode_chunk(255, p, sl, len, 4, dst, &s, NULL, NULL) == CKG_E_CODEC);
    CHECK(ckg_decode_chunk(CKG_RAW, raw, len - 1, len, 4, dst, &s, NULL, NULL) == CKG_E_LENGTH);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_LZ4, p, (size_t)1 << 40, len, 4, dst, &s, NULL, NULL) ==
          CKG_E_TOOBIG);
    free(raw);
    free(out);
    free(dst);
    ckg_scratch_free(&s);
}

/* shuffle-zstd: every way a payload can disagree with its frame is refused before decoding. */
static void test_decode_malformed_zstd(void) {
    ckg_scratch s = {0};
    size_t len = 65536, cap = ckg_encode_bound(len);
    uint8_t *raw = malloc(len), *out = calloc(1, cap + 8), *dst = malloc(len);
    fill(raw, len, 4, 3);
    ckg_chunk ch;
    CHECK(ckg_encode_chunk(raw, len, 4, CKG_SHUFFLE_ZSTD, 0, 0, out, cap, &s, &ch) == CKG_OK);
    CHECK(ch.codec == CKG_SHUFFLE_ZSTD && memcmp(out, "\x28\xb5\x2f\xfd", 4) == 0);
    const uint8_t *p = ch.payload;
    size_t sl = ch.stored_len;
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, sl, len, 4, dst, &s, ch.hash, NULL) == CKG_OK);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, sl - 1, len, 4, dst, &s, NULL, NULL) ==
          CKG_E_PAYLOAD);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, 5, len, 4, dst, &s, NULL, NULL) == CKG_E_PAYLOAD);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, sl + 1, len, 4, dst, &s, NULL, NULL) ==
          CKG_E_PAYLOAD);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, sl, len - 4, 4, dst, &s, NULL, NULL) ==
          CKG_E_PAYLOAD);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, 0, len, 4, dst, &s, NULL, NULL) == CKG_E_LENGTH);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, 1, 32769, 1, dst, &s, NULL, NULL) == CKG_E_LENGTH);
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, sl, len, 3, dst, &s, NULL, NULL) == CKG_E_ELEM);
    out[4] |= 0x04; /* the checksum flag */
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, sl, len, 4, dst, &s, NULL, NULL) == CKG_E_PAYLOAD);
    out[4] &= (uint8_t)~0x04;
    out[0] ^= 1; /* not the zstd magic */
    CHECK(ckg_decode_chunk(CKG_SHUFFLE_ZSTD, p, sl, len, 4, dst, &s, NULL, NULL) == CKG_E_PAYLOAD);
    CHECK(ckg_check_level(CKG_SHUFFLE_ZSTD, 0) == CKG_OK);
    CHECK(ckg_check_level(CKG_SHUFFLE_ZSTD, -5) == CKG_OK);
    CHECK(ckg_check_level(CKG_SHUFFLE_ZSTD, 23) == CKG_E_LEVEL);
    CHECK(ckg_check_level(CKG_SHUFFLE_LZ4, 23) == CKG_OK);
    CHECK(ckg_check_level(7, 0) == CKG_E_CODEC);
    CHECK(ckg_encode_chunk(raw, len, 4, CKG_SHUFFLE_ZSTD, 99, 0, out, cap, &s, &ch) == CKG_E_LEVEL);
    free(raw);
    free(out);
    free(dst);
    ckg_scratch_free(&s);
}

static void test_records(void) {
    ckg_scratch s = {0};
    size_t len = 40000;
    uint8_t *raw = malloc(len), *dst = malloc(len);
    fill(raw, len, 2, 2);
    size_t cap = ckg_encode_bound(len), ext = ckg_align_up(CKG_REC_HDR + cap);
    uint8_t *rec = calloc(1, ext);
    ckg_chunk ch;
    CHECK(ckg_encode_chunk(raw, len, 2, 1, 0, 0, rec + CKG_REC_HDR, cap, &s, &ch) == CKG_OK);
    CHECK(ch.payload == rec + CKG_REC_HDR);
    ckg_rec_header h = {ch.codec, 2, len, ch.stored_len, {0}, 41, 0, {0}};
    memcpy(h.hash, ch.hash, 16);
    ckg_pack_record_header(rec, &h);
    size_t extent = ckg_align_up(CKG_REC_HDR + ch.stored_len);
    memset(rec + CKG_REC_HDR + ch.stored_len, 0, extent - CKG_REC_HDR - ch.stored_len);
    ckg_rec_header back;
    CHECK(ckg_unpack_record_header(rec, &back) == CKG_OK);
    CHECK(back.seq == 41 && back.raw_len == len && back.stored_len == ch.stored_len);
    CHECK(ckg_decode_record(rec, extent, &h, 1, dst, &s, 1, NULL) == CKG_OK);
    CHECK(memcmp(dst, raw, len) == 0);
    CHECK(ckg_decode_record(rec, CKG_REC_HDR - 1, &h, 1, dst, &s, 1, NULL) == CKG_E_TRUNCATED);
    CHECK(ckg_decode_record(rec, CKG_REC_HDR + ch.stored_len - 1, &h, 1, dst, &s, 1, NULL) ==
          CKG_E_TRUNCATED);
    ckg_rec_header other = h;
    other.seq = 40;
    CHECK(ckg_decode_record(rec, extent, &other, 1, dst, &s, 1, NULL) == CKG_E_MISMATCH);
    CHECK(ckg_decode_record(rec, extent, &other, 0, dst, &s, 1, NULL) == CKG_OK);
    other = h;
    other.raw_len = len + 2;
    CHECK(ckg_decode_record(rec, extent, &other, 1, dst, &s, 1, NULL) == CKG_E_MISMATCH);
    /* every header byte matters */
    for (int i = 0; i < CKG_REC_HDR; i++) {
        rec[i] ^= 0x10;
        int rc = ckg_decode_record(rec, extent, &h, 1, dst, &s, 1, NULL);
        CHECK(rc == CKG_E_HEADER || rc == CKG_E_MISMATCH);
        rec[i] ^= 0x10;
    }
    if (extent > CKG_REC_HDR + ch.stored_len) {
        rec[extent - 1] = 1;
        CHECK(ckg_decode_record(rec, extent, &h, 1, dst, &s, 1, NULL) == CKG_E_PADDING);
        rec[extent - 1] = 0;
    }
    rec[CKG_REC_HDR + ch.stored_len / 2] ^= 0x04;
    int rc = ckg_decode_record(rec, extent, &h, 1, dst, &s, 1, NULL);
    CHECK(rc == CKG_E_PAYLOAD || rc == CKG_E_HASH);
    CHECK(ckg_decode_record(rec, extent, &h, 1, dst, &s, 0, NULL) == CKG_OK || rc == CKG_E_PAYLOAD);
    free(raw);
    free(dst);
    free(rec);
    ckg_scratch_free(&s);
}

static void test_pipelines(void) {
    size_t len = (5u << 20) + 4096 + 48, chunk = 1 << 20;
    uint8_t *buf = malloc(len);
    fill(buf, len, 2, 2);
    fill(buf + (2u << 20), 1u << 20, 2, 1); /* one zero chunk */
    fill(buf + (3u << 20), 1u << 20, 2, 0); /* one random chunk: stored raw */
    size_t n = ckg_nchunks(len, chunk);
    ckg_rec_info ref[8], res[8];
    uint8_t *outs[8], *outs2[8];
    for (size_t i = 0; i < n; i++) {
        outs[i] = malloc(ckg_encode_bound(chunk));
        outs2[i] = malloc(ckg_encode_bound(chunk));
    }
    ckg_failure f;
    CHECK(ckg_encode_buffer(buf, len, 2, chunk, 1, 0, 1, outs, ref, &f) == CKG_OK);
    CHECK(ref[2].codec == CKG_SHUFFLE_LZ4 && ref[3].codec == CKG_RAW);
    for (int threads = 2; threads <= 5; threads++) {
        CHECK(ckg_encode_buffer(buf, len, 2, chunk, 1, 0, threads, outs2, res, &f) == CKG_OK);
        for (size_t i = 0; i < n; i++) {
            CHECK(res[i].codec == ref[i].codec && res[i].stored_len == ref[i].stored_len);
            CHECK(memcmp(res[i].hash, ref[i].hash, 16) == 0);
            CHECK(memcmp(outs[i], outs2[i], res[i].stored_len) == 0);
        }
    }
    /* decode_many back into one destination */
    uint8_t *dst = malloc(len);
    ckg_decode_item items[8];
    for (size_t i = 0; i < n; i++)
        items[i] = (ckg_decode_item){ref[i].codec,   2,           outs[i],        ref[i].stored_len,
                                     ref[i].raw_len, ref[i].hash, dst + i * chunk};
    for (int threads = 1; threads <= 4; threads++) {
        memset(dst, 0xAA, len);
        CHECK(ckg_decode_many(items, n, threads, &f) == CKG_OK);
        CHECK(memcmp(dst, buf, len) == 0);
    }
    uint8_t badh[16] = {0};
    items[4].hash = badh;
    items[1].codec = 9;
    CHECK(ckg_decode_many(items, n, 3, &f) == CKG_E_CODEC && f.index == 1);
    items[1].codec = ref[1].codec;
    CHECK(ckg_decode_many(items, n, 3, &f) == CKG_E_HASH && f.index == 4);

    /* write to a file (buffered, then O_DIRECT where allowed), read back */
    char path[] = "/tmp/ckg-native-test-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    for (int direct = 0; direct <= 1; direct++) {
        for (int threads = 1; threads <= 4; threads += 3) {
            CHECK(ftruncate(fd, 0) == 0);
            int dfd = direct ? ckg_open_direct(path) : -1;
            ckg_write_args a = {fd, dfd, buf, len, 2, chunk, 1, 0, 4096, 7, NULL, 1};
            uint64_t end = 0;
            int used = -1;
            CHECK(ckg_write_buffer(&a, threads, res, &end, &used, &f) == CKG_OK);
            if (dfd >= 0) close(dfd);
            CHECK(used == (dfd >= 0));
            uint64_t pos = 4096;
            ckg_read_item ri[8];
            for (size_t i = 0; i < n; i++) {
                CHECK(res[i].offset == pos && res[i].stored_len == ref[i].stored_len);
                size_t ext = ckg_align_up(CKG_REC_HDR + res[i].stored_len);
                ckg_rec_header w = {
                    res[i].codec, 2, res[i].raw_len, res[i].stored_len, {0}, (uint32_t)(7 + i), 0,
                    {0}};
                memcpy(w.hash, res[i].hash, 16);
                uint8_t d[CKG_DIGEST];
                CHECK(ckg_sha256(buf + i * chunk, res[i].raw_len, d) == CKG_OK);
                CHECK(memcmp(d, res[i].digest, CKG_DIGEST) == 0);
                ri[i] = (ckg_read_item){
                    pos, ext, w, 1, dst + i * chunk, res[i].digest, {NULL, NULL, NULL, 0}};
                pos += ext;
            }
            CHECK(end == pos);
            memset(dst, 0, len);
            CHECK(ckg_read_records(fd, ri, n, threads, 1, &f) == CKG_OK);
            CHECK(memcmp(dst, buf, len) == 0);
            uint8_t other[CKG_DIGEST] = {0}; /* a digest the bytes do not have */
            ri[1].digest = other;
            CHECK(ckg_read_records(fd, ri, n, threads, 1, &f) == CKG_E_DIGEST && f.index == 1);
            CHECK(ckg_read_records(fd, ri, n, threads, 0, &f) == CKG_OK); /* not verifying */
            ri[1].digest = res[1].digest;
            if (threads == 1) { /* an injected read error: errno and the record's index */
                ckg_io_inject(EIO, 1);
                CHECK(ckg_read_records(fd, ri, n, threads, 1, &f) == CKG_E_IO && f.err == EIO &&
                      f.index == 1);
                ckg_io_inject(0, 0);
            }
            ri[2].want.seq = 99;
            CHECK(ckg_read_records(fd, ri, n, threads, 1, &f) == CKG_E_MISMATCH && f.index == 2);
            ri[2].want.seq = 9;
            CHECK(ftruncate(fd, (off_t)(ri[n - 1].offset + 10)) == 0);
            CHECK(ckg_read_records(fd, ri, n, threads, 1, &f) == CKG_E_TRUNCATED &&
                  f.index == n - 1);
        }
    }
    /* injected I/O error: reported with errno, and the pipeline stops */
    ckg_io_inject(EIO, 2);
    ckg_write_args a = {fd, -1, buf, len, 2, chunk, 1, 0, 0, 0, NULL, 0};
    uint64_t end;
    int used;
    CHECK(ckg_write_buffer(&a, 3, res, &end, &used, &f) == CKG_E_IO && f.err == EIO);
    ckg_io_inject(0, 0);
    /* waiting for the writeback of what the buffered writes left: whole file or a range */
    CHECK(ckg_wait_written(fd, 0, 0) == 0 && ckg_wait_written(fd, 4096, 8192) == 0);
    CHECK(ckg_wait_written(-1, 0, 0) == EBADF);
    close(fd);
    unlink(path);
    /* ENOSPC from /dev/full */
    int full = open("/dev/full", O_WRONLY);
    if (full >= 0) {
        ckg_write_args b = {full, -1, buf, len, 2, chunk, 1, 0, 0, 0, NULL, 0};
        CHECK(ckg_write_buffer(&b, 2, res, &end, &used, &f) == CKG_E_IO && f.err == ENOSPC);
        close(full);
    }
    for (size_t i = 0; i < n; i++) {
        free(outs[i]);
        free(outs2[i]);
    }
    free(dst);
    free(buf);
}

/* Read a whole file (at most cap bytes) into buf; its length. */
static size_t slurp(int fd, uint8_t *buf, size_t cap) {
    size_t got = 0;
    CHECK(ckg_pread_all(fd, buf, cap, 0, &got) == 0);
    return got;
}

/* A batch of segments (codecs, element sizes and lengths of their own, one empty) writes the
 * same file as one ckg_write_buffer call per segment, with per-segment stats; an injected error
 * in the middle of the batch is reported with errno and stops it. */
static void test_segments(void) {
    size_t chunk = 8192, lens[] = {20000, 0, 8192, 100, 50000}, total = 0;
    unsigned elems[] = {4, 2, 2, 1, 8};
    int codecs[] = {CKG_SHUFFLE_LZ4, CKG_RAW, CKG_SHUFFLE_ZSTD, CKG_SHUFFLE_LZ4, CKG_RAW};
    enum { NS = 5 };
    ckg_segment segs[NS];
    for (int s = 0; s < NS; s++) {
        uint8_t *b = malloc(lens[s] + 1);
        fill(b, lens[s], elems[s], s % 3 + 1);
        segs[s] = (ckg_segment){b, lens[s], elems[s], codecs[s], 0, 1, NULL};
        total += ckg_nchunks(lens[s], chunk);
    }
    char pa[] = "/tmp/ckg_seg_a_XXXXXX", pb[] = "/tmp/ckg_seg_b_XXXXXX";
    int fa = mkstemp(pa), fb = mkstemp(pb);
    CHECK(fa >= 0 && fb >= 0);
    ckg_rec_info *res = calloc(total, sizeof *res), one[16];
    ckg_segment_stats st[NS];
    ckg_failure f;
    for (int threads = 1; threads <= 4; threads += 3) {
        CHECK(ftruncate(fa, 0) == 0 && ftruncate(fb, 0) == 0);
        ckg_batch_args ba = {fa, -1, chunk, 4096, 3, segs, NS, 1, NULL, 0};
        uint64_t end = 0, pos = 4096;
        CHECK(ckg_write_segments(&ba, threads, res, st, &end, &f) == CKG_OK);
        size_t r = 0;
        for (int s = 0; s < NS; s++) {
            ckg_write_args a = {fb,
                                -1,
                                segs[s].buf,
                                segs[s].len,
                                segs[s].elem,
                                chunk,
                                segs[s].codec,
                                0,
                                pos,
                                (uint32_t)(3 + r),
                                NULL,
                                0};
            int used;
            CHECK(ckg_write_buffer(&a, threads, one, &pos, &used, &f) == CKG_OK);
            size_t n = ckg_nchunks(segs[s].len, chunk);
            uint64_t bytes = 0;
            for (size_t i = 0; i < n; i++, r++) {
                CHECK(res[r].offset == one[i].offset && res[r].codec == one[i].codec);
                CHECK(memcmp(res[r].hash, one[i].hash, 16) == 0);
                bytes += ckg_align_up(CKG_REC_HDR + one[i].stored_len);
            }
            CHECK(st[s].st.bytes == bytes && st[s].direct_used == 0);
        }
        CHECK(end == pos && r == total);
        size_t cap = (size_t)pos + 1;
        uint8_t *x = malloc(cap), *y = malloc(cap);
        size_t nx = slurp(fa, x, cap), ny = slurp(fb, y, cap);
        CHECK(nx == ny && nx == pos && memcmp(x, y, nx) == 0);
        free(x);
        free(y);
    }
    ckg_io_inject(ENOSPC, 3);
    ckg_batch_args ba = {fa, -1, chunk, 0, 0, segs, NS, 0, NULL, 0};
    uint64_t end = 1;
    CHECK(ckg_write_segments(&ba, 2, res, st, &end, &f) == CKG_E_IO && f.err == ENOSPC &&
          f.index == 3 && end == 0);
    ckg_io_inject(0, 0);
    for (int s = 0; s < NS; s++) free((void *)segs[s].buf);
    free(res);
    close(fa);
    close(fb);
    unlink(pa);
    unlink(pb);
}

static void unhex(const char *h, uint8_t *out) {
    for (size_t i = 0; h[2 * i]; i++) {
        unsigned v;
        CHECK(sscanf(h + 2 * i, "%2x", &v) == 1);
        out[i] = (uint8_t)v;
    }
}

/* Known answers: AES-256 (FIPS-197 C.3) for the fingerprint; AES-256-GCM test case 14 of the GCM
 * specification (zero key, nonce and block) for sealing, and a flipped bit in the associated
 * data changing the tag. Then a sealed segment through the pipeline under the sanitizers: its
 * headers carry the flag, the nonce (the sequence number), the stored length with the tag and
 * the xxh3-128 of the stored bytes; its index hash is the fingerprint of the raw bytes' hash. */
static void test_seal(void) {
    uint8_t key[32], in[16], want[16], out[16];
    unhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", key);
    unhex("00112233445566778899aabbccddeeff", in);
    unhex("8ea2b7ca516745bfeafc49904b496089", want);
    CHECK(ckg_fingerprint(key, in, out) == CKG_OK && memcmp(out, want, 16) == 0);
    uint8_t zero[32] = {0}, nonce[CKG_NONCE] = {0}, buf[16] = {0}, tag[CKG_TAG], ct[16], t14[16];
    unhex("cea7403d4d606b6e074ec5d3baf39d18", ct);
    unhex("d0d1c8a799996bf0265b98b5d48ab919", t14);
    CHECK(ckg_seal_payload(zero, nonce, NULL, 0, buf, 16, tag) == CKG_OK);
    CHECK(memcmp(buf, ct, 16) == 0 && memcmp(tag, t14, 16) == 0);
    uint8_t aad[3] = {1, 2, 3}, tag2[CKG_TAG];
    memset(buf, 0, sizeof buf);
    CHECK(ckg_seal_payload(zero, nonce, aad, 3, buf, 16, tag2) == CKG_OK);
    CHECK(memcmp(buf, ct, 16) == 0 && memcmp(tag2, t14, 16) != 0);

    size_t chunk = 8192, len = 20000;
    uint8_t *b = malloc(len);
    fill(b, len, 4, 1);
    uint8_t uuid[16], kid[16], rows[9] = {1, 0, 0, 0, 1, 0, 0, 0, 'k'};
    memset(uuid, 7, 16);
    memset(kid, 9, 16);
    ckg_seal_args sa = {key, key, kid, rows, sizeof rows, 0, 5};
    ckg_segment seg = {b, len, 4, CKG_SHUFFLE_LZ4, 0, 1, &sa};
    char pa[] = "/tmp/ckg_seal_XXXXXX";
    int fa = mkstemp(pa);
    CHECK(fa >= 0);
    size_t n = ckg_nchunks(len, chunk);
    ckg_rec_info res[4];
    ckg_segment_stats st;
    ckg_failure f;
    uint64_t end = 0;
    ckg_batch_args ba = {fa, -1, chunk, 4096, 2, &seg, 1, 1, uuid, 3};
    CHECK(ckg_write_segments(&ba, 2, res, &st, &end, &f) == CKG_OK);
    for (size_t i = 0; i < n; i++) {
        uint8_t head[CKG_REC_HDR], *stored = malloc(res[i].stored_len), h[16], fp[16];
        CHECK(pread(fa, head, CKG_REC_HDR, (off_t)res[i].offset) == CKG_REC_HDR);
        CHECK(pread(fa, stored, res[i].stored_len, (off_t)res[i].offset + CKG_REC_HDR) ==
              (ssize_t)res[i].stored_len);
        CHECK(head[6] == CKG_SEALED && head[44] == 2 + i && head[45] == 0 && head[55] == 0);
        ckg_hash128(stored, res[i].stored_len, h);
        CHECK(memcmp(head + 24, h, 16) == 0);
        size_t raw = i + 1 < n ? chunk : len - i * chunk;
        ckg_hash128(b + i * chunk, raw, h);
        CHECK(ckg_fingerprint(key, h, fp) == CKG_OK && memcmp(res[i].hash, fp, 16) == 0);
        free(stored);
        /* Read it back with the associated data built from the spec (format.md 4.4). */
        uint8_t aad[128], *p = aad, *out = malloc(raw);
        uint64_t c = 5 + i;
        memcpy(p, "CKGSEAL1", 8);
        memcpy(p + 8, uuid, 16);
        p += 24;
        uint64_t fields[][2] = {{3, 4},   {2 + i, 4}, {0, 0},        {(uint64_t)res[i].codec, 1},
                                {4, 1},   {raw, 8},   {1, 4},        {0, 8},
                                {raw, 8}, {c, 4},     {c * chunk, 8}};
        for (size_t j = 0; j < sizeof fields / sizeof fields[0]; j++) {
            if (j == 2) {
                memcpy(p, kid, 16);
                p += 16;
                continue;
            }
            for (uint64_t b8 = 0; b8 < fields[j][1]; b8++)
                *p++ = (uint8_t)(fields[j][0] >> (8 * b8));
        }
        memcpy(p, rows, sizeof rows);
        p += sizeof rows;
        ckg_read_item it = {
            res[i].offset,
            ckg_align_up(CKG_REC_HDR + res[i].stored_len),
            {res[i].codec, 4, raw, res[i].stored_len, {0}, (uint32_t)(2 + i), 0, {0}},
            1,
            out,
            res[i].digest,
            {key, key, aad, (size_t)(p - aad)}};
        memcpy(it.want.hash, res[i].hash, 16);
        CHECK(ckg_read_records(fa, &it, 1, 1, 1, &f) == CKG_OK);
        CHECK(memcmp(out, b + i * chunk, raw) == 0);
        aad[30] ^= 1; /* another sequence number: the record does not authenticate */
        CHECK(ckg_read_records(fa, &it, 1, 1, 1, &f) == CKG_E_AUTH);
        free(out);
    }
    free(b);
    close(fa);
    unlink(pa);
}

int main(void) {
    test_shuffle();
    test_sha256();
    test_chunk_roundtrip();
    test_decode_malformed();
    test_decode_malformed_zstd();
    test_records();
    test_pipelines();
    test_segments();
    test_seal();
    ckg_release_thread_buffers();
    printf("test_native: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
