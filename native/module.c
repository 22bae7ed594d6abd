/* CPython binding of the native chunk pipeline: ckptguard._native.
 *
 * Buffers come in through the buffer protocol (bytes, numpy arrays, memoryviews of torch CPU
 * tensors, pinned memory) and are held for the whole call; every heavy step runs with the GIL
 * released. Decoding problems raise DecodeError(message, index, kind); I/O problems raise OSError
 * with errno and the file name.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <lz4.h>
#include <openssl/crypto.h>
#include <openssl/opensslv.h>
#include <stddef.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include "pipeline.h"

static PyObject *DecodeError;

static const char *kind_of(int code) {
    return code == CKG_E_HASH     ? "hash"
           : code == CKG_E_DIGEST ? "digest"
           : code == CKG_E_IO     ? "io"
                                  : "format";
}

/* Raise the Python error for a failed pipeline (returns NULL). */
static PyObject *raise_failure(const ckg_failure *f, PyObject *path) {
    if (f->code == CKG_E_NOMEM) return PyErr_NoMemory();
    if (f->code == CKG_E_IO) {
        errno = f->err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path ? path : Py_None);
    }
    PyObject *args =
        Py_BuildValue("(sns)", ckg_strerror(f->code), (Py_ssize_t)f->index, kind_of(f->code));
    if (args) {
        PyErr_SetObject(DecodeError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static int get_threads(int threads) {
    if (threads < 1) {
        PyErr_SetString(PyExc_ValueError, "threads must be >= 1");
        return -1;
    }
    return threads > 1024 ? 1024 : threads;
}

static int check_elem(int elem) {
    if (elem < 1 || elem > 255) {
        PyErr_SetString(PyExc_ValueError, "elem_size must be in 1..255");
        return -1;
    }
    return 0;
}

/* ---- small single-buffer functions ------------------------------------------------------ */

static PyObject *py_hash128(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    uint8_t out[16];
    Py_BEGIN_ALLOW_THREADS
    ckg_hash128(b.buf, (size_t)b.len, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *shuffle_common(PyObject *args, int inverse) {
    Py_buffer b;
    int w;
    if (!PyArg_ParseTuple(args, "y*i", &b, &w)) return NULL;
    if (check_elem(w) < 0 || b.len % w) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "width does not divide length");
        PyBuffer_Release(&b);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, b.len);
    if (out) {
        uint8_t *d = (uint8_t *)PyBytes_AS_STRING(out);
        size_t n = (size_t)b.len / (size_t)w;
        Py_BEGIN_ALLOW_THREADS
        if (inverse)
            ckg_unshuffle(d, b.buf, n, (size_t)w);
        else
            ckg_shuffle(d, b.buf, n, (size_t)w);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    return out;
}

static PyObject *py_shuffle(PyObject *self, PyObject *args) {
    (void)self;
    return shuffle_common(args, 0);
}

static PyObject *py_unshuffle(PyObject *self, PyObject *args) {
    (void)self;
    return shuffle_common(args, 1);
}

/* decode(codec, payload, raw_len, elem_size, hash=None) -> bytes */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    (void)self;
    int codec, elem;
    Py_ssize_t raw_len;
    Py_buffer p;
    PyObject *want = Py_None;
    if (!PyArg_ParseTuple(args, "iy*ni|O", &codec, &p, &raw_len, &elem, &want)) return NULL;
    PyObject *out = NULL;
    ckg_failure f = {CKG_OK, 0, 0};
    const uint8_t *h = NULL;
    if (want != Py_None) {
        if (!PyBytes_Check(want) || PyBytes_GET_SIZE(want) != 16) {
            PyErr_SetString(PyExc_ValueError, "hash must be 16 bytes or None");
            goto done;
        }
        h = (const uint8_t *)PyBytes_AS_STRING(want);
    }
    if (raw_len < 0) {
        PyErr_SetString(PyExc_ValueError, "raw_len must be >= 0");
        goto done;
    }
    if (codec != CKG_RAW && codec != CKG_SHUFFLE_LZ4 && codec != CKG_SHUFFLE_ZSTD) {
        f.code = CKG_E_CODEC;
        raise_failure(&f, NULL);
        goto done;
    }
    /* Refuse impossible lengths before allocating: an LZ4 block expands at most ~255x; a zstd
     * frame says how long it is, and that must be raw_len. */
    if ((codec == CKG_RAW && raw_len != p.len) ||
        (codec == CKG_SHUFFLE_LZ4 &&
         (uint64_t)raw_len > (uint64_t)p.len * CKG_LZ4_MAX_RATIO + CKG_LZ4_SLACK))
        f.code = CKG_E_LENGTH;
    else if (codec == CKG_SHUFFLE_ZSTD)
        f.code = ckg_zstd_check(p.buf, (size_t)p.len, (size_t)raw_len);
    if (f.code) {
        raise_failure(&f, NULL);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, raw_len);
    if (!out) goto done;
    int rc;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    rc = ckg_decode_chunk(codec, p.buf, (size_t)p.len, (size_t)raw_len,
                          (unsigned)(elem < 0 ? 0 : elem), dst, ckg_thread_scratch(), h, NULL);
    Py_END_ALLOW_THREADS
    if (rc) {
        Py_CLEAR(out);
        f.code = rc;
        raise_failure(&f, NULL);
    }
done:
    PyBuffer_Release(&p);
    return out;
}

/* ---- encode ---------------------------------------------------------------------------- */

static int check_chunking(Py_ssize_t len, Py_ssize_t chunk, int elem, int codec, int level) {
    int rc = ckg_check_level(codec, level);
    if (rc == CKG_E_CODEC) {
        PyErr_Format(PyExc_ValueError, "unknown codec id %d", codec);
        return -1;
    }
    if (rc == CKG_E_LEVEL) {
        PyErr_Format(PyExc_ValueError, "zstd level must be 0 (level %d) or in %d..%d, not %d",
                     CKG_ZSTD_DEFAULT_LEVEL, ZSTD_minCLevel(), ZSTD_maxCLevel(), level);
        return -1;
    }
    if (chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be >= 1");
        return -1;
    }
    if (codec != CKG_RAW && (len % elem || chunk % elem)) {
        PyErr_SetString(PyExc_ValueError,
                        "buffer length and chunk_size must be multiples of elem_size");
        return -1;
    }
    return 0;
}

static PyObject *info_tuple(const ckg_rec_info *r) {
    return Py_BuildValue("(iny#nn)", r->codec, (Py_ssize_t)r->stored_len, r->hash, (Py_ssize_t)16,
                         (Py_ssize_t)r->offset, (Py_ssize_t)r->raw_len);
}

/* encode(buf, elem_size, chunk_size, codec, level, threads) -> [(codec, payload, hash), ...] */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b;
    int elem, codec, level, threads;
    Py_ssize_t chunk;
    if (!PyArg_ParseTuple(args, "y*iniii", &b, &elem, &chunk, &codec, &level, &threads))
        return NULL;
    PyObject *list = NULL, **outs = NULL;
    uint8_t **ptrs = NULL;
    ckg_rec_info *res = NULL;
    size_t n = 0;
    if (check_elem(elem) < 0 || check_chunking(b.len, chunk, elem, codec, level) < 0 ||
        (threads = get_threads(threads)) < 0)
        goto done;
    n = ckg_nchunks((size_t)b.len, (size_t)chunk);
    outs = PyMem_Calloc(n ? n : 1, sizeof *outs);
    ptrs = PyMem_Calloc(n ? n : 1, sizeof *ptrs);
    res = PyMem_Calloc(n ? n : 1, sizeof *res);
    if (!outs || !ptrs || !res) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        size_t off = i * (size_t)chunk, len = (size_t)b.len - off;
        if (len > (size_t)chunk) len = (size_t)chunk;
        outs[i] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)ckg_encode_bound(len));
        if (!outs[i]) goto done;
        ptrs[i] = (uint8_t *)PyBytes_AS_STRING(outs[i]);
    }
    ckg_failure f;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ckg_encode_buffer(b.buf, (size_t)b.len, (unsigned)elem, (size_t)chunk, codec, level,
                           threads, ptrs, res, &f);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_failure(&f, NULL);
        goto done;
    }
    list = PyList_New((Py_ssize_t)n);
    if (!list) goto done;
    for (size_t i = 0; i < n; i++) {
        if (_PyBytes_Resize(&outs[i], (Py_ssize_t)res[i].stored_len) < 0) {
            Py_CLEAR(list);
            goto done;
        }
        PyObject *t = Py_BuildValue("(iOy#)", res[i].codec, outs[i], res[i].hash, (Py_ssize_t)16);
        if (!t) {
            Py_CLEAR(list);
            goto done;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
done:
    for (size_t i = 0; outs && i < n; i++) Py_XDECREF(outs[i]);
    PyMem_Free(outs);
    PyMem_Free(ptrs);
    PyMem_Free(res);
    PyBuffer_Release(&b);
    return list;
}

/* write_records(fd, path, pos, seq0, buf, elem_size, chunk_size, codec, level, threads, dfd)
 *   -> ([(codec, stored_len, hash, offset, raw_len), ...], end_pos, direct_used,
 *       (enc_ns, write_ns, bytes_written))
 * dfd: an O_DIRECT descriptor of the same file (the caller's, opened once per file), or -1. */
static PyObject *py_write_records(PyObject *self, PyObject *args) {
    (void)self;
    int fd, elem, codec, level, threads, dfd;
    PyObject *name, *path;
    unsigned long long pos, seq0;
    Py_buffer b;
    Py_ssize_t chunk;
    if (!PyArg_ParseTuple(args, "iOKKy*iniiii", &fd, &name, &pos, &seq0, &b, &elem, &chunk, &codec,
                          &level, &threads, &dfd))
        return NULL;
    if (!PyUnicode_FSConverter(name, &path)) {
        PyBuffer_Release(&b);
        return NULL;
    }
    PyObject *out = NULL;
    ckg_rec_info *res = NULL;
    if (check_elem(elem) < 0 || check_chunking(b.len, chunk, elem, codec, level) < 0 ||
        (threads = get_threads(threads)) < 0)
        goto done;
    size_t n = ckg_nchunks((size_t)b.len, (size_t)chunk);
    if (pos % CKG_ALIGN || seq0 + n > CKG_MAX_SEQ) {
        PyErr_SetString(PyExc_ValueError, "pos must be aligned to 4096 and seq fit in 32 bits");
        goto done;
    }
    res = PyMem_Calloc(n ? n : 1, sizeof *res);
    if (!res) {
        PyErr_NoMemory();
        goto done;
    }
    ckg_write_stats st = {0, 0, 0};
    ckg_write_args a = {fd,
                        dfd < 0 ? -1 : dfd,
                        b.buf,
                        (size_t)b.len,
                        (unsigned)elem,
                        (size_t)chunk,
                        codec,
                        level,
                        pos,
                        (uint32_t)seq0,
                        &st,
                        0};
    ckg_failure f;
    uint64_t end = pos;
    int used = 0, rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ckg_write_buffer(&a, threads, res, &end, &used, &f);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_failure(&f, name);
        goto done;
    }
    /* Leave the descriptor's file position after the last record (the footer goes there). */
    if (lseek(fd, (off_t)end, SEEK_SET) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        goto done;
    }
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list) goto done;
    for (size_t i = 0; i < n; i++) {
        PyObject *t = info_tuple(&res[i]);
        if (!t) {
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    out = Py_BuildValue("(NKO(KKK))", list, (unsigned long long)end, used && n ? Py_True : Py_False,
                        (unsigned long long)st.enc_ns, (unsigned long long)st.write_ns,
                        (unsigned long long)st.bytes);
done:
    PyMem_Free(res);
    PyBuffer_Release(&b);
    Py_DECREF(path);
    return out;
}

/* A bytes object of n int64 values, each get(i) (NULL: the error is set). */
static PyObject *int64_column(size_t n, const void *base, size_t stride, size_t at) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * sizeof(int64_t)));
    if (!out) return NULL;
    int64_t *d = (int64_t *)PyBytes_AS_STRING(out);
    for (size_t i = 0; i < n; i++) {
        uint64_t v;
        memcpy(&v, (const char *)base + i * stride + at, sizeof v);
        d[i] = (int64_t)v;
    }
    return out;
}

/* The records of a batch as columns: (codecs, stored_lens, hashes, offsets, raw_lens, digests);
 * codecs one byte each, hashes 16 bytes each, digests 32 bytes each (empty without them), the
 * others native int64. */
static PyObject *record_columns(const ckg_rec_info *res, size_t n, int digest) {
    PyObject *codecs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    PyObject *hashes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(16 * n));
    PyObject *digests = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(digest ? CKG_DIGEST * n : 0));
    if (!codecs || !hashes || !digests) {
        Py_XDECREF(codecs);
        Py_XDECREF(hashes);
        Py_XDECREF(digests);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        PyBytes_AS_STRING(codecs)[i] = (char)res[i].codec;
        memcpy(PyBytes_AS_STRING(hashes) + 16 * i, res[i].hash, 16);
        if (digest) memcpy(PyBytes_AS_STRING(digests) + CKG_DIGEST * i, res[i].digest, CKG_DIGEST);
    }
    size_t sz = sizeof *res;
    return Py_BuildValue("(NNNNNN)", codecs,
                         int64_column(n, res, sz, offsetof(ckg_rec_info, stored_len)), hashes,
                         int64_column(n, res, sz, offsetof(ckg_rec_info, offset)),
                         int64_column(n, res, sz, offsetof(ckg_rec_info, raw_len)), digests);
}

/* Per segment: (direct_used bytes, enc_ns, write_ns, bytes_written as native int64). */
static PyObject *segment_columns(const ckg_segment_stats *st, size_t n) {
    PyObject *direct = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!direct) return NULL;
    for (size_t i = 0; i < n; i++) PyBytes_AS_STRING(direct)[i] = (char)(st[i].direct_used != 0);
    size_t sz = sizeof *st;
    return Py_BuildValue("(NNNN)", direct,
                         int64_column(n, st, sz, offsetof(ckg_segment_stats, st.enc_ns)),
                         int64_column(n, st, sz, offsetof(ckg_segment_stats, st.write_ns)),
                         int64_column(n, st, sz, offsetof(ckg_segment_stats, st.bytes)));
}

/* Hold the buffers of (buf, elem_size, codec, level, direct) items (*held: how many, for the
 * caller to release) and check each as write_records does; -1 with the error set. */
/* A sealed segment's (rkey, fkey, key_id, rows, nrows, first): the keys 32, 32 and 16 bytes,
 * rows bytes, the pack's row count (0: a stretch), a stretch's first chunk number. The pointers
 * borrow the bytes objects of the segment tuple (alive while the segments sequence is). */
static int get_seal(PyObject *o, ckg_seal_args *s) {
    PyObject *rkey, *fkey, *kid, *rows;
    unsigned int nrows;
    unsigned long long first;
    if (!PyArg_ParseTuple(o, "SSSSIK;bad seal", &rkey, &fkey, &kid, &rows, &nrows, &first))
        return -1;
    if (PyBytes_GET_SIZE(rkey) != 32 || PyBytes_GET_SIZE(fkey) != 32 ||
        PyBytes_GET_SIZE(kid) != 16) {
        PyErr_SetString(PyExc_ValueError, "seal keys must be 32, 32 and 16 bytes");
        return -1;
    }
    *s = (ckg_seal_args){(const uint8_t *)PyBytes_AS_STRING(rkey),
                         (const uint8_t *)PyBytes_AS_STRING(fkey),
                         (const uint8_t *)PyBytes_AS_STRING(kid),
                         (const uint8_t *)PyBytes_AS_STRING(rows),
                         (size_t)PyBytes_GET_SIZE(rows),
                         nrows,
                         first};
    return 0;
}

static int get_segments(PyObject *seq, Py_ssize_t chunk, Py_buffer *bufs, ckg_segment *segs,
                        ckg_seal_args *seals, Py_ssize_t *held) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int elem, codec, level, direct;
        PyObject *seal = Py_None;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "y*iiip|O;bad segment", &bufs[i],
                              &elem, &codec, &level, &direct, &seal))
            return -1;
        *held = i + 1;
        if (check_elem(elem) < 0 || check_chunking(bufs[i].len, chunk, elem, codec, level) < 0)
            return -1;
        if (seal != Py_None && get_seal(seal, &seals[i]) < 0) return -1;
        segs[i] = (ckg_segment){bufs[i].buf,
                                (size_t)bufs[i].len,
                                (unsigned)elem,
                                codec,
                                level,
                                direct,
                                seal != Py_None ? &seals[i] : NULL};
    }
    return 0;
}

/* write_segments(fd, path, pos, seq0, [(buf, elem_size, codec, level, direct[, seal]), ...],
 *                chunk_size, threads, dfd, digest=False, uuid=None, rank=0) -> (end, record
 * columns, segment columns): see record_columns and segment_columns. One native call for the
 * chunks of many buffers. A segment with a seal (get_seal) is written in sealed records of the
 * data file of checkpoint uuid (16 bytes) and rank (docs/format.md section 4.4). */
static PyObject *py_write_segments(PyObject *self, PyObject *args) {
    (void)self;
    int fd, threads, dfd, digest = 0;
    unsigned int rank = 0;
    PyObject *name, *path, *seq_obj, *seq = NULL, *out = NULL, *uuid = Py_None;
    unsigned long long pos, seq0;
    Py_ssize_t chunk, held = 0;
    if (!PyArg_ParseTuple(args, "iOKKOnii|pOI", &fd, &name, &pos, &seq0, &seq_obj, &chunk, &threads,
                          &dfd, &digest, &uuid, &rank))
        return NULL;
    if (uuid != Py_None && (!PyBytes_Check(uuid) || PyBytes_GET_SIZE(uuid) != 16)) {
        PyErr_SetString(PyExc_ValueError, "uuid must be 16 bytes or None");
        return NULL;
    }
    if (!PyUnicode_FSConverter(name, &path)) return NULL;
    Py_buffer *bufs = NULL;
    ckg_segment *segs = NULL;
    ckg_seal_args *seals = NULL;
    ckg_segment_stats *stats = NULL;
    ckg_rec_info *res = NULL;
    if ((threads = get_threads(threads)) < 0) goto done;
    if (chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be >= 1");
        goto done;
    }
    if (!(seq = PySequence_Fast(seq_obj, "segments must be a sequence"))) goto done;
    Py_ssize_t ns = PySequence_Fast_GET_SIZE(seq);
    bufs = PyMem_Calloc((size_t)(ns ? ns : 1), sizeof *bufs);
    segs = PyMem_Calloc((size_t)(ns ? ns : 1), sizeof *segs);
    seals = PyMem_Calloc((size_t)(ns ? ns : 1), sizeof *seals);
    stats = PyMem_Calloc((size_t)(ns ? ns : 1), sizeof *stats);
    if (!bufs || !segs || !seals || !stats) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_segments(seq, chunk, bufs, segs, seals, &held) < 0) goto done;
    for (Py_ssize_t i = 0; i < ns; i++)
        if (segs[i].seal && uuid == Py_None) {
            PyErr_SetString(PyExc_ValueError, "a sealed segment needs the data file's uuid");
            goto done;
        }
    size_t n = 0;
    for (Py_ssize_t i = 0; i < ns; i++) n += ckg_nchunks(segs[i].len, (size_t)chunk);
    if (pos % CKG_ALIGN || seq0 + n > CKG_MAX_SEQ) {
        PyErr_SetString(PyExc_ValueError, "pos must be aligned to 4096 and seq fit in 32 bits");
        goto done;
    }
    if (!(res = PyMem_Calloc(n ? n : 1, sizeof *res))) {
        PyErr_NoMemory();
        goto done;
    }
    ckg_batch_args a = {fd,
                        dfd < 0 ? -1 : dfd,
                        (size_t)chunk,
                        pos,
                        (uint32_t)seq0,
                        segs,
                        (size_t)ns,
                        digest,
                        uuid == Py_None ? NULL : (const uint8_t *)PyBytes_AS_STRING(uuid),
                        (uint32_t)rank};
    ckg_failure f;
    uint64_t end = pos;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ckg_write_segments(&a, threads, res, stats, &end, &f);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_failure(&f, name);
        goto done;
    }
    if (lseek(fd, (off_t)end, SEEK_SET) < 0) { /* the footer goes after the last record */
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        goto done;
    }
    out = Py_BuildValue("(KNN)", (unsigned long long)end, record_columns(res, n, digest),
                        segment_columns(stats, (size_t)ns));
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(segs);
    PyMem_Free(seals);
    PyMem_Free(stats);
    PyMem_Free(res);
    Py_XDECREF(seq);
    Py_DECREF(path);
    return out;
}

/* ---- decode into a destination ----------------------------------------------------------- */

static int get_hash(PyObject *o, const uint8_t **h, int allow_none) {
    if (o == Py_None && allow_none) {
        *h = NULL;
        return 0;
    }
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) != 16) {
        PyErr_SetString(PyExc_ValueError, "hash must be 16 bytes");
        return -1;
    }
    *h = (const uint8_t *)PyBytes_AS_STRING(o);
    return 0;
}

/* A 32-byte SHA-256 digest, or None (not checked); the pointer borrows the bytes object. */
static int get_digest(PyObject *o, const uint8_t **d) {
    if (o == Py_None) {
        *d = NULL;
        return 0;
    }
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) != CKG_DIGEST) {
        PyErr_SetString(PyExc_ValueError, "digest must be 32 bytes or None");
        return -1;
    }
    *d = (const uint8_t *)PyBytes_AS_STRING(o);
    return 0;
}

static int check_dest(Py_ssize_t dest_len, unsigned long long off, unsigned long long len,
                      size_t index) {
    if (off > (unsigned long long)dest_len || len > (unsigned long long)dest_len - off) {
        ckg_failure f = {CKG_E_LENGTH, 0, index};
        PyObject *args = Py_BuildValue("(sns)", "chunk does not fit in the destination",
                                       (Py_ssize_t)f.index, "format");
        if (args) {
            PyErr_SetObject(DecodeError, args);
            Py_DECREF(args);
        }
        return -1;
    }
    return 0;
}

/* decode_into(dest, [(codec, payload, raw_len, elem_size, hash|None, dest_offset), ...], threads)
 */
static PyObject *py_decode_into(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *dest_obj, *seq_obj;
    int threads;
    if (!PyArg_ParseTuple(args, "OOi", &dest_obj, &seq_obj, &threads)) return NULL;
    if ((threads = get_threads(threads)) < 0) return NULL;
    Py_buffer d;
    if (PyObject_GetBuffer(dest_obj, &d, PyBUF_WRITABLE) < 0) return NULL;
    PyObject *seq = PySequence_Fast(seq_obj, "items must be a sequence");
    Py_buffer *bufs = NULL;
    ckg_decode_item *items = NULL;
    Py_ssize_t n = 0, held = 0;
    PyObject *ret = NULL;
    if (!seq) goto done;
    n = PySequence_Fast_GET_SIZE(seq);
    bufs = PyMem_Calloc((size_t)(n ? n : 1), sizeof *bufs);
    items = PyMem_Calloc((size_t)(n ? n : 1), sizeof *items);
    if (!bufs || !items) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int codec, elem;
        unsigned long long raw_len, doff;
        PyObject *h;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iy*KiOK;bad decode item", &codec,
                              &bufs[i], &raw_len, &elem, &h, &doff))
            goto done;
        held = i + 1;
        ckg_decode_item *it = &items[i];
        if (get_hash(h, &it->hash, 1) < 0 || check_dest(d.len, doff, raw_len, (size_t)i) < 0)
            goto done;
        it->codec = codec;
        it->elem = (unsigned)(elem < 0 ? 0 : elem);
        it->payload = bufs[i].buf;
        it->stored_len = (size_t)bufs[i].len;
        it->raw_len = (size_t)raw_len;
        it->dst = (uint8_t *)d.buf + doff;
    }
    ckg_failure f;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ckg_decode_many(items, (size_t)n, threads, &f);
    Py_END_ALLOW_THREADS
    if (rc)
        raise_failure(&f, NULL);
    else
        ret = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(items);
    Py_XDECREF(seq);
    PyBuffer_Release(&d);
    return ret;
}

/* read_into(fd, path, dest, [(offset, extent, codec, elem, raw_len, stored_len, hash,
 *                             dest_offset, seq), ...], threads, verify); seq < 0: not checked */
/* A sealed record's (rkey, fkey, aad) for reading: 32, 32 and any bytes, borrowed from the item
 * (alive while the items sequence is). */
static int get_open(PyObject *o, ckg_open_args *s) {
    PyObject *rkey, *fkey, *aad;
    if (!PyArg_ParseTuple(o, "SSS;bad seal", &rkey, &fkey, &aad)) return -1;
    if (PyBytes_GET_SIZE(rkey) != 32 || PyBytes_GET_SIZE(fkey) != 32) {
        PyErr_SetString(PyExc_ValueError, "seal keys must be 32 bytes");
        return -1;
    }
    *s = (ckg_open_args){(const uint8_t *)PyBytes_AS_STRING(rkey),
                         (const uint8_t *)PyBytes_AS_STRING(fkey),
                         (const uint8_t *)PyBytes_AS_STRING(aad), (size_t)PyBytes_GET_SIZE(aad)};
    return 0;
}

static PyObject *py_read_into(PyObject *self, PyObject *args) {
    (void)self;
    int fd, threads, verify;
    PyObject *name, *dest_obj, *seq_obj;
    if (!PyArg_ParseTuple(args, "iOOOip", &fd, &name, &dest_obj, &seq_obj, &threads, &verify))
        return NULL;
    PyObject *ret = NULL, *seq = NULL;
    ckg_read_item *items = NULL;
    Py_buffer d = {0};
    int have_d = 0;
    if ((threads = get_threads(threads)) < 0) goto done;
    if (PyObject_GetBuffer(dest_obj, &d, PyBUF_WRITABLE) < 0) goto done;
    have_d = 1;
    seq = PySequence_Fast(seq_obj, "items must be a sequence");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    items = PyMem_Calloc((size_t)(n ? n : 1), sizeof *items);
    if (!items) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long off, ext, raw_len, stored_len, doff;
        long long rseq;
        int codec, elem;
        PyObject *h, *dg = Py_None, *sl = Py_None;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKiiKKOKL|OO;bad read item", &off,
                              &ext, &codec, &elem, &raw_len, &stored_len, &h, &doff, &rseq, &dg,
                              &sl))
            goto done;
        ckg_read_item *it = &items[i];
        if (sl != Py_None && get_open(sl, &it->seal) < 0) goto done;
        const uint8_t *hp;
        if (get_hash(h, &hp, 0) < 0 || get_digest(dg, &it->digest) < 0 ||
            check_dest(d.len, doff, raw_len, (size_t)i) < 0)
            goto done;
        if (ext > CKG_MAX_EXTENT) {
            PyErr_SetString(PyExc_ValueError, "record extent too large");
            goto done;
        }
        it->offset = off;
        it->extent = (size_t)ext;
        it->want.codec = codec;
        it->want.elem = (unsigned)(elem < 0 ? 0 : elem);
        it->want.raw_len = raw_len;
        it->want.stored_len = stored_len;
        memcpy(it->want.hash, hp, 16);
        it->want.seq = rseq < 0 ? 0 : (uint32_t)rseq;
        it->check_seq = rseq >= 0 && (uint64_t)rseq <= CKG_MAX_SEQ;
        if (rseq > (long long)CKG_MAX_SEQ) {
            PyErr_SetString(PyExc_ValueError, "seq must fit in 32 bits");
            goto done;
        }
        it->dst = (uint8_t *)d.buf + doff;
    }
    ckg_failure f;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ckg_read_records(fd, items, (size_t)n, threads, verify, &f);
    Py_END_ALLOW_THREADS
    if (rc)
        raise_failure(&f, name);
    else
        ret = Py_NewRef(Py_None);
done:
    PyMem_Free(items);
    Py_XDECREF(seq);
    if (have_d) PyBuffer_Release(&d);
    return ret;
}

/* ---- misc ------------------------------------------------------------------------------- */

static PyObject *py_versions(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    unsigned x = XXH_versionNumber(), c = XXH_VERSION_NUMBER;
    char xv[32], xc[32];
    snprintf(xv, sizeof xv, "%u.%u.%u", x / 10000, x / 100 % 100, x % 100);
    snprintf(xc, sizeof xc, "%u.%u.%u", c / 10000, c / 100 % 100, c % 100);
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:s}", "lz4", LZ4_versionString(),
                         "lz4_compiled", LZ4_VERSION_STRING, "zstd", ZSTD_versionString(),
                         "zstd_compiled", ZSTD_VERSION_STRING, "xxhash", xv, "xxhash_compiled", xc,
                         "openssl", OpenSSL_version(OPENSSL_VERSION), "openssl_compiled",
                         OPENSSL_VERSION_TEXT);
}

static PyObject *py_wait_written(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    PyObject *name;
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "iOKK", &fd, &name, &off, &len)) return NULL;
    if (off > (unsigned long long)INT64_MAX || len > (unsigned long long)INT64_MAX - off) {
        PyErr_SetString(PyExc_ValueError, "offset and length must lie within 2**63");
        return NULL;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = ckg_wait_written(fd, (uint64_t)off, (uint64_t)len);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    }
    Py_RETURN_NONE;
}

static PyObject *py_inject(PyObject *self, PyObject *args) {
    (void)self;
    int err;
    long after = 0;
    if (!PyArg_ParseTuple(args, "i|l", &err, &after)) return NULL;
    ckg_io_inject(err, after);
    Py_RETURN_NONE;
}

/* The docstrings open with the signature (CPython's __text_signature__), which
 * ckptguard/_native.pyi states with types and stubtest holds against these. */
static PyMethodDef methods[] = {
    {"hash128", py_hash128, METH_O,
     "hash128($module, buf, /)\n--\n\nxxh3-128 of a buffer, canonical 16 bytes."},
    {"shuffle", py_shuffle, METH_VARARGS,
     "shuffle($module, buf, width, /)\n--\n\nByte-plane shuffled bytes of buf."},
    {"unshuffle", py_unshuffle, METH_VARARGS,
     "unshuffle($module, buf, width, /)\n--\n\nInverse of shuffle."},
    {"decode", py_decode, METH_VARARGS,
     "decode($module, codec, payload, raw_len, elem_size, hash=None, /)\n--\n\n"
     "The raw bytes of one chunk payload."},
    {"encode", py_encode, METH_VARARGS,
     "encode($module, buf, elem_size, chunk_size, codec, level, threads, /)\n--\n\n"
     "Chunk and encode buf: [(codec, payload, hash), ...]."},
    {"write_records", py_write_records, METH_VARARGS,
     "write_records($module, fd, path, pos, seq0, buf, elem_size, chunk_size, codec, "
     "level, threads, dfd, /)\n--\n\n"
     "Encode buf and write its records at pos (dfd: an O_DIRECT descriptor or -1): "
     "([(codec, stored_len, hash, offset, raw_len)], end, direct_used, "
     "(enc_ns, write_ns, bytes_written))."},
    {"write_segments", py_write_segments, METH_VARARGS,
     "write_segments($module, fd, path, pos, seq0, segments, chunk_size, threads, dfd, "
     "digest=False, uuid=None, rank=0, /)\n--\n\n"
     "Encode and write the records of every (buf, elem_size, codec, level, direct[, seal]) "
     "segment at "
     "pos in one call: (end, (codecs, stored_lens, hashes, offsets, raw_lens, digests), "
     "(direct_used, enc_ns, write_ns, bytes_written)); codecs and direct_used one byte each, "
     "hashes 16, digests 32 (SHA-256; empty unless digest), the others native int64."},
    {"decode_into", py_decode_into, METH_VARARGS,
     "decode_into($module, dest, items, threads, /)\n--\n\n"
     "Decode (codec, payload, raw_len, elem_size, hash, dest_offset) items into dest."},
    {"read_into", py_read_into, METH_VARARGS,
     "read_into($module, fd, path, dest, items, threads, verify, /)\n--\n\n"
     "Read, check and decode (offset, extent, codec, elem_size, raw_len, stored_len, hash, "
     "dest_offset, seq[, digest]) records into dest."},
    {"wait_written", py_wait_written, METH_VARARGS,
     "wait_written($module, fd, path, offset, length, /)\n--\n\n"
     "Write back the dirty pages of [offset, offset + length) (length 0: to the end) and wait "
     "for them, without a cache flush; a writeback error raises OSError naming path."},
    {"library_versions", py_versions, METH_NOARGS,
     "library_versions($module, /)\n--\n\nVersions of the linked LZ4, zstd and xxHash."},
    {"_inject_io_error", py_inject, METH_VARARGS,
     "_inject_io_error($module, err, after=0, /)\n--\n\n"
     "Test hook: fail a later write or read with errno err (0 disables)."},
    {NULL, NULL, 0, NULL},
};

/* Add a new reference (NULL: the error is set) to m as name, and drop it. */
static int add_owned(PyObject *m, const char *name, PyObject *value) {
    int rc = value ? PyModule_AddObjectRef(m, name, value) : -1;
    Py_XDECREF(value);
    return rc;
}

/* The format constants the C code uses, so that a test can hold them against Python's. */
static int add_constants(PyObject *m) {
    if (PyModule_AddIntConstant(m, "RAW", CKG_RAW) < 0 ||
        PyModule_AddIntConstant(m, "SHUFFLE_LZ4", CKG_SHUFFLE_LZ4) < 0 ||
        PyModule_AddIntConstant(m, "SHUFFLE_ZSTD", CKG_SHUFFLE_ZSTD) < 0 ||
        PyModule_AddIntConstant(m, "ZSTD_MAX_RATIO", CKG_ZSTD_MAX_RATIO) < 0 ||
        PyModule_AddIntConstant(m, "ZSTD_MIN_LEVEL", ZSTD_minCLevel()) < 0 ||
        PyModule_AddIntConstant(m, "ZSTD_MAX_LEVEL", ZSTD_maxCLevel()) < 0 ||
        PyModule_AddIntConstant(m, "ALIGN", CKG_ALIGN) < 0 ||
        PyModule_AddIntConstant(m, "REC_HDR", CKG_REC_HDR) < 0 ||
        PyModule_AddIntConstant(m, "MIN_COMPRESS", CKG_MIN_COMPRESS) < 0 ||
        PyModule_AddIntConstant(m, "LZ4_MAX_RATIO", CKG_LZ4_MAX_RATIO) < 0 ||
        PyModule_AddIntConstant(m, "LZ4_SLACK", CKG_LZ4_SLACK) < 0 ||
        PyModule_AddIntConstant(m, "LZ4_MAX_INPUT", LZ4_MAX_INPUT_SIZE) < 0)
        return -1;
    if (add_owned(m, "MAX_EXTENT", PyLong_FromUnsignedLongLong(CKG_MAX_EXTENT)) < 0 ||
        add_owned(m, "MAX_SEQ", PyLong_FromUnsignedLongLong(CKG_MAX_SEQ)) < 0 ||
        add_owned(m, "REC_MAGIC", PyBytes_FromStringAndSize(CKG_REC_MAGIC, 4)) < 0)
        return -1;
    return 0;
}

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT,
                                    "_native",
                                    "Native chunk pipeline of ckptguard (see docs/native.md).",
                                    -1,
                                    methods,
                                    NULL,
                                    NULL,
                                    NULL,
                                    NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    DecodeError = PyErr_NewExceptionWithDoc(
        "ckptguard._native.DecodeError",
        "A chunk cannot be decoded or fails its hash: args are (message, index, kind).",
        PyExc_ValueError, NULL);
    if (!DecodeError || PyModule_AddObject(m, "DecodeError", DecodeError) < 0) {
        Py_XDECREF(DecodeError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(DecodeError);
    if (add_constants(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
