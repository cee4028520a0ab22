//! Loading Apple's `.p8` private keys into a `ring` signer ([`MemoryKey`]).
//!
//! Accepts what people actually have: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, Apple's
//! download), SEC1 PEM (`-----BEGIN EC PRIVATE KEY-----`, what `openssl ecparam` makes, with
//! or without the `EC PARAMETERS` block before it), from a file or an environment variable,
//! tolerating literal `\n` escapes, base64 of the whole file, and the bare base64 body without
//! the armour lines. P-256 only. Every failure names the source and says what was found
//! instead (RSA, another curve, an encrypted key, a certificate, …) — never the key bytes.

use base64::Engine as _;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::signer::MemoryKey;

use crate::config::KeySource;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// Why a key could not be loaded. Each message starts with the source (file or variable).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{source_name}: key file not found (fix: check private_key_file, or download the key again from App Store Connect → Users and Access → Integrations)")]
    Missing { source_name: String },
    #[error("{source_name}: cannot read the key: {error} (fix: check the file's owner and permissions; the proxy's user must be able to read it)")]
    Unreadable {
        source_name: String,
        error: std::io::Error,
    },
    #[error("{source_name}: environment variable is not set or empty (fix: export it with the .p8 file's contents, or use private_key_file)")]
    EnvUnset { source_name: String },
    #[error("{source_name}: not a PEM private key (no `-----BEGIN PRIVATE KEY-----` block, and not base64 of one) (fix: use the .p8 file exactly as downloaded from App Store Connect)")]
    NotPem { source_name: String },
    #[error("{source_name}: the key is encrypted with a passphrase (fix: decrypt it: `openssl pkcs8 -in key.p8 -out AuthKey.p8 -nocrypt`; Apple's downloads are never encrypted)")]
    Encrypted { source_name: String },
    #[error("{source_name}: this is an RSA key; Apple's APIs need an ES256 (EC P-256) key (fix: use the .p8 downloaded from App Store Connect)")]
    Rsa { source_name: String },
    #[error("{source_name}: this is an EC key on {curve}; Apple needs P-256 (prime256v1) (fix: use the .p8 from App Store Connect, or `openssl ecparam -name prime256v1 -genkey` for keys you create)")]
    WrongCurve { source_name: String, curve: String },
    #[error("{source_name}: this is a {found} key, not an EC P-256 private key (fix: use the .p8 downloaded from App Store Connect)")]
    WrongKind { source_name: String, found: String },
    #[error("{source_name}: {problem} (fix: {fix})")]
    Hsm {
        source_name: String,
        problem: String,
        fix: String,
    },
    #[error("{source_name}: the key's contents are damaged: {problem} (fix: download a fresh copy or restore it from your secret store)")]
    Malformed {
        source_name: String,
        problem: String,
    },
}

/// A key from a PKCS#8 or SEC1 DER document.
fn from_der(der: &[u8], source_name: &str) -> Result<p256::SecretKey, KeyError> {
    match pkcs8::PrivateKeyInfo::try_from(der) {
        Ok(info) => from_pkcs8(info, source_name),
        Err(_) => match sec1::EcPrivateKey::try_from(der) {
            Ok(ec) => from_sec1(ec, source_name),
            Err(_) => Err(KeyError::Malformed {
                source_name: source_name.to_string(),
                problem: "neither a PKCS#8 nor a SEC1 structure".into(),
            }),
        },
    }
}

/// A key plus what an operator should hear about it (e.g. loose file permissions).
#[derive(Debug)]
pub struct Loaded {
    pub key: MemoryKey,
    pub warnings: Vec<String>,
}

/// Loads the key `source` (a `.p8` file or variable) points at into memory.
pub fn load(source: &KeySource) -> Result<Loaded, KeyError> {
    let (secret, warnings) = load_secret(source)?;
    let key = memory_key(&secret, &source.to_string())?;
    Ok(Loaded { key, warnings })
}

/// The private key `source` points at, parsed and checked (P-256, consistent halves), with
/// the operator warnings; `key import` hands it to an HSM, [`load`] to `ring`.
pub fn load_secret(source: &KeySource) -> Result<(p256::SecretKey, Vec<String>), KeyError> {
    let source_name = source.to_string();
    let mut warnings = Vec::new();
    let text = match source {
        KeySource::File(path) => {
            let bytes = std::fs::read(path).map_err(|error| match error.kind() {
                std::io::ErrorKind::NotFound => KeyError::Missing {
                    source_name: source_name.clone(),
                },
                _ => KeyError::Unreadable {
                    source_name: source_name.clone(),
                    error,
                },
            })?;
            if let Some(w) = permission_warning(path) {
                warnings.push(format!("{source_name}: {w}"));
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
        KeySource::Env(var) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => v,
            _ => return Err(KeyError::EnvUnset { source_name }),
        },
        KeySource::Inline(pem) => pem.clone(),
        KeySource::Pkcs11(_) => {
            return Err(KeyError::WrongKind {
                source_name,
                found: "PKCS#11 token object (not a .p8)".into(),
            })
        }
    };
    Ok((parse_secret(&text, &source_name)?, warnings))
}

/// Parses key text in any of the tolerated forms into a `ring` signer.
pub fn parse(text: &str, source_name: &str) -> Result<MemoryKey, KeyError> {
    memory_key(&parse_secret(text, source_name)?, source_name)
}

fn memory_key(secret: &p256::SecretKey, source_name: &str) -> Result<MemoryKey, KeyError> {
    let public = secret.public_key().to_encoded_point(false);
    let rng = SystemRandom::new();
    let pair = EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &secret.to_bytes(),
        public.as_bytes(),
        &rng,
    )
    .map_err(|e| KeyError::Malformed {
        source_name: source_name.to_string(),
        problem: format!("rejected by the signer ({e})"),
    })?;
    Ok(MemoryKey::new(pair, rng))
}

fn parse_secret(text: &str, source_name: &str) -> Result<p256::SecretKey, KeyError> {
    let text = normalise(text);
    if text.contains("-----BEGIN") {
        return parse_pem(&text, source_name);
    }
    // Not armoured: base64 of the whole PEM file, or the bare base64 DER body.
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.as_bytes()))
        .map_err(|_| KeyError::NotPem {
            source_name: source_name.to_string(),
        })?;
    match std::str::from_utf8(&decoded) {
        Ok(inner) if inner.contains("-----BEGIN") => parse_pem(&normalise(inner), source_name),
        _ if decoded.first() == Some(&0x30) => from_der(&decoded, source_name),
        _ => Err(KeyError::NotPem {
            source_name: source_name.to_string(),
        }),
    }
}

/// Undo the usual mangling of PEM in environment variables and CI secrets.
fn normalise(text: &str) -> String {
    text.replace("\\r\\n", "\n")
        .replace("\\n", "\n")
        .replace('\r', "")
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .trim()
        .to_string()
}

fn parse_pem(text: &str, source_name: &str) -> Result<p256::SecretKey, KeyError> {
    let blocks = pem::parse_many(text).map_err(|_| KeyError::NotPem {
        source_name: source_name.to_string(),
    })?;
    let err = |found: &str| KeyError::WrongKind {
        source_name: source_name.to_string(),
        found: found.to_string(),
    };
    // `openssl ecparam -genkey` writes an EC PARAMETERS block first: skip it.
    let Some(block) = blocks.iter().find(|b| b.tag() != "EC PARAMETERS") else {
        return Err(if blocks.is_empty() {
            KeyError::NotPem {
                source_name: source_name.to_string(),
            }
        } else {
            err("bare EC parameters block (no private key)")
        });
    };
    let encrypted_header = block
        .headers()
        .get("Proc-Type")
        .is_some_and(|v| v.contains("ENCRYPTED"));
    match block.tag() {
        "ENCRYPTED PRIVATE KEY" => Err(KeyError::Encrypted {
            source_name: source_name.to_string(),
        }),
        _ if encrypted_header => Err(KeyError::Encrypted {
            source_name: source_name.to_string(),
        }),
        "PRIVATE KEY" => {
            let info = pkcs8::PrivateKeyInfo::try_from(block.contents()).map_err(|e| {
                KeyError::Malformed {
                    source_name: source_name.to_string(),
                    problem: format!("PKCS#8 structure: {e}"),
                }
            })?;
            from_pkcs8(info, source_name)
        }
        "EC PRIVATE KEY" => {
            let ec = sec1::EcPrivateKey::try_from(block.contents()).map_err(|e| {
                KeyError::Malformed {
                    source_name: source_name.to_string(),
                    problem: format!("SEC1 structure: {e}"),
                }
            })?;
            from_sec1(ec, source_name)
        }
        "RSA PRIVATE KEY" => Err(KeyError::Rsa {
            source_name: source_name.to_string(),
        }),
        "PUBLIC KEY" | "EC PUBLIC KEY" => Err(err("public key (the proxy needs the private key)")),
        "CERTIFICATE" => Err(err("certificate")),
        other => Err(err(&format!("`{other}` PEM block"))),
    }
}

fn from_pkcs8(
    info: pkcs8::PrivateKeyInfo<'_>,
    source_name: &str,
) -> Result<p256::SecretKey, KeyError> {
    let oid = info.algorithm.oid.to_string();
    match oid.as_str() {
        OID_EC_PUBLIC_KEY => {}
        "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => {
            return Err(KeyError::Rsa {
                source_name: source_name.to_string(),
            })
        }
        other => {
            return Err(KeyError::WrongKind {
                source_name: source_name.to_string(),
                found: algorithm_name(other),
            })
        }
    }
    let curve = info.algorithm.parameters_oid().map(|o| o.to_string()).ok();
    check_curve(curve.as_deref(), source_name)?;
    let ec = sec1::EcPrivateKey::try_from(info.private_key).map_err(|e| KeyError::Malformed {
        source_name: source_name.to_string(),
        problem: format!("inner EC key: {e}"),
    })?;
    from_sec1(ec, source_name)
}

fn from_sec1(ec: sec1::EcPrivateKey<'_>, source_name: &str) -> Result<p256::SecretKey, KeyError> {
    if let Some(params) = &ec.parameters {
        let curve = params.named_curve().map(|o| o.to_string());
        check_curve(curve.as_deref(), source_name)?;
    }
    let malformed = |problem: &str| KeyError::Malformed {
        source_name: source_name.to_string(),
        problem: problem.to_string(),
    };
    if ec.private_key.len() != 32 {
        return Err(match ec.private_key.len() {
            48 => KeyError::WrongCurve {
                source_name: source_name.to_string(),
                curve: "P-384".into(),
            },
            66 => KeyError::WrongCurve {
                source_name: source_name.to_string(),
                curve: "P-521".into(),
            },
            _ => malformed("the private scalar is not 32 bytes"),
        });
    }
    let secret = p256::SecretKey::from_slice(ec.private_key)
        .map_err(|_| malformed("the private scalar is out of range"))?;
    let public = secret.public_key().to_encoded_point(false);
    if let Some(embedded) = ec.public_key {
        if embedded != public.as_bytes() {
            return Err(malformed(
                "the embedded public key does not belong to the private key",
            ));
        }
    }
    Ok(secret)
}

fn check_curve(curve_oid: Option<&str>, source_name: &str) -> Result<(), KeyError> {
    match curve_oid {
        Some(OID_P256) => Ok(()),
        Some(other) => Err(KeyError::WrongCurve {
            source_name: source_name.to_string(),
            curve: curve_name(other),
        }),
        None => Err(KeyError::Malformed {
            source_name: source_name.to_string(),
            problem: "the EC key names no curve".into(),
        }),
    }
}

fn curve_name(oid: &str) -> String {
    match oid {
        "1.3.132.0.34" => "P-384 (secp384r1)".into(),
        "1.3.132.0.35" => "P-521 (secp521r1)".into(),
        "1.3.132.0.10" => "secp256k1".into(),
        other => format!("the curve with OID {other}"),
    }
}

fn algorithm_name(oid: &str) -> String {
    match oid {
        "1.3.101.112" => "Ed25519".into(),
        "1.3.101.113" => "Ed448".into(),
        "1.2.840.10040.4.1" => "DSA".into(),
        other => format!("non-EC (algorithm OID {other})"),
    }
}

/// A key readable by group or others is a secret on display.
#[cfg(unix)]
fn permission_warning(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "key file is readable by group or others (mode {:o}); fix: chmod 600 and own it by the proxy's user",
            mode & 0o777
        )
    })
}

#[cfg(not(unix))]
fn permission_warning(_path: &std::path::Path) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Signer as _;
    use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};

    fn pkcs8_p256() -> Vec<u8> {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn pem_of(tag: &str, der: &[u8]) -> String {
        pem::encode(&pem::Pem::new(tag, der.to_vec()))
    }

    fn sec1_pem() -> String {
        use p256::pkcs8::LineEnding;
        let sk = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        sk.to_sec1_pem(LineEnding::LF).unwrap().to_string()
    }

    #[test]
    fn accepts_every_tolerated_form() {
        let der = pkcs8_p256();
        let pem = pem_of("PRIVATE KEY", &der);
        let b64 = base64::engine::general_purpose::STANDARD;
        let forms = [
            ("pkcs8 pem", pem.clone()),
            ("escaped newlines", pem.replace('\n', "\\n")),
            ("crlf", pem.replace('\n', "\r\n")),
            ("quoted", format!("\"{pem}\"")),
            ("base64 of file", b64.encode(&pem)),
            ("bare body", b64.encode(&der)),
            ("sec1 pem", sec1_pem()),
            ("ec parameters first", format!("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}", sec1_pem())),
        ];
        for (name, text) in forms {
            let key = parse(&text, "test").unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(key.sign(b"x").unwrap().len(), 64, "{name}");
        }
    }

    #[test]
    fn rejects_the_wrong_things_with_a_named_reason() {
        let p384 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let ed = ring::signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let cases: Vec<(&str, String, &str)> = vec![
            ("garbage", "hello world".into(), "not a PEM"),
            ("p384", pem_of("PRIVATE KEY", p384.as_ref()), "P-384"),
            ("ed25519", pem_of("PRIVATE KEY", ed.as_ref()), "Ed25519"),
            (
                "rsa",
                include_str!("../../tests/fixtures/rsa-2048-test-only.pem").into(),
                "RSA",
            ),
            (
                "encrypted",
                pem_of("ENCRYPTED PRIVATE KEY", &[0x30, 0x00]),
                "encrypted",
            ),
            (
                "certificate",
                pem_of("CERTIFICATE", &[0x30, 0x00]),
                "certificate",
            ),
            ("public", pem_of("PUBLIC KEY", &[0x30, 0x00]), "public key"),
            (
                "truncated",
                pem_of("PRIVATE KEY", &pkcs8_p256()[..40]),
                "damaged",
            ),
        ];
        for (name, text, want) in cases {
            let err = parse(&text, "file keys/k.p8").unwrap_err().to_string();
            assert!(err.starts_with("file keys/k.p8:"), "{name}: {err}");
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains("fix:"), "{name}: {err}");
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let der = pkcs8_p256();
        let key = parse(&pem_of("PRIVATE KEY", &der), "t").unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&crate::hex(&der[36..68])));
        assert!(shown.starts_with("MemoryKey"));
        let src = KeySource::Inline(pem_of("PRIVATE KEY", &der));
        assert!(!format!("{src:?}").contains("BEGIN"));
    }

    #[cfg(unix)]
    #[test]
    fn loose_file_permissions_warn_and_missing_files_error() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("AuthKey_ABC.p8");
        std::fs::write(&path, pem_of("PRIVATE KEY", &pkcs8_p256())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loaded = load(&KeySource::File(path.clone())).unwrap();
        assert!(
            loaded.warnings[0].contains("chmod 600"),
            "{:?}",
            loaded.warnings
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&KeySource::File(path)).unwrap().warnings.is_empty());
        let err = load(&KeySource::File(dir.path().join("nope.p8"))).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }), "{err}");
        let err = load(&KeySource::Env("AAP_TEST_SURELY_UNSET_VAR".into())).unwrap_err();
        assert!(matches!(err, KeyError::EnvUnset { .. }), "{err}");
    }
}
