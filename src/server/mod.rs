//! Listeners and connections: accepts TCP, speaks HTTP/1.1 and HTTP/2 (cleartext, prior
//! knowledge) through hyper's auto builder, hands each request to `Proxy::handle`, and
//! shuts down gracefully (stop accepting, let in-flight requests finish within
//! `shutdown_grace`).
//!
//! Owns connection-level limits (header read timeout, header size, HTTP/2 stream limits,
//! `max_connections`; the idle timeout and TLS per connection are in `connection`). Knows
//! nothing of Apple or tokens.

mod connection;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::admin;
use crate::config::Config;
use crate::proxy::{Peer, Proxy, StartError};
use crate::runtime::{self, Live};

use connection::Connections;

/// HTTP/1 read buffer: larger than the longest head the framing guard passes on
/// (`framing::MAX_HEAD`), so the guard, which audits its refusal, always decides first.
const MAX_HEADER_BYTES: usize = crate::framing::MAX_HEAD + 16 * 1024;
/// HTTP/2 limits, set deliberately rather than inherited.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
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
        // Pings find dead peers; an idle live one is closed by the idle timeout.
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_PENDING_RESETS);
    b
}

/// Serves an already-built proxy. Returns after `shutdown` and the drain.
pub(crate) async fn serve(
    live: Arc<Live>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let proxy = live.current();
    let server = &proxy.config().server;
    let grace = server.shutdown_grace;
    if server.allow_anonymous {
        tracing::warn!(
            "allow_anonymous = true: requests without a client secret are served as `anonymous`"
        );
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "proxy listening");
    }
    proxy.set_serving(true);
    let builder = builder(proxy.config());
    let connections = Connections::new(server.max_connections);
    let limits = connection::Limits {
        idle: server.idle_timeout,
        head: server.header_read_timeout,
    };
    // Requests and the admin listener read the live runtime; holding this one would keep
    // it (keys, pool) alive after a reload replaced it.
    drop(proxy);
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
        // Beyond max_connections a new connection is closed at once, before any byte of
        // it is read: a flood of idle connections cannot take every file descriptor.
        let Some(slot) = connections.open() else {
            tracing::debug!(%peer, "max_connections reached; connection closed");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection::serve(
            stream,
            Peer::new(peer),
            live.clone(),
            builder.clone(),
            limits,
            slot,
        ));
    }
    drop(listener);
    live.current().set_serving(false);
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight requests");
    if tokio::time::timeout(grace, connections.drain())
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
