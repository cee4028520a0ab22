//! The admin listener, separate from the client listener: `/healthz` (the process answers),
//! `/readyz` (config and keys loaded, audit log open and writable, proxy listener accepting),
//! `/metrics` (Prometheus), `/audit/head` (the audit chain's newest line, DESIGN §19). Requests here are not audited and need no credential: bind it
//! to an address only operators and the cluster's probes reach.
//!
//! Reads the live runtime (`runtime::Live`), so after a reload `/metrics` and
//! `/readyz` report the new one. Imports `runtime` and `metrics`; not `server`.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::CONTENT_TYPE;
use crate::runtime::Live;

/// What the admin endpoints report on: the live runtime, once the first one is built.
#[derive(Debug, Default)]
pub struct State {
    live: OnceLock<Arc<Live>>,
}

impl State {
    pub(crate) fn set_live(&self, live: Arc<Live>) {
        let _ = self.live.set(live);
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => match self.live.get().map(|l| l.current().ready()) {
                Some(Ok(())) => text(StatusCode::OK, "ready\n".into()),
                Some(Err(why)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: starting (loading config and keys)\n".into(),
                ),
            },
            "/metrics" => {
                let body = self
                    .live
                    .get()
                    .map(|l| l.current().metrics_text())
                    .unwrap_or_default();
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(CONTENT_TYPE),
                );
                r
            }
            "/audit/head" => match self.live.get().and_then(|l| l.current().audit_head()) {
                Some(head) => {
                    let mut r = text(
                        StatusCode::OK,
                        serde_json::to_string(&head).unwrap_or_default() + "\n",
                    );
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    r.headers_mut().insert(
                        header::CACHE_CONTROL,
                        header::HeaderValue::from_static("no-store"),
                    );
                    r
                }
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the audit log is not open yet\n".into(),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: /healthz, /readyz, /metrics, /audit/head\n".into(),
            ),
        }
    }
}

/// Serves the admin endpoints until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = state.answer(&req);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
