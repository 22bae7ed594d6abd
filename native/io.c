/* Positional I/O helpers: full writes and reads, O_DIRECT opening, aligned buffers, and a fault
 * hook for tests that fails the n-th next write or read with a given errno. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ckg.h"

static atomic_int inject_err;
static atomic_long inject_after;

void ckg_io_inject(int err, long after) {
    atomic_store(&inject_after, after);
    atomic_store(&inject_err, err);
}

static int injected(void) {
    int err = atomic_load(&inject_err);
    if (!err) return 0;
    if (atomic_fetch_sub(&inject_after, 1) > 0) return 0;
    atomic_store(&inject_err, 0);
    return err;
}

int ckg_pwritev_all(int fd, struct iovec *iov, int iovcnt, off_t off) {
    int err = injected();
    if (err) return err;
    while (iovcnt > 0) {
        ssize_t n = pwritev(fd, iov, iovcnt > IOV_MAX ? IOV_MAX : iovcnt, off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) return EIO;
        off += n;
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

int ckg_pwrite_all(int fd, const void *buf, size_t len, off_t off) {
    struct iovec v = {(void *)buf, len};
    return ckg_pwritev_all(fd, &v, 1, off);
}

int ckg_pread_all(int fd, void *buf, size_t len, off_t off, size_t *got) {
    size_t done = 0;
    *got = 0;
    int err = injected();
    if (err) return err;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);
        if (n < 0) {
            if (errno == EINTR) continue;
            *got = done;
            return errno;
        }
        if (n == 0) break;
        done += (size_t)n;
    }
    *got = done;
    return 0;
}

int ckg_open_direct(const char *path) {
#ifdef O_DIRECT
    return open(path, O_WRONLY | O_DIRECT | O_CLOEXEC);
#else
    (void)path;
    errno = EINVAL;
    return -1;
#endif
}

void *ckg_aligned_alloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, CKG_ALIGN, n ? n : 1)) return NULL;
    return p;
}

void ckg_aligned_free(void *p) { free(p); }
