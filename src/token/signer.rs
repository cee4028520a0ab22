//! The signing seam: what produces an ES256 signature for a key. Today one implementation,
//! [`MemoryKey`] (`ring`, the `.p8` parsed into process memory); a PKCS#11 token, a cloud
//! KMS or Vault transit slot in beside it (DESIGN §16) without touching the request path.
//!
//! Every signer answers in the JWS form (raw 64-byte `r‖s`, RFC 7518 §3.4); DER, which the
//! legacy promotional-offer signature and most HSMs and KMSs speak, converts both ways with
//! [`der_from_raw`] / [`raw_from_der`].

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _};

/// Why a signature could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The signer answered, but not with a signature (a bug, or a key that cannot sign).
    #[error("the signer failed to sign")]
    Failed,
    /// The signer cannot be reached right now (an HSM or KMS down); requests get 503
    /// PROXY_SIGNER_UNAVAILABLE and nothing reaches Apple.
    #[error("the signer is unavailable: {0}")]
    Unavailable(String),
}

/// Where a key lives, as `check` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Parsed from a `.p8` into this process's memory.
    Memory,
    /// A key object in a PKCS#11 token (DESIGN §16).
    Pkcs11,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Pkcs11 => "pkcs11",
        }
    }
}

/// Signs for one P-256 key. `Debug` never shows key material.
pub trait Signer: Send + Sync + fmt::Debug {
    /// ECDSA P-256 with SHA-256 over `message`: the raw 64-byte `r‖s`, never DER.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError>;

    /// The uncompressed SEC1 public point (65 bytes, `0x04 ‖ X ‖ Y`).
    fn public_key(&self) -> &[u8];

    fn backend(&self) -> Backend;

    /// Whether the private key can be read out of where it lives: always for a key in
    /// memory; for an HSM what its token says (`CKA_EXTRACTABLE`, `CKA_SENSITIVE`).
    fn extractable(&self) -> Option<bool>;

    /// `Err(why)` while the signer cannot sign (an HSM that stopped answering); `/readyz`
    /// reports it. A signer in memory is always available.
    fn available(&self) -> Result<(), String> {
        Ok(())
    }

    /// The same signature DER-encoded (ASN.1 `SEQUENCE { r, s }`).
    fn sign_der(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        Ok(der_from_raw(&self.sign(message)?))
    }
}

/// A key held in memory and signed with `ring`.
pub struct MemoryKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl MemoryKey {
    pub(crate) fn new(pair: EcdsaKeyPair, rng: SystemRandom) -> MemoryKey {
        MemoryKey { pair, rng }
    }
}

#[cfg(test)]
impl MemoryKey {
    /// A fresh throw-away key, for the unit tests of everything that signs.
    pub(crate) fn generated() -> MemoryKey {
        use ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let rng = SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("ring generates a P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref(), &rng)
            .expect("ring reads the key it made");
        MemoryKey::new(pair, rng)
    }
}

impl fmt::Debug for MemoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryKey")
            .field(
                "public_key_sha256",
                &crate::hex(&crate::sha256(self.public_key())[..8]),
            )
            .finish_non_exhaustive()
    }
}

impl Signer for MemoryKey {
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        let sig = self
            .pair
            .sign(&self.rng, message)
            .map_err(|_| SignError::Failed)?;
        sig.as_ref().try_into().map_err(|_| SignError::Failed)
    }

    fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    fn backend(&self) -> Backend {
        Backend::Memory
    }

    fn extractable(&self) -> Option<bool> {
        Some(true)
    }
}

/// `r‖s` → DER `SEQUENCE { INTEGER r, INTEGER s }` (minimal integers, as X9.62 requires).
pub fn der_from_raw(raw: &[u8; 64]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, bytes: &[u8]) {
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        let digits = &bytes[start..];
        let pad = digits[0] & 0x80 != 0;
        out.push(0x02);
        out.push((digits.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(digits);
    }
    let mut body = Vec::with_capacity(70);
    integer(&mut body, &raw[..32]);
    integer(&mut body, &raw[32..]);
    let mut der = Vec::with_capacity(body.len() + 2);
    der.push(0x30);
    der.push(body.len() as u8);
    der.extend_from_slice(&body);
    der
}

/// DER `SEQUENCE { INTEGER r, INTEGER s }` → `r‖s`; `None` for anything else.
pub fn raw_from_der(der: &[u8]) -> Option<[u8; 64]> {
    fn integer(input: &[u8]) -> Option<(&[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let len = usize::from(len);
        if tag != 0x02 || len == 0 || len > 33 || rest.len() < len {
            return None;
        }
        let (value, rest) = rest.split_at(len);
        let value = match value {
            [0, tail @ ..] if len == 33 => tail,
            _ if len == 33 => return None,
            _ => value,
        };
        Some((value, rest))
    }
    let (&tag, rest) = der.split_first()?;
    let (&len, body) = rest.split_first()?;
    if tag != 0x30 || usize::from(len) != body.len() {
        return None;
    }
    let (r, rest) = integer(body)?;
    let (s, rest) = integer(rest)?;
    if !rest.is_empty() {
        return None;
    }
    let mut raw = [0u8; 64];
    raw[32 - r.len()..32].copy_from_slice(r);
    raw[64 - s.len()..].copy_from_slice(s);
    Some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED};

    fn key() -> MemoryKey {
        MemoryKey::generated()
    }

    #[test]
    fn both_forms_of_a_signature_verify_and_convert_into_each_other() {
        let key = key();
        for message in [&b"promotional offer"[..], b"", &[0xff; 300]] {
            let raw = key.sign(message).unwrap();
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key())
                .verify(message, &raw)
                .unwrap();
            let der = key.sign_der(message).unwrap();
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key())
                .verify(message, &der)
                .unwrap();
            assert_eq!(raw_from_der(&der_from_raw(&raw)), Some(raw));
            // RustCrypto's encoder agrees byte for byte.
            let theirs = p256::ecdsa::Signature::from_slice(&raw).unwrap().to_der();
            assert_eq!(der_from_raw(&raw), theirs.as_bytes());
        }
    }

    #[test]
    fn der_with_leading_zeros_and_high_bits_round_trips() {
        for (r0, s0) in [(0x00, 0x80), (0x80, 0x00), (0x7f, 0xff)] {
            let mut raw = [0x11u8; 64];
            raw[0] = r0;
            raw[1] = 0;
            raw[32] = s0;
            let der = der_from_raw(&raw);
            assert_eq!(raw_from_der(&der), Some(raw), "{der:02x?}");
        }
    }

    #[test]
    fn malformed_der_is_refused() {
        for bad in [
            &b""[..],
            &[0x30, 0x00],
            &[0x30, 0x03, 0x02, 0x01, 0x01],
            &[0x31, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
            &[0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x00],
        ] {
            assert_eq!(raw_from_der(bad), None, "{bad:02x?}");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let text = format!("{:?}", key());
        assert!(text.starts_with("MemoryKey { public_key_sha256:"), "{text}");
    }
}
