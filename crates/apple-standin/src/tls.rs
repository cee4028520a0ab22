//! The stand-in's throw-away certificate authority and its rustls server config.
//!
//! Owns: one CA per stand-in, generated in memory at start (never written to disk), a
//! server certificate it signs for `localhost` and `127.0.0.1`, and the rustls
//! `ServerConfig` (ring provider passed explicitly, ALPN `h2` then `http/1.1`).
//! Imports nothing from the rest of the crate.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The names the server certificate is valid for.
const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// Why the stand-in could not set up TLS.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("generating the stand-in's throw-away certificates")]
    Certificate(#[source] rcgen::Error),
    #[error("building the stand-in's rustls server config")]
    Config(#[source] rustls::Error),
}

/// A freshly minted CA (PEM, for clients to trust) and a server config using a
/// certificate it signed.
pub(crate) struct Authority {
    pub ca_pem: String,
    pub server_config: Arc<ServerConfig>,
}

impl Authority {
    pub(crate) fn generate() -> Result<Self, TlsError> {
        let ca_key = KeyPair::generate().map_err(TlsError::Certificate)?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Certificate)?;
        ca_params.distinguished_name =
            distinguished_name("apple-api-proxy stand-in CA (throw-away)");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(TlsError::Certificate)?;

        let server_key = KeyPair::generate().map_err(TlsError::Certificate)?;
        let mut server_params = CertificateParams::new(
            SERVER_NAMES
                .iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )
        .map_err(TlsError::Certificate)?;
        server_params.distinguished_name = distinguished_name("localhost");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .map_err(TlsError::Certificate)?;

        let private_key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Config)?
                .with_no_client_auth()
                .with_single_cert(vec![server_cert.der().clone()], private_key)
                .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        Ok(Authority {
            ca_pem: ca_cert.pem(),
            server_config: Arc::new(config),
        })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}
