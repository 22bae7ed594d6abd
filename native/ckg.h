/* ckptguard native chunk pipeline: shared declarations.
 *
 * The byte formats implemented here are defined by docs/format.md section 7 (chunk records,
 * byte-plane shuffle, LZ4 block and zstd frame payloads, keep-raw rule). Everything here is plain
 * C11 + POSIX threads and links the system LZ4, zstd and xxHash libraries, and OpenSSL's libcrypto
 * for the chunk digest (SHA-256, docs/format.md section 4, feature `digests`).
 */
#ifndef CKG_H
#define CKG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define CKG_RAW 0
#define CKG_SHUFFLE_LZ4 1
#define CKG_SHUFFLE_ZSTD 2
#define CKG_REC_HDR 64
#define CKG_ALIGN 4096
#define CKG_WRITEBACK_WINDOW (1u << 20) /* early writeback of records goes by these windows */
#define CKG_MIN_COMPRESS 64             /* chunks shorter than this are always stored raw */
#define CKG_REC_MAGIC "CKGR"            /* the first 4 bytes of every chunk record header */
/* An LZ4 block expands at most ~255x: a payload of n bytes decodes to at most n*RATIO+SLACK. */
#define CKG_LZ4_MAX_RATIO 256
#define CKG_LZ4_SLACK 64
/* A zstd frame block decodes to at most 128 KiB and takes at least 4 payload bytes (an RLE
 * block): a payload of n bytes decodes to at most n*RATIO bytes. */
#define CKG_ZSTD_MAX_RATIO 32768
#define CKG_ZSTD_DEFAULT_LEVEL 1           /* level 0 asks for this one */
#define CKG_MAX_EXTENT ((uint64_t)1 << 40) /* longer records are refused before reading */
#define CKG_MAX_SEQ 0xFFFFFFFFull          /* record sequence numbers are 32 bits */
#define CKG_DIGEST 32                      /* a chunk digest: SHA-256 of its raw bytes */
#define CKG_NONCE 12                       /* a sealed record's AES-GCM nonce */
#define CKG_TAG 16                         /* and its authentication tag */
#define CKG_SEALED 1                       /* the record header's flag of a sealed record */

/* Status codes of the chunk and record functions (0 = ok). */
enum {
    CKG_OK = 0,
    CKG_E_NOMEM = 1,      /* allocation failed */
    CKG_E_CODEC = 2,      /* unknown codec id */
    CKG_E_LENGTH = 3,     /* a length does not fit (raw payload length, destination size) */
    CKG_E_ELEM = 4,       /* elem_size is 0 or does not divide raw_len */
    CKG_E_PAYLOAD = 5,    /* compressed payload is malformed or decodes to the wrong length */
    CKG_E_HASH = 6,       /* decoded bytes do not match their xxh3-128 */
    CKG_E_HEADER = 7,     /* record header: bad magic, hash, reserved bytes */
    CKG_E_MISMATCH = 8,   /* record header disagrees with what the index says */
    CKG_E_PADDING = 9,    /* non-zero bytes in a record's padding */
    CKG_E_TRUNCATED = 10, /* the file ends inside a record */
    CKG_E_IO = 11,        /* a system call failed: see the errno stored beside the code */
    CKG_E_TOOBIG = 12,    /* a length beyond what LZ4 or this platform handles */
    CKG_E_LEVEL = 13,     /* a compression level the codec does not have */
    CKG_E_DIGEST = 14,    /* decoded bytes do not match their SHA-256 digest */
    CKG_E_CRYPTO = 15,    /* libcrypto could not seal a record */
    CKG_E_AUTH = 16,      /* a sealed record does not authenticate */
    CKG_E_STORED = 17,    /* a sealed record's stored bytes do not match their hash */
};

const char *ckg_strerror(int code);

/* ---- chunk.c: one chunk at a time ---------------------------------------------------- */

static inline size_t ckg_align_up(size_t n) {
    return (n + (CKG_ALIGN - 1)) / CKG_ALIGN * CKG_ALIGN;
}

/* xxh3-128 (seed 0) of buf in its canonical big-endian 16-byte form. */
void ckg_hash128(const void *buf, size_t len, uint8_t out[16]);
uint64_t ckg_hash64(const void *buf, size_t len);
/* SHA-256 of buf (OpenSSL); CKG_E_NOMEM if libcrypto cannot make a digest context. */
int ckg_sha256(const void *buf, size_t len, uint8_t out[CKG_DIGEST]);

/* Byte-plane shuffle of n elements of width w: dst[j*n + i] = src[i*w + j]. */
void ckg_shuffle(uint8_t *dst, const uint8_t *src, size_t n, size_t w);
/* Inverse: dst[i*w + j] = src[j*n + i]. */
void ckg_unshuffle(uint8_t *dst, const uint8_t *src, size_t n, size_t w);

/* Capacity that ckg_encode_chunk needs in `out` for a chunk of raw_len bytes, whatever the codec.
 */
size_t ckg_encode_bound(size_t raw_len);

/* Whether codec can be asked for at level (CKG_OK, CKG_E_CODEC or CKG_E_LEVEL). LZ4 and raw take
 * any level (they have one); zstd takes 0 (CKG_ZSTD_DEFAULT_LEVEL) and ZSTD_minCLevel() ..
 * ZSTD_maxCLevel(). */
int ckg_check_level(int codec, int level);

/* Per-thread scratch space, grown on demand, and the thread's zstd contexts (created on first
 * use, reused); free all with ckg_scratch_free. Zero-initialize. */
typedef struct {
    uint8_t *buf;
    size_t cap;
    struct ZSTD_CCtx_s *zc;
    struct ZSTD_DCtx_s *zd;
    struct evp_md_ctx_st *sha; /* SHA-256 context, reused from chunk to chunk */
} ckg_scratch;

int ckg_scratch_reserve(ckg_scratch *s, size_t n);
void ckg_scratch_free(ckg_scratch *s);

/* Result of encoding one chunk. payload is always `out` (compressed or raw). */
typedef struct {
    int codec;
    size_t stored_len;
    const uint8_t *payload;
    uint8_t hash[16];
    uint8_t digest[CKG_DIGEST]; /* set only when asked for */
} ckg_chunk;

/* Copy raw once into private memory, hash that copy and (for a codec other than CKG_RAW)
 * shuffle it by elem and compress it with that codec at `level` (0: the codec's default) into out
 * (capacity out_cap >= ckg_encode_bound(raw_len)); keep the compressed form only if it saves
 * >= 5%, else out gets the copied raw bytes. The hash is always of the bytes the payload holds,
 * even while another thread writes to raw; so is the SHA-256 digest, computed in the same pass when
 * `digest` is set. CKG_E_CODEC for a codec this build cannot write. */
int ckg_encode_chunk(const uint8_t *raw, size_t raw_len, unsigned elem, int codec, int level,
                     int digest, uint8_t *out, size_t out_cap, ckg_scratch *scratch,
                     ckg_chunk *res);

/* Check a shuffle-zstd payload of n bytes against raw_len without decoding or allocating anything
 * (docs/format.md section 7): CKG_E_LENGTH if no frame of n bytes decodes to raw_len bytes,
 * CKG_E_PAYLOAD if the frame is not exactly one plain frame of content size raw_len. */
int ckg_zstd_check(const uint8_t *p, size_t n, size_t raw_len);

/* Decode one payload into dst (exactly raw_len bytes). If want_hash is not NULL, the decoded
 * bytes must hash to it (CKG_E_HASH otherwise); if want_digest is not NULL, their SHA-256 must be
 * it (CKG_E_DIGEST otherwise). dst is written even when an error is returned. */
int ckg_decode_chunk(int codec, const uint8_t *payload, size_t stored_len, size_t raw_len,
                     unsigned elem, uint8_t *dst, ckg_scratch *scratch, const uint8_t *want_hash,
                     const uint8_t *want_digest);

/* ---- digest.c: SHA-256 through OpenSSL's EVP interface ---------------------------------- */

/* One digest in progress: ctx is the scratch's context (NULL: no digest is wanted, and updates
 * do nothing); ok turns 0 on the first failed update. */
typedef struct {
    struct evp_md_ctx_st *ctx;
    int ok;
} ckg_sha;

int ckg_sha_begin(ckg_scratch *s, ckg_sha *h);
void ckg_sha_update(ckg_sha *h, const void *p, size_t n);
int ckg_sha_end(ckg_sha *h, uint8_t out[CKG_DIGEST]);
/* SHA-256 of one buffer with the scratch's context. */
int ckg_sha256_with(ckg_scratch *s, const void *buf, size_t len, uint8_t out[CKG_DIGEST]);
/* Free the scratch's digest context (ckg_scratch_free does). */
void ckg_sha_free(ckg_scratch *s);

/* ---- records (docs/format.md section 7, chunk record) -------------------------------- */

typedef struct {
    int codec;
    unsigned elem;
    uint64_t raw_len;
    uint64_t stored_len;
    uint8_t hash[16];
    uint32_t seq;
    int flags;                /* CKG_SEALED or 0 (written; readers here refuse sealed records) */
    uint8_t nonce[CKG_NONCE]; /* a sealed record's nonce; zero otherwise */
} ckg_rec_header;

void ckg_pack_record_header(uint8_t out[CKG_REC_HDR], const ckg_rec_header *h);
/* Checks magic, header hash and reserved bytes (not the codec id). */
int ckg_unpack_record_header(const uint8_t in[CKG_REC_HDR], ckg_rec_header *h);

/* Check and decode a whole record extent (header + payload + padding) that a reader expects to
 * hold `want` (its seq is compared only if check_seq); writes want->raw_len bytes into dst. With
 * verify, the bytes must match the header's hash and, if want_digest is not NULL, that digest. */
int ckg_decode_record(const uint8_t *rec, size_t rec_len, const ckg_rec_header *want, int check_seq,
                      uint8_t *dst, ckg_scratch *scratch, int verify, const uint8_t *want_digest);

/* ---- seal.c: sealed records (docs/format.md section 4.4) ---------------------------- */

/* Encrypt buf[0..len) in place with AES-256-GCM under key, nonce and aad; the tag goes to tag.
 * CKG_E_CRYPTO (or CKG_E_NOMEM) if libcrypto fails. */
int ckg_seal_payload(const uint8_t key[32], const uint8_t nonce[CKG_NONCE], const uint8_t *aad,
                     size_t aad_len, uint8_t *buf, size_t len, uint8_t tag[CKG_TAG]);
/* A sealed row's index hash: the 16-byte block `in` enciphered with AES-256 under key. */
int ckg_fingerprint(const uint8_t key[32], const uint8_t in[16], uint8_t out[16]);

/* What opening a sealed record needs: its data file's record key, the fingerprint key, and the
 * record's associated data (built by the caller from the index). rkey NULL: not sealed. */
typedef struct {
    const uint8_t *rkey;
    const uint8_t *fkey;
    const uint8_t *aad;
    size_t aad_len;
} ckg_open_args;

/* ckg_decode_record for a sealed record (want->hash: the row's fingerprint): the header (flag,
 * fields, the xxh3-128 of the stored bytes), the padding, with verify the digest of the stored
 * bytes; then the payload is authenticated and decrypted in place (rec is written), decoded into
 * dst and, with verify, its fingerprint compared. CKG_E_AUTH, CKG_E_STORED, ... */
int ckg_open_record(uint8_t *rec, size_t rec_len, const ckg_rec_header *want, int check_seq,
                    const ckg_open_args *keys, uint8_t *dst, ckg_scratch *scratch, int verify,
                    const uint8_t *want_digest);

/* ---- pool.c: run fn(ctx, task, worker) for task in [0, ntasks) on up to nthreads threads --- */

typedef void (*ckg_task_fn)(void *ctx, size_t task, int worker);

/* The calling thread takes part (as worker 0). Tasks are handed out in increasing order.
 * Returns the number of workers that ran (>= 1). Never fails: without threads it runs inline. */
int ckg_parallel(int nthreads, size_t ntasks, ckg_task_fn fn, void *ctx);

/* ---- io.c ------------------------------------------------------------------------------ */

/* Write all of an iovec list at off (retrying short writes and EINTR). 0 or an errno. */
struct iovec;
int ckg_pwritev_all(int fd, struct iovec *iov, int iovcnt, off_t off);
int ckg_pwrite_all(int fd, const void *buf, size_t len, off_t off);
/* Read up to len bytes at off; *got is what was read (less only at end of file). 0 or errno. */
int ckg_pread_all(int fd, void *buf, size_t len, off_t off, size_t *got);
/* Open path for writing with O_DIRECT; -1 (errno set) if the file system refuses it. */
int ckg_open_direct(const char *path);
void *ckg_aligned_alloc(size_t n);
void ckg_aligned_free(void *p);

/* Test hook: make the n-th next write or read (0 = the next; ckg_pwritev_all, ckg_pwrite_all
 * and ckg_pread_all count alike) fail with errno err (0 disables). */
void ckg_io_inject(int err, long after);

#endif
