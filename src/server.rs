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

use crate::config::Config;
use crate::proxy::{Proxy, StartError};

/// How long a client may take to send a request's headers (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1 read buffer, which bounds the header block (hyper answers 431 beyond it).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// HTTP/2 limits, set deliberately rather than inherited.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
pub const H2_MAX_PENDING_RESETS: usize = 20;

/// Builds the proxy from `config` and serves it on `listener` until `shutdown` resolves.
/// The library entry point: tests bind port 0 and pass the listener in.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let (proxy, warnings) = Proxy::new(config, None)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    serve(Arc::new(proxy), listener, shutdown).await;
    Ok(())
}

/// The connection builder with the proxy's limits.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
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
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let grace = proxy.config().server.shutdown_grace;
    if proxy.config().server.allow_anonymous {
        tracing::warn!(
            "allow_anonymous = true: requests without a client secret are served as `anonymous`"
        );
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "proxy listening");
    }
    let builder = builder();
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
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed with requests still in flight");
    }
}

/// Binds `config.server.listen`.
pub async fn bind(config: &Config) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.server.listen).await
}
