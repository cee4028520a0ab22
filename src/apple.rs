//! What Apple requires, as pure data: the API families, their hosts and path prefixes, the
//! token audience, lifetime caps and the claims each family takes.
//!
//! Nothing here does I/O or knows about configuration; every other module reads its Apple
//! facts from here so there is exactly one place to correct when Apple changes something.
//! Sources are cited next to each fact (see `shared/APPLE.md` for the full bibliography).

use std::fmt;
use std::time::Duration;

/// The audience every App Store Connect and App Store Server token carries.
/// [ASC-JWT], [ASSA-JWT]
pub const AUDIENCE: &str = "appstoreconnect-v1";

/// App Store Connect (and Notary) reject tokens whose `exp - iat` exceeds 20 minutes. [ASC-JWT]
pub const CONNECT_MAX_LIFETIME: Duration = Duration::from_secs(20 * 60);

/// App Store Server, Advanced Commerce, External Purchase and Retention Messaging reject
/// tokens that expire more than 60 minutes after `iat`. [ASSA-JWT]
pub const STOREKIT_MAX_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// Query parameters App Store Connect ignores when matching a token's scope. [ASC-JWT]
pub const SCOPE_IGNORED_PARAMS: [&str; 3] = ["limit", "cursor", "sort"];

/// The path prefix that selects Apple's sandbox environment for the storekit APIs.
pub const SANDBOX_PREFIX: &str = "/sandbox";

/// One of Apple's server APIs. The proxy routes by path prefix to one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    /// App Store Connect API: `/v1/`, `/v2/`, `/v3/` (any `/v<N>/`).
    AppStoreConnect,
    /// App Store Server API (incl. Retention Messaging): `/inApps/`, `/groups/`.
    AppStoreServer,
    /// Advanced Commerce API (server-to-server part): `/advancedCommerce/`.
    AdvancedCommerce,
    /// External Purchase Server API: `/externalPurchase/`.
    ExternalPurchase,
    /// Notary API: `/notary/`, on `appstoreconnect.apple.com` with App Store Connect keys.
    Notary,
}

/// How a family's token is shaped. [ASC-JWT], [ASSA-JWT]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFamily {
    /// `iss` (team) or `sub:"user"` (individual), `aud`, `iat`, `exp`, optional `scope`; ≤ 20 min.
    Connect,
    /// `iss`, `aud`, `iat`, `exp`, `bid`; never `scope`; ≤ 60 min; in-app-purchase keys only.
    StoreKit,
}

/// Production or sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Environment {
    Production,
    Sandbox,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Sandbox => "sandbox",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Api {
    /// Every API, in the order the route table and `check` print them.
    pub const ALL: [Api; 5] = [
        Api::AppStoreConnect,
        Api::AppStoreServer,
        Api::AdvancedCommerce,
        Api::ExternalPurchase,
        Api::Notary,
    ];

    /// The stable id used in config (`[apis.<id>]`, `apis = [...]`), errors, audit and metrics.
    pub fn id(self) -> &'static str {
        match self {
            Api::AppStoreConnect => "app-store-connect",
            Api::AppStoreServer => "app-store-server",
            Api::AdvancedCommerce => "advanced-commerce",
            Api::ExternalPurchase => "external-purchase",
            Api::Notary => "notary",
        }
    }

    pub fn from_id(id: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|api| api.id() == id)
    }

    /// The literal path prefixes this API owns (App Store Connect's `/v<N>/` is matched by
    /// [`Api::for_path`]; `/v1/` … `/v3/` are listed here for humans).
    pub fn prefixes(self) -> &'static [&'static str] {
        match self {
            Api::AppStoreConnect => &["/v1/", "/v2/", "/v3/"],
            Api::AppStoreServer => &["/inApps/", "/groups/"],
            Api::AdvancedCommerce => &["/advancedCommerce/"],
            Api::ExternalPurchase => &["/externalPurchase/"],
            Api::Notary => &["/notary/"],
        }
    }

    /// Apple's production base URL. [ASC-SPEC servers], [ASSA-CHANGELOG 2026-05-05], forum 749215
    pub fn production_url(self) -> &'static str {
        match self {
            Api::AppStoreConnect => "https://api.appstoreconnect.apple.com",
            Api::AppStoreServer | Api::AdvancedCommerce | Api::ExternalPurchase => {
                "https://api.storekit.apple.com"
            }
            Api::Notary => "https://appstoreconnect.apple.com",
        }
    }

    /// Apple's sandbox base URL, for the APIs that have one. [ASSA-CHANGELOG 2026-05-05]
    pub fn sandbox_url(self) -> Option<&'static str> {
        match self {
            Api::AppStoreServer | Api::AdvancedCommerce | Api::ExternalPurchase => {
                Some("https://api.storekit-sandbox.apple.com")
            }
            Api::AppStoreConnect | Api::Notary => None,
        }
    }

    pub fn has_sandbox(self) -> bool {
        self.sandbox_url().is_some()
    }

    pub fn token_family(self) -> TokenFamily {
        match self {
            Api::AppStoreConnect | Api::Notary => TokenFamily::Connect,
            Api::AppStoreServer | Api::AdvancedCommerce | Api::ExternalPurchase => {
                TokenFamily::StoreKit
            }
        }
    }

    /// The API that owns `path` (already stripped of any `/sandbox` prefix), by prefix alone.
    /// Apple adds endpoints several times a year, so no endpoint list is consulted.
    pub fn for_path(path: &str) -> Option<Api> {
        if is_versioned_connect_path(path) {
            return Some(Api::AppStoreConnect);
        }
        [
            Api::AppStoreServer,
            Api::AdvancedCommerce,
            Api::ExternalPurchase,
            Api::Notary,
        ]
        .into_iter()
        .find(|api| api.prefixes().iter().any(|p| path.starts_with(p)))
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// `/v<digits>/…`: App Store Connect's versioned paths (`/v1/`, `/v2/`, `/v3/`, and any later).
fn is_versioned_connect_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && digits <= 3 && rest.as_bytes().get(digits) == Some(&b'/')
}

impl TokenFamily {
    /// The longest `exp - iat` Apple accepts for this family.
    pub fn max_lifetime(self) -> Duration {
        match self {
            TokenFamily::Connect => CONNECT_MAX_LIFETIME,
            TokenFamily::StoreKit => STOREKIT_MAX_LIFETIME,
        }
    }
}

/// The kind of Apple API key, as App Store Connect issues them. [ASC-KEYS], [ASSA-KEYS]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// App Store Connect team key: `iss` = issuer id.
    Team,
    /// App Store Connect individual key: `sub: "user"`, no `iss`.
    Individual,
    /// In-App Purchase key ("SubscriptionKey_…"): the storekit APIs only.
    InAppPurchase,
}

impl KeyKind {
    pub fn id(self) -> &'static str {
        match self {
            KeyKind::Team => "team",
            KeyKind::Individual => "individual",
            KeyKind::InAppPurchase => "in-app-purchase",
        }
    }

    /// Whether Apple accepts this kind of key for `api` at all.
    /// Individual keys can't use Notary (nor provisioning / reports, which are paths, not APIs).
    pub fn serves(self, api: Api) -> bool {
        match (self, api.token_family()) {
            (KeyKind::InAppPurchase, TokenFamily::StoreKit) => true,
            (KeyKind::Team, TokenFamily::Connect) => true,
            (KeyKind::Individual, TokenFamily::Connect) => api != Api::Notary,
            _ => false,
        }
    }

    /// The file name Apple gives this kind's download, for `check`'s hints.
    pub fn file_prefix(self) -> &'static str {
        match self {
            KeyKind::Team | KeyKind::Individual => "AuthKey_",
            KeyKind::InAppPurchase => "SubscriptionKey_",
        }
    }
}

/// Apple key ids are 10 upper-case alphanumerics (e.g. `2X9R4HXF34`). [ASC-JWT]
pub fn is_plausible_key_id(key_id: &str) -> bool {
    key_id.len() == 10
        && key_id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Issuer ids are UUIDs (8-4-4-4-12 hex). [ASC-JWT]
pub fn is_plausible_issuer_id(issuer: &str) -> bool {
    let groups: Vec<&str> = issuer.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_apis_by_prefix_alone() {
        let cases = [
            ("/v1/apps", Some(Api::AppStoreConnect)),
            ("/v2/inAppPurchases/1", Some(Api::AppStoreConnect)),
            ("/v3/appPricePoints/x", Some(Api::AppStoreConnect)),
            ("/v17/future", Some(Api::AppStoreConnect)),
            ("/v/apps", None),
            ("/v1", None),
            ("/vx/apps", None),
            ("/inApps/v1/transactions/1", Some(Api::AppStoreServer)),
            ("/groups/v1/transactions/1/seats", Some(Api::AppStoreServer)),
            (
                "/advancedCommerce/v1/subscription/cancel/1",
                Some(Api::AdvancedCommerce),
            ),
            ("/externalPurchase/v1/reports", Some(Api::ExternalPurchase)),
            ("/notary/v2/test", Some(Api::Notary)),
            ("/inapps/v1/x", None),
            ("/", None),
            ("", None),
        ];
        for (path, want) in cases {
            assert_eq!(Api::for_path(path), want, "{path}");
        }
    }

    #[test]
    fn key_kinds_serve_only_their_families() {
        assert!(KeyKind::Team.serves(Api::Notary));
        assert!(!KeyKind::Individual.serves(Api::Notary));
        assert!(KeyKind::Individual.serves(Api::AppStoreConnect));
        assert!(!KeyKind::Team.serves(Api::AppStoreServer));
        assert!(KeyKind::InAppPurchase.serves(Api::ExternalPurchase));
        assert!(!KeyKind::InAppPurchase.serves(Api::AppStoreConnect));
    }

    #[test]
    fn plausible_ids() {
        assert!(is_plausible_key_id("2X9R4HXF34"));
        assert!(!is_plausible_key_id("2x9r4hxf34"));
        assert!(!is_plausible_key_id("2X9R4HXF3"));
        assert!(is_plausible_issuer_id(
            "57246542-96fe-1a63-e053-0824d011072a"
        ));
        assert!(!is_plausible_issuer_id("57246542-96fe-1a63-e053"));
    }
}
