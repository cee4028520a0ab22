//! The audit log: one JSON line per request, hash-chained, written by one writer.
//!
//! Owns the [`Record`] schema (documented field by field in the README), the chain (`seq`
//! and `prev_sha256`: the SHA-256 of the previous line's bytes without its newline), the
//! writer thread that alone touches the file, the durability policy (flush per record; fsync
//! per record or per interval), re-opening on SIGHUP (logrotate), and the health flag that
//! lets the proxy refuse requests it could not audit (`on_failure = "reject"`).
//!
//! Requests hand finished records over a bounded channel and never wait on disk. A record
//! the writer cannot write is kept in a bounded backlog and written, in order, once the sink
//! works again; meanwhile the sink is unhealthy and — by default — new requests get
//! 503 PROXY_AUDIT_UNAVAILABLE. `verify` checks a log or a rotated series.
//!
//! Never in a record: tokens (only their SHA-256), secrets, keys, bodies; path segments and
//! query values that look like secrets are replaced by [`REDACTED`] (see [`redact_path`]).
//! Imports only `config`.

pub mod verify;

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{self, Fsync, OnAuditFailure};

/// The record format's version; bump when a field changes meaning.
pub const VERSION: u32 = 1;
/// What replaces a secret-looking path segment or query value.
pub const REDACTED: &str = "REDACTED";
/// `prev_sha256` of the first line of a new chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Records waiting for the writer, at most.
const CHANNEL_CAPACITY: usize = 16_384;
/// Records kept while the sink fails, at most; beyond this they are counted as lost.
const BACKLOG_CAPACITY: usize = 16_384;
/// How often a failing sink is retried when no record arrives.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Group commit: how long the writer lets records gather after waking for one.
const BATCH_LINGER: Duration = Duration::from_millis(2);
/// Records written with one write at most.
const BATCH_MAX: usize = 1024;

/// What happened to a request, for the reviewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Sent to Apple (whatever Apple answered).
    Forwarded,
    /// Refused by policy, limits or input checks.
    Denied,
    /// No valid client credential.
    Unauthenticated,
    /// No API under the path (or no key for it).
    NoRoute,
    /// The proxy or Apple failed (unreachable, timeout, internal).
    Error,
}

impl Decision {
    /// The record's (and the metrics label's) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Forwarded => "forwarded",
            Decision::Denied => "denied",
            Decision::Unauthenticated => "unauthenticated",
            Decision::NoRoute => "no_route",
            Decision::Error => "error",
        }
    }
}

/// One request, as the security team reads it. Field order is the line's order.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// RFC 3339 UTC with milliseconds, when the response ended.
    pub time: String,
    pub request_id: String,
    /// The client's configured name; `null` when unauthenticated.
    pub client: Option<Arc<str>>,
    /// `secret`, `mtls`, `anonymous`, or `none`.
    pub client_auth: &'static str,
    pub client_addr: Arc<str>,
    pub method: Cow<'static, str>,
    /// The path as the client sent it, secret-looking segments redacted.
    pub path: String,
    /// The raw query without `?`, secret-looking values redacted; `null` when absent.
    pub query: Option<String>,
    pub api: Option<&'static str>,
    pub environment: Option<&'static str>,
    /// The configured key name that signed, and its Apple key id.
    pub key: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    /// Hex SHA-256 of the compact JWT sent to Apple (the last one, after a retry).
    pub token_sha256: Option<Arc<str>>,
    pub decision: Decision,
    /// The status the client got.
    pub status: u16,
    /// Apple's status, when Apple answered.
    pub upstream_status: Option<u16>,
    /// The first likely cause when Apple refused (or the note on a retried success).
    pub diagnosis: Option<&'static str>,
    /// Whether the proxy re-minted and retried after Apple's 401.
    pub retried: bool,
    /// How many times the connection to Apple failed before anything was sent and the
    /// (body-less, idempotent) request was sent again.
    pub connect_retries: u32,
    /// Whether sandbox answered a production request (sandbox fallback); `environment`
    /// then says `sandbox`.
    pub sandbox_fallback: bool,
    /// Apple's `x-apple-request-uuid`.
    pub apple_request_id: Option<String>,
    /// Apple's `X-Rate-Limit` `user-hour-rem`.
    pub rate_limit_remaining: Option<u64>,
    /// Request body bytes read from the client, and response body bytes sent to it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    /// Whether the response body was sent to the end (false: the client went away).
    pub completed: bool,
    /// The proxy's error kind when it answered itself.
    pub error: Option<&'static str>,
}

/// Appends one line's JSON (without the newline) to `buf`: the chain fields around the
/// record, `{"version":…,"seq":…,<the record's fields>,"prev_sha256":"…"}`. The record is
/// serialised by its own derive and spliced in, which is what `#[serde(flatten)]` would
/// write, without flatten's per-field map detour.
fn write_line(
    buf: &mut Vec<u8>,
    seq: u64,
    record: &Record,
    prev_sha256: &str,
) -> serde_json::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(b"{\"version\":");
    serde_json::to_writer(&mut *buf, &VERSION)?;
    buf.extend_from_slice(b",\"seq\":");
    serde_json::to_writer(&mut *buf, &seq)?;
    let at = buf.len();
    serde_json::to_writer(&mut *buf, record)?;
    // The record is a non-empty object: its `{` becomes the separator and its `}` moves
    // after the last chain field.
    if buf.get(at) != Some(&b'{') || buf.pop() != Some(b'}') {
        buf.truncate(start);
        return Err(serde::ser::Error::custom(
            "an audit record is not a JSON object",
        ));
    }
    buf[at] = b',';
    buf.extend_from_slice(b",\"prev_sha256\":");
    serde_json::to_writer(&mut *buf, prev_sha256)?;
    buf.push(b'}');
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: cannot open the audit log: {error} (fix: check [audit] path, its directory and permissions)")]
    Open { path: String, error: io::Error },
    #[error("{path}: cannot read the existing audit log to continue its chain: {error}")]
    Resume { path: String, error: io::Error },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(io::Error),
}

/// Counters and the health flag, shared by the writer, the proxy and the metrics.
#[derive(Debug, Default)]
pub struct Health {
    healthy: AtomicBool,
    pub written: AtomicU64,
    pub write_failures: AtomicU64,
    pub lost: AtomicU64,
    pub refused: AtomicU64,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

enum Message {
    Record(Box<Record>),
    Reopen,
    Flush(mpsc::SyncSender<()>),
    /// Shutdown: write everything, fsync, and save the chain state.
    Close(mpsc::SyncSender<()>),
}

/// The proxy's handle on the audit log. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<Message>,
    health: Arc<Health>,
    policy: OnAuditFailure,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

/// The writer thread; joining it flushes everything.
pub struct Writer {
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Waits until every record handed over before the last [`Audit`] handle was dropped is
    /// written (or counted lost).
    pub fn join(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Audit {
    /// Opens the sink, resumes the chain from the existing file (or its `.chain` state file
    /// after a rotation), and starts the writer thread.
    pub fn start(config: &config::Audit) -> Result<(Audit, Writer), AuditError> {
        let sink = Sink::open(config.path.as_deref())?;
        let chain = match config.path.as_deref() {
            Some(path) => Chain::resume(path)?,
            None => Chain::new(),
        };
        let health = Arc::new(Health::default());
        health.healthy.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(CHANNEL_CAPACITY);
        let mut task = WriterTask {
            sink,
            chain,
            backlog: Vec::new(),
            health: health.clone(),
            fsync: config.fsync,
            last_sync: Instant::now(),
            dirty: false,
            buf: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || task.run(rx))
            .map_err(AuditError::Thread)?;
        Ok((
            Audit {
                tx,
                health,
                policy: config.on_failure,
            },
            Writer {
                handle: Some(handle),
            },
        ))
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Whether a new request may be served: always under `on_failure = "serve"`; under
    /// `"reject"` only while the sink is writing.
    pub fn admits(&self) -> bool {
        match self.policy {
            OnAuditFailure::Serve => true,
            OnAuditFailure::Reject => self.health.healthy(),
        }
    }

    /// Counts a request refused because the sink is failing.
    pub fn refused(&self) {
        self.health.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Hands a finished record to the writer without waiting. A full channel means the
    /// writer cannot keep up: the record is lost, counted, and the sink marked unhealthy.
    pub fn record(&self, record: Record) {
        match self.tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.health.lost.fetch_add(1, Ordering::Relaxed);
                self.health.healthy.store(false, Ordering::Relaxed);
                tracing::error!("audit record lost: the writer is not keeping up");
            }
        }
    }

    /// Re-opens the file (after logrotate moved it away); the chain continues.
    pub fn reopen(&self) {
        let _ = self.tx.try_send(Message::Reopen);
    }

    /// At shutdown: writes everything handed over so far, forces it to disk and saves the
    /// chain state; waits (bounded) for that to finish.
    pub fn close(&self) {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if self.tx.send(Message::Close(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Waits until everything handed over so far is written (tests, shutdown).
    pub fn flush(&self) {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if self.tx.send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// The chain's position: the next seq and the hash the next line must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chain {
    next_seq: u64,
    prev_sha256: String,
}

impl Chain {
    fn new() -> Chain {
        Chain {
            next_seq: 1,
            prev_sha256: GENESIS.to_string(),
        }
    }

    /// Continues from the file's last line, or — when the file is empty (just rotated) —
    /// from the `.chain` state file written at the last rotation or shutdown.
    fn resume(path: &Path) -> Result<Chain, AuditError> {
        let err = |error| AuditError::Resume {
            path: path.display().to_string(),
            error,
        };
        if let Some(last) = last_line(path).map_err(err)? {
            let seq = serde_json::from_slice::<serde_json::Value>(&last)
                .ok()
                .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
                .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidData, "the last line is not an audit record; run `apple-api-proxy audit verify` on it")))?;
            return Ok(Chain {
                next_seq: seq + 1,
                prev_sha256: crate::hex(&crate::sha256(&last)),
            });
        }
        match std::fs::read(state_path(path)) {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                match (
                    v.get("next_seq").and_then(|s| s.as_u64()),
                    v.get("prev_sha256").and_then(|s| s.as_str()),
                ) {
                    (Some(next_seq), Some(prev)) => Ok(Chain {
                        next_seq,
                        prev_sha256: prev.to_string(),
                    }),
                    _ => Err(err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the .chain state file is damaged",
                    ))),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Chain::new()),
            Err(e) => Err(err(e)),
        }
    }
}

/// `<log>.chain`: where the chain continues when the log itself is empty after a rotation.
pub fn state_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".chain");
    PathBuf::from(p)
}

/// The last complete line of `path` (without its newline), reading only the file's tail.
fn last_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    // Records are a few hundred bytes; read a generous tail.
    let start = len.saturating_sub(256 * 1024);
    file.seek(io::SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    io::Read::read_to_end(&mut file, &mut tail)?;
    if tail.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the log ends with a partial line; run `apple-api-proxy audit verify` and move the file aside",
        ));
    }
    tail.pop();
    Ok(tail.rsplit(|b| *b == b'\n').next().map(<[u8]>::to_vec))
}

enum Sink {
    File { path: PathBuf, file: File },
    Stdout,
}

impl Sink {
    fn open(path: Option<&Path>) -> Result<Sink, AuditError> {
        match path {
            None => Ok(Sink::Stdout),
            Some(path) => Ok(Sink::File {
                path: path.to_path_buf(),
                file: open_append(path).map_err(|error| AuditError::Open {
                    path: path.display().to_string(),
                    error,
                })?,
            }),
        }
    }

    /// Writes one whole line; on failure, cuts the file back so no partial line stays.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            Sink::File { file, .. } => {
                let before = file.metadata().map(|m| m.len()).ok();
                let result = file.write_all(line);
                if result.is_err() {
                    if let Some(len) = before {
                        let _ = file.set_len(len);
                    }
                }
                result
            }
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout => Ok(()),
            Sink::File { file, .. } => file.sync_data(),
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Sink::File { path, file } = self {
            *file = open_append(path)?;
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)
}

struct WriterTask {
    sink: Sink,
    chain: Chain,
    /// Records not yet written because the sink failed, oldest first.
    backlog: Vec<Record>,
    health: Arc<Health>,
    fsync: Fsync,
    last_sync: Instant,
    dirty: bool,
    /// The batch being written, kept between batches (up to [`MAX_KEPT_BUFFER`]).
    buf: Vec<u8>,
}

/// A batch buffer grown past this (a long backlog after an outage) is not kept.
const MAX_KEPT_BUFFER: usize = 1 << 20;

impl WriterTask {
    fn run(&mut self, rx: mpsc::Receiver<Message>) {
        loop {
            let timeout = if self.backlog.is_empty() {
                self.sync_wait()
            } else {
                RETRY_EVERY
            };
            match rx.recv_timeout(timeout) {
                Ok(Message::Record(r)) => {
                    self.accept(*r);
                    // Group commit: let the records of a burst arrive, then write them all
                    // with one write(2). Under load that is one wake-up of this thread (a
                    // futex wake and a context switch for the sender) per batch, not per
                    // record; a record waits at most BATCH_LINGER longer to be written.
                    std::thread::sleep(BATCH_LINGER);
                    let mut next = None;
                    for _ in 1..BATCH_MAX {
                        match rx.try_recv() {
                            Ok(Message::Record(r)) => self.accept(*r),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.drain();
                    if let Some(message) = next {
                        self.handle(message);
                    }
                }
                Ok(message) => self.handle(message),
                Err(RecvTimeoutError::Timeout) => {
                    if !self.backlog.is_empty() {
                        // The sink failed: try a fresh handle (the disk may be back, or the
                        // path may point somewhere writable again).
                        let _ = self.sink.reopen();
                        self.drain();
                    }
                    self.sync_if_due();
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.drain();
                    self.sync();
                    self.save_state();
                    if !self.backlog.is_empty() {
                        self.health
                            .lost
                            .fetch_add(self.backlog.len() as u64, Ordering::Relaxed);
                        tracing::error!(
                            lost = self.backlog.len(),
                            "audit records could not be written before exit"
                        );
                    }
                    return;
                }
            }
        }
    }

    fn accept(&mut self, record: Record) {
        if self.backlog.len() >= BACKLOG_CAPACITY {
            self.health.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            self.backlog.push(record);
        }
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Record(r) => {
                self.accept(*r);
                self.drain();
            }
            Message::Reopen => {
                match self.sink.reopen() {
                    Ok(()) => tracing::info!("audit log re-opened"),
                    Err(e) => tracing::error!(error = %e, "audit log re-open failed"),
                }
                self.save_state();
                self.drain();
            }
            Message::Flush(done) => {
                self.drain();
                self.sync();
                let _ = done.send(());
            }
            Message::Close(done) => {
                self.drain();
                self.dirty = true;
                self.sync();
                self.save_state();
                let _ = done.send(());
            }
        }
    }

    /// Writes the backlog in order, as one write: all of it, or (the sink failing) none of
    /// it, the chain then not advanced and the sink unhealthy.
    fn drain(&mut self) {
        if !self.backlog.is_empty() {
            // One buffer for the writer's life: a batch allocates nothing once it has grown.
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            let mut seq = self.chain.next_seq;
            let mut prev = self.chain.prev_sha256.clone();
            let mut lost = 0u64;
            self.backlog.retain(|record| {
                let start = buf.len();
                if let Err(e) = write_line(&mut buf, seq, record, &prev) {
                    tracing::error!(error = %e, "audit record could not be serialised");
                    buf.truncate(start);
                    lost += 1;
                    return false;
                }
                prev.clear();
                crate::push_hex(&mut prev, &crate::sha256(&buf[start..]));
                buf.push(b'\n');
                seq += 1;
                true
            });
            if lost > 0 {
                self.health.lost.fetch_add(lost, Ordering::Relaxed);
            }
            let written = self.sink.write_line(&buf);
            if buf.capacity() > MAX_KEPT_BUFFER {
                buf = Vec::new();
            }
            self.buf = buf;
            if let Err(e) = written {
                self.health.write_failures.fetch_add(1, Ordering::Relaxed);
                if self.health.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "audit log write failed: refusing requests until it works (on_failure = reject) or counting losses (serve)");
                }
                return;
            }
            self.health
                .written
                .fetch_add(seq - self.chain.next_seq, Ordering::Relaxed);
            self.chain.next_seq = seq;
            self.chain.prev_sha256 = prev;
            self.backlog.clear();
            self.dirty = true;
            if self.fsync == Fsync::Always {
                self.sync();
            }
        }
        if !self.health.healthy.swap(true, Ordering::Relaxed) {
            tracing::warn!("audit log writable again");
        }
    }

    fn sync_wait(&self) -> Duration {
        match self.fsync {
            Fsync::Interval(every) if self.dirty => every
                .saturating_sub(self.last_sync.elapsed())
                .max(Duration::from_millis(1)),
            _ => Duration::from_secs(3600),
        }
    }

    fn sync_if_due(&mut self) {
        if let Fsync::Interval(every) = self.fsync {
            if self.dirty && self.last_sync.elapsed() >= every {
                self.sync();
            }
        }
    }

    fn sync(&mut self) {
        if self.dirty {
            if let Err(e) = self.sink.sync() {
                self.health.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "audit log fsync failed");
            }
            self.dirty = false;
            self.last_sync = Instant::now();
        }
    }

    /// Records where the chain stands, so a proxy restarted on an empty (rotated) log
    /// continues it.
    fn save_state(&self) {
        if let Sink::File { path, .. } = &self.sink {
            let state = serde_json::json!({"next_seq": self.chain.next_seq, "prev_sha256": self.chain.prev_sha256});
            if let Err(e) = std::fs::write(state_path(path), state.to_string()) {
                tracing::warn!(error = %e, "cannot write the audit chain state file");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Redaction.

/// Whether a path segment or query value looks like a secret: a proxy client secret, a JWT,
/// or a long run of base64/hex (keys, signatures). Apple's ids (numeric transaction ids,
/// short resource ids, bundle ids) do not.
pub fn looks_secret(value: &str) -> bool {
    let decoded = crate::route::percent_decode(value);
    let v = match decoded.as_deref().map(std::str::from_utf8) {
        Some(Ok(v)) => v,
        _ => value,
    };
    if v.contains(crate::client::SECRET_PREFIX) || v.contains("-----BEGIN") {
        return true;
    }
    let jwt_like = v.starts_with("eyJ") && v.split('.').count() >= 2;
    let token_chars = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'/' | b'='));
    let has_letters_and_digits =
        v.bytes().any(|b| b.is_ascii_alphabetic()) && v.bytes().any(|b| b.is_ascii_digit());
    jwt_like || (v.len() >= 40 && token_chars && has_letters_and_digits)
}

/// The path with secret-looking segments replaced by [`REDACTED`].
pub fn redact_path(path: &str) -> String {
    if !path.split('/').any(looks_secret) {
        return path.to_string();
    }
    path.split('/')
        .map(|seg| if looks_secret(seg) { REDACTED } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// The raw query with secret-looking values (and names) replaced by [`REDACTED`].
pub fn redact_query(query: &str) -> String {
    // The same test as below, without building anything when nothing needs redacting.
    let pair_secret = |pair: &str| match pair.split_once('=') {
        Some((name, value)) => looks_secret(value) || looks_secret(name),
        None => looks_secret(pair),
    };
    if !query.split('&').any(pair_secret) {
        return query.to_string();
    }
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if looks_secret(value) || looks_secret(name) => format!(
                "{}={REDACTED}",
                if looks_secret(name) { REDACTED } else { name }
            ),
            None if looks_secret(pair) => REDACTED.to_string(),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_what_serde_flatten_would_write() {
        #[derive(Serialize)]
        struct Flattened<'a> {
            version: u32,
            seq: u64,
            #[serde(flatten)]
            record: &'a Record,
            prev_sha256: &'a str,
        }
        for n in [0, 7] {
            let mut rec = record(n);
            rec.query = Some("a=\"quoted\"\\&b=\u{1}".into());
            let prev = "0".repeat(64);
            let mut buf = b"earlier line".to_vec();
            write_line(&mut buf, u64::from(n) + 1, &rec, &prev).unwrap();
            let want = serde_json::to_vec(&Flattened {
                version: VERSION,
                seq: u64::from(n) + 1,
                record: &rec,
                prev_sha256: &prev,
            })
            .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&buf[b"earlier line".len()..]),
                String::from_utf8_lossy(&want)
            );
        }
    }

    fn record(n: u32) -> Record {
        Record {
            time: "2026-11-22T15:21:46.000Z".into(),
            request_id: format!("r-{n}"),
            client: Some("ci".into()),
            client_auth: "secret",
            client_addr: "127.0.0.1:5000".into(),
            method: "GET".into(),
            path: "/v1/apps".into(),
            query: None,
            api: Some("app-store-connect"),
            environment: Some("production"),
            key: Some("connect".into()),
            key_id: Some("2X9R4HXF34".into()),
            token_sha256: Some("ab".repeat(32).into()),
            decision: Decision::Forwarded,
            status: 200,
            upstream_status: Some(200),
            diagnosis: None,
            retried: false,
            connect_retries: 0,
            sandbox_fallback: false,
            apple_request_id: None,
            rate_limit_remaining: Some(3599),
            bytes_in: 0,
            bytes_out: 10,
            duration_ms: 3,
            completed: true,
            error: None,
        }
    }

    fn config(path: &Path, fsync: Fsync) -> config::Audit {
        config::Audit {
            path: Some(path.to_path_buf()),
            on_failure: OnAuditFailure::Reject,
            fsync,
        }
    }

    #[test]
    fn records_chain_and_continue_across_restart_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let (audit, writer) = Audit::start(&config(&log, Fsync::Always)).unwrap();
        audit.record(record(1));
        audit.record(record(2));
        drop(audit);
        writer.join();
        // Restart: continues from the file's last line.
        let (audit, writer) = Audit::start(&config(&log, Fsync::Off)).unwrap();
        audit.record(record(3));
        // Rotation: the file is moved away, the proxy re-opens, the chain continues.
        audit.flush();
        std::fs::rename(&log, dir.path().join("audit.jsonl.1")).unwrap();
        audit.reopen();
        audit.record(record(4));
        drop(audit);
        writer.join();
        // Restart on the rotated (now non-empty) file, and on an empty one via .chain.
        std::fs::rename(&log, dir.path().join("audit.jsonl.0")).unwrap();
        let (audit, writer) = Audit::start(&config(&log, Fsync::Off)).unwrap();
        audit.record(record(5));
        drop(audit);
        writer.join();

        let mut lines = Vec::new();
        for f in ["audit.jsonl.1", "audit.jsonl.0", "audit.jsonl"] {
            lines.extend(
                std::fs::read_to_string(dir.path().join(f))
                    .unwrap()
                    .lines()
                    .map(str::to_string),
            );
        }
        assert_eq!(lines.len(), 5);
        let mut prev = GENESIS.to_string();
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["seq"], (i + 1) as u64);
            assert_eq!(v["prev_sha256"], prev.as_str(), "line {}", i + 1);
            assert_eq!(v["version"], VERSION);
            prev = crate::hex(&crate::sha256(line.as_bytes()));
        }
        assert!(lines[0].starts_with("{\"version\":1,\"seq\":1,\"time\":"));
        assert!(lines[0].ends_with(&format!("\"prev_sha256\":\"{GENESIS}\"}}")));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_failing_sink_refuses_then_recovers_in_order_without_losing_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink("/dev/full", &log).unwrap();
        let (audit, writer) = Audit::start(&config(&log, Fsync::Off)).unwrap();
        assert!(audit.admits());
        audit.record(record(1));
        audit.flush();
        assert!(!audit.admits(), "disk full: new requests are refused");
        assert!(audit.health().write_failures.load(Ordering::Relaxed) >= 1);
        audit.record(record(2));
        // The disk comes back: the path is a real file again.
        std::fs::remove_file(&log).unwrap();
        std::thread::sleep(RETRY_EVERY * 3);
        audit.flush();
        assert!(audit.admits(), "recovered");
        drop(audit);
        writer.join();
        let text = std::fs::read_to_string(&log).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            ids,
            ["r-1", "r-2"],
            "the backlog is written in order once the sink works"
        );
    }

    #[test]
    fn secret_looking_values_are_redacted_and_apple_ids_are_not() {
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0.c2lnbmF0dXJl";
        assert_eq!(redact_path(&format!("/v1/apps/{jwt}")), "/v1/apps/REDACTED");
        assert_eq!(redact_path("/v1/apps/aap_abc"), "/v1/apps/REDACTED");
        assert_eq!(
            redact_path("/inApps/v1/transactions/2000000123456789"),
            "/inApps/v1/transactions/2000000123456789"
        );
        assert_eq!(
            redact_path("/v1/apps/6446048470/builds"),
            "/v1/apps/6446048470/builds"
        );
        assert_eq!(
            redact_query(&format!(
                "filter[bundleId]=com.example.app&token={jwt}&limit=5&x=aap_s3cr3t"
            )),
            "filter[bundleId]=com.example.app&token=REDACTED&limit=5&x=REDACTED"
        );
        assert_eq!(redact_query("a%3Daap_x"), "REDACTED");
        assert!(looks_secret("aap%5Fsecret") || looks_secret("aap_secret"));
        assert!(looks_secret(
            "MIGTAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHkwdwIBAQQg"
        ));
        assert!(!looks_secret("com.example.app.subscription.monthly"));
    }
}
