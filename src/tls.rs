//! Inbound TLS: the rustls acceptor (on ring) for `[server] tls_cert_file`/`tls_key_file`,
//! and client-certificate verification against `client_ca_file` (mTLS). Built with each
//! runtime, so a reload that changes them takes effect for new connections. Imports only
//! `config`.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// What identifies the inbound TLS settings: the files' paths and bytes. A reload that
/// changes it closes the connections accepted under the old settings (DESIGN §13b).
pub fn fingerprint(config: &Config) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let s = &config.server;
    for path in [&s.tls_cert_file, &s.tls_key_file, &s.client_ca_file] {
        path.hash(&mut h);
        if let Some(p) = path {
            std::fs::read(p).unwrap_or_default().hash(&mut h);
        }
    }
    h.finish()
}

/// A TLS setting that cannot be used, naming the file, the field and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{file}: field `{field}`: {problem} (fix: {fix})")]
pub struct TlsError {
    pub file: String,
    pub field: &'static str,
    pub problem: String,
    pub fix: &'static str,
}

/// The inbound TLS acceptor when `tls_cert_file`/`tls_key_file` are set: rustls on ring,
/// ALPN `h2` then `http/1.1`; with `client_ca_file`, client certificates are required and
/// verified against it (mTLS).
pub fn acceptor(config: &Config) -> Result<Option<TlsAcceptor>, TlsError> {
    let s = &config.server;
    let (Some(cert_file), Some(key_file)) = (&s.tls_cert_file, &s.tls_key_file) else {
        return Ok(None);
    };
    let err = |field: &'static str, problem: String, fix: &'static str| TlsError {
        file: config.source.clone(),
        field,
        problem,
        fix,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| {
            err(
                "server.tls_cert_file",
                format!("cannot read {}: {e}", cert_file.display()),
                "point it at a PEM certificate chain",
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            err(
                "server.tls_cert_file",
                format!("{}: {e}", cert_file.display()),
                "point it at a PEM certificate chain",
            )
        })?;
    if certs.is_empty() {
        return Err(err(
            "server.tls_cert_file",
            format!("{} holds no certificate", cert_file.display()),
            "point it at a PEM certificate chain, leaf first",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        err(
            "server.tls_key_file",
            format!("{}: {e}", key_file.display()),
            "point it at the PEM private key of tls_cert_file",
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("server.tls_cert_file", e.to_string(), "use TLS 1.2 or 1.3"))?;
    let builder = match &s.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca_file).map_err(|e| {
                err(
                    "server.client_ca_file",
                    format!("cannot read {}: {e}", ca_file.display()),
                    "point it at the PEM CA that issues client certificates",
                )
            })?;
            for ca in cas {
                let ca = ca.map_err(|e| {
                    err(
                        "server.client_ca_file",
                        format!("{}: {e}", ca_file.display()),
                        "point it at PEM CA certificates",
                    )
                })?;
                roots.add(ca).map_err(|e| {
                    err(
                        "server.client_ca_file",
                        format!("{}: {e}", ca_file.display()),
                        "point it at PEM CA certificates",
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| {
                err(
                    "server.client_ca_file",
                    format!("{}: {e}", ca_file.display()),
                    "point it at PEM CA certificates",
                )
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder.with_single_cert(certs, key).map_err(|e| {
        err(
            "server.tls_key_file",
            e.to_string(),
            "use the private key that belongs to tls_cert_file",
        )
    })?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}
