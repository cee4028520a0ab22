//! Path → API → upstream. The upstream is chosen by the path prefix alone — never by the
//! `Host` header or an absolute-form request target — so no client can steer the proxy's
//! credentials at another host.
//!
//! Owns the route table (built once from config: Apple's hosts, or the configured
//! `base_url` overrides) and the path checks that must run before routing. Imports only
//! `apple` and `config`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::Uri;

use crate::apple::{Api, Environment, PROXY_PREFIX, SANDBOX_PREFIX};
use crate::config::Config;

/// Where one (API, environment) pair is forwarded.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// `https://host[:port]` plus any base path, without a trailing slash.
    pub base: String,
}

/// A resolved request.
#[derive(Clone, Debug)]
pub struct Route<'a> {
    pub api: Api,
    pub environment: Environment,
    /// The path sent to Apple: the client's path with any `/sandbox` prefix removed.
    pub path: &'a str,
    pub upstream: &'a Upstream,
}

impl Route<'_> {
    /// The absolute URL to forward to.
    pub fn url(&self, query: Option<&str>) -> String {
        let mut url = String::with_capacity(
            self.upstream.base.len() + self.path.len() + query.map_or(0, |q| q.len() + 1),
        );
        url.push_str(&self.upstream.base);
        url.push_str(self.path);
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        url
    }
}

/// What a path names: one of Apple's APIs, or one of the proxy's own endpoints.
#[derive(Clone, Debug)]
pub enum Destination<'a> {
    Apple(Route<'a>),
    Own(Endpoint),
}

/// The proxy's own endpoints under `PROXY_PREFIX` (DESIGN §14), dispatched before Apple's
/// route table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `signatures/<kind>`: an in-app signature (DESIGN §15).
    Signature(crate::apple::SignatureKind),
}

impl Endpoint {
    /// The endpoint at `rest` (the path after `PROXY_PREFIX`): exact names only, no
    /// trailing slash or extra segment.
    fn at(rest: &str) -> Option<Endpoint> {
        let kind = rest.strip_prefix("signatures/")?;
        crate::apple::SignatureKind::from_id(kind).map(Endpoint::Signature)
    }

    /// The API its audit records and metrics name.
    pub fn api(self) -> Api {
        match self {
            Endpoint::Signature(_) => Api::InAppSigning,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no Apple API is served under this path")]
    NoRoute,
    #[error("the proxy has no endpoint at this path")]
    NoEndpoint,
    #[error("{0} has no sandbox environment")]
    NoSandbox(Api),
}

/// The route table.
#[derive(Debug)]
pub struct Table {
    upstreams: BTreeMap<(Api, EnvKey), Upstream>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EnvKey {
    Production,
    Sandbox,
}

impl From<Environment> for EnvKey {
    fn from(e: Environment) -> EnvKey {
        match e {
            Environment::Production => EnvKey::Production,
            Environment::Sandbox => EnvKey::Sandbox,
        }
    }
}

fn base_of(uri: &Uri) -> String {
    uri.to_string().trim_end_matches('/').to_string()
}

impl Table {
    pub fn new(config: &Config) -> Table {
        let mut upstreams = BTreeMap::new();
        for api in Api::FORWARDED {
            let Some(default_production) = api.production_url() else {
                continue;
            };
            let settings = config.api(api);
            let production = settings
                .base_url
                .as_ref()
                .map(base_of)
                .unwrap_or_else(|| default_production.to_string());
            upstreams.insert((api, EnvKey::Production), Upstream { base: production });
            if let Some(default_sandbox) = api.sandbox_url() {
                let sandbox = settings
                    .sandbox_base_url
                    .as_ref()
                    .map(base_of)
                    .unwrap_or_else(|| default_sandbox.to_string());
                upstreams.insert((api, EnvKey::Sandbox), Upstream { base: sandbox });
            }
        }
        Table { upstreams }
    }

    /// What an already-validated path (see [`check_path`]) names: the proxy's own endpoints
    /// first, so no Apple route can shadow one, then Apple's table.
    pub(crate) fn destination<'a>(&'a self, path: &'a str) -> Result<Destination<'a>, RouteError> {
        match path.strip_prefix(PROXY_PREFIX) {
            Some(rest) => Endpoint::at(rest)
                .map(Destination::Own)
                .ok_or(RouteError::NoEndpoint),
            None => self.resolve(path).map(Destination::Apple),
        }
    }

    /// Resolves an already-validated path (see [`check_path`]) in Apple's table.
    pub fn resolve<'a>(&'a self, path: &'a str) -> Result<Route<'a>, RouteError> {
        let (environment, rest) = match path.strip_prefix(SANDBOX_PREFIX) {
            Some(rest) if rest.starts_with('/') => (Environment::Sandbox, rest),
            _ => (Environment::Production, path),
        };
        let (api, rest) = Api::locate(rest).ok_or(RouteError::NoRoute)?;
        let upstream = self
            .upstreams
            .get(&(api, environment.into()))
            .ok_or(RouteError::NoSandbox(api))?;
        Ok(Route {
            api,
            environment,
            path: rest,
            upstream,
        })
    }

    /// The same request against the API's sandbox (sandbox fallback and the diagnosis's
    /// probe); `None` for an API without one.
    pub(crate) fn sandbox_of<'a>(&'a self, route: &Route<'a>) -> Option<Route<'a>> {
        let upstream = self.upstreams.get(&(route.api, EnvKey::Sandbox))?;
        Some(Route {
            api: route.api,
            environment: Environment::Sandbox,
            path: route.path,
            upstream,
        })
    }

    /// Every (API, environment, upstream) row, for `check` and the docs.
    pub fn rows(&self) -> impl Iterator<Item = (Api, Environment, &Upstream)> {
        self.upstreams.iter().map(|((api, env), up)| {
            (
                *api,
                match env {
                    EnvKey::Production => Environment::Production,
                    EnvKey::Sandbox => Environment::Sandbox,
                },
                up,
            )
        })
    }
}

/// The known path prefixes, as listed in `PROXY_NO_ROUTE` errors.
pub fn known_prefixes() -> Vec<String> {
    let mut out: Vec<String> = Api::ALL
        .iter()
        .flat_map(|a| a.prefixes().iter().map(|p| p.to_string()))
        .collect();
    out.push(
        "/sandbox/{inApps,groups,advancedCommerce,externalPurchase,apns,devicecheck,appattest}/"
            .to_string(),
    );
    out
}

/// Why a path is refused before routing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("the path contains a `.` or `..` segment (literal or percent-encoded)")]
    DotSegment,
    #[error("the path contains an encoded slash or backslash, or a backslash")]
    EncodedSeparator,
    #[error("the path contains an empty segment (`//`)")]
    EmptySegment,
    #[error("the path contains a NUL or control character")]
    ControlCharacter,
    #[error("the path's percent-encoding is invalid or does not decode to UTF-8")]
    BadEncoding,
    #[error("the path contains a `;`, literal or encoded (path parameters are never forwarded)")]
    Semicolon,
    #[error("the path contains `%25`, an encoded `%` (no double decoding reaches Apple)")]
    EncodedPercent,
}

/// Paths are never normalised into other paths: anything that a server on the way could read
/// as a different path is refused (DESIGN §13).
pub fn check_path(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.contains('\\') {
        return Err(PathError::EncodedSeparator);
    }
    // A server that reads `;` as a parameter delimiter (`/v1/apps;x/..`) or decodes twice
    // (`%252e%252e`) would see another path than the one the allow rules matched.
    if path.contains(';') {
        return Err(PathError::Semicolon);
    }
    if path
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && w[2] == b'5')
    {
        return Err(PathError::EncodedPercent);
    }
    let decoded = percent_decode(path).ok_or(PathError::BadEncoding)?;
    let decoded = std::str::from_utf8(&decoded).map_err(|_| PathError::BadEncoding)?;
    if decoded.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter);
    }
    for segment in path.split('/') {
        let segment = percent_decode(segment).ok_or(PathError::BadEncoding)?;
        if *segment == *b"." || *segment == *b".." {
            return Err(PathError::DotSegment);
        }
        if segment.contains(&b'/') || segment.contains(&b'\\') {
            return Err(PathError::EncodedSeparator);
        }
        // An encoded `;` (`%3B`) is a `;` to a server that decodes before it splits.
        if segment.contains(&b';') {
            return Err(PathError::Semicolon);
        }
    }
    if path[1..].split('/').rev().skip(1).any(str::is_empty) {
        return Err(PathError::EmptySegment);
    }
    Ok(())
}

/// Strict percent-decoding: `None` for a `%` not followed by two hex digits. Borrows when
/// there is nothing to decode (the common case, checked on every request).
pub fn percent_decode(s: &str) -> Option<Cow<'_, [u8]>> {
    let bytes = s.as_bytes();
    if !bytes.contains(&b'%') {
        return Some(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(extra: &str) -> Table {
        Table::new(&Config::parse(extra, "t.toml", Path::new(".")).unwrap())
    }

    #[test]
    fn semicolons_and_encoded_percent_signs_are_refused() {
        for (path, want) in [
            ("/v1/apps;jsessionid=1", PathError::Semicolon),
            ("/v1/apps/..;/users", PathError::Semicolon),
            ("/v1/%252e%252e/users", PathError::EncodedPercent),
            ("/inApps/v1/x%25", PathError::EncodedPercent),
            // Found by the path fuzz target: an encoded `;` after an encoded dot.
            ("/v1/apps/%2e%3b", PathError::Semicolon),
            ("/v1/apps%3Bx=1", PathError::Semicolon),
        ] {
            assert_eq!(check_path(path), Err(want), "{path}");
        }
        assert_eq!(check_path("/v1/apps%2C1"), Ok(()));
    }

    #[test]
    fn the_proxys_own_namespace_is_resolved_before_apples_table() {
        let t = table("");
        for path in [
            "/proxy/v1/",
            "/proxy/v1/signatures/",
            "/proxy/v1/signatures/promotional-offer/",
            "/proxy/v1/signatures/promotional-offer/x",
            "/proxy/v1/signatures/Promotional-Offer",
            "/proxy/v1/v1/apps",
        ] {
            assert_eq!(
                t.destination(path).unwrap_err(),
                RouteError::NoEndpoint,
                "{path}"
            );
        }
        for kind in crate::apple::SignatureKind::ALL {
            let path = format!("/proxy/v1/signatures/{}", kind.id());
            assert!(
                matches!(t.destination(&path), Ok(Destination::Own(Endpoint::Signature(k))) if k == kind),
                "{path}"
            );
        }
        assert!(matches!(
            t.destination("/v1/apps"),
            Ok(Destination::Apple(Route {
                api: Api::AppStoreConnect,
                ..
            }))
        ));
        assert_eq!(
            t.destination("/proxy/v2/x").unwrap_err(),
            RouteError::NoRoute
        );
    }

    #[test]
    fn every_api_and_the_sandbox_prefix_route_to_apples_hosts() {
        let t = table("");
        let cases = [
            (
                "/v1/apps",
                Api::AppStoreConnect,
                Environment::Production,
                "https://api.appstoreconnect.apple.com/v1/apps",
            ),
            (
                "/inApps/v1/transactions/1",
                Api::AppStoreServer,
                Environment::Production,
                "https://api.storekit.apple.com/inApps/v1/transactions/1",
            ),
            (
                "/sandbox/inApps/v1/transactions/1",
                Api::AppStoreServer,
                Environment::Sandbox,
                "https://api.storekit-sandbox.apple.com/inApps/v1/transactions/1",
            ),
            (
                "/sandbox/groups/v1/transactions/1/seats",
                Api::AppStoreServer,
                Environment::Sandbox,
                "https://api.storekit-sandbox.apple.com/groups/v1/transactions/1/seats",
            ),
            (
                "/advancedCommerce/v1/subscription/revoke/1",
                Api::AdvancedCommerce,
                Environment::Production,
                "https://api.storekit.apple.com/advancedCommerce/v1/subscription/revoke/1",
            ),
            (
                "/sandbox/externalPurchase/v1/reports",
                Api::ExternalPurchase,
                Environment::Sandbox,
                "https://api.storekit-sandbox.apple.com/externalPurchase/v1/reports",
            ),
            (
                "/notary/v2/test",
                Api::Notary,
                Environment::Production,
                "https://appstoreconnect.apple.com/notary/v2/test",
            ),
        ];
        for (path, api, env, url) in cases {
            let r = t.resolve(path).unwrap();
            assert_eq!(
                (r.api, r.environment, r.url(None)),
                (api, env, url.to_string()),
                "{path}"
            );
        }
    }

    #[test]
    fn unknown_prefixes_and_sandbox_without_a_sandbox_do_not_route() {
        let t = table("");
        assert_eq!(t.resolve("/foo").unwrap_err(), RouteError::NoRoute);
        assert_eq!(t.resolve("/sandbox").unwrap_err(), RouteError::NoRoute);
        assert_eq!(
            t.resolve("/sandboxinApps/v1/x").unwrap_err(),
            RouteError::NoRoute
        );
        assert_eq!(
            t.resolve("/sandbox/v1/apps").unwrap_err(),
            RouteError::NoSandbox(Api::AppStoreConnect)
        );
        assert_eq!(
            t.resolve("/sandbox/notary/v2/x").unwrap_err(),
            RouteError::NoSandbox(Api::Notary)
        );
    }

    #[test]
    fn a_production_route_has_its_sandbox_twin_only_where_apple_has_one() {
        let t = table("");
        let prod = t.resolve("/inApps/v1/transactions/1").unwrap();
        let sandbox = t.sandbox_of(&prod).unwrap();
        assert_eq!(
            (sandbox.environment, sandbox.url(Some("a=1"))),
            (
                Environment::Sandbox,
                "https://api.storekit-sandbox.apple.com/inApps/v1/transactions/1?a=1".to_string()
            )
        );
        assert!(t.sandbox_of(&t.resolve("/v1/apps").unwrap()).is_none());
    }

    #[test]
    fn base_url_overrides_keep_the_path_and_query() {
        let t = table("[apis.app-store-server]\nbase_url = \"https://127.0.0.1:9443/\"\nsandbox_base_url = \"https://127.0.0.1:9444/prefix\"\n");
        assert_eq!(
            t.resolve("/inApps/v1/x").unwrap().url(Some("a=1")),
            "https://127.0.0.1:9443/inApps/v1/x?a=1"
        );
        assert_eq!(
            t.resolve("/sandbox/inApps/v1/x").unwrap().url(None),
            "https://127.0.0.1:9444/prefix/inApps/v1/x"
        );
    }

    #[test]
    fn path_tricks_are_refused() {
        let bad = [
            ("v1/apps", PathError::NotAbsolute),
            ("/v1/../inApps/x", PathError::DotSegment),
            ("/v1/./apps", PathError::DotSegment),
            ("/v1/%2e%2e/inApps", PathError::DotSegment),
            ("/v1/%2E/apps", PathError::DotSegment),
            ("/v1/apps/..", PathError::DotSegment),
            ("/v1/a%2fb", PathError::EncodedSeparator),
            ("/v1/a%5cb", PathError::EncodedSeparator),
            ("/v1\\apps", PathError::EncodedSeparator),
            ("/v1//apps", PathError::EmptySegment),
            ("/v1/a%00b", PathError::ControlCharacter),
            ("/v1/a%zz", PathError::BadEncoding),
            ("/v1/a%ff", PathError::BadEncoding),
            ("/v1/a%+a", PathError::BadEncoding),
        ];
        for (path, want) in bad {
            assert_eq!(check_path(path), Err(want), "{path}");
        }
        for ok in [
            "/v1/apps",
            "/v1/apps/",
            "/v1/apps/%20x",
            "/inApps/v1/transactions/123",
            "/",
            "/v1/a..b",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
    }
}
