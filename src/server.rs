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

use crate::admin;
use crate::client::CertIdentity;
use crate::config::Config;
use crate::framing::{Guard, Verdict};
use crate::proxy::{Peer, Proxy, StartError};
use crate::runtime::{self, Live};

/// HTTP/1 read buffer, which bounds the header block (hyper answers 431 beyond it).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 limits, set deliberately rather than inherited.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
const H2_MAX_PENDING_RESETS: usize = 20;

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
    let live = Live::new(proxy);
    admin_state.set_live(live.clone());
    let watcher = tokio::spawn(runtime::watch(live.clone()));
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
    // Requests and the admin listener read the live runtime; holding this one would keep
    // it (keys, pool) alive after a reload replaced it.
    drop(proxy);
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
        // The inbound TLS settings current at accept serve this connection; its requests
        // each take the runtime current when they arrive.
        let tls = live.current().tls().cloned();
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
            let result = match tls {
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
