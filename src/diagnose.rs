//! Why did Apple say 401 or 403? Pure: [`Evidence`] in, ranked [`Cause`]s out.
//!
//! Apple's App Store Connect 401 body is identical for every cause and the App Store Server
//! API's is empty, so this is the only explanation a user gets (APPLE.md §3, §5). Each cause
//! has a stable code, a plain explanation and a fix a person can act on in App Store Connect
//! or on the host. Causes are ranked by the strength of the evidence for them; weak
//! candidates are still listed, after the strong ones.
//!
//! Nothing here does I/O or reads the clock: `proxy` gathers the evidence (the claims it
//! sent, Apple's `Date`, Apple's body, the key's history, a sandbox probe) and renders the
//! result. The evidence never holds a token, signature or secret.

use crate::apple::{self, Api, Environment, KeyKind, TokenFamily};
use crate::token::Claims;

/// Stable cause codes (README lists them; `X-Proxy-Diagnosis` carries the first).
pub mod codes {
    pub const CLOCK_SKEW: &str = "CLOCK_SKEW";
    pub const WRONG_KEY_KIND: &str = "WRONG_KEY_KIND";
    pub const INDIVIDUAL_KEY_NOT_ALLOWED: &str = "INDIVIDUAL_KEY_NOT_ALLOWED";
    pub(crate) const BUNDLE_ID: &str = "BUNDLE_ID_MISMATCH";
    pub const SCOPE_MISMATCH: &str = "SCOPE_MISMATCH";
    pub const APP_NOT_RELEASED: &str = "APP_NOT_RELEASED";
    pub const KEY_REVOKED: &str = "KEY_REVOKED";
    pub const WRONG_KEY_ID: &str = "WRONG_KEY_ID";
    pub const WRONG_ISSUER: &str = "WRONG_ISSUER";
    pub const ROLE_FORBIDDEN: &str = "ROLE_FORBIDDEN";
    pub const AGREEMENT_PENDING: &str = "AGREEMENT_PENDING";
    pub(crate) const TRANSIENT_401: &str = "APPLE_TRANSIENT_401";
    pub const APNS_INVALID_PROVIDER_TOKEN: &str = "APNS_INVALID_PROVIDER_TOKEN";
    pub const APNS_EXPIRED_PROVIDER_TOKEN: &str = "APNS_EXPIRED_PROVIDER_TOKEN";
    pub const APNS_MISSING_PROVIDER_TOKEN: &str = "APNS_MISSING_PROVIDER_TOKEN";
    pub const APNS_UNRELATED_KEY: &str = "APNS_UNRELATED_KEY";
    pub const APNS_TOO_MANY_TOKEN_UPDATES: &str = "APNS_TOO_MANY_TOKEN_UPDATES";
    pub const APNS_FORBIDDEN: &str = "APNS_FORBIDDEN";
    pub const DEVELOPER_TOKEN_REFUSED: &str = "DEVELOPER_TOKEN_REFUSED";

    /// Every code, for the README table and tests.
    pub const ALL: [&str; 19] = [
        CLOCK_SKEW,
        WRONG_KEY_KIND,
        INDIVIDUAL_KEY_NOT_ALLOWED,
        BUNDLE_ID,
        SCOPE_MISMATCH,
        APP_NOT_RELEASED,
        KEY_REVOKED,
        WRONG_KEY_ID,
        WRONG_ISSUER,
        ROLE_FORBIDDEN,
        AGREEMENT_PENDING,
        TRANSIENT_401,
        APNS_INVALID_PROVIDER_TOKEN,
        APNS_EXPIRED_PROVIDER_TOKEN,
        APNS_MISSING_PROVIDER_TOKEN,
        APNS_UNRELATED_KEY,
        APNS_TOO_MANY_TOKEN_UPDATES,
        APNS_FORBIDDEN,
        DEVELOPER_TOKEN_REFUSED,
    ];
}

/// Skew beyond this is reported even when the token was inside Apple's window.
const SKEW_WORTH_REPORTING_S: i64 = 10;

/// App Store Connect paths an individual key cannot use (APPLE.md §5).
const INDIVIDUAL_KEY_FORBIDDEN_PREFIXES: [&str; 7] = [
    "/v1/bundleIds",
    "/v1/certificates",
    "/v1/devices",
    "/v1/profiles",
    "/v1/bundleIdCapabilities",
    "/v1/salesReports",
    "/v1/financeReports",
];

/// What a sandbox retry of a production storekit request showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxProbe {
    /// Sandbox accepted the token (2xx, or a 4xx other than 401/403: the request was
    /// authenticated and then answered).
    Accepted(u16),
    /// Sandbox rejected it too.
    Rejected(u16),
    /// The probe could not be made (network, timeout).
    Failed,
}

/// One entry of Apple's `errors` array, as far as the diagnosis reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppleError {
    pub code: String,
    pub title: String,
    pub detail: String,
}

/// The facts about one failed request.
#[derive(Clone, Debug)]
pub struct Evidence<'a> {
    /// Apple's status: 401 or 403.
    pub status: u16,
    pub api: Api,
    pub environment: Environment,
    pub method: &'a str,
    /// The path sent to Apple.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub key_name: &'a str,
    pub key_id: &'a str,
    pub key_kind: KeyKind,
    /// The kind the key's file name suggests (`AuthKey_` / `SubscriptionKey_`), if any.
    pub file_kind_hint: Option<KeyKind>,
    /// The key id the key file's name carries (`AuthKey_<id>.p8`), if it carries one.
    pub file_key_id: Option<&'a str>,
    pub claims: &'a Claims,
    /// The proxy's own clock when Apple answered (UNIX seconds).
    pub proxy_now: i64,
    /// Apple's `Date` header (UNIX seconds), when sent.
    pub apple_date: Option<i64>,
    /// Apple's `errors` entries (empty when Apple sent no JSON).
    pub apple_errors: &'a [AppleError],
    /// When this key last got a non-401/403 answer from Apple (UNIX seconds).
    pub key_last_success: Option<i64>,
    /// Whether any other key with the same issuer id has been accepted.
    pub issuer_proven: bool,
    /// Whether this 401 came after one automatic re-mint and retry.
    pub retried: bool,
    pub sandbox_probe: Option<SandboxProbe>,
}

/// A likely cause, with what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cause {
    pub code: &'static str,
    pub detail: String,
    pub fix: String,
    /// Strength of the evidence (higher first). Not part of the JSON contract.
    #[serde(skip)]
    pub weight: u8,
}

const STRONG: u8 = 90;
const GOOD: u8 = 70;
const FAIR: u8 = 50;
const WEAK: u8 = 30;
const GUESS: u8 = 10;

fn cause(code: &'static str, weight: u8, detail: String, fix: &str) -> Cause {
    Cause {
        code,
        detail,
        fix: fix.to_string(),
        weight,
    }
}

/// The causes, strongest first. Never empty for a 401/403.
/// What the proxy knows when an API served by a developer key refuses its token.
#[derive(Debug)]
pub struct DeveloperEvidence<'a> {
    pub status: u16,
    pub api: Api,
    /// APNs' `reason` (`InvalidProviderToken`, …); `None` elsewhere or without a body.
    pub reason: Option<&'a str>,
    pub key_name: &'a str,
    pub key_id: &'a str,
    pub team_id: Option<&'a str>,
    pub service_id: Option<&'a str>,
    pub claims: &'a Claims,
    /// This host's clock and Apple's `Date`, UNIX seconds.
    pub proxy_now: i64,
    pub apple_date: Option<i64>,
    /// When Apple last accepted this key (UNIX seconds), if it has since start-up.
    pub key_last_success: Option<i64>,
    /// How often the proxy renews this key's provider token, in seconds.
    pub refresh_s: u64,
}

/// The service a developer-key API needs enabled on the key, as the portal names it.
fn service_name(api: Api) -> &'static str {
    match api {
        Api::Apns => "Apple Push Notifications service (APNs)",
        Api::DeviceCheck | Api::AppAttest => "DeviceCheck",
        Api::WeatherKit => "WeatherKit",
        Api::AppleMusic => "Media Services (MusicKit, ShazamKit, Apple Music Feed)",
        _ => "the API's service",
    }
}

/// Whether APNs' `status`/`reason` is about the provider token, i.e. the proxy's to
/// diagnose; 410 `Unregistered`, the 400s and `TooManyRequests` are the app's (APPLE.md §9.1).
pub fn apns_token_reason(status: u16, reason: &str) -> bool {
    matches!(
        (status, reason),
        (
            403,
            "InvalidProviderToken"
                | "ExpiredProviderToken"
                | "MissingProviderToken"
                | "UnrelatedKeyIdInToken"
                | "Forbidden"
        ) | (429, "TooManyProviderTokenUpdates")
    )
}

/// Why APNs, DeviceCheck, App Attest, WeatherKit or Apple Music refused the token, with
/// fixes (DESIGN §18): APNs' `reason` first, then what the token and the clocks show.
pub fn diagnose_developer(e: &DeveloperEvidence<'_>) -> Vec<Cause> {
    let mut out = Vec::new();
    let key = e.key_name;
    let team = e.team_id.unwrap_or("?");
    let service = service_name(e.api);
    let worked_before = e.key_last_success.is_some();
    let skew = e.apple_date.map(|apple| apple - e.proxy_now);
    if let (Some(apple_now), Some(skew)) = (e.apple_date, skew) {
        if e.claims.iat > apple_now || apple_now - e.claims.iat >= 3600 {
            out.push(cause(
                codes::CLOCK_SKEW,
                STRONG,
                format!(
                    "by Apple's clock the token's iat ({}) is {} s {}; this host's clock is {} s {} Apple's",
                    e.claims.iat,
                    (apple_now - e.claims.iat).abs(),
                    if e.claims.iat > apple_now { "in the future" } else { "old, past APNs' one-hour limit" },
                    skew.abs(),
                    if skew < 0 { "ahead of" } else { "behind" }
                ),
                "sync this host's clock (chrony/NTP); the proxy corrects the next token for the offset it measured",
            ));
        }
    }
    let refused_token = |out: &mut Vec<Cause>, code: &'static str| {
        out.push(cause(
            code,
            if worked_before { FAIR } else { STRONG },
            format!("the token is signed by key `{key}` (kid {}) for team {team}; Apple accepts it only if that key belongs to that team and has {service} enabled", e.key_id),
            &format!("in Certificates, Identifiers & Profiles → Keys, check that key {} has {service} enabled, and that team_id in proxy.toml is the team shown under Membership details", e.key_id),
        ));
        out.push(cause(
            codes::KEY_REVOKED,
            if worked_before { GOOD } else { WEAK },
            if worked_before {
                format!("key `{key}` worked earlier and is refused now: it was probably revoked")
            } else {
                format!("key `{key}` may have been revoked")
            },
            "create a new key in Certificates, Identifiers & Profiles → Keys and replace this one",
        ));
    };
    match (e.api, e.reason) {
        (Api::Apns, Some("InvalidProviderToken")) => {
            refused_token(&mut out, codes::APNS_INVALID_PROVIDER_TOKEN);
        }
        (Api::Apns, Some("ExpiredProviderToken")) => out.push(cause(
            codes::APNS_EXPIRED_PROVIDER_TOKEN,
            GOOD,
            format!(
                "APNs says the token's iat ({}) is more than an hour old; the proxy renews it every {} s, so Apple's clock and this host's disagree",
                e.claims.iat, e.refresh_s
            ),
            "sync this host's clock (chrony/NTP); lower apns_token_refresh only if the clock cannot be fixed",
        )),
        (Api::Apns, Some("MissingProviderToken")) => out.push(cause(
            codes::APNS_MISSING_PROVIDER_TOKEN,
            STRONG,
            "the proxy sent a provider token, but APNs received none: something between them (an egress proxy, a TLS-inspecting middlebox) removed the authorization header".into(),
            "let the proxy reach api.push.apple.com directly, or make the egress proxy pass `authorization` through",
        )),
        (Api::Apns, Some("UnrelatedKeyIdInToken")) => out.push(cause(
            codes::APNS_UNRELATED_KEY,
            STRONG,
            format!("APNs bound the connection to another key or team than key `{key}`'s; the proxy has opened a new connection for this key, so a retry goes through"),
            "retry the push; if it keeps happening, check that one key's topics belong to the one team (team_id) and that keys of different teams are separate [[keys]]",
        )),
        (Api::Apns, Some("TooManyProviderTokenUpdates")) => out.push(cause(
            codes::APNS_TOO_MANY_TOKEN_UPDATES,
            STRONG,
            format!("APNs saw key `{key}`'s token change more often than every 20 minutes; this proxy renews it every {} s, so something else signs APNs tokens with the same key (another service, a second deployment)", e.refresh_s),
            "let only this proxy sign with the key (remove the .p8 from other services and point them at the proxy); every replica renews no faster than apns_token_refresh",
        )),
        (Api::Apns, Some(other)) => out.push(cause(
            codes::APNS_FORBIDDEN,
            FAIR,
            format!("APNs refused the request ({}, reason {other})", e.status),
            &format!("check that key {} has {service} enabled and that the topic (apns-topic) is an app of team {team}", e.key_id),
        )),
        (_, _) => {
            refused_token(&mut out, codes::DEVELOPER_TOKEN_REFUSED);
            if e.api == Api::WeatherKit {
                out.push(cause(
                    codes::DEVELOPER_TOKEN_REFUSED,
                    FAIR,
                    format!("WeatherKit also checks the service id: the token says `{}`", e.service_id.unwrap_or("?")),
                    "set service_id to the WeatherKit service identifier registered under Identifiers → Services IDs",
                ));
            }
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.weight));
    out
}

pub fn diagnose(e: &Evidence<'_>) -> Vec<Cause> {
    let mut out = Vec::new();
    let family = e.api.token_family();
    let forbidden = e.status == 403;

    // Clock: judged on Apple's own clock, the only one that matters.
    if let Some(apple_now) = e.apple_date {
        let skew = apple_now - e.proxy_now;
        if e.claims.iat > apple_now {
            out.push(cause(
                codes::CLOCK_SKEW,
                STRONG,
                format!(
                    "the token's iat ({}) is {} s in the future by Apple's clock ({apple_now}); this host's clock is {} s {} Apple's",
                    e.claims.iat,
                    e.claims.iat - apple_now,
                    skew.abs(),
                    if skew < 0 { "ahead of" } else { "behind" }
                ),
                "sync this host's clock (chrony/NTP). The proxy has learned Apple's clock from this answer and corrects the next tokens for it",
            ));
        } else if let Some(exp) = e.claims.exp.filter(|exp| *exp <= apple_now) {
            out.push(cause(
                codes::CLOCK_SKEW,
                STRONG,
                format!("the token had already expired by Apple's clock (exp {exp} ≤ {apple_now}); this host's clock is {} s off", skew.abs()),
                "sync this host's clock (chrony/NTP); the proxy corrects for the offset it measured",
            ));
        } else if skew.abs() > SKEW_WORTH_REPORTING_S {
            out.push(cause(
                codes::CLOCK_SKEW,
                WEAK,
                format!("this host's clock differs from Apple's by {skew} s (the token was still inside Apple's window)"),
                "sync this host's clock (chrony/NTP)",
            ));
        }
    }

    // 403s carry Apple's own words; quote them.
    let detail_text = e
        .apple_errors
        .iter()
        .map(|a| format!("{} {} {}", a.code, a.title, a.detail))
        .collect::<Vec<_>>()
        .join(" | ");
    let quoted = e
        .apple_errors
        .iter()
        .find(|a| !a.detail.is_empty())
        .map(|a| format!(" Apple says: \"{}\"", a.detail))
        .unwrap_or_default();
    let lower = detail_text.to_ascii_lowercase();

    if forbidden && (lower.contains("agreement") || lower.contains("access unavailable")) {
        out.push(cause(
            codes::AGREEMENT_PENDING,
            STRONG,
            format!("Apple refuses access until an agreement is accepted.{quoted}"),
            "the Account Holder signs in to App Store Connect → Business (Agreements, Tax, and Banking) and accepts the pending agreement; for Advanced Commerce, the Advanced Commerce API Addendum",
        ));
    }

    let individual_forbidden_path = family == TokenFamily::Connect
        && (e.api == Api::Notary
            || INDIVIDUAL_KEY_FORBIDDEN_PREFIXES
                .iter()
                .any(|p| e.path.starts_with(p)));
    if e.key_kind == KeyKind::Individual && individual_forbidden_path {
        out.push(cause(
            codes::INDIVIDUAL_KEY_NOT_ALLOWED,
            if forbidden { STRONG } else { GOOD },
            format!(
                "key `{}` is an individual key, and Apple does not let individual keys use provisioning, sales and finance reports, or notary ({} {}).{quoted}",
                e.key_name, e.method, e.path
            ),
            "create a team key (App Store Connect → Users and Access → Integrations → Team Keys) with a role that covers this (Finance or Sales for reports, Developer for notary and provisioning), and pin it for this client",
        ));
    }

    if forbidden
        && !out.iter().any(|c| {
            c.code == codes::AGREEMENT_PENDING || c.code == codes::INDIVIDUAL_KEY_NOT_ALLOWED
        })
    {
        out.push(cause(
            codes::ROLE_FORBIDDEN,
            GOOD,
            format!("Apple authenticated key `{}` but its role does not allow {} {}.{quoted}", e.key_name, e.method, e.path),
            "in App Store Connect → Users and Access → Integrations, give the key a role that allows this operation (keys can't be edited: revoke and create a new one with the right role), or use another key",
        ));
    }

    // Wrong kind of key for the API: the file name is the evidence.
    if let Some(hint) = e.file_kind_hint {
        let hint_family_ok = hint.serves(e.api);
        if !hint_family_ok
            || (hint == KeyKind::InAppPurchase) != (e.key_kind == KeyKind::InAppPurchase)
        {
            out.push(cause(
                codes::WRONG_KEY_KIND,
                STRONG,
                format!(
                    "key `{}` is configured as {} but its file name says it is {} key, and Apple accepts only {} keys for {}",
                    e.key_name,
                    e.key_kind.id(),
                    match hint {
                        KeyKind::InAppPurchase => "an In-App Purchase (SubscriptionKey_…)",
                        _ => "an App Store Connect (AuthKey_…)",
                    },
                    match family {
                        TokenFamily::StoreKit => "In-App Purchase",
                        TokenFamily::Connect => "App Store Connect team or individual",
                        TokenFamily::Developer => "Apple Developer account",
                        TokenFamily::AccountManager => "Apple Business/School Manager",
                    },
                    e.api
                ),
                match family {
                    TokenFamily::StoreKit => "use an In-App Purchase key (Users and Access → Integrations → In-App Purchase) for the storekit APIs, with kind = \"in-app-purchase\"",
                    TokenFamily::Connect => "use an App Store Connect team key (Users and Access → Integrations → Team Keys) for App Store Connect and notary",
                    TokenFamily::Developer => "use a key from Certificates, Identifiers & Profiles → Keys with the service enabled, with kind = \"developer\"",
                    TokenFamily::AccountManager => "use the API account's key from Apple Business/School Manager → Preferences → API, with kind = \"business-manager\"",
                },
            ));
        }
    }

    if !forbidden {
        // Production storekit 401 while sandbox accepts the same token: the app is not
        // released yet (or the transaction is a sandbox one). APPLE.md §0, forum 806452.
        match e.sandbox_probe {
            Some(SandboxProbe::Accepted(status)) => out.push(cause(
                codes::APP_NOT_RELEASED,
                STRONG,
                format!(
                    "production answered 401 but sandbox accepted the same token (status {status}): the key, issuer and bundle id are fine. Before an app's first release, production answers 401 for it; or this transaction belongs to the sandbox"
                ),
                "send sandbox transactions to /sandbox/… (or enable sandbox_fallback once available); production starts working after the app's first release on the App Store",
            )),
            Some(SandboxProbe::Rejected(_)) | Some(SandboxProbe::Failed) | None => {}
        }

        if family == TokenFamily::Connect {
            if let Some(scope) = e.claims.scope.as_ref().and_then(|s| s.first()) {
                let encoded = e
                    .query
                    .is_some_and(|q| q.contains('%') || q.contains('[') || q.contains('+'));
                out.push(cause(
                    codes::SCOPE_MISMATCH,
                    if encoded { GOOD } else { GUESS },
                    format!(
                        "the token was scoped to \"{scope}\"; Apple rejects a scoped token whose entry does not match the request{}",
                        if encoded {
                            ". The query has encoded characters: the proxy writes brackets literally in the scope (Apple's documented form), and how Apple matches encoded brackets is unconfirmed"
                        } else {
                            ""
                        }
                    ),
                    "retry with the query written as Apple documents it (literal brackets, e.g. filter[platform]=IOS); if that fails too, set [tokens] scope_methods = [] to send unscoped short-lived tokens, and report it",
                ));
            }
        }

        if family == TokenFamily::StoreKit {
            let bid = e.claims.bid.as_deref().unwrap_or("");
            let weight = match e.sandbox_probe {
                Some(SandboxProbe::Rejected(_)) if e.key_last_success.is_none() => FAIR,
                _ => WEAK,
            };
            out.push(cause(
                codes::BUNDLE_ID,
                weight,
                format!("the token's bid is \"{bid}\"; Apple needs the exact (case-sensitive) bundle id of the app the key's team owns and the transaction belongs to"),
                "check bundle_id for this key (or the client's pinned bundle_id) against App Store Connect → App Information → Bundle ID",
            ));
        }

        // The key itself: revoked, or the key id / issuer are wrong. History decides the order.
        let iss = e.claims.iss.as_deref();
        let worked = e.key_last_success.map(|t| {
            let ago = (e.proxy_now - t).max(0);
            format!(
                "this key last worked at {} ({} min ago)",
                httpdate::fmt_http_date(unix_to_system(t)),
                ago / 60
            )
        });
        match &worked {
            Some(when) => out.push(cause(
                codes::KEY_REVOKED,
                if e.retried { GOOD } else { FAIR },
                format!("key `{}` ({}) was accepted before — {when} — and is refused now: it may have been revoked", e.key_name, e.key_id),
                "check App Store Connect → Users and Access → Integrations: if the key shows as revoked, create a new one, install its .p8 on the proxy host and update key_id",
            )),
            None => out.push(cause(
                codes::KEY_REVOKED,
                WEAK,
                format!("key `{}` ({}) has not been accepted by Apple since the proxy started: it may be revoked", e.key_name, e.key_id),
                "check App Store Connect → Users and Access → Integrations for the key's status",
            )),
        }
        let kid_confirmed = e.file_key_id == Some(e.key_id);
        let kid_contradicted = e.file_key_id.is_some_and(|f| f != e.key_id);
        if e.key_kind != KeyKind::Individual {
            let malformed = iss.is_none_or(|i| !apple::is_plausible_issuer_id(i));
            out.push(cause(
                codes::WRONG_ISSUER,
                if malformed {
                    STRONG
                } else if worked.is_none() && !e.issuer_proven && kid_confirmed {
                    FAIR + 5
                } else if worked.is_none() && !e.issuer_proven {
                    FAIR
                } else {
                    GUESS
                },
                format!("the token's iss is \"{}\"; Apple rejects the token if it is not your team's issuer id", iss.unwrap_or("")),
                "copy the Issuer ID shown above the key list in App Store Connect → Users and Access → Integrations into issuer_id",
            ));
        }
        let plausible_kid = apple::is_plausible_key_id(e.key_id);
        out.push(cause(
            codes::WRONG_KEY_ID,
            if !plausible_kid || (kid_contradicted && worked.is_none()) {
                STRONG
            } else if worked.is_none() && !kid_confirmed {
                FAIR
            } else if worked.is_none() {
                WEAK
            } else {
                GUESS
            },
            format!(
                "the token's kid is \"{}\"; it must be the Key ID of the .p8 that signed it{}",
                e.key_id,
                match e.file_key_id {
                    Some(f) if f == e.key_id => " (the key file's name agrees)".to_string(),
                    Some(f) => format!(" — but the key file's name says {f}"),
                    None => String::new(),
                }
            ),
            "copy the Key ID of this key from App Store Connect → Users and Access → Integrations into key_id (Apple names the download AuthKey_<KeyID>.p8 / SubscriptionKey_<KeyID>.p8)",
        ));
        if e.retried || worked.is_some() {
            out.push(cause(
                codes::TRANSIENT_401,
                if worked.is_some() { FAIR - 5 } else { WEAK },
                "Apple sometimes answers 401 to valid tokens; the proxy re-minted and retried once and was refused again".to_string(),
                "retry in a few minutes; if it persists, check the key's status in App Store Connect",
            ));
        }
    }

    // Stable order: by weight, then by the order pushed (evidence order above).
    out.sort_by_key(|c| std::cmp::Reverse(c.weight));
    out
}

/// Parses Apple's `{"errors":[…]}` body. The storekit APIs' 401 has none.
pub fn apple_errors(body: &[u8]) -> Vec<AppleError> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let field = |e: &serde_json::Value, k: &str| {
        e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string()
    };
    json.get("errors")
        .and_then(|e| e.as_array())
        .map(|errors| {
            errors
                .iter()
                .map(|e| AppleError {
                    code: field(e, "code"),
                    title: field(e, "title"),
                    detail: field(e, "detail"),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn unix_to_system(t: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(t).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "57246542-96fe-1a63-e053-0824d011072a";

    fn claims(family: TokenFamily) -> Claims {
        Claims {
            iss: Some(ISS.into()),
            sub: None,
            iat: NOW - 60,
            exp: Some(NOW + 240),
            aud: Some("appstoreconnect-v1"),
            scope: (family == TokenFamily::Connect).then(|| vec!["GET /v1/apps".to_string()]),
            bid: (family == TokenFamily::StoreKit).then(|| "com.example.app".to_string()),
            jti: None,
        }
    }

    fn evidence<'a>(api: Api, c: &'a Claims, errors: &'a [AppleError]) -> Evidence<'a> {
        Evidence {
            status: 401,
            api,
            environment: Environment::Production,
            method: "GET",
            path: "/v1/apps",
            query: None,
            key_name: "k",
            key_id: "2X9R4HXF34",
            key_kind: if api.token_family() == TokenFamily::StoreKit {
                KeyKind::InAppPurchase
            } else {
                KeyKind::Team
            },
            file_kind_hint: None,
            file_key_id: Some("2X9R4HXF34"),
            claims: c,
            proxy_now: NOW,
            apple_date: Some(NOW),
            apple_errors: errors,
            key_last_success: None,
            issuer_proven: false,
            retried: true,
            sandbox_probe: None,
        }
    }

    fn first(e: &Evidence<'_>) -> &'static str {
        diagnose(e)[0].code
    }

    #[test]
    fn each_kind_of_evidence_puts_its_cause_first() {
        let connect = claims(TokenFamily::Connect);
        let storekit = claims(TokenFamily::StoreKit);
        let none: [AppleError; 0] = [];

        let mut e = evidence(Api::AppStoreConnect, &connect, &none);
        e.apple_date = Some(NOW - 300);
        assert_eq!(first(&e), codes::CLOCK_SKEW, "iat in Apple's future");

        let mut e = evidence(Api::AppStoreServer, &storekit, &none);
        e.file_kind_hint = Some(KeyKind::Team);
        assert_eq!(first(&e), codes::WRONG_KEY_KIND);

        let forbidden = [AppleError {
            code: "FORBIDDEN_ERROR".into(),
            title: "This request is forbidden for security reasons".into(),
            detail: "The API key in use does not allow this request".into(),
        }];
        let mut e = evidence(Api::AppStoreConnect, &connect, &forbidden);
        e.status = 403;
        e.key_kind = KeyKind::Individual;
        e.path = "/v1/salesReports";
        assert_eq!(first(&e), codes::INDIVIDUAL_KEY_NOT_ALLOWED);
        e.key_kind = KeyKind::Team;
        assert_eq!(first(&e), codes::ROLE_FORBIDDEN);
        assert!(
            diagnose(&e)[0]
                .detail
                .contains("does not allow this request"),
            "quotes Apple"
        );

        let agreement = [AppleError {
            code: "FORBIDDEN".into(),
            title: "Access Unavailable".into(),
            detail: "You currently don't have access to this membership resource. To resolve this issue, the Account Holder must agree to the latest Program License Agreement.".into(),
        }];
        let mut e = evidence(Api::AppStoreConnect, &connect, &agreement);
        e.status = 403;
        assert_eq!(first(&e), codes::AGREEMENT_PENDING);
        assert!(diagnose(&e)[0].detail.contains("Program License Agreement"));

        let mut e = evidence(Api::AppStoreServer, &storekit, &none);
        e.sandbox_probe = Some(SandboxProbe::Accepted(200));
        assert_eq!(first(&e), codes::APP_NOT_RELEASED);

        let mut e = evidence(Api::AppStoreConnect, &connect, &none);
        e.query = Some("filter%5Bplatform%5D=IOS");
        e.issuer_proven = true;
        e.key_last_success = Some(NOW - 600);
        e.retried = false;
        assert_eq!(first(&e), codes::SCOPE_MISMATCH);

        let mut e = evidence(Api::AppStoreConnect, &connect, &none);
        e.key_last_success = Some(NOW - 600);
        assert_eq!(first(&e), codes::KEY_REVOKED);
        assert!(diagnose(&e)[0].detail.contains("10 min ago"));

        let e = evidence(Api::AppStoreConnect, &connect, &none);
        assert_eq!(
            first(&e),
            codes::WRONG_ISSUER,
            "never worked, issuer unproven, kid matches the file"
        );

        let mut e = evidence(Api::AppStoreConnect, &connect, &none);
        e.issuer_proven = true;
        e.file_key_id = None;
        assert_eq!(first(&e), codes::WRONG_KEY_ID);
        let mut e = evidence(Api::AppStoreConnect, &connect, &none);
        e.file_key_id = Some("7Z3K9QWE12");
        assert_eq!(
            first(&e),
            codes::WRONG_KEY_ID,
            "the file name contradicts key_id"
        );
        assert!(diagnose(&e)[0].detail.contains("7Z3K9QWE12"));

        let mut e = evidence(Api::AppStoreServer, &storekit, &none);
        e.sandbox_probe = Some(SandboxProbe::Rejected(401));
        e.issuer_proven = true;
        assert_eq!(first(&e), codes::BUNDLE_ID);
    }

    #[test]
    fn malformed_ids_are_strong_evidence() {
        let mut c = claims(TokenFamily::Connect);
        c.iss = Some("not-a-uuid".into());
        let none: [AppleError; 0] = [];
        let e = evidence(Api::AppStoreConnect, &c, &none);
        assert_eq!(first(&e), codes::WRONG_ISSUER);
        let c = claims(TokenFamily::Connect);
        let mut e = evidence(Api::AppStoreConnect, &c, &none);
        e.key_id = "abc";
        e.issuer_proven = true;
        assert_eq!(first(&e), codes::WRONG_KEY_ID);
    }

    #[test]
    fn every_cause_has_a_fix_and_a_known_code_and_none_holds_a_token() {
        let c = claims(TokenFamily::StoreKit);
        let none: [AppleError; 0] = [];
        let mut e = evidence(Api::AppStoreServer, &c, &none);
        e.key_last_success = Some(NOW - 60);
        e.apple_date = Some(NOW + 30);
        let causes = diagnose(&e);
        assert!(causes.len() >= 4);
        for c in &causes {
            assert!(codes::ALL.contains(&c.code));
            assert!(!c.fix.is_empty() && !c.detail.is_empty());
            assert!(!c.detail.contains("eyJ"));
        }
    }

    #[test]
    fn apples_error_bodies_parse_and_non_json_is_empty() {
        let body =
            br#"{"errors":[{"status":"401","code":"NOT_AUTHORIZED","title":"t","detail":"d"}]}"#;
        assert_eq!(apple_errors(body)[0].code, "NOT_AUTHORIZED");
        assert!(apple_errors(b"Unauthenticated").is_empty());
        assert!(apple_errors(b"").is_empty());
        assert!(apple_errors(br#"{"errorCode":4040010}"#).is_empty());
    }
}
