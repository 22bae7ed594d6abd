/* SHA-256 chunk digests (docs/format.md section 4, feature `digests`) through OpenSSL's EVP
 * interface: the system libcrypto, with the CPU's SHA extensions where it has them. */
#include <pthread.h>

#include <openssl/evp.h>

#include "ckg.h"

#if OPENSSL_VERSION_NUMBER >= 0x30000000L
/* OpenSSL 3 looks an algorithm up by name on every init given EVP_sha256(); fetch it once. */
static EVP_MD *fetched;
static pthread_once_t fetch_once = PTHREAD_ONCE_INIT;

static void fetch_sha256(void) { fetched = EVP_MD_fetch(NULL, "SHA256", NULL); }

static const EVP_MD *sha256_md(void) {
    pthread_once(&fetch_once, fetch_sha256);
    return fetched ? fetched : EVP_sha256();
}
#else
static const EVP_MD *sha256_md(void) { return EVP_sha256(); }
#endif

int ckg_sha_begin(ckg_scratch *s, ckg_sha *h) {
    h->ok = 1;
    if (!s->sha && !(s->sha = EVP_MD_CTX_new())) return CKG_E_NOMEM;
    h->ctx = s->sha;
    return EVP_DigestInit_ex(h->ctx, sha256_md(), NULL) == 1 ? CKG_OK : CKG_E_NOMEM;
}

void ckg_sha_update(ckg_sha *h, const void *p, size_t n) {
    if (h->ctx && h->ok && n) h->ok = EVP_DigestUpdate(h->ctx, p, n) == 1;
}

int ckg_sha_end(ckg_sha *h, uint8_t out[CKG_DIGEST]) {
    unsigned got = 0;
    if (!h->ok || EVP_DigestFinal_ex(h->ctx, out, &got) != 1 || got != CKG_DIGEST)
        return CKG_E_NOMEM;
    return CKG_OK;
}

int ckg_sha256_with(ckg_scratch *s, const void *buf, size_t len, uint8_t out[CKG_DIGEST]) {
    ckg_sha h;
    int rc = ckg_sha_begin(s, &h);
    if (rc) return rc;
    ckg_sha_update(&h, buf, len);
    return ckg_sha_end(&h, out);
}

int ckg_sha256(const void *buf, size_t len, uint8_t out[CKG_DIGEST]) {
    ckg_scratch s = {0};
    int rc = ckg_sha256_with(&s, buf, len, out);
    ckg_sha_free(&s);
    return rc;
}

void ckg_sha_free(ckg_scratch *s) {
    EVP_MD_CTX_free(s->sha);
    s->sha = NULL;
}
