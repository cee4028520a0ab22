//! Listeners and connections: accepts TCP, speaks HTTP/1.1 and HTTP/2 (cleartext, prior
//! knowledge) through hyper's auto builder, hands each request to [`Proxy::handle`], and
//! shuts down gracefully (stop accepting, let in-flight requests finish within
//! `shutdown_grace`).
//!
//! Owns connection-level limits (header read timeout, header size, HTTP/2 stream limits).
//! Knows nothing of Apple or tokens.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::client::CertIdentity;
use crate::config::Config;
use crate::framing::{Guard, Verdict};
use crate::proxy::{Peer, Proxy, StartError};

/// HTTP/1 read buffer, which bounds the header block (hyper answers 431 beyond it).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to finish the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 limits, set deliberately rather than inherited.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
pub const H2_MAX_PENDING_RESETS: usize = 20;

/// The runtime currently serving, swapped whole on reload. Each request takes the runtime
/// current when it arrives and keeps it to the end, so a reload never changes the rules
/// under a request in flight.
pub struct Live {
    current: ArcSwap<Proxy>,
    /// The file to re-read on reload; `None` for configs built in code (the demo).
    config_path: Option<PathBuf>,
    /// Fingerprint of the config and key files last loaded (or rejected).
    seen: std::sync::Mutex<u64>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// How often the config and key files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

impl Live {
    pub fn new(proxy: Arc<Proxy>) -> Arc<Live> {
        let path = PathBuf::from(&proxy.config().source);
        let config_path = path.is_file().then_some(path);
        let seen = config_path
            .as_deref()
            .map_or(0, |p| fingerprint(p, proxy.config()));
        Arc::new(Live {
            current: ArcSwap::new(proxy),
            config_path,
            seen: std::sync::Mutex::new(seen),
        })
    }

    pub fn current(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// Re-reads the config file and swaps in a new runtime; a config that fails to load or
    /// validate is rejected, logged with its reason and counted, and the old one keeps
    /// serving.
    pub fn reload(&self, why: &str) -> bool {
        let Some(path) = &self.config_path else {
            return false;
        };
        let old = self.current();
        let result = Config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let print = fingerprint(path, &config);
                if let Ok(mut seen) = self.seen.lock() {
                    *seen = print;
                }
                old.reload(config).map_err(|e| format!("{e:#}"))
            });
        match result {
            Ok((proxy, warnings)) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                proxy.set_serving(true);
                self.current.store(Arc::new(proxy));
                old.note_reload(true);
                tracing::info!(why, config = %path.display(), "configuration reloaded");
                true
            }
            Err(reason) => {
                old.note_reload(false);
                tracing::error!(why, %reason, "configuration reload rejected; the previous configuration keeps serving");
                false
            }
        }
    }

    /// Reloads when the config file or a key file changed since the last (attempted) load.
    fn reload_if_changed(&self) {
        let Some(path) = &self.config_path else {
            return;
        };
        let now = fingerprint(path, self.current().config());
        let changed = self.seen.lock().map(|seen| *seen != now).unwrap_or(false);
        if changed {
            self.reload("file change");
            if let Ok(mut seen) = self.seen.lock() {
                // Even a rejected change is not retried until the files change again.
                *seen = now;
            }
        }
    }
}

/// A hash of the config file's bytes and each key file's bytes: what a reload would read.
fn fingerprint(config_path: &Path, config: &Config) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(config_path).unwrap_or_default().hash(&mut h);
    for key in &config.keys {
        if let crate::config::KeySource::File(p) = &key.source {
            std::fs::read(p).unwrap_or_default().hash(&mut h);
        }
    }
    h.finish()
}

/// SIGHUP → reload the configuration and re-open the audit log (logrotate); and every
/// [`WATCH_INTERVAL`], reload when the config or key files changed (ConfigMap updates).
async fn watch(live: Arc<Live>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(unix)]
    if hup.is_none() {
        tracing::warn!("cannot watch SIGHUP: reload by editing the config file instead");
    }
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = hangup => {
                tracing::info!("SIGHUP: reloading the configuration and re-opening the audit log");
                if let Some(audit) = live.current().audit() {
                    audit.reopen();
                }
                let live = live.clone();
                let _ = tokio::task::spawn_blocking(move || live.reload("SIGHUP")).await;
            }
            _ = tick.tick() => {
                let live = live.clone();
                let _ = tokio::task::spawn_blocking(move || live.reload_if_changed()).await;
            }
        }
    }
}

/// The listeners the proxy serves: bound by the caller, so tests bind port 0.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics`; `None` to serve no admin endpoints.
    pub admin: Option<TcpListener>,
}

/// Builds the proxy from `config`, opens its audit log, and serves until `shutdown`
/// resolves; then drains in-flight requests and flushes the audit log. The library entry
/// point. SIGHUP re-opens the audit log (logrotate).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let admin_state = Arc::new(admin::State::default());
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(listener) = listeners.admin {
        let state = admin_state.clone();
        tokio::spawn(admin::serve(listener, state, async {
            let _ = admin_stopped.await;
        }));
    }
    let (proxy, warnings) = Proxy::new(config)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let proxy = Arc::new(proxy);
    let writer = proxy.start_audit()?;
    admin_state.set_proxy(proxy.clone());
    let live = Live::new(proxy.clone());
    let watcher = tokio::spawn(watch(live.clone()));
    serve(live.clone(), listeners.proxy, shutdown).await;
    watcher.abort();
    let proxy = live.current();
    if let Some(audit) = proxy.audit() {
        audit.close();
    }
    let _ = stop_admin.send(());
    drop(proxy);
    // The writer thread ends once the last handle is gone; connection tasks that outlived
    // the grace period may still hold one, so do not wait on it here.
    drop(writer);
    Ok(())
}

/// The connection builder with the proxy's limits.
fn builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_PENDING_RESETS);
    b
}

/// Serves an already-built proxy. Returns after `shutdown` and the drain.
pub async fn serve(live: Arc<Live>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let proxy = live.current();
    let grace = proxy.config().server.shutdown_grace;
    if proxy.config().server.allow_anonymous {
        tracing::warn!(
            "allow_anonymous = true: requests without a client secret are served as `anonymous`"
        );
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "proxy listening");
    }
    proxy.set_serving(true);
    let builder = builder(proxy.config());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = live.current();
        let live = live.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Every connection's bytes pass the framing guard; its verdict tells the service
            // which request (if any) carried smuggling-prone framing.
            let verdict = Arc::new(Verdict::default());
            let client = Peer::new(peer);
            let service = {
                let (live, verdict) = (live.clone(), verdict.clone());
                move |cert: Option<Arc<CertIdentity>>| {
                    let (live, verdict, client) = (live.clone(), verdict.clone(), client.clone());
                    service_fn(move |req| {
                        // The runtime current now serves this request to its end.
                        let (proxy, cert, peer) = (live.current(), cert.clone(), client.clone());
                        let smuggled = verdict.next_request_is_smuggled();
                        async move {
                            Ok::<_, std::convert::Infallible>(if smuggled {
                                proxy.refuse_smuggling(&req, peer)
                            } else {
                                proxy.handle(req, peer, cert).await
                            })
                        }
                    })
                }
            };
            let result = match proxy.tls().cloned() {
                None => {
                    let io = TokioIo::new(Guard::new(stream, verdict));
                    let conn = builder.serve_connection(io, service(None));
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| CertIdentity::from_der(leaf))
                        .map(Arc::new);
                    let io = TokioIo::new(Guard::new(tls, verdict));
                    let conn = builder.serve_connection(io, service(cert));
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    live.current().set_serving(false);
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed with requests still in flight");
    }
}

/// The inbound TLS acceptor when `tls_cert_file`/`tls_key_file` are set: rustls on ring,
/// ALPN `h2` then `http/1.1`; with `client_ca_file`, client certificates are required and
/// verified against it (mTLS).
pub fn tls_acceptor(config: &Config) -> Result<Option<TlsAcceptor>, StartError> {
    let s = &config.server;
    let (Some(cert_file), Some(key_file)) = (&s.tls_cert_file, &s.tls_key_file) else {
        return Ok(None);
    };
    let err = |field: &'static str, problem: String, fix: &'static str| StartError::Tls {
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

/// Binds `config.server.listen` and, unless it is off, `config.server.admin_listen`.
pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
    Ok(Listeners {
        proxy: TcpListener::bind(config.server.listen).await?,
        admin: match config.server.admin_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        },
    })
}
