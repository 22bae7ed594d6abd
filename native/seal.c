/* Sealed records (docs/format.md section 4.4): a record's payload encrypted with AES-256-GCM in
 * place, and the fingerprint of a chunk's hash (one AES-256 block), through OpenSSL's EVP
 * interface: the system libcrypto, with the CPU's AES instructions where it has them. The keys
 * are derived by the caller (HKDF, in Python); nothing here keeps key material after a call. */
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
