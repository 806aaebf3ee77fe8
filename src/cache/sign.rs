//! Ed25519 keys for the cache: the public keys a manifest trusts and the private key that signs
//! pushed entries, in the forms `openssl genpkey -algorithm ed25519` writes.
//!
//! The signed statement names the build id, the platform and the payload's SHA-256, so a
//! signature cannot be moved to another build or another platform's entry.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo; the key's 32 bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// The DER prefix of an Ed25519 PKCS#8 private key; the 32-byte seed follows.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not base64 or PEM: {0}")]
    Encoding(String),
    #[error("not an Ed25519 {0} key")]
    NotEd25519(&'static str),
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

/// The base64 body of a PEM text, or the text itself when it is bare base64.
fn der_of(text: &str) -> Result<Vec<u8>, KeyError> {
    let body: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect();
    STANDARD
        .decode(body.trim())
        .map_err(|e| KeyError::Encoding(e.to_string()))
}

/// A public key: the 32 raw bytes in base64, or the PEM (or its base64 line) that
/// `openssl pkey -pubout` prints.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], KeyError> {
    let der = der_of(text)?;
    let raw = match der.strip_prefix(&SPKI_PREFIX[..]) {
        Some(rest) => rest,
        None => &der[..],
    };
    let key: [u8; 32] = raw.try_into().map_err(|_| KeyError::NotEd25519("public"))?;
    VerifyingKey::from_bytes(&key).map_err(|_| KeyError::NotEd25519("public"))?;
    Ok(key)
}

/// A private key: PKCS#8 PEM as `openssl genpkey -algorithm ed25519` writes it, or the 32-byte
/// seed in base64.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, KeyError> {
    let der = der_of(text)?;
    let seed = match der.strip_prefix(&PKCS8_PREFIX[..]) {
        Some(rest) => rest,
        None => &der[..],
    };
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| KeyError::NotEd25519("private"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The signing key: `PMESH_CACHE_SIGNING_KEY` (the key itself, for CI secrets) or else the
/// manifest's `signing_key` file.
pub fn load_signing_key(file: Option<&Path>) -> Result<Option<SigningKey>, KeyError> {
    if let Some(text) = std::env::var_os("PMESH_CACHE_SIGNING_KEY") {
        return parse_signing_key(&text.to_string_lossy()).map(Some);
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|error| KeyError::Read {
        path: path.display().to_string(),
        error,
    })?;
    parse_signing_key(&text).map(Some)
}

/// What a signature covers.
pub fn statement(id: &str, platform: &str, size: u64, sha256: &str) -> Vec<u8> {
    format!("pmesh-dev cache v1\n{id}\n{platform}\n{size}\n{sha256}\n").into_bytes()
}

/// The signature of `statement`, in base64.
pub fn sign(key: &SigningKey, statement: &[u8]) -> String {
    STANDARD.encode(key.sign(statement).to_bytes())
}

/// Whether `signature` (base64) is one of `trusted`'s over `statement`.
pub fn verify(trusted: &[[u8; 32]], statement: &[u8], signature: &str) -> bool {
    let Ok(bytes) = STANDARD.decode(signature) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(&bytes) else {
        return false;
    };
    trusted.iter().any(|k| {
        VerifyingKey::from_bytes(k).is_ok_and(|vk| vk.verify_strict(statement, &sig).is_ok())
    })
}

/// The base64 of `key`'s public half, as a manifest's `trusted_keys` takes it.
pub fn public_of(key: &SigningKey) -> String {
    STANDARD.encode(key.verifying_key().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout`.
    const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJugAi5LkfG09yTXGdIAV+6RFDIgbp9JLzIHfzV8zwXr\n-----END PRIVATE KEY-----\n";

    #[test]
    fn sign_and_verify_round_trip() {
        let key = parse_signing_key(PRIVATE).unwrap();
        let public = parse_public_key(&public_of(&key)).unwrap();
        let st = statement("ab", "linux-x86_64", 3, "cd");
        let sig = sign(&key, &st);
        assert!(verify(&[public], &st, &sig));
        let other = statement("ab", "linux-x86_64", 4, "cd");
        assert!(!verify(&[public], &other, &sig));
        assert!(!verify(&[], &st, &sig));
        assert!(!verify(&[public], &st, "not base64!"));
    }

    #[test]
    fn public_keys_in_pem_and_raw_form_agree() {
        let key = parse_signing_key(PRIVATE).unwrap();
        let raw = key.verifying_key().to_bytes();
        let mut spki = SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&raw);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(&spki)
        );
        assert_eq!(parse_public_key(&pem).unwrap(), raw);
        assert_eq!(parse_public_key(&STANDARD.encode(raw)).unwrap(), raw);
        assert!(parse_public_key("AAAA").is_err());
    }
}
