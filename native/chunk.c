/* One chunk: xxh3-128, byte-plane shuffle, LZ4 block or zstd frame, keep-raw rule (format.md s. 7).
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <lz4.h>
#include <zstd.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

#include "ckg.h"

/* Bytes hashed and shuffled per step: small enough to stay in L1/L2 between the two. */
#define CKG_BLOCK (64u * 1024u)

const char *ckg_strerror(int code) {
    switch (code) {
    case CKG_OK: return "ok";
    case CKG_E_NOMEM: return "out of memory";
    case CKG_E_CODEC: return "unknown codec id";
    case CKG_E_LENGTH: return "payload length does not match";
    case CKG_E_ELEM: return "elem_size does not divide raw_len";
    case CKG_E_PAYLOAD: return "compressed payload cannot be decoded";
    case CKG_E_HASH: return "chunk hash mismatch (data corrupted)";
    case CKG_E_HEADER: return "bad record header (magic, hash or reserved bytes)";
    case CKG_E_MISMATCH: return "record header disagrees with the index";
    case CKG_E_PADDING: return "non-zero bytes in record padding";
    case CKG_E_TRUNCATED: return "record is truncated";
    case CKG_E_IO: return "I/O error";
    case CKG_E_TOOBIG: return "length too large";
    case CKG_E_LEVEL: return "compression level out of range";
    case CKG_E_DIGEST: return "chunk digest mismatch (SHA-256: data altered)";
    case CKG_E_CRYPTO: return "a record could not be sealed (libcrypto)";
    case CKG_E_AUTH:
        return "sealed chunk does not authenticate: altered, moved or replayed from another "
               "checkpoint, or encrypted under another key";
    case CKG_E_STORED:
        return "sealed chunk's stored bytes do not match their hash (data corrupted)";
    default: return "unknown error";
    }
}

void ckg_hash128(const void *buf, size_t len, uint8_t out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf, len));
    memcpy(out, c.digest, 16);
}

uint64_t ckg_hash64(const void *buf, size_t len) { return XXH3_64bits(buf, len); }

/* Shuffle elements [e0, e1) of n elements of width w. Fixed widths let the compiler vectorize. */
static void shuffle_range(uint8_t *restrict dst, const uint8_t *restrict src, size_t n, size_t w,
                          size_t e0, size_t e1) {
    switch (w) {
    case 2: {
        uint8_t *restrict d0 = dst, *restrict d1 = dst + n;
        for (size_t i = e0; i < e1; i++) {
            d0[i] = src[2 * i];
            d1[i] = src[2 * i + 1];
        }
        return;
    }
    case 4: {
        uint8_t *restrict d0 = dst, *restrict d1 = dst + n, *restrict d2 = dst + 2 * n;
        uint8_t *restrict d3 = dst + 3 * n;
        for (size_t i = e0; i < e1; i++) {
            d0[i] = src[4 * i];
            d1[i] = src[4 * i + 1];
            d2[i] = src[4 * i + 2];
            d3[i] = src[4 * i + 3];
        }
        return;
    }
    case 8:
        for (size_t i = e0; i < e1; i++) {
            const uint8_t *s = src + 8 * i;
            for (size_t j = 0; j < 8; j++) dst[j * n + i] = s[j];
        }
        return;
    default:
        for (size_t i = e0; i < e1; i++) {
            const uint8_t *s = src + w * i;
            for (size_t j = 0; j < w; j++) dst[j * n + i] = s[j];
        }
    }
}

static void unshuffle_range(uint8_t *restrict dst, const uint8_t *restrict src, size_t n, size_t w,
                            size_t e0, size_t e1) {
    switch (w) {
    case 2: {
        const uint8_t *restrict s0 = src, *restrict s1 = src + n;
        for (size_t i = e0; i < e1; i++) {
            dst[2 * i] = s0[i];
            dst[2 * i + 1] = s1[i];
        }
        return;
    }
    case 4: {
        const uint8_t *restrict s0 = src, *restrict s1 = src + n, *restrict s2 = src + 2 * n;
        const uint8_t *restrict s3 = src + 3 * n;
        for (size_t i = e0; i < e1; i++) {
            dst[4 * i] = s0[i];
            dst[4 * i + 1] = s1[i];
            dst[4 * i + 2] = s2[i];
            dst[4 * i + 3] = s3[i];
        }
        return;
    }
    default:
        for (size_t i = e0; i < e1; i++) {
            uint8_t *d = dst + w * i;
            for (size_t j = 0; j < w; j++) d[j] = src[j * n + i];
        }
    }
}

void ckg_shuffle(uint8_t *dst, const uint8_t *src, size_t n, size_t w) {
    if (w <= 1) {
        if (n) memcpy(dst, src, n);
        return;
    }
    shuffle_range(dst, src, n, w, 0, n);
}

void ckg_unshuffle(uint8_t *dst, const uint8_t *src, size_t n, size_t w) {
    if (w <= 1) {
        if (n) memcpy(dst, src, n);
        return;
    }
    unshuffle_range(dst, src, n, w, 0, n);
}

size_t ckg_encode_bound(size_t raw_len) {
    size_t b = raw_len; /* stored raw */
    if (raw_len <= (size_t)LZ4_MAX_INPUT_SIZE) {
        size_t l = (size_t)LZ4_compressBound((int)raw_len);
        if (l > b) b = l;
    }
    size_t z = ZSTD_compressBound(raw_len); /* an error code (huge) past zstd's input limit */
    if (!ZSTD_isError(z) && z > b) b = z;
    return b;
}

int ckg_check_level(int codec, int level) {
    if (codec == CKG_RAW || codec == CKG_SHUFFLE_LZ4) return CKG_OK;
    if (codec != CKG_SHUFFLE_ZSTD) return CKG_E_CODEC;
    if (level != 0 && (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel())) return CKG_E_LEVEL;
    return CKG_OK;
}

int ckg_scratch_reserve(ckg_scratch *s, size_t n) {
    if (s->cap >= n) return CKG_OK;
    void *p = ckg_aligned_alloc(n ? n : 1);
    if (!p) return CKG_E_NOMEM;
    ckg_aligned_free(s->buf);
    s->buf = p;
    s->cap = n;
    return CKG_OK;
}

void ckg_scratch_free(ckg_scratch *s) {
    ckg_aligned_free(s->buf);
    ZSTD_freeCCtx(s->zc);
    ZSTD_freeDCtx(s->zd);
    ckg_sha_free(s);
    s->buf = NULL;
    s->cap = 0;
    s->zc = NULL;
    s->zd = NULL;
}

/* Copy src to dst block by block, hashing (and digesting) each block from dst while it is in
 * cache. */
static void copy_hash(uint8_t *restrict dst, const uint8_t *restrict src, size_t n,
                      XXH3_state_t *st, ckg_sha *sha) {
    for (size_t o = 0; o < n; o += CKG_BLOCK) {
        size_t k = n - o < CKG_BLOCK ? n - o : CKG_BLOCK;
        memcpy(dst + o, src + o, k);
        XXH3_128bits_update(st, dst + o, k);
        ckg_sha_update(sha, dst + o, k);
    }
}

static void final_hash(XXH3_state_t *st, uint8_t out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(st));
    memcpy(out, c.digest, 16);
}

/* Exactly the call python-lz4's lz4.block.compress(mode="default") makes: a fresh stream and
 * LZ4_compress_fast_continue at acceleration 1. (LZ4_compress_default picks another hash table
 * layout for inputs < 64 KiB and can emit different, equally valid, bytes.) */
static int lz4_compress(const uint8_t *src, size_t n, uint8_t *out, size_t out_cap, size_t *got) {
    size_t cap = out_cap > (size_t)INT_MAX ? (size_t)INT_MAX : out_cap;
    LZ4_stream_t stream;
    if (!LZ4_initStream(&stream, sizeof stream)) return CKG_E_NOMEM;
    int r =
        LZ4_compress_fast_continue(&stream, (const char *)src, (char *)out, (int)n, (int)cap, 1);
    *got = r > 0 ? (size_t)r : 0;
    return CKG_OK;
}

/* One zstd frame with its content size, no checksum, no dictionary id: the parameters
 * python-zstandard's ZstdCompressor(level, write_content_size=True, write_checksum=False,
 * write_dict_id=False).compress() sets, so both emit the same bytes for one libzstd version. */
static int zstd_compress(ckg_scratch *s, int level, const uint8_t *src, size_t n, uint8_t *out,
                         size_t out_cap, size_t *got) {
    if (!s->zc && !(s->zc = ZSTD_createCCtx())) return CKG_E_NOMEM;
    ZSTD_CCtx *c = s->zc;
    size_t r = ZSTD_CCtx_reset(c, ZSTD_reset_session_and_parameters);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel,
                                   level ? level : CKG_ZSTD_DEFAULT_LEVEL);
    if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1);
    if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0);
    if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(c, ZSTD_c_dictIDFlag, 0);
    if (ZSTD_isError(r)) return CKG_E_NOMEM;
    r = ZSTD_compress2(c, out, out_cap, src, n);
    *got = ZSTD_isError(r) ? 0 : r;
    return CKG_OK;
}

/* Check a zstd payload (docs/format.md section 7) before anything is allocated for it: raw_len
 * within what n bytes can decode to; exactly one frame, starting with the zstd magic, without
 * checksum or dictionary flags, its content size equal to raw_len, no trailing bytes. */
int ckg_zstd_check(const uint8_t *p, size_t n, size_t raw_len) {
    static const uint8_t magic[4] = {0x28, 0xB5, 0x2F, 0xFD};
    if (raw_len && (raw_len - 1) / CKG_ZSTD_MAX_RATIO >= n) return CKG_E_LENGTH;
    if (n < 6 || memcmp(p, magic, 4) || (p[4] & 0x07)) return CKG_E_PAYLOAD;
    unsigned long long fcs = ZSTD_getFrameContentSize(p, n);
    if (fcs == ZSTD_CONTENTSIZE_UNKNOWN || fcs == ZSTD_CONTENTSIZE_ERROR || fcs != raw_len)
        return CKG_E_PAYLOAD;
    if (ZSTD_findFrameCompressedSize(p, n) != n) return CKG_E_PAYLOAD; /* errors are huge */
    return CKG_OK;
}

/* Decode a payload that ckg_zstd_check accepted into dst (raw_len bytes). */
static int zstd_decode(ckg_scratch *s, const uint8_t *p, size_t n, uint8_t *dst, size_t raw_len) {
    if (!s->zd && !(s->zd = ZSTD_createDCtx())) return CKG_E_NOMEM;
    size_t got = ZSTD_decompressDCtx(s->zd, dst, raw_len, p, n);
    return ZSTD_isError(got) || got != raw_len ? CKG_E_PAYLOAD : CKG_OK;
}

/* The input is read exactly once, into a private copy; the hash, the shuffle, the compressor and
 * the payload all come from that copy. Another thread may write to the input meanwhile (a misuse):
 * the chunk then holds some mix of old and new values, but its hash always matches its payload,
 * so a committed checkpoint always verifies (invariant I9). */
int ckg_encode_chunk(const uint8_t *raw, size_t raw_len, unsigned elem, int codec, int level,
                     int digest, uint8_t *out, size_t out_cap, ckg_scratch *scratch,
                     ckg_chunk *res) {
    res->codec = CKG_RAW;
    res->stored_len = raw_len;
    res->payload = out;
    int rc = ckg_check_level(codec, level);
    if (rc) return rc;
    int fits = codec == CKG_SHUFFLE_LZ4    ? raw_len <= (size_t)LZ4_MAX_INPUT_SIZE
               : codec == CKG_SHUFFLE_ZSTD ? !ZSTD_isError(ZSTD_compressBound(raw_len))
                                           : 0;
    int try_codec = fits && raw_len >= CKG_MIN_COMPRESS;
    if (try_codec && (elem == 0 || raw_len % elem)) return CKG_E_ELEM;
    if (out_cap < raw_len) return CKG_E_TOOBIG;
    XXH3_state_t st;
    XXH3_INITSTATE(&st);
    if (XXH3_128bits_reset(&st) != XXH_OK) return CKG_E_NOMEM;
    ckg_sha sha = {NULL, 1};
    if (digest && (rc = ckg_sha_begin(scratch, &sha))) return rc;
    if (!try_codec) { /* the copy in out is the payload */
        copy_hash(out, raw, raw_len, &st, &sha);
        final_hash(&st, res->hash);
        return digest ? ckg_sha_end(&sha, res->digest) : CKG_OK;
    }
    /* scratch: the chunk's copy to compress (shuffled for elem > 1), then one block of input. */
    rc = ckg_scratch_reserve(scratch, raw_len + (elem > 1 ? CKG_BLOCK : 0));
    if (rc) return rc;
    uint8_t *copy = scratch->buf;
    if (elem > 1) {
        uint8_t *block = scratch->buf + raw_len;
        size_t n = raw_len / elem, per = CKG_BLOCK / elem;
        if (per == 0) per = 1;
        for (size_t e0 = 0; e0 < n; e0 += per) {
            size_t e1 = e0 + per < n ? e0 + per : n, k = (e1 - e0) * elem;
            memcpy(block, raw + e0 * elem, k);
            XXH3_128bits_update(&st, block, k);
            ckg_sha_update(&sha, block, k);
            shuffle_range(copy, block - e0 * elem, n, elem, e0, e1);
        }
    } else {
        copy_hash(copy, raw, raw_len, &st, &sha);
    }
    final_hash(&st, res->hash);
    if (digest && (rc = ckg_sha_end(&sha, res->digest))) return rc;
    size_t got = 0; /* 0: the codec failed or the output did not fit */
    rc = codec == CKG_SHUFFLE_LZ4
             ? lz4_compress(copy, raw_len, out, out_cap, &got)
             : zstd_compress(scratch, level, copy, raw_len, out, out_cap, &got);
    if (rc) return rc;
    /* Keep-raw rule: the compressed form must save at least 5% (stored*20 <= raw*19). */
    if (got > 0 && (uint64_t)got * 20 <= (uint64_t)raw_len * 19) {
        res->codec = codec;
        res->stored_len = got;
        return CKG_OK;
    }
    /* Stored raw: the hashed bytes, rebuilt from the copy (never read from the input again). */
    if (elem > 1)
        ckg_unshuffle(out, copy, raw_len / elem, elem);
    else if (raw_len)
        memcpy(out, copy, raw_len);
    return CKG_OK;
}

/* Check the decoded bytes of a chunk against its hash and digest (either may be NULL). */
static int check_whole(const uint8_t *dst, size_t raw_len, ckg_scratch *scratch,
                       const uint8_t *want_hash, const uint8_t *want_digest) {
    uint8_t got[CKG_DIGEST];
    if (want_hash) {
        ckg_hash128(dst, raw_len, got);
        if (memcmp(got, want_hash, 16)) return CKG_E_HASH;
    }
    if (want_digest) {
        int rc = ckg_sha256_with(scratch, dst, raw_len, got);
        if (rc) return rc;
        if (memcmp(got, want_digest, CKG_DIGEST)) return CKG_E_DIGEST;
    }
    return CKG_OK;
}

/* Hash (and digest) dst block by block as it is unshuffled (one pass over the output). */
int ckg_decode_chunk(int codec, const uint8_t *payload, size_t stored_len, size_t raw_len,
                     unsigned elem, uint8_t *dst, ckg_scratch *scratch, const uint8_t *want_hash,
                     const uint8_t *want_digest) {
    if (codec == CKG_RAW) {
        if (stored_len != raw_len) return CKG_E_LENGTH;
        if (raw_len) memcpy(dst, payload, raw_len);
        return check_whole(dst, raw_len, scratch, want_hash, want_digest);
    }
    if (codec != CKG_SHUFFLE_LZ4 && codec != CKG_SHUFFLE_ZSTD) return CKG_E_CODEC;
    if (elem == 0 || raw_len % elem) return CKG_E_ELEM;
    if (codec == CKG_SHUFFLE_LZ4 && (raw_len > (size_t)INT_MAX || stored_len > (size_t)INT_MAX))
        return CKG_E_TOOBIG;
    if (codec == CKG_SHUFFLE_ZSTD) {
        int rc = ckg_zstd_check(payload, stored_len, raw_len);
        if (rc) return rc;
    }
    uint8_t *tmp = dst;
    if (elem > 1) {
        int rc = ckg_scratch_reserve(scratch, raw_len);
        if (rc) return rc;
        tmp = scratch->buf;
    }
    if (codec == CKG_SHUFFLE_ZSTD) {
        int rc = zstd_decode(scratch, payload, stored_len, tmp, raw_len);
        if (rc) return rc;
    } else {
        int n =
            LZ4_decompress_safe((const char *)payload, (char *)tmp, (int)stored_len, (int)raw_len);
        if (n < 0 || (size_t)n != raw_len) return CKG_E_PAYLOAD;
    }
    if (elem == 1) return check_whole(dst, raw_len, scratch, want_hash, want_digest);
    XXH3_state_t st;
    XXH3_INITSTATE(&st);
    if (want_hash && XXH3_128bits_reset(&st) != XXH_OK) return CKG_E_NOMEM;
    ckg_sha sha = {NULL, 1};
    if (want_digest) {
        int rc = ckg_sha_begin(scratch, &sha);
        if (rc) return rc;
    }
    size_t ne = raw_len / elem, per = CKG_BLOCK / elem;
    if (per == 0) per = 1;
    for (size_t e0 = 0; e0 < ne; e0 += per) {
        size_t e1 = e0 + per < ne ? e0 + per : ne;
        unshuffle_range(dst, tmp, ne, elem, e0, e1);
        if (want_hash) XXH3_128bits_update(&st, dst + e0 * elem, (e1 - e0) * elem);
        ckg_sha_update(&sha, dst + e0 * elem, (e1 - e0) * elem);
    }
    if (want_hash) {
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
        if (memcmp(c.digest, want_hash, 16)) return CKG_E_HASH;
    }
    if (want_digest) {
        uint8_t got[CKG_DIGEST];
        int rc = ckg_sha_end(&sha, got);
        if (rc) return rc;
        if (memcmp(got, want_digest, CKG_DIGEST)) return CKG_E_DIGEST;
    }
    return CKG_OK;
}

/* ---- record headers ------------------------------------------------------------------- */

static void put_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

void ckg_pack_record_header(uint8_t out[CKG_REC_HDR], const ckg_rec_header *h) {
    memset(out, 0, CKG_REC_HDR);
    memcpy(out, CKG_REC_MAGIC, 4);
    out[4] = (uint8_t)h->codec;
    out[5] = (uint8_t)h->elem;
    out[6] = (uint8_t)h->flags;
    put_le(out + 8, h->raw_len, 8);
    put_le(out + 16, h->stored_len, 8);
    memcpy(out + 24, h->hash, 16);
    put_le(out + 40, h->seq, 4);
    memcpy(out + 44, h->nonce, CKG_NONCE);
    put_le(out + 56, ckg_hash64(out, 56), 8);
}

int ckg_unpack_record_header(const uint8_t in[CKG_REC_HDR], ckg_rec_header *h) {
    if (memcmp(in, CKG_REC_MAGIC, 4)) return CKG_E_HEADER;
    if (get_le(in + 56, 8) != ckg_hash64(in, 56)) return CKG_E_HEADER;
    if (in[6] > CKG_SEALED || in[7]) return CKG_E_HEADER;
    for (int i = 44; i < 56 && !in[6]; i++) /* the nonce: a sealed record's only */
        if (in[i]) return CKG_E_HEADER;
    h->flags = in[6];
    memcpy(h->nonce, in + 44, CKG_NONCE);
    h->codec = in[4];
    h->elem = in[5];
    h->raw_len = get_le(in + 8, 8);
    h->stored_len = get_le(in + 16, 8);
    memcpy(h->hash, in + 24, 16);
    h->seq = (uint32_t)get_le(in + 40, 4);
    return CKG_OK;
}

int ckg_decode_record(const uint8_t *rec, size_t rec_len, const ckg_rec_header *want, int check_seq,
                      uint8_t *dst, ckg_scratch *scratch, int verify, const uint8_t *want_digest) {
    if (rec_len < CKG_REC_HDR) return CKG_E_TRUNCATED;
    ckg_rec_header h;
    int rc = ckg_unpack_record_header(rec, &h);
    if (rc) return rc;
    if (h.flags || h.codec != want->codec || h.elem != want->elem || h.raw_len != want->raw_len ||
        h.stored_len != want->stored_len || memcmp(h.hash, want->hash, 16) ||
        (check_seq && h.seq != want->seq))
        return CKG_E_MISMATCH;
    if (h.stored_len > rec_len - CKG_REC_HDR) return CKG_E_TRUNCATED;
    size_t end = CKG_REC_HDR + (size_t)h.stored_len;
    for (size_t i = end; i < rec_len; i++)
        if (rec[i]) return CKG_E_PADDING;
    return ckg_decode_chunk(h.codec, rec + CKG_REC_HDR, (size_t)h.stored_len, (size_t)h.raw_len,
                            h.elem, dst, scratch, verify ? h.hash : NULL,
                            verify ? want_digest : NULL);
}
