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
pub(crate) const AUDIENCE: &str = "appstoreconnect-v1";

/// App Store Connect (and Notary) reject tokens whose `exp - iat` exceeds 20 minutes. [ASC-JWT]
pub(crate) const CONNECT_MAX_LIFETIME: Duration = Duration::from_secs(20 * 60);

/// App Store Server, Advanced Commerce, External Purchase and Retention Messaging reject
/// tokens that expire more than 60 minutes after `iat`. [ASSA-JWT]
pub(crate) const STOREKIT_MAX_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// Query parameters App Store Connect ignores when matching a token's scope. [ASC-JWT]
pub(crate) const SCOPE_IGNORED_PARAMS: [&str; 3] = ["limit", "cursor", "sort"];

/// The path prefix that selects Apple's sandbox environment for the storekit APIs.
pub(crate) const SANDBOX_PREFIX: &str = "/sandbox";

/// Where the proxy's own endpoints live on the main listener (DESIGN §14): a prefix no Apple
/// API uses.
pub(crate) const PROXY_PREFIX: &str = "/proxy/v1/";

/// APNs' own path prefix (`POST /3/device/<device token>`), routed to APNs without a mount
/// because most APNs libraries take only a host and port (DESIGN §18). [APNS-SEND]
pub(crate) const APNS_NATIVE_PREFIX: &str = "/3/device/";

/// Whether a client-sent path is one of APNs' routes (its mount, with or without
/// `/sandbox`, or its own `/3/device/`), known before the request is routed.
pub(crate) fn is_apns_path(path: &str) -> bool {
    let path = path.strip_prefix(SANDBOX_PREFIX).unwrap_or(path);
    path.starts_with("/apns/") || path.starts_with(APNS_NATIVE_PREFIX)
}

/// APNs' provider-token rules (APPLE.md §9.1): refresh no more than once every 20 minutes
/// and no less than once every 60; the proxy's default sits between. [APNS-TOKEN]
pub(crate) const APNS_REFRESH_MIN: Duration = Duration::from_secs(20 * 60);
pub(crate) const APNS_REFRESH_MAX: Duration = Duration::from_secs(55 * 60);
pub(crate) const APNS_REFRESH_DEFAULT: Duration = Duration::from_secs(40 * 60);

/// The Apple Music developer token's `exp` may be at most 15,777,000 s (six months) after
/// `iat`. [MUSIC-TOK]
pub(crate) const MUSIC_MAX_LIFETIME: Duration = Duration::from_secs(15_777_000);

/// WeatherKit documents no maximum (APPLE.md §11: UNCONFIRMED); Apple's samples use an hour,
/// so the proxy never goes beyond it.
pub(crate) const WEATHERKIT_MAX_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// The exchange APIs' assertions (Maps' auth token, Apple Business/School Manager's client
/// assertion) are minted for one exchange each, so they live no longer than this whatever
/// the portal allows (INFERENCE, APPLE.md §9.6: "mint the assertion rarely with a short
/// `exp`"). [MAPS-TOK], [ABM-OAUTH]
pub(crate) const ASSERTION_MAX_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// Apple Business / School Manager's token endpoint (no `/v2/`) and the assertion's `aud`
/// (with `/v2/`). [ABM-OAUTH], [ABM-SAMPLE]
pub(crate) const ACCOUNT_TOKEN_URL: &str = "https://account.apple.com/auth/oauth2/token";
pub(crate) const ACCOUNT_TOKEN_AUDIENCE: &str = "https://account.apple.com/auth/oauth2/v2/token";
/// The OAuth client-assertion type of the client-credentials exchange. [ABM-OAUTH]
pub(crate) const CLIENT_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Maps Server API: the one path that takes the auth token; every other takes the access
/// token it returns. [MAPS-TOK]
pub(crate) const MAPS_TOKEN_PATH: &str = "/v1/token";

/// Sign in with Apple: the `client_secret`'s `aud`, the endpoints whose form carries it, its
/// cap (six months, by Apple's clock) and the proxy's default lifetime (DESIGN §18). [SIWA],
/// [AODS]
pub(crate) const SIGN_IN_AUDIENCE: &str = "https://appleid.apple.com";
pub(crate) const SIGN_IN_FORM_PATHS: [&str; 3] =
    ["/auth/token", "/auth/revoke", "/auth/oauth2/v2/token"];
pub(crate) const SIGN_IN_MAX_LIFETIME: Duration = Duration::from_secs(15_777_000);
pub(crate) const SIGN_IN_DEFAULT_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The largest Sign in with Apple form the proxy buffers to rewrite.
pub(crate) const SIGN_IN_MAX_FORM: usize = 64 * 1024;

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
    /// Not forwarded: the in-app signatures the proxy makes itself with an In-App Purchase
    /// key (`/proxy/v1/signatures/*`, DESIGN §15), for StoreKit to carry to Apple.
    InAppSigning,
    /// Apple Push Notification service: mount `/apns/`, and APNs' own `/3/device/` (DESIGN
    /// §18). HTTP/2 only. [APNS-SEND]
    Apns,
    /// DeviceCheck: mount `/devicecheck/`. [DC]
    DeviceCheck,
    /// App Attest fraud metric: mount `/appattest/`; its token goes without `Bearer`. [AA-FRAUD]
    AppAttest,
    /// WeatherKit REST API: mount `/weatherkit/`. [WK-AUTH]
    WeatherKit,
    /// Apple Music API: mount `/music/`. [MUSIC-TOK]
    AppleMusic,
    /// Apple Maps Server API: mount `/maps/`; the access token from `/v1/token`. [MAPS-TOK]
    Maps,
    /// Apple Business Manager API: mount `/business/`; an OAuth client-credentials access
    /// token (scope `business.api`). [ABM-OAUTH]
    AppleBusiness,
    /// Apple School Manager API: mount `/school/`; scope `school.api`. [ABM-OAUTH]
    AppleSchool,
    /// Sign in with Apple's token endpoints: mount `/appleid/`; the `client_secret` goes in
    /// the form body. [SIWA]
    SignInWithApple,
}

/// How a family's token is shaped. [ASC-JWT], [ASSA-JWT]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFamily {
    /// `iss` (team) or `sub:"user"` (individual), `aud`, `iat`, `exp`, optional `scope`; ≤ 20 min.
    Connect,
    /// `iss`, `aud`, `iat`, `exp`, `bid`; never `scope`; ≤ 60 min; in-app-purchase keys only.
    StoreKit,
    /// Apple Developer account keys (APNs, DeviceCheck, App Attest, WeatherKit, Music):
    /// `iss` = team id, `iat`, and per API `exp` and `sub`; no `aud` (APPLE.md §9) — Sign in
    /// with Apple's `client_secret` adds `aud` and `sub` (the client id).
    Developer,
    /// Apple Business / School Manager keys: `iss` = `sub` = the client id, `aud` the account
    /// token endpoint, `iat`, `exp`, `jti`; the `kid` is a UUID. [ABM-SAMPLE]
    AccountManager,
}

/// How an API's client-facing path prefixes reach it (DESIGN §3, §18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mount {
    /// Apple's own path prefixes, forwarded unchanged (`/v1/…`, `/inApps/…`). Every API of
    /// part one.
    Native,
    /// A prefix of the proxy's (`/apns`, `/weatherkit`, …) removed before forwarding, so a
    /// client's base URL is `http://proxy/<mount>` (DESIGN §18).
    Prefix(&'static str),
}

/// How the proxy authenticates to an API (DESIGN §18): what the mint phase produces and
/// where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStrategy {
    /// A JWT for this request (scoped where the family allows), cached per key, scope and
    /// bundle id until shortly before it expires, sent as `Authorization: Bearer`. Part two
    /// adds the cached provider token (APNs and its kin), the exchanged access token (Maps,
    /// Apple Business/School Manager) and the form-injected `client_secret` (Sign in with
    /// Apple).
    PerRequest,
    /// No token goes anywhere: the proxy answers with a signature for the client to hand to
    /// StoreKit (the in-app signatures, DESIGN §15).
    Answered,
    /// One token per key and API, reused until it is due for renewal and never re-minted
    /// sooner (APNs' provider token and its kin, WeatherKit's and Music's developer tokens;
    /// DESIGN §18): the same token for every request, across reloads.
    Cached,
    /// A short assertion exchanged with Apple for an access token, cached until shortly
    /// before it expires; the access token is what the request carries (Maps, Apple
    /// Business/School Manager; DESIGN §18).
    Exchanged,
    /// A `client_secret` JWT put into the request's form body, never a header (Sign in with
    /// Apple): cached per key and client id like [`TokenStrategy::Cached`].
    FormSecret,
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
    /// Every API, in the order `check` prints them: the forwarded ones, then the proxy's own.
    pub const ALL: [Api; 15] = [
        Api::AppStoreConnect,
        Api::AppStoreServer,
        Api::AdvancedCommerce,
        Api::ExternalPurchase,
        Api::Notary,
        Api::Apns,
        Api::DeviceCheck,
        Api::AppAttest,
        Api::WeatherKit,
        Api::AppleMusic,
        Api::Maps,
        Api::AppleBusiness,
        Api::AppleSchool,
        Api::SignInWithApple,
        Api::InAppSigning,
    ];

    /// The APIs the proxy forwards to, in the order the route table prints them.
    pub const FORWARDED: [Api; 14] = [
        Api::AppStoreConnect,
        Api::AppStoreServer,
        Api::AdvancedCommerce,
        Api::ExternalPurchase,
        Api::Notary,
        Api::Apns,
        Api::DeviceCheck,
        Api::AppAttest,
        Api::WeatherKit,
        Api::AppleMusic,
        Api::Maps,
        Api::AppleBusiness,
        Api::AppleSchool,
        Api::SignInWithApple,
    ];

    /// The stable id used in config (`[apis.<id>]`, `apis = [...]`), errors, audit and metrics.
    pub fn id(self) -> &'static str {
        match self {
            Api::AppStoreConnect => "app-store-connect",
            Api::AppStoreServer => "app-store-server",
            Api::AdvancedCommerce => "advanced-commerce",
            Api::ExternalPurchase => "external-purchase",
            Api::Notary => "notary",
            Api::InAppSigning => "in-app-signing",
            Api::Apns => "apns",
            Api::DeviceCheck => "devicecheck",
            Api::AppAttest => "app-attest",
            Api::WeatherKit => "weatherkit",
            Api::AppleMusic => "apple-music",
            Api::Maps => "maps",
            Api::AppleBusiness => "apple-business",
            Api::AppleSchool => "apple-school",
            Api::SignInWithApple => "sign-in-with-apple",
        }
    }

    pub(crate) fn from_id(id: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|api| api.id() == id)
    }

    /// The literal path prefixes this API owns (App Store Connect's `/v<N>/` is matched by
    /// `Api::locate`; `/v1/` … `/v3/` are listed here for humans).
    pub fn prefixes(self) -> &'static [&'static str] {
        match self {
            Api::AppStoreConnect => &["/v1/", "/v2/", "/v3/"],
            Api::AppStoreServer => &["/inApps/", "/groups/"],
            Api::AdvancedCommerce => &["/advancedCommerce/"],
            Api::ExternalPurchase => &["/externalPurchase/"],
            Api::Notary => &["/notary/"],
            Api::InAppSigning => &["/proxy/v1/signatures/"],
            Api::Apns => &["/apns/", APNS_NATIVE_PREFIX],
            Api::DeviceCheck => &["/devicecheck/"],
            Api::AppAttest => &["/appattest/"],
            Api::WeatherKit => &["/weatherkit/"],
            Api::AppleMusic => &["/music/"],
            Api::Maps => &["/maps/"],
            Api::AppleBusiness => &["/business/"],
            Api::AppleSchool => &["/school/"],
            Api::SignInWithApple => &["/appleid/"],
        }
    }

    /// Apple's production base URL; `None` for the proxy's own endpoints.
    /// [ASC-SPEC servers], [ASSA-CHANGELOG 2026-05-05], forum 749215
    pub(crate) fn production_url(self) -> Option<&'static str> {
        match self {
            Api::AppStoreConnect => Some("https://api.appstoreconnect.apple.com"),
            Api::AppStoreServer | Api::AdvancedCommerce | Api::ExternalPurchase => {
                Some("https://api.storekit.apple.com")
            }
            Api::Notary => Some("https://appstoreconnect.apple.com"),
            Api::InAppSigning => None,
            Api::Apns => Some("https://api.push.apple.com"),
            Api::DeviceCheck => Some("https://api.devicecheck.apple.com"),
            Api::AppAttest => Some("https://data.appattest.apple.com"),
            Api::WeatherKit => Some("https://weatherkit.apple.com"),
            Api::AppleMusic => Some("https://api.music.apple.com"),
            Api::Maps => Some("https://maps-api.apple.com"),
            Api::AppleBusiness => Some("https://api-business.apple.com"),
            Api::AppleSchool => Some("https://api-school.apple.com"),
            Api::SignInWithApple => Some("https://appleid.apple.com"),
        }
    }

    /// Apple's sandbox (for the developer-key APIs: development) base URL, for the APIs
    /// that have one. [ASSA-CHANGELOG 2026-05-05], [APNS-SEND], [DC], [AA-FRAUD]
    pub(crate) fn sandbox_url(self) -> Option<&'static str> {
        match self {
            Api::AppStoreServer | Api::AdvancedCommerce | Api::ExternalPurchase => {
                Some("https://api.storekit-sandbox.apple.com")
            }
            Api::Apns => Some("https://api.sandbox.push.apple.com"),
            Api::DeviceCheck => Some("https://api.development.devicecheck.apple.com"),
            Api::AppAttest => Some("https://data-development.appattest.apple.com"),
            Api::AppStoreConnect
            | Api::Notary
            | Api::InAppSigning
            | Api::WeatherKit
            | Api::AppleMusic
            | Api::Maps
            | Api::AppleBusiness
            | Api::AppleSchool
            | Api::SignInWithApple => None,
        }
    }

    pub(crate) fn has_sandbox(self) -> bool {
        self.sandbox_url().is_some()
    }

    /// The claim family. The in-app signatures are StoreKit-shaped (`iss`, `iat`, `aud`,
    /// `bid`) and made with the same In-App Purchase key.
    pub(crate) fn token_family(self) -> TokenFamily {
        match self {
            Api::AppStoreConnect | Api::Notary => TokenFamily::Connect,
            Api::AppStoreServer
            | Api::AdvancedCommerce
            | Api::ExternalPurchase
            | Api::InAppSigning => TokenFamily::StoreKit,
            Api::Apns
            | Api::DeviceCheck
            | Api::AppAttest
            | Api::WeatherKit
            | Api::AppleMusic
            | Api::Maps
            | Api::SignInWithApple => TokenFamily::Developer,
            Api::AppleBusiness | Api::AppleSchool => TokenFamily::AccountManager,
        }
    }

    pub fn mount(self) -> Mount {
        match self {
            Api::AppStoreConnect
            | Api::AppStoreServer
            | Api::AdvancedCommerce
            | Api::ExternalPurchase
            | Api::Notary
            | Api::InAppSigning => Mount::Native,
            Api::Apns => Mount::Prefix("/apns"),
            Api::DeviceCheck => Mount::Prefix("/devicecheck"),
            Api::AppAttest => Mount::Prefix("/appattest"),
            Api::WeatherKit => Mount::Prefix("/weatherkit"),
            Api::AppleMusic => Mount::Prefix("/music"),
            Api::Maps => Mount::Prefix("/maps"),
            Api::AppleBusiness => Mount::Prefix("/business"),
            Api::AppleSchool => Mount::Prefix("/school"),
            Api::SignInWithApple => Mount::Prefix("/appleid"),
        }
    }

    pub fn token_strategy(self) -> TokenStrategy {
        match self {
            Api::AppStoreConnect
            | Api::AppStoreServer
            | Api::AdvancedCommerce
            | Api::ExternalPurchase
            | Api::Notary => TokenStrategy::PerRequest,
            Api::InAppSigning => TokenStrategy::Answered,
            Api::Apns | Api::DeviceCheck | Api::AppAttest | Api::WeatherKit | Api::AppleMusic => {
                TokenStrategy::Cached
            }
            Api::Maps | Api::AppleBusiness | Api::AppleSchool => TokenStrategy::Exchanged,
            Api::SignInWithApple => TokenStrategy::FormSecret,
        }
    }

    /// An exchange API's token endpoint when it is not on the API's own host (Apple
    /// Business/School Manager: `account.apple.com`); Maps' is `/v1/token` on its host.
    pub(crate) fn token_url(self) -> Option<&'static str> {
        match self {
            Api::AppleBusiness | Api::AppleSchool => Some(ACCOUNT_TOKEN_URL),
            _ => None,
        }
    }

    /// The OAuth `scope` an account-manager exchange asks for, and the prefix of the client
    /// ids it takes (mixing school and business values is the common cause of errors,
    /// APPLE.md §9.6). [ABM-OAUTH]
    pub(crate) fn account_scope(self) -> Option<(&'static str, &'static str)> {
        match self {
            Api::AppleBusiness => Some(("business.api", "BUSINESSAPI.")),
            Api::AppleSchool => Some(("school.api", "SCHOOLAPI.")),
            _ => None,
        }
    }

    /// The scheme before the token in `Authorization`: `Bearer`, except App Attest's, which
    /// Apple shows as the bare JWT (the safe reading: APPLE.md §9.2 marks `Bearer` there
    /// UNVERIFIED). [AA-FRAUD]
    pub(crate) fn bearer(self) -> bool {
        self != Api::AppAttest
    }

    /// The API that owns `path` (already stripped of any `/sandbox` prefix), by prefix alone,
    /// and the path forwarded to it (its mount removed). Apple adds endpoints several times
    /// a year, so no endpoint list is consulted.
    pub(crate) fn locate(path: &str) -> Option<(Api, &str)> {
        if is_versioned_connect_path(path) {
            return Some((Api::AppStoreConnect, path));
        }
        // APNs' own prefix, for the libraries that take only a host and port.
        if path.starts_with(APNS_NATIVE_PREFIX) {
            return Some((Api::Apns, path));
        }
        let api = Api::FORWARDED
            .into_iter()
            .filter(|api| *api != Api::AppStoreConnect)
            .find(|api| match api.mount() {
                Mount::Native => api.prefixes().iter().any(|p| path.starts_with(p)),
                Mount::Prefix(mount) => path
                    .strip_prefix(mount)
                    .is_some_and(|rest| rest.starts_with('/')),
            })?;
        match api.mount() {
            Mount::Native => Some((api, path)),
            Mount::Prefix(mount) => Some((api, &path[mount.len()..])),
        }
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
    /// The longest `exp - iat` Apple accepts for this family (for the developer family, the
    /// longest of its APIs: each API's own cap is [`Api::max_lifetime`]).
    pub(crate) fn max_lifetime(self) -> Duration {
        match self {
            TokenFamily::Connect => CONNECT_MAX_LIFETIME,
            TokenFamily::StoreKit => STOREKIT_MAX_LIFETIME,
            TokenFamily::Developer => MUSIC_MAX_LIFETIME,
            TokenFamily::AccountManager => ASSERTION_MAX_LIFETIME,
        }
    }
}

impl Api {
    /// The longest `exp - iat` this API accepts; `None` for a token without `exp` (APNs,
    /// DeviceCheck and App Attest's provider token is renewed by age instead).
    pub(crate) fn max_lifetime(self) -> Option<Duration> {
        match self {
            Api::Apns | Api::DeviceCheck | Api::AppAttest => None,
            Api::WeatherKit => Some(WEATHERKIT_MAX_LIFETIME),
            Api::AppleMusic => Some(MUSIC_MAX_LIFETIME),
            Api::Maps | Api::AppleBusiness | Api::AppleSchool => Some(ASSERTION_MAX_LIFETIME),
            Api::SignInWithApple => Some(SIGN_IN_MAX_LIFETIME),
            api => Some(api.token_family().max_lifetime()),
        }
    }
}

/// The in-app signatures an In-App Purchase key makes for StoreKit (APPLE.md §8), one per
/// endpoint under `/proxy/v1/signatures/` (DESIGN §15).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureKind {
    /// Promotional offer, JWS form (V2): `aud` `promotional-offer`.
    PromotionalOffer,
    /// Introductory-offer eligibility: `aud` `introductory-offer-eligibility`.
    IntroductoryOfferEligibility,
    /// Advanced Commerce in-app request: `aud` `advanced-commerce-api`.
    AdvancedCommerce,
    /// Promotional offer, legacy signature: base64 DER over the U+2063-separated message.
    PromotionalOfferV1,
}

impl SignatureKind {
    pub const ALL: [SignatureKind; 4] = [
        SignatureKind::PromotionalOffer,
        SignatureKind::IntroductoryOfferEligibility,
        SignatureKind::AdvancedCommerce,
        SignatureKind::PromotionalOfferV1,
    ];

    /// The endpoint's last path segment, and the kind's name in audit records and metrics.
    pub fn id(self) -> &'static str {
        match self {
            SignatureKind::PromotionalOffer => "promotional-offer",
            SignatureKind::IntroductoryOfferEligibility => "introductory-offer-eligibility",
            SignatureKind::AdvancedCommerce => "advanced-commerce",
            SignatureKind::PromotionalOfferV1 => "promotional-offer-v1",
        }
    }

    /// The kind at `/proxy/v1/signatures/<name>`.
    pub fn from_id(name: &str) -> Option<SignatureKind> {
        SignatureKind::ALL.into_iter().find(|k| k.id() == name)
    }

    /// The JWS `aud` claim; `None` for the legacy signature, which is not a JWS. [SK-JWS]
    pub fn audience(self) -> Option<&'static str> {
        match self {
            SignatureKind::PromotionalOffer => Some("promotional-offer"),
            SignatureKind::IntroductoryOfferEligibility => Some("introductory-offer-eligibility"),
            SignatureKind::AdvancedCommerce => Some("advanced-commerce-api"),
            SignatureKind::PromotionalOfferV1 => None,
        }
    }

    /// The kind whose JWS carries `aud`.
    pub fn from_audience(aud: &str) -> Option<SignatureKind> {
        SignatureKind::ALL
            .into_iter()
            .find(|k| k.audience() == Some(aud))
    }
}

impl fmt::Display for SignatureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// The separator of the legacy V1 promotional-offer message: U+2063 INVISIBLE SEPARATOR.
/// [SK-PROMO-V1]
pub const V1_SEPARATOR: char = '\u{2063}';

/// The kind of Apple API key, as App Store Connect issues them. [ASC-KEYS], [ASSA-KEYS]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// App Store Connect team key: `iss` = issuer id.
    Team,
    /// App Store Connect individual key: `sub: "user"`, no `iss`.
    Individual,
    /// In-App Purchase key ("SubscriptionKey_…"): the storekit APIs only.
    InAppPurchase,
    /// Apple Developer account key (Certificates, Identifiers & Profiles → Keys): APNs,
    /// DeviceCheck, App Attest, WeatherKit, MusicKit, Maps, Sign in with Apple; `iss` = team
    /// id. [APNS-TOKEN]
    Developer,
    /// Apple Business / School Manager API key: `client_id` (`BUSINESSAPI.…`/`SCHOOLAPI.…`),
    /// a UUID key id. [ABM-OAUTH]
    BusinessManager,
}

impl KeyKind {
    pub fn id(self) -> &'static str {
        match self {
            KeyKind::Team => "team",
            KeyKind::Individual => "individual",
            KeyKind::InAppPurchase => "in-app-purchase",
            KeyKind::Developer => "developer",
            KeyKind::BusinessManager => "business-manager",
        }
    }

    /// Whether Apple accepts this kind of key for `api` at all.
    /// Individual keys can't use Notary (nor provisioning / reports, which are paths, not APIs).
    pub fn serves(self, api: Api) -> bool {
        match (self, api.token_family()) {
            (KeyKind::InAppPurchase, TokenFamily::StoreKit) => true,
            (KeyKind::Team, TokenFamily::Connect) => true,
            (KeyKind::Individual, TokenFamily::Connect) => api != Api::Notary,
            (KeyKind::Developer, TokenFamily::Developer) => true,
            (KeyKind::BusinessManager, TokenFamily::AccountManager) => true,
            _ => false,
        }
    }
}

/// Apple key ids are 10 upper-case alphanumerics (e.g. `2X9R4HXF34`). [ASC-JWT]
pub(crate) fn is_plausible_key_id(key_id: &str) -> bool {
    key_id.len() == 10
        && key_id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Issuer ids are UUIDs (8-4-4-4-12 hex). [ASC-JWT]
pub(crate) fn is_plausible_issuer_id(issuer: &str) -> bool {
    is_uuid(issuer)
}

/// `8-4-4-4-12` hex digits, any case: issuer ids, nonces, app account tokens.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
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
            assert_eq!(Api::locate(path).map(|(api, _)| api), want, "{path}");
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

/// One of Apple's documented per-endpoint rate limits (requests per second, per app;
/// sandbox gets 10% of it). [ASSA-RL], [ACA-RL], [RM-RL]; APPLE.md §4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointLimit {
    /// Apple's name for the endpoint (or endpoint group).
    pub name: &'static str,
    /// `None` = any method.
    pub method: Option<&'static str>,
    /// Path segments after the leading `/`; `"{}"` matches any one segment, a trailing
    /// `"**"` any rest.
    pub pattern: &'static [&'static str],
    pub per_second: u32,
}

const fn limit(
    name: &'static str,
    method: Option<&'static str>,
    pattern: &'static [&'static str],
    per_second: u32,
) -> EndpointLimit {
    EndpointLimit {
        name,
        method,
        pattern,
        per_second,
    }
}

/// Apple's published limits for the storekit APIs, most specific first.
const STOREKIT_LIMITS: &[EndpointLimit] = &[
    limit(
        "Finish Transaction",
        Some("POST"),
        &["inApps", "v1", "transactions", "{}", "finish"],
        50,
    ),
    limit(
        "Set App Account Token",
        Some("PUT"),
        &["inApps", "v1", "transactions", "{}", "appAccountToken"],
        20,
    ),
    limit(
        "Get App Transaction Info",
        Some("GET"),
        &["inApps", "v1", "transactions", "appTransactions", "{}"],
        50,
    ),
    limit(
        "Send Consumption Information",
        Some("PUT"),
        &["inApps", "v1", "transactions", "consumption", "{}"],
        50,
    ),
    limit(
        "Send Consumption Information",
        Some("PUT"),
        &["inApps", "v2", "transactions", "consumption", "{}"],
        50,
    ),
    limit(
        "Get Transaction Info",
        Some("GET"),
        &["inApps", "v1", "transactions", "{}"],
        50,
    ),
    limit(
        "Get Transaction History",
        Some("GET"),
        &["inApps", "v2", "history", "{}"],
        50,
    ),
    limit(
        "Get Transaction History",
        Some("GET"),
        &["inApps", "v1", "history", "{}"],
        50,
    ),
    limit(
        "Mass Extend",
        Some("POST"),
        &["inApps", "v1", "subscriptions", "extend", "mass"],
        1,
    ),
    limit(
        "Extend a Subscription Renewal Date",
        Some("PUT"),
        &["inApps", "v1", "subscriptions", "extend", "{}"],
        20,
    ),
    limit(
        "Get All Subscription Statuses",
        Some("GET"),
        &["inApps", "v1", "subscriptions", "{}"],
        50,
    ),
    limit(
        "Get Notification History",
        Some("POST"),
        &["inApps", "v1", "notifications", "history"],
        50,
    ),
    limit(
        "Request a Test Notification",
        Some("POST"),
        &["inApps", "v1", "notifications", "test"],
        1,
    ),
    limit(
        "Get Test Notification Status",
        Some("GET"),
        &["inApps", "v1", "notifications", "test", "{}"],
        1,
    ),
    limit(
        "Look Up Order ID",
        Some("GET"),
        &["inApps", "v1", "lookup", "{}"],
        10,
    ),
    limit(
        "Get Refund History",
        Some("GET"),
        &["inApps", "v2", "refund", "lookup", "{}"],
        10,
    ),
    limit(
        "Get Refund History",
        Some("GET"),
        &["inApps", "v1", "refund", "lookup", "{}"],
        10,
    ),
    limit(
        "Configure Default Message",
        None,
        &["inApps", "v1", "messaging", "default", "**"],
        10,
    ),
    limit(
        "Retention Messaging",
        None,
        &["inApps", "v1", "messaging", "**"],
        1,
    ),
    limit(
        "Cancel Subscription",
        Some("POST"),
        &["advancedCommerce", "v1", "subscription", "cancel", "{}"],
        5,
    ),
    limit(
        "Revoke Subscription",
        Some("POST"),
        &["advancedCommerce", "v1", "subscription", "revoke", "{}"],
        5,
    ),
    limit(
        "Request Transaction Refund",
        Some("POST"),
        &[
            "advancedCommerce",
            "v1",
            "transaction",
            "requestRefund",
            "{}",
        ],
        5,
    ),
    limit(
        "Change Subscription Metadata",
        Some("POST"),
        &[
            "advancedCommerce",
            "v1",
            "subscription",
            "changeMetadata",
            "{}",
        ],
        50,
    ),
    limit(
        "Change Subscription Price",
        Some("POST"),
        &[
            "advancedCommerce",
            "v1",
            "subscription",
            "changePrice",
            "{}",
        ],
        50,
    ),
    limit(
        "Migrate Subscription",
        Some("POST"),
        &["advancedCommerce", "v1", "subscription", "migrate", "{}"],
        50,
    ),
];

/// The documented limit for `method path` (the path Apple sees, without `/sandbox`).
pub fn endpoint_limit(method: &str, path: &str) -> Option<&'static EndpointLimit> {
    let segments: Vec<&str> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .collect();
    STOREKIT_LIMITS.iter().find(|l| {
        l.method.is_none_or(|m| m == method) && {
            let rest = l.pattern.last() == Some(&"**");
            let fixed = if rest {
                &l.pattern[..l.pattern.len() - 1]
            } else {
                l.pattern
            };
            (if rest {
                segments.len() > fixed.len()
            } else {
                segments.len() == fixed.len()
            }) && fixed
                .iter()
                .zip(&segments)
                .all(|(p, s)| *p == "{}" || p == s)
        }
    })
}

/// Sandbox gets 10% of production's limits. [ASSA-RL]
pub const SANDBOX_LIMIT_FRACTION: f64 = 0.1;

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn endpoints_map_to_apples_documented_limits() {
        let cases = [
            ("GET", "/inApps/v1/transactions/2000000000000001", Some(50)),
            ("POST", "/inApps/v1/transactions/1/finish", Some(50)),
            ("PUT", "/inApps/v1/transactions/1/appAccountToken", Some(20)),
            ("GET", "/inApps/v1/transactions/appTransactions/1", Some(50)),
            ("GET", "/inApps/v1/lookup/MQ8H9K", Some(10)),
            ("POST", "/inApps/v1/subscriptions/extend/mass", Some(1)),
            ("PUT", "/inApps/v1/subscriptions/extend/1", Some(20)),
            ("GET", "/inApps/v1/subscriptions/1", Some(50)),
            ("POST", "/inApps/v1/notifications/test", Some(1)),
            (
                "PUT",
                "/inApps/v1/messaging/default/product/en-US",
                Some(10),
            ),
            ("GET", "/inApps/v1/messaging/message/list", Some(1)),
            (
                "POST",
                "/advancedCommerce/v1/subscription/cancel/1",
                Some(5),
            ),
            (
                "POST",
                "/advancedCommerce/v1/subscription/migrate/1",
                Some(50),
            ),
            ("GET", "/groups/v1/transactions/1/seats", None),
            ("PUT", "/externalPurchase/v1/reports", None),
            ("DELETE", "/inApps/v1/transactions/1", None),
        ];
        for (method, path, want) in cases {
            assert_eq!(
                endpoint_limit(method, path).map(|l| l.per_second),
                want,
                "{method} {path}"
            );
        }
    }
}
