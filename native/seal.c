/* Sealed records (docs/format.md section 4.4): a record's payload encrypted with AES-256-GCM in
 * place, and the fingerprint of a chunk's hash (one AES-256 block), through OpenSSL's EVP
 * interface: the system libcrypto, with the CPU's AES instructions where it has them. The keys
 * are derived by the caller (HKDF, in Python); nothing here keeps key material after a call. */
#include <string.h>

#include <openssl/evp.h>

#include "ckg.h"

int ckg_seal_payload(const uint8_t key[32], const uint8_t nonce[CKG_NONCE], const uint8_t *aad,
                     size_t aad_len, uint8_t *buf, size_t len, uint8_t tag[CKG_TAG]) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return CKG_E_NOMEM;
    int ok = EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, CKG_NONCE, NULL) == 1 &&
             EVP_EncryptInit_ex(ctx, NULL, NULL, key, nonce) == 1;
    int out = 0;
    /* EVP lengths are ints: the AAD and the payload go in pieces of at most 1 GiB. */
    for (size_t at = 0; ok && at < aad_len;) {
        int k = (int)(aad_len - at < (1u << 30) ? aad_len - at : (1u << 30));
        ok = EVP_EncryptUpdate(ctx, NULL, &out, aad + at, k) == 1;
        at += (size_t)k;
    }
    for (size_t at = 0; ok && at < len;) {
        int k = (int)(len - at < (1u << 30) ? len - at : (1u << 30));
        ok = EVP_EncryptUpdate(ctx, buf + at, &out, buf + at, k) == 1 && out == k;
        at += (size_t)k;
    }
    ok = ok && EVP_EncryptFinal_ex(ctx, buf + len, &out) == 1 && out == 0;
    ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, CKG_TAG, tag) == 1;
    EVP_CIPHER_CTX_free(ctx);
    return ok ? CKG_OK : CKG_E_CRYPTO;
}

int ckg_fingerprint(const uint8_t key[32], const uint8_t in[16], uint8_t out[16]) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return CKG_E_NOMEM;
    int n = 0, m = 0;
    int ok = EVP_EncryptInit_ex(ctx, EVP_aes_256_ecb(), NULL, key, NULL) == 1 &&
             EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 &&
             EVP_EncryptUpdate(ctx, out, &n, in, 16) == 1 && n == 16 &&
             EVP_EncryptFinal_ex(ctx, out + n, &m) == 1 && m == 0;
    EVP_CIPHER_CTX_free(ctx);
    return ok ? CKG_OK : CKG_E_CRYPTO;
}

static int open_payload(const uint8_t key[32], const uint8_t nonce[CKG_NONCE], const uint8_t *aad,
                        size_t aad_len, uint8_t *buf, size_t len, const uint8_t tag[CKG_TAG]) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return CKG_E_NOMEM;
    int ok = EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, CKG_NONCE, NULL) == 1 &&
             EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce) == 1;
    int out = 0, rc = ok ? CKG_OK : CKG_E_CRYPTO;
    for (size_t at = 0; ok && at < aad_len;) {
        int k = (int)(aad_len - at < (1u << 30) ? aad_len - at : (1u << 30));
        ok = EVP_DecryptUpdate(ctx, NULL, &out, aad + at, k) == 1;
        at += (size_t)k;
    }
    for (size_t at = 0; ok && at < len;) {
        int k = (int)(len - at < (1u << 30) ? len - at : (1u << 30));
        ok = EVP_DecryptUpdate(ctx, buf + at, &out, buf + at, k) == 1 && out == k;
        at += (size_t)k;
    }
    ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, CKG_TAG, (void *)tag) == 1;
    if (ok && (EVP_DecryptFinal_ex(ctx, buf + len, &out) != 1 || out != 0))
        rc = CKG_E_AUTH;
    else if (!ok && rc == CKG_OK)
        rc = CKG_E_CRYPTO;
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int ckg_open_record(uint8_t *rec, size_t rec_len, const ckg_rec_header *want, int check_seq,
                    const ckg_open_args *keys, uint8_t *dst, ckg_scratch *scratch, int verify,
                    const uint8_t *want_digest) {
    if (rec_len < CKG_REC_HDR) return CKG_E_TRUNCATED;
    ckg_rec_header h;
    int rc = ckg_unpack_record_header(rec, &h);
    if (rc) return rc;
    if (h.flags != CKG_SEALED || h.codec != want->codec || h.elem != want->elem ||
        h.raw_len != want->raw_len || h.stored_len != want->stored_len ||
        (check_seq && h.seq != want->seq))
        return CKG_E_MISMATCH;
    if (h.stored_len > rec_len - CKG_REC_HDR) return CKG_E_TRUNCATED;
    if (h.stored_len < CKG_TAG) return CKG_E_LENGTH;
    size_t end = CKG_REC_HDR + (size_t)h.stored_len;
    for (size_t i = end; i < rec_len; i++)
        if (rec[i]) return CKG_E_PADDING;
    uint8_t *stored = rec + CKG_REC_HDR, got[16];
    ckg_hash128(stored, (size_t)h.stored_len, got);
    if (memcmp(got, h.hash, 16)) return CKG_E_STORED;
    if (verify && want_digest) {
        uint8_t d[CKG_DIGEST];
        if ((rc = ckg_sha256_with(scratch, stored, (size_t)h.stored_len, d))) return rc;
        if (memcmp(d, want_digest, CKG_DIGEST)) return CKG_E_DIGEST;
    }
    size_t len = (size_t)h.stored_len - CKG_TAG;
    if ((rc = open_payload(keys->rkey, h.nonce, keys->aad, keys->aad_len, stored, len,
                           stored + len)))
        return rc;
    rc =
        ckg_decode_chunk(h.codec, stored, len, (size_t)h.raw_len, h.elem, dst, scratch, NULL, NULL);
    if (rc || !verify) return rc;
    uint8_t fp[16];
    ckg_hash128(dst, (size_t)h.raw_len, got);
    if ((rc = ckg_fingerprint(keys->fkey, got, fp))) return rc;
    return memcmp(fp, want->hash, 16) ? CKG_E_HASH : CKG_OK;
}
