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

mod record;
mod redact;
pub mod report;
pub mod verify;
mod writer;

pub use record::{Decision, Marker, Record, Signing};
pub(crate) use redact::redact_query;
pub use redact::{looks_secret, redact_path};

use writer::{Chain, Sink, WriterTask};

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{self, OnAuditFailure};

/// The record format's version; bump when a field changes meaning.
pub(crate) const VERSION: u32 = 1;
/// What replaces a secret-looking path segment or query value.
pub const REDACTED: &str = "REDACTED";
/// `prev_sha256` of the first line of a new chain.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
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
    /// A SIGHUP asked for the file to be re-opened; the writer does it at its next turn, so
    /// a full channel cannot drop the request.
    reopen: AtomicBool,
    /// The chain's newest line (DESIGN §19), for `GET /audit/head`.
    head: std::sync::Mutex<Head>,
}

/// The newest line of the chain: its `seq`, the SHA-256 of its bytes and when it was
/// written (`None` for a line found at start-up). Kept outside the file — served on the
/// admin listener and logged every minute and at shutdown — it anchors the tail a hash chain
/// cannot protect by itself: `audit verify --head SEQ:SHA256` catches a cut or rewritten
/// tail against it. Seq 0 and 64 zeros: nothing written yet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Head {
    pub seq: u64,
    pub sha256: String,
    pub time: Option<String>,
}

impl Default for Head {
    fn default() -> Head {
        Head {
            seq: 0,
            sha256: GENESIS.to_string(),
            time: None,
        }
    }
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn head(&self) -> Head {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_head(&self, head: Head) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head;
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
        let (chain, markers) = match config.path.as_deref() {
            Some(path) => Chain::resume(path)?,
            None => (Chain::new(), Vec::new()),
        };
        let health = Arc::new(Health::default());
        health.healthy.store(true, Ordering::Relaxed);
        health.set_head(chain.head(None));
        let (tx, rx) = mpsc::sync_channel(CHANNEL_CAPACITY);
        let mut task = WriterTask {
            sink,
            chain,
            markers,
            lost_marked: 0,
            backlog: Vec::new(),
            health: health.clone(),
            fsync: config.fsync,
            last_sync: Instant::now(),
            dirty: false,
            buf: Vec::new(),
            last_head_log: Instant::now(),
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

    pub(crate) fn health(&self) -> &Health {
        &self.health
    }

    /// The chain's newest line (DESIGN §19).
    pub fn head(&self) -> Head {
        self.health.head()
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
    pub(crate) fn reopen(&self) {
        self.health.reopen.store(true, Ordering::Release);
        // Only a wake-up: when the channel is full the writer is busy and sees the flag
        // after its current batch.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Fsync;
    use record::write_line;
    use serde::Serialize;

    use std::path::Path;

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
            request_id: format!("r-{n}").into(),
            client: Some("ci".into()),
            client_auth: "secret",
            identity: None,
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
            signing: None,
        }
    }

    fn config(path: &Path, fsync: Fsync) -> config::Audit {
        config::Audit {
            path: Some(path.to_path_buf()),
            on_failure: OnAuditFailure::Reject,
            fsync,
        }
    }

    /// The lines of `log`, parsed.
    fn lines_of(log: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn dropped_records_leave_a_chained_records_lost_marker_before_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let (audit, writer) = Audit::start(&config(&log, Fsync::Off)).unwrap();
        audit.record(record(1));
        audit.flush();
        // Three records the writer never got (a full channel, a full backlog).
        audit.health.lost.fetch_add(3, Ordering::Relaxed);
        audit.record(record(2));
        audit.flush();
        // Losses with no record after them are marked too.
        audit.health.lost.fetch_add(1, Ordering::Relaxed);
        drop(audit);
        writer.join();
        let lines = lines_of(&log);
        let events: Vec<(&str, Option<u64>)> = lines
            .iter()
            .map(|l| {
                (
                    l["event"].as_str().or(l["request_id"].as_str()).unwrap(),
                    l["count"].as_u64(),
                )
            })
            .collect();
        assert_eq!(
            events,
            [
                ("r-1", None),
                ("records_lost", Some(3)),
                ("r-2", None),
                ("records_lost", Some(1)),
            ],
            "the last loss is marked when the writer closes"
        );
        assert_eq!(lines[1]["seq"], 2);
        verify::verify_files(&[log]).expect("markers are chained like records");
    }

    #[test]
    fn a_restart_on_a_cut_tail_marks_the_gap_before_its_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let (audit, writer) = Audit::start(&config(&log, Fsync::Always)).unwrap();
        for n in 1..=4 {
            audit.record(record(n));
        }
        audit.close();
        drop(audit);
        writer.join();
        // Someone cuts the last two lines.
        let text = std::fs::read_to_string(&log).unwrap();
        let kept: Vec<&str> = text.lines().take(2).collect();
        std::fs::write(&log, format!("{}\n", kept.join("\n"))).unwrap();
        let (audit, writer) = Audit::start(&config(&log, Fsync::Always)).unwrap();
        audit.record(record(5));
        drop(audit);
        writer.join();
        let lines = lines_of(&log);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2]["event"], "resumed_after_truncation");
        assert_eq!(lines[2]["expected_seq"], 5);
        assert_eq!(lines[2]["resumed_seq"], 3);
        assert_eq!(lines[3]["request_id"], "r-5");
        verify::verify_files(&[log]).expect("the chain continues from the surviving tail");
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
