/* Fuzz harness of the native decoder: malformed chunk payloads and chunk records.
 *
 * Built two ways:
 *   - with libFuzzer (clang -fsanitize=fuzzer,address,undefined -DCKG_LIBFUZZER): the entry point
 *     LLVMFuzzerTestOneInput is driven by the fuzzer;
 *   - standalone (gcc, `make test-native`): main() mutates valid records made by the encoder
 *     (bit flips, truncation, extension, length fields set to odd or huge values, bad codec ids,
 *     bad element sizes, damaged zstd frame headers) for a bounded number of inputs, re-signing the
 * header half of the time so the payload decoder is reached. Either way every input must end in a
 * typed status code, and ASan/UBSan watch every access.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../ckg.h"

#define MAX_RAW (1u << 20) /* a reader validates raw_len against the tensor before allocating */

static int valid_code(int rc) { return rc >= CKG_OK && rc <= CKG_E_DIGEST && rc != CKG_E_IO; }

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void resign(uint8_t *rec, size_t len) {
    if (len >= CKG_REC_HDR) put_le64(rec + 56, ckg_hash64(rec, 56));
}

/* Decode `data` as a bare payload described by its first 8 bytes, then as a whole record. */
static int one_input(const uint8_t *data, size_t size) {
    static ckg_scratch s;
    int bad = 0;
    if (size >= 8) {
        int codec = data[0] & 3;
        unsigned elem = data[1] & 31;
        size_t raw_len = (size_t)(data[2] | data[3] << 8 | (data[4] & 0x1F) << 16);
        uint8_t *dst = malloc(raw_len ? raw_len : 1);
        int rc = ckg_decode_chunk(codec, data + 8, size - 8, raw_len, elem, dst, &s,
                                  (data[5] & 1) ? data + 8 : NULL,
                                  (data[5] & 2) && size >= 8 + CKG_DIGEST ? data + 8 : NULL);
        if (!valid_code(rc)) bad = 1;
        free(dst);
    }
    ckg_rec_header h;
    if (size >= CKG_REC_HDR && ckg_unpack_record_header(data, &h) == CKG_OK &&
        h.raw_len <= MAX_RAW) {
        uint8_t *dst = malloc(h.raw_len ? (size_t)h.raw_len : 1);
        int rc = ckg_decode_record(data, size, &h, 1, dst, &s, 1, size >= 96 ? data + 64 : NULL);
        if (!valid_code(rc)) bad = 1;
        if (rc == CKG_OK) { /* decoded bytes must match the header's hash */
            uint8_t got[16];
            ckg_hash128(dst, (size_t)h.raw_len, got);
            if (memcmp(got, h.hash, 16)) bad = 1;
        }
        free(dst);
    }
    return bad;
}

#ifdef CKG_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *copy = malloc(size ? size : 1);
    if (size) memcpy(copy, data, size);
    if (one_input(copy, size)) abort();
    resign(copy, size); /* also reach the payload decoder behind the header hash */
    if (one_input(copy, size)) abort();
    free(copy);
    return 0;
}
#else

static uint64_t st = 0x1234567887654321ull;
static uint64_t rnd(void) {
    st ^= st >> 12;
    st ^= st << 25;
    st ^= st >> 27;
    return st * 0x2545F4914F6CDD1Dull;
}

/* A valid record (header + payload + padding) of one of a few data shapes; kinds 0-9 try
 * shuffle-lz4, 10-19 shuffle-zstd. */
static uint8_t *seed_record(int kind, size_t *len) {
    static ckg_scratch s;
    unsigned elems[] = {1, 2, 4, 8, 16};
    unsigned elem = elems[kind % 5];
    size_t raw_len = (size_t)(64 + rnd() % 20000) / elem * elem;
    uint8_t *raw = malloc(raw_len);
    for (size_t i = 0; i < raw_len; i++)
        raw[i] = (kind & 1) ? (uint8_t)(rnd() & 3) : (i % elem ? (uint8_t)rnd() : 0x3C);
    size_t cap = ckg_encode_bound(raw_len);
    uint8_t *rec = calloc(1, ckg_align_up(CKG_REC_HDR + cap));
    ckg_chunk ch;
    int codec = kind < 10 ? CKG_SHUFFLE_LZ4 : CKG_SHUFFLE_ZSTD;
    if (ckg_encode_chunk(raw, raw_len, elem, codec, 0, 0, rec + CKG_REC_HDR, cap, &s, &ch) !=
        CKG_OK)
        abort();
    ckg_rec_header h = {ch.codec, elem, raw_len, ch.stored_len, {0}, (uint32_t)kind, 0, {0}};
    memcpy(h.hash, ch.hash, 16);
    ckg_pack_record_header(rec, &h);
    *len = ckg_align_up(CKG_REC_HDR + ch.stored_len);
    free(raw);
    return rec;
}

static void mutate(uint8_t **buf, size_t *len) {
    uint8_t *b = *buf;
    size_t n = *len;
    switch (rnd() % 9) {
    case 0: /* bit flips */
        for (int k = 0, m = 1 + (int)(rnd() % 8); k < m && n; k++)
            b[rnd() % n] ^= (uint8_t)(1u << (rnd() % 8));
        break;
    case 1: /* truncate */ *len = n ? (size_t)(rnd() % n) : 0; break;
    case 2: { /* extend with garbage */
        size_t extra = 1 + rnd() % 5000;
        b = realloc(b, n + extra);
        for (size_t i = 0; i < extra; i++) b[n + i] = (uint8_t)rnd();
        *len = n + extra;
        break;
    }
    case 3: /* raw_len: off by one, huge, zero, random */
        if (n >= 16) {
            uint64_t choices[] = {0,
                                  1,
                                  0xFFFFFFFFFFFFFFFFull,
                                  0x7FFFFFFFull,
                                  (uint64_t)rnd() % 70000,
                                  (uint64_t)(b[8] | b[9] << 8) + 1};
            put_le64(b + 8, choices[rnd() % 6]);
        }
        break;
    case 4: /* stored_len */
        if (n >= 24) {
            uint64_t choices[] = {0,
                                  1,
                                  0xFFFFFFFFFFFFFFFFull,
                                  (uint64_t)n,
                                  (uint64_t)n - 63,
                                  (uint64_t)rnd() % 70000};
            put_le64(b + 16, choices[rnd() % 6]);
        }
        break;
    case 5: /* codec id */
        if (n > 4) b[4] = (uint8_t)rnd();
        break;
    case 6: /* elem size */
        if (n > 5) b[5] = (uint8_t)(rnd() % 4 ? rnd() % 20 : rnd());
        break;
    case 7: /* overwrite a run of payload bytes, half of the time in a zstd frame's header */
        if (n > CKG_REC_HDR) {
            size_t span = n - CKG_REC_HDR, m = 1 + rnd() % 64;
            size_t at = CKG_REC_HDR + rnd() % ((rnd() & 1) && span > 18 ? 18 : span);
            for (size_t i = at; i < n && i < at + m; i++) b[i] = (uint8_t)rnd();
        }
        break;
    default: /* splice: repeat a piece of itself */
        if (n > 2) {
            size_t a = rnd() % n, c = rnd() % n, m = 1 + rnd() % 256;
            for (size_t i = 0; i < m && a + i < n && c + i < n; i++) b[a + i] = b[c + i];
        }
    }
    *buf = b;
}

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 20000;
    long bad = 0, ok = 0;
    for (long it = 0; it < iters; it++) {
        size_t len;
        uint8_t *rec = seed_record((int)(it % 20), &len);
        for (int m = 0, k = 1 + (int)(rnd() % 3); m < k; m++) mutate(&rec, &len);
        if (rnd() & 1) resign(rec, len);
        bad += one_input(rec, len);
        ckg_rec_header h;
        if (len >= CKG_REC_HDR && ckg_unpack_record_header(rec, &h) == CKG_OK) ok++;
        free(rec);
    }
    printf("fuzz_decode: %ld inputs, %ld with a parseable header, %ld bad outcomes\n", iters, ok,
           bad);
    return bad ? 1 : 0;
}
#endif
