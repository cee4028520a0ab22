//! The configuration as written in TOML: serde structs with unknown fields rejected, every
//! value still a string where validation must say what is wrong with it. Nothing here has a
//! meaning yet; [`super::validate`] gives it one.

use serde::Deserialize;

use super::OnAuditFailure;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub tokens: RawTokens,
    #[serde(default)]
    pub apis: RawApis,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub clients: Vec<RawClient>,
    #[serde(default)]
    pub identity_providers: Vec<RawIdentityProvider>,
    #[serde(default)]
    pub log: RawLog,
}

/// `[[identity_providers]]` (DESIGN §17).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentityProvider {
    pub name: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub jwks_url: Option<String>,
    pub ca_file: Option<String>,
    pub max_token_age: Option<String>,
}

/// `identity = { provider, claims = { … } }` on a client (DESIGN §17).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientIdentity {
    pub provider: String,
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub format: Option<String>,
    pub filter: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub allow_anonymous: Option<bool>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub client_ca_file: Option<String>,
    pub max_request_body: Option<String>,
    pub max_concurrent_requests: Option<usize>,
    pub request_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub header_read_timeout: Option<String>,
    pub body_idle_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub path: Option<String>,
    pub on_failure: Option<OnAuditFailure>,
    pub fsync: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub ca_file: Option<String>,
    pub connect_timeout: Option<String>,
    pub egress_proxy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    pub iat_leeway: Option<String>,
    pub scope_methods: Option<Vec<String>>,
    pub unscoped_lifetime: Option<String>,
    pub cache_capacity: Option<usize>,
    pub max_clock_offset: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApis {
    #[serde(rename = "app-store-connect")]
    pub app_store_connect: Option<RawApi>,
    #[serde(rename = "app-store-server")]
    pub app_store_server: Option<RawApi>,
    #[serde(rename = "advanced-commerce")]
    pub advanced_commerce: Option<RawApi>,
    #[serde(rename = "external-purchase")]
    pub external_purchase: Option<RawApi>,
    pub notary: Option<RawApi>,
    pub apns: Option<RawApi>,
    pub devicecheck: Option<RawApi>,
    #[serde(rename = "app-attest")]
    pub app_attest: Option<RawApi>,
    pub weatherkit: Option<RawApi>,
    #[serde(rename = "apple-music")]
    pub apple_music: Option<RawApi>,
    pub maps: Option<RawApi>,
    #[serde(rename = "apple-business")]
    pub apple_business: Option<RawApi>,
    #[serde(rename = "apple-school")]
    pub apple_school: Option<RawApi>,
    #[serde(rename = "sign-in-with-apple")]
    pub sign_in_with_apple: Option<RawApi>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub base_url: Option<String>,
    pub sandbox_base_url: Option<String>,
    pub sandbox_fallback: Option<bool>,
    pub enforce_apple_limits: Option<bool>,
    pub apple_limit_fraction: Option<f64>,
    pub token_url: Option<String>,
    pub token_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub name: String,
    pub kind: String,
    pub key_id: String,
    pub issuer_id: Option<String>,
    pub bundle_id: Option<String>,
    pub private_key_file: Option<String>,
    pub private_key_env: Option<String>,
    pub pkcs11: Option<RawPkcs11>,
    pub apis: Vec<String>,
    pub token_lifetime: Option<String>,
    pub team_id: Option<String>,
    pub service_id: Option<String>,
    pub apns_token_refresh: Option<String>,
    pub client_id: Option<String>,
    pub client_ids: Option<Vec<String>>,
}

/// `pkcs11 = { … }` on a key (DESIGN §16).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPkcs11 {
    pub module: Option<String>,
    pub token_label: Option<String>,
    pub key_label: Option<String>,
    pub pin_env: Option<String>,
    pub pin_file: Option<String>,
    pub sessions: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub name: String,
    pub secret_sha256: Option<String>,
    pub tls_subject: Option<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    pub key: Option<String>,
    pub bundle_id: Option<String>,
    pub rate_limit: Option<String>,
    pub key_id: Option<String>,
    pub public_key_file: Option<String>,
    pub public_key: Option<String>,
    pub signing: Option<RawSigning>,
    pub apns_environment: Option<String>,
    pub identity: Option<RawClientIdentity>,
}

/// `[clients.signing]`: what the client may have the proxy sign (DESIGN §15).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSigning {
    #[serde(default)]
    pub products: Vec<String>,
    #[serde(default)]
    pub offers: Vec<String>,
    #[serde(default)]
    pub grant_introductory_offer: bool,
    #[serde(default)]
    pub operations: Vec<String>,
    pub currencies: Option<Vec<String>>,
    pub max_price: Option<i64>,
}
