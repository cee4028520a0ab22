//! The way out to Apple: a pooled hyper client over rustls (ring provider), HTTP/2 when the
//! upstream offers it via ALPN, header hygiene, and bodies streamed through with byte
//! counters and a size limit enforced while streaming.
//!
//! Owns everything about the upstream connection; knows nothing about tokens or clients
//! beyond "this is the `Authorization` value to send". Imports only `config`.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use crate::config::Config;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type flowing in both directions.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// TCP (direct, or tunnelled through an egress proxy) → TLS, all within the connect timeout.
pub type Connector = Timeout<HttpsConnector<Egress>>;
pub type Client = hyper_util::client::legacy::Client<Connector, ProxyBody>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{file}: cannot read the extra CA file: {error} (fix: check {field})")]
    CaRead {
        file: String,
        field: &'static str,
        error: std::io::Error,
    },
    #[error("{file}: holds no usable PEM certificate (fix: point {field} at a PEM file of CA certificates)")]
    CaEmpty { file: String, field: &'static str },
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    #[error("[upstream] egress_proxy `{0}` is not an http:// URL with a host (fix: write it as \"http://proxy.internal:3128\")")]
    EgressProxy(String),
}

/// Builds the upstream client: host roots (Mozilla's as the fallback when the host has
/// none) plus `[upstream] ca_file`; HTTP/2 or HTTP/1.1, as the upstream's ALPN chooses.
pub fn client(config: &Config) -> Result<Client, ClientError> {
    build(config, false, None)
}

/// The client an identity provider's discovery document and JWKS are fetched with
/// (DESIGN §17): the upstream client's trust (host roots, `[upstream] ca_file`) and egress,
/// plus the provider's own `ca_file`.
pub fn identity_client(
    config: &Config,
    ca_file: Option<&std::path::Path>,
) -> Result<Client, ClientError> {
    build(config, false, ca_file)
}

/// The same client speaking HTTP/2 only (ALPN `h2` alone, and no HTTP/1.1 fallback): for
/// APNs, which speaks nothing else (APPLE.md §9.1). Each one keeps its own connection per
/// host, so one per key never mixes keys on a connection.
pub fn http2_client(config: &Config) -> Result<Client, ClientError> {
    build(config, true, None)
}

fn build(
    config: &Config,
    http2_only: bool,
    identity_ca: Option<&std::path::Path>,
) -> Result<Client, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    let extra = [
        (config.upstream.ca_file.as_deref(), "[upstream] ca_file"),
        (identity_ca, "the identity provider's ca_file"),
    ];
    for (path, field) in extra {
        let Some(path) = path else { continue };
        let file = path.display().to_string();
        let pem = std::fs::read(path).map_err(|error| ClientError::CaRead {
            file: file.clone(),
            field,
            error,
        })?;
        let (n, _) = roots.add_parsable_certificates(pem_certs(&pem));
        if n == 0 {
            return Err(ClientError::CaEmpty { file, field });
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.upstream.connect_timeout));
    http.set_nodelay(true);
    let egress = Egress::new(http, config.upstream.egress_proxy.as_deref())?;
    let https = if http2_only {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http2()
            .wrap_connector(egress)
    } else {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(egress)
    };
    let connector = Timeout {
        inner: https,
        limit: config.upstream.connect_timeout,
    };
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(http2_only)
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            // Every client that walks away mid-download makes the proxy cancel its stream to
            // Apple. h2 counts those resets and, at its default 1,024, closes the whole
            // pooled connection — failing every other request on it. The limit guards
            // against hostile servers; Apple is authenticated by TLS, so keep a large one.
            .http2_max_local_error_reset_streams(H2_UPSTREAM_MAX_LOCAL_RESETS)
            .build(connector),
    )
}

/// See [`client`]: resets the proxy may make on one upstream HTTP/2 connection.
const H2_UPSTREAM_MAX_LOCAL_RESETS: usize = 1 << 20;

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = Result<T, BoxError>> + Send>>;

/// Chooses, per destination, a direct TCP connection or an HTTP CONNECT tunnel through the
/// egress proxy: `[upstream] egress_proxy` when set, else `HTTPS_PROXY`/`ALL_PROXY` from
/// the environment, with `NO_PROXY` exempting hosts (curl's rules).
#[derive(Clone)]
pub struct Egress {
    direct: HttpConnector,
    matcher: Arc<hyper_util::client::proxy::matcher::Matcher>,
}

impl Egress {
    fn new(direct: HttpConnector, configured: Option<&str>) -> Result<Egress, ClientError> {
        use hyper_util::client::proxy::matcher::Matcher;
        let matcher = match configured {
            Some(url) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|_| ClientError::EgressProxy(url.to_string()))?;
                if uri.scheme_str() != Some("http") || uri.host().is_none() {
                    return Err(ClientError::EgressProxy(url.to_string()));
                }
                let no_proxy = std::env::var("NO_PROXY")
                    .or_else(|_| std::env::var("no_proxy"))
                    .unwrap_or_default();
                Matcher::builder()
                    .https(url.to_string())
                    .no(no_proxy)
                    .build()
            }
            None => Matcher::from_env(),
        };
        Ok(Egress {
            direct,
            matcher: Arc::new(matcher),
        })
    }
}

impl tower_service::Service<http::Uri> for Egress {
    type Response = <HttpConnector as tower_service::Service<http::Uri>>::Response;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let mut direct = self.direct.clone();
        match self.matcher.intercept(&dst) {
            None => Box::pin(async move { direct.call(dst).await.map_err(Into::into) }),
            Some(via) => {
                let mut tunnel = hyper_util::client::legacy::connect::proxy::Tunnel::new(
                    via.uri().clone(),
                    direct,
                );
                if let Some(auth) = via.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move { tunnel.call(dst).await.map_err(Into::into) })
            }
        }
    }
}

/// The connect timeout applied to the whole connection set-up — TCP, the egress tunnel and
/// the TLS handshake — so a stalled handshake fails fast rather than at `request_timeout`.
#[derive(Clone)]
pub struct Timeout<C> {
    inner: C,
    limit: std::time::Duration,
}

/// The upstream connection could not be set up within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("connecting to Apple (TCP, proxy tunnel and TLS) took longer than {0:?}")]
pub struct ConnectTimedOut(pub std::time::Duration);

impl<C> tower_service::Service<http::Uri> for Timeout<C>
where
    C: tower_service::Service<http::Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = BoxFuture<C::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let limit = self.limit;
        let connecting = self.inner.call(dst);
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimedOut(limit)) as BoxError),
            }
        })
    }
}

/// Whether `err` is (caused by) a timeout: the connect timeout, or an I/O timeout.
pub(crate) fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    sources(err).any(|e| {
        e.is::<ConnectTimedOut>()
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// `err` and the errors under it, outermost first.
fn sources<'e>(
    err: &'e (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'e (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// Whether Apple's HTTP/2 server said it never processed the request: the stream refused
/// (`RST_STREAM` `REFUSED_STREAM`) or dropped by a graceful `GOAWAY` (`NO_ERROR`, the stream
/// above its last-stream-id) — a server rotating its connection. RFC 9113 §8.7: such a
/// request "can be safely retried", on another connection. Any other reset or error stays
/// a failure: Apple may have acted on it.
pub(crate) fn is_unprocessed(err: &(dyn std::error::Error + 'static)) -> bool {
    // The innermost HTTP/2 error is the one h2 itself raised; hyper only wraps it.
    sources(err)
        .find_map(|e| e.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            h2.is_remote()
                && match h2.reason() {
                    Some(h2::Reason::REFUSED_STREAM) => h2.is_reset(),
                    Some(h2::Reason::NO_ERROR) => h2.is_go_away(),
                    _ => false,
                }
        })
}

fn pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// Headers that describe one hop, never the request (RFC 9110 §7.6.1), plus the client's
/// own credentials and identity-revealing headers that must never reach Apple.
/// Also the method-override and path-override headers some front ends honour: if Apple's
/// did, a client could bypass its allow rules (DESIGN §13b).
const NEVER_FORWARDED: [HeaderName; 21] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::AUTHORIZATION,
    header::COOKIE,
    header::HOST,
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// Response headers not passed back to the client: hop-by-hop ones, and Apple's cookies and
/// alternative services, which would otherwise be set under the proxy's origin.
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::SET_COOKIE,
    header::ALT_SVC,
];

/// The headers to send upstream: the client's, minus everything in `NEVER_FORWARDED`
/// and anything its `Connection` header names, plus our `Authorization` (none where the
/// credential travels elsewhere: Sign in with Apple's form). `Host` is set by the client
/// from the upstream URL, so it is always the proxy's choice.
pub fn upstream_headers(client: &HeaderMap, authorization: Option<HeaderValue>) -> HeaderMap {
    let named = connection_named(client);
    let mut out = HeaderMap::with_capacity(client.len() + 1);
    for (name, value) in client {
        if NEVER_FORWARDED.contains(name)
            || named.contains(name)
            || name.as_str().starts_with("x-forwarded-")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Some(authorization) = authorization {
        out.insert(header::AUTHORIZATION, authorization);
    }
    out
}

/// Strips hop-by-hop headers from Apple's response before it goes back to the client.
pub(crate) fn clean_response_headers(headers: &mut HeaderMap) {
    // One pass over the few headers Apple sends, comparing names (cheap for standard ones),
    // instead of a hashed lookup per hop-by-hop name: most answers carry none of them.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named = connection_named(headers);
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
}

fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// No body frame arrived within the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct BodyIdle(pub std::time::Duration);

/// The request body grew past `max_request_body` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// What a [`Metered`] body reports, shared with whoever reads it afterwards: the bytes
/// that passed, and whether the body reached its end or failed.
#[derive(Debug, Default)]
pub struct Meter {
    pub bytes: AtomicU64,
    /// Set when the inner body reached its end.
    pub ended: AtomicBool,
    /// Set when the inner body failed (for a request body: the client went away mid-upload).
    pub failed: AtomicBool,
    /// Woken when the body ends or fails, for a meter made `Meter::watched`.
    done: Option<tokio::sync::Notify>,
}

impl Meter {
    /// A meter whose end can be awaited ([`Meter::finished`]).
    pub(crate) fn watched() -> Meter {
        Meter {
            done: Some(tokio::sync::Notify::new()),
            ..Meter::default()
        }
    }

    /// Resolves once the body has ended or failed; never, for a meter not made
    /// `Meter::watched`.
    pub async fn finished(&self) {
        let Some(done) = &self.done else {
            return std::future::pending().await;
        };
        loop {
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.ended.load(Ordering::Acquire) || self.failed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn wake(&self) {
        if let Some(done) = &self.done {
            done.notify_waiters();
        }
    }
}

/// A body that counts the bytes passing through into a shared [`Meter`], and optionally
/// fails once more than `limit` bytes have passed. Nothing is buffered. It can also hold a
/// guard `G` (e.g. a concurrency permit) that is released only when the body is dropped, so
/// a request counts as in flight until its response has finished streaming.
pub struct Metered<B, G = ()> {
    inner: B,
    meter: Arc<Meter>,
    seen: u64,
    limit: Option<u64>,
    drop_trailers: bool,
    /// Fails the body when no frame arrives for this long.
    idle: Option<(std::time::Duration, Option<Pin<Box<tokio::time::Sleep>>>)>,
    _guard: G,
}

impl<B> Metered<B> {
    pub fn new(inner: B, meter: Arc<Meter>, limit: Option<u64>) -> Metered<B> {
        Metered {
            inner,
            meter,
            seen: 0,
            limit,
            drop_trailers: false,
            idle: None,
            _guard: (),
        }
    }
}

impl<B, G> Metered<B, G> {
    /// Fails the body with [`BodyIdle`] when no frame arrives for `limit` (a stalled
    /// client upload, or Apple stalling mid-response).
    pub(crate) fn idle_timeout(mut self, limit: std::time::Duration) -> Metered<B, G> {
        self.idle = Some((limit, None));
        self
    }

    /// Drops trailer frames: a client's trailers are headers too (`authorization`, `cookie`
    /// could hide there), and Apple's APIs take none.
    pub(crate) fn without_trailers(mut self) -> Metered<B, G> {
        self.drop_trailers = true;
        self
    }

    fn mark_ended(&self) {
        self.meter.ended.store(true, Ordering::Release);
        self.meter.wake();
    }

    /// Keeps `guard` alive as long as the body.
    pub fn holding<H>(self, guard: H) -> Metered<B, H> {
        Metered {
            inner: self.inner,
            meter: self.meter,
            seen: self.seen,
            limit: self.limit,
            drop_trailers: self.drop_trailers,
            idle: self.idle,
            _guard: guard,
        }
    }
}

impl<B, G> Body for Metered<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if let Some((limit, timer)) = &mut this.idle {
                if polled.is_pending() {
                    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(*limit)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Box::new(BodyIdle(*limit)))));
                    }
                } else if let Some(timer) = timer {
                    timer.as_mut().reset(tokio::time::Instant::now() + *limit);
                }
            }
            return match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let n = data.len() as u64;
                        this.seen += n;
                        this.meter.bytes.fetch_add(n, Ordering::Relaxed);
                        if let Some(limit) = this.limit {
                            if this.seen > limit {
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                            }
                        }
                    } else if this.drop_trailers && frame.is_trailers() {
                        continue;
                    }
                    // hyper stops polling once a body's length is satisfied, so the end is
                    // noticed here, not only on a final `None`.
                    if this.inner.is_end_stream() {
                        this.mark_ended();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    this.meter.failed.store(true, Ordering::Release);
                    this.meter.wake();
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(None) => {
                    this.mark_ended();
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.mark_ended();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An empty body (retries and probes replay body-less requests).
pub fn empty() -> ProxyBody {
    boxed(http_body_util::Empty::<Bytes>::new())
}

/// Boxes any streaming body into [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apples_cookies_and_alternative_services_never_reach_the_client() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("set-cookie", "session=abc; Domain=apple.com"),
            ("alt-svc", "h3=\":443\""),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("x-rate-limit", "user-hour-lim:3600;user-hour-rem:3599;"),
            ("content-type", "application/json"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        clean_response_headers(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-rate-limit", "content-type"]);
    }

    #[test]
    fn client_credentials_and_hop_by_hop_headers_are_never_forwarded() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client-jwt"),
            ("proxy-authorization", "Bearer aap_x"),
            ("cookie", "session=1"),
            ("host", "evil.example"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("user-agent", "sdk/1"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_headers(&h, Some(HeaderValue::from_static("Bearer minted")));
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            ["accept", "content-type", "user-agent", "authorization"]
        );
        assert_eq!(out.get_all(header::AUTHORIZATION).iter().count(), 1);
        assert_eq!(out[header::AUTHORIZATION], "Bearer minted");
    }

    #[tokio::test]
    async fn request_trailers_are_dropped_and_bytes_counted() {
        let mut trailers = HeaderMap::new();
        trailers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer aap_hidden"),
        );
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers)),
        ];
        let meter = Arc::new(Meter::default());
        let stream = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let body = Metered::new(stream, meter.clone(), None).without_trailers();
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_none());
        assert_eq!(collected.to_bytes(), "abc");
        assert_eq!(meter.bytes.load(Ordering::Relaxed), 3);
        assert!(meter.ended.load(Ordering::Relaxed));
        assert!(!meter.failed.load(Ordering::Relaxed));
    }

    #[test]
    fn response_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert(
            HeaderName::from_static("x-hop"),
            HeaderValue::from_static("1"),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        clean_response_headers(&mut h);
        assert_eq!(h.len(), 1);
    }
}
