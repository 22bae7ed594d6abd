/* Whole-buffer pipelines over the pool: encode, encode+write, decode, read+decode. */
#ifndef CKG_PIPELINE_H
#define CKG_PIPELINE_H

#include "ckg.h"

/* What one chunk became. offset is set by the write pipeline only. */
typedef struct {
    int codec;
    size_t raw_len;
    size_t stored_len;
    uint64_t offset;
    uint8_t hash[16];
    uint8_t digest[CKG_DIGEST]; /* the write pipelines' records, when asked for */
} ckg_rec_info;

/* Where a pipeline failed: the chunk/item index, the status code, and errno for CKG_E_IO. */
typedef struct {
    int code;
    int err;
    size_t index;
} ckg_failure;

static inline size_t ckg_nchunks(size_t len, size_t chunk) {
    return chunk ? (len + chunk - 1) / chunk : 0;
}

/* Encode buf in chunks of `chunk` bytes (the last may be shorter). outs[i] must hold
 * ckg_encode_bound(len of chunk i) bytes; the payload (raw or compressed) is written there. */
int ckg_encode_buffer(const uint8_t *buf, size_t len, unsigned elem, size_t chunk, int codec,
                      int level, int threads, uint8_t *const *outs, ckg_rec_info *res,
                      ckg_failure *fail);

/* What a write pipeline measured, for the caller's choice of codec and I/O mode
 * (ckptguard/adapt.py). Times are CLOCK_MONOTONIC nanoseconds. */
typedef struct {
    uint64_t enc_ns;   /* copy + hash + encode, summed over the threads */
    uint64_t write_ns; /* pwrite, plus for buffered records starting and awaiting writeback */
    uint64_t bytes;    /* bytes of records written (headers, payloads, padding) */
} ckg_write_stats;

/* Buffered records: the writer waits for the writeback of what lies this far behind the record
 * it writes, so that dirty pages stay bounded, the one fsync at the end has little left, and the
 * time of a write is the disk's rate rather than the page cache's. */
#define CKG_WRITEBACK_LAG ((uint64_t)64 << 20)

/* Start the writeback of the dirty pages of [off, off + len) of fd (len 0: to the end of the
 * file) and wait for it, without flushing the device's cache: afterwards a write's time
 * includes the disk's. 0, or the errno of a writeback error (a file that cannot sync ranges
 * is not an error). */
int ckg_wait_written(int fd, uint64_t off, uint64_t len);

typedef struct {
    int fd;  /* buffered descriptor of the data file */
    int dfd; /* O_DIRECT descriptor of the same file, or -1 */
    const uint8_t *buf;
    size_t len;
    unsigned elem;
    size_t chunk;
    int codec;     /* the codec to try on every chunk (CKG_RAW: none); see ckg_encode_chunk */
    int level;     /* its level (0: the codec's default) */
    uint64_t pos;  /* offset of the first record (a multiple of 4096) */
    uint32_t seq0; /* sequence number of the first record */
    ckg_write_stats *stats; /* if not NULL: set to what this call measured */
    int digest;             /* compute each record's SHA-256 digest too */
} ckg_write_args;

/* Encode and write every chunk of a->buf as aligned records at increasing offsets from a->pos.
 * Workers encode (or copy and hash) chunks in parallel; the records are written one at a time,
 * in order: two threads appending to one file contend on its inode lock, and the kernel spins
 * there. *end is the offset after the last record's padding.
 * *direct_used ends 1 if every record went through dfd, 0 if dfd was absent or was refused. */
int ckg_write_buffer(const ckg_write_args *a, int threads, ckg_rec_info *res, uint64_t *end,
                     int *direct_used, ckg_failure *fail);

/* One buffer of a batch written in one call (ckg_write_segments): its chunks are encoded with
 * its own element size and codec. A model state of many medium tensors is one batch. */
/* How a segment's records are sealed (docs/format.md section 4.4). The associated data of
 * each is its head (uuid, rank, sequence number, key id, codec, elem_size, raw length, rows)
 * and its rows: a pack's `rows` as given (`nrows` of them, one record); a stretch's one row per
 * chunk, built here from its chunk number (`first` plus its place in the segment) and `rows`,
 * the row's bytes after its shard_byte_offset (dimensions, shard offsets, key). */
typedef struct {
    const uint8_t *rkey;   /* 32 bytes: the data file's record key */
    const uint8_t *fkey;   /* 32 bytes: the fingerprint key */
    const uint8_t *key_id; /* 16 bytes */
    const uint8_t *rows;
    size_t rows_len;
    uint32_t nrows; /* a pack's rows; 0: a stretch */
    uint64_t first; /* a stretch's first chunk number */
} ckg_seal_args;

typedef struct {
    const uint8_t *buf;
    size_t len;
    unsigned elem;
    int codec;  /* the codec to try on every chunk (CKG_RAW: none); see ckg_encode_chunk */
    int level;  /* its level (0: the codec's default) */
    int direct; /* its records go through the O_DIRECT descriptor, where there is one */
    const ckg_seal_args *seal; /* NULL: records in the clear */
} ckg_segment;

/* What one segment's records measured, and whether every one went through O_DIRECT (a segment
 * without records: whether it asked for it and the descriptor was there). */
typedef struct {
    ckg_write_stats st;
    int direct_used;
} ckg_segment_stats;

typedef struct {
    int fd;  /* buffered descriptor of the data file */
    int dfd; /* O_DIRECT descriptor of the same file, or -1 */
    size_t chunk;
    uint64_t pos;  /* offset of the first record (a multiple of 4096) */
    uint32_t seq0; /* sequence number of the first record */
    const ckg_segment *segs;
    size_t nsegs;
    int digest;          /* compute each record's SHA-256 digest too (of a sealed one: stored) */
    const uint8_t *uuid; /* 16 bytes: the data file's checkpoint uuid (sealed segments only) */
    uint32_t rank;       /* the data file's rank (sealed segments only) */
} ckg_batch_args;

/* ckg_write_buffer over several buffers at once: the chunks of every segment, in order, are the
 * pool's tasks of one run, written as consecutive records (the same bytes as one
 * ckg_write_buffer call per segment). res has a slot per chunk of all segments, stats one per
 * segment. Once O_DIRECT is refused, the rest of the batch is written buffered. */
int ckg_write_segments(const ckg_batch_args *a, int threads, ckg_rec_info *res,
                       ckg_segment_stats *stats, uint64_t *end, ckg_failure *fail);

typedef struct {
    int codec;
    unsigned elem;
    const uint8_t *payload;
    size_t stored_len;
    size_t raw_len;
    const uint8_t *hash; /* NULL: do not verify */
    uint8_t *dst;        /* raw_len bytes */
} ckg_decode_item;

int ckg_decode_many(const ckg_decode_item *items, size_t n, int threads, ckg_failure *fail);

typedef struct {
    uint64_t offset; /* of the record */
    size_t extent;   /* align(offset + 64 + stored_len) - offset */
    ckg_rec_header want;
    int check_seq;         /* compare want.seq with the record's sequence number */
    uint8_t *dst;          /* want.raw_len bytes */
    const uint8_t *digest; /* the SHA-256 its bytes must have (when verifying); NULL: none */
    ckg_open_args seal;    /* a sealed record's keys and associated data; rkey NULL: clear */
} ckg_read_item;

/* pread each record extent (with posix_fadvise), check header and padding, decode into dst and
 * verify its hash and digest (if verify). Items should be in offset order. */
int ckg_read_records(int fd, const ckg_read_item *items, size_t n, int threads, int verify,
                     ckg_failure *fail);

/* The calling thread's cached scratch buffer (for single-chunk calls). */
ckg_scratch *ckg_thread_scratch(void);

/* Free the calling thread's cached scratch buffers (pool threads keep theirs). */
void ckg_release_thread_buffers(void);

#endif
