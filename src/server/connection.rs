//! One client connection, from accept to close: the TLS handshake (when configured), the
//! framing guard under hyper, the service that hands each request to the runtime current
//! when it arrives, and the watch that closes the connection gracefully — when the server
//! shuts down, when no request has been in flight for `idle_timeout`, or when a reload
//! changed the inbound TLS settings it was accepted under (DESIGN §13b). Also the bound on
//! open connections and the drain at shutdown ([`Connections`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use crate::client::CertIdentity;
use crate::forward::{BoxError, ProxyBody};
use crate::framing::{Guard, Verdict};
use crate::proxy::Peer;
use crate::runtime::Live;

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection asked to close, with nothing in flight, may take to do so.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The open connections: bounded, and drained at shutdown.
pub(super) struct Connections {
    open: AtomicUsize,
    max: usize,
    /// Woken when the last connection closes.
    closed: tokio::sync::Notify,
    /// Tells every connection to close gracefully (shutdown).
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Connections {
    pub fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            max,
            closed: tokio::sync::Notify::new(),
            shutdown: tokio::sync::watch::Sender::new(false),
        })
    }

    /// A slot for one more connection, or `None` at `max_connections`.
    pub fn open(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            connections: self.clone(),
            shutdown: self.shutdown.subscribe(),
        })
    }

    /// Asks every connection to close once its requests are done, and waits until all have.
    pub async fn drain(&self) {
        self.shutdown.send_replace(true);
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// One open connection's place under `max_connections`; freed when dropped.
pub(super) struct Slot {
    connections: Arc<Connections>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.connections.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.connections.closed.notify_waiters();
        }
    }
}

/// The per-connection settings taken at start.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub idle: Duration,
    /// `header_read_timeout`, which the framing guard enforces for a head it holds back.
    pub head: Duration,
}

/// Requests in flight on one connection, and how many have ended: the watch sees the
/// connection idle when nothing is in flight and nothing ended since its last look (no
/// clock is read per request).
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    ended: AtomicU64,
}

impl Activity {
    /// `(in flight, ended so far)`.
    fn now(&self) -> (usize, u64) {
        (
            self.in_flight.load(Ordering::Acquire),
            self.ended.load(Ordering::Acquire),
        )
    }
}

/// What the watch saw at its last look, and for how long the connection has been idle.
struct Idleness {
    last_ended: u64,
    idle: Duration,
}

impl Idleness {
    /// Called every `every`: how long the connection has now been idle, at that resolution.
    fn look(&mut self, activity: &Activity, every: Duration) -> Duration {
        let (in_flight, ended) = activity.now();
        if in_flight > 0 || ended != self.last_ended {
            self.last_ended = ended;
            self.idle = Duration::ZERO;
        } else {
            self.idle += every;
        }
        self.idle
    }
}

/// Counts a request as in flight until its response body is done.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The response body, holding its request's [`InFlight`].
struct Tracked {
    inner: ProxyBody,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a connection's [`warden`] has asked of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    No,
    /// Finish what is in flight and close (HTTP/1: after the response; HTTP/2: GOAWAY).
    Gracefully,
    /// The grace is over: drop the connection now.
    Now,
}

/// Watches one connection from outside it, on its own timer, so a request costs the
/// connection nothing but one channel poll: asks it to close gracefully at shutdown, after
/// `limits.idle` without a request in flight, or once a reload changed the inbound TLS
/// settings it was accepted under; then, once nothing is in flight, gives it CLOSE_GRACE to
/// say goodbye before closing it (an HTTP/2 peer that never answers the GOAWAY's ping is not
/// waited for). Ends with the connection.
async fn warden(
    close: tokio::sync::watch::Sender<Close>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    activity: Arc<Activity>,
    live: Arc<Live>,
    tls_fingerprint: u64,
    limits: Limits,
) {
    let every = (limits.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    // The first look is one period in, so each look stands for `every` of idleness.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idleness = Idleness {
        last_ended: 0,
        idle: Duration::ZERO,
    };
    let mut closing: Option<Instant> = None;
    let mut swaps = live.swaps();
    // A reload between the accept and this subscription would otherwise go unseen: look at
    // the settings once now, then at every swap.
    swaps.mark_changed();
    let mut watching_swaps = true;
    loop {
        tokio::select! {
            () = close.closed() => return,
            // A reload: if it changed the inbound TLS settings, close now.
            changed = swaps.changed(), if closing.is_none() && watching_swaps => {
                watching_swaps = changed.is_ok();
                if watching_swaps && live.current().tls_fingerprint() != tls_fingerprint {
                    tracing::debug!("closing the connection: the inbound TLS settings changed");
                    close.send_replace(Close::Gracefully);
                    closing = Some(Instant::now());
                }
            }
            changed = shutdown.changed(), if closing.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    close.send_replace(Close::Gracefully);
                    closing = Some(Instant::now());
                }
            }
            _ = tick.tick() => match closing {
                Some(since) => {
                    if activity.now().0 == 0 && since.elapsed() >= CLOSE_GRACE {
                        close.send_replace(Close::Now);
                        return;
                    }
                }
                None => {
                    if idleness.look(&activity, every) >= limits.idle {
                        tracing::debug!("closing the idle connection");
                        close.send_replace(Close::Gracefully);
                        closing = Some(Instant::now());
                    }
                }
            },
        }
    }
}

/// Drives `conn` to its end, doing what the connection's [`warden`] asks. A macro because
/// the plain and the TLS connection are different types with hyper's long bounds.
macro_rules! drive {
    ($conn:expr, $close:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let mut close = $close;
        let mut asked = false;
        loop {
            tokio::select! {
                biased;
                result = conn.as_mut() => break result,
                changed = close.changed() => {
                    let now = *close.borrow_and_update();
                    if changed.is_err() || now == Close::Now {
                        break Ok(());
                    }
                    if now == Close::Gracefully && !asked {
                        asked = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }};
}

/// Serves one accepted connection to its end.
pub(super) async fn serve(
    stream: TcpStream,
    peer: Peer,
    live: Arc<Live>,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    slot: Slot,
) {
    // The inbound TLS settings current at accept serve this connection.
    let (tls, tls_fingerprint) = {
        let proxy = live.current();
        (proxy.tls().cloned(), proxy.tls_fingerprint())
    };
    let activity = Arc::new(Activity::default());
    let (close, close_rx) = tokio::sync::watch::channel(Close::No);
    let shutdown = slot.shutdown.clone();
    tokio::spawn(warden(
        close,
        shutdown,
        activity.clone(),
        live.clone(),
        tls_fingerprint,
        limits,
    ));
    // Every connection's bytes pass the framing guard; its verdict tells the service which
    // request (if any) carried smuggling-prone framing.
    let verdict = Arc::new(Verdict::default());
    let service = |cert: Option<Arc<CertIdentity>>| {
        let (live, verdict, peer, activity) = (
            live.clone(),
            verdict.clone(),
            peer.clone(),
            activity.clone(),
        );
        service_fn(move |req| {
            // The runtime current now serves this request to its end.
            let (proxy, cert, peer) = (live.current(), cert.clone(), peer.clone());
            // A head the guard refused reaches here as its stand-in request.
            let refused = verdict
                .next_request()
                .map(|r| proxy.refuse_framing(r, peer.clone()));
            let in_flight = InFlight::new(&activity);
            async move {
                let response = if let Some(refused) = refused {
                    refused
                } else {
                    proxy.handle(req, peer, cert).await
                };
                Ok::<_, std::convert::Infallible>(response.map(|inner| Tracked {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let addr = peer.addr;
    let result = match tls {
        None => {
            let io = TokioIo::new(Guard::new(stream, verdict.clone(), limits.head));
            let conn = builder.serve_connection(io, service(None));
            drive!(conn, close_rx)
        }
        Some(acceptor) => {
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %addr, "TLS handshake timed out");
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
            let io = TokioIo::new(Guard::new(tls, verdict.clone(), limits.head));
            let conn = builder.serve_connection(io, service(cert));
            drive!(conn, close_rx)
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, peer = %addr, "connection ended with an error");
    }
}
