//! The writer thread, the only code that touches the log file: the chain's position (resumed
//! from the file's last line, or its `.chain` state file after a rotation), the sink (a
//! file re-opened on SIGHUP, or stdout), group commit, the fsync policy, and the bounded
//! backlog kept, in order, while the sink fails.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Fsync;

use super::record::write_line;
use super::{
    AuditError, Health, Marker, Message, Record, BACKLOG_CAPACITY, BATCH_LINGER, BATCH_MAX,
    GENESIS, RETRY_EVERY,
};

/// The chain's position: the next seq and the hash the next line must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Chain {
    next_seq: u64,
    prev_sha256: String,
}

impl Chain {
    /// The head this chain state stands on: its last line's seq and hash.
    pub(super) fn head(&self, time: Option<String>) -> super::Head {
        super::Head {
            seq: self.next_seq - 1,
            sha256: self.prev_sha256.clone(),
            time,
        }
    }

    pub(super) fn new() -> Chain {
        Chain {
            next_seq: 1,
            prev_sha256: GENESIS.to_string(),
        }
    }

    /// Continues from the file's last line, or — when the file is empty (just rotated) —
    /// from the `.chain` state file written at each fsync, rotation and shutdown. A file
    /// whose last line is older than the state expected (its tail was cut) is continued
    /// from that line, with a `resumed_after_truncation` marker to write first.
    pub(super) fn resume(path: &Path) -> Result<(Chain, Vec<Marker>), AuditError> {
        let err = |error| AuditError::Resume {
            path: path.display().to_string(),
            error,
        };
        if let Some(last) = last_line(path).map_err(err)? {
            let seq = serde_json::from_slice::<serde_json::Value>(&last)
                .ok()
                .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
                .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidData, "the last line is not an audit record; run `apple-api-proxy audit verify` on it")))?;
            let chain = Chain {
                next_seq: seq + 1,
                prev_sha256: crate::hex(&crate::sha256(&last)),
            };
            let mut markers = Vec::new();
            if let Ok(Some(saved)) = saved_state(path) {
                if saved.next_seq > chain.next_seq {
                    tracing::error!(
                        expected_seq = saved.next_seq,
                        resumed_seq = chain.next_seq,
                        "the audit log's tail is shorter than the chain state saved: continuing from its last line and marking the gap"
                    );
                    markers.push(Marker {
                        time: crate::rfc3339_millis(std::time::SystemTime::now()),
                        event: Marker::RESUMED_AFTER_TRUNCATION,
                        count: None,
                        expected_seq: Some(saved.next_seq),
                        resumed_seq: Some(chain.next_seq),
                    });
                }
            }
            return Ok((chain, markers));
        }
        Ok((
            saved_state(path).map_err(err)?.unwrap_or_else(Chain::new),
            Vec::new(),
        ))
    }
}

/// The chain state saved beside the log, if there is one.
fn saved_state(path: &Path) -> io::Result<Option<Chain>> {
    {
        match std::fs::read(state_path(path)) {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                match (
                    v.get("next_seq").and_then(|s| s.as_u64()),
                    v.get("prev_sha256").and_then(|s| s.as_str()),
                ) {
                    (Some(next_seq), Some(prev)) => Ok(Some(Chain {
                        next_seq,
                        prev_sha256: prev.to_string(),
                    })),
                    _ => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the .chain state file is damaged",
                    )),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// `<log>.chain`: where the chain continues when the log itself is empty after a rotation.
pub(crate) fn state_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".chain");
    PathBuf::from(p)
}

/// The last complete line of `path` (without its newline), reading only the file's tail.
pub(super) fn last_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
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

pub(super) enum Sink {
    File { path: PathBuf, file: File },
    Stdout,
}

impl Sink {
    pub(super) fn open(path: Option<&Path>) -> Result<Sink, AuditError> {
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

pub(super) struct WriterTask {
    pub(super) sink: Sink,
    pub(super) chain: Chain,
    /// Markers to write before the next record (a resume after truncation).
    pub(super) markers: Vec<Marker>,
    /// `health.lost` as of the last `records_lost` marker written.
    pub(super) lost_marked: u64,
    /// Records not yet written because the sink failed, oldest first.
    pub(super) backlog: Vec<Record>,
    pub(super) health: Arc<Health>,
    pub(super) fsync: Fsync,
    pub(super) last_sync: Instant,
    pub(super) dirty: bool,
    /// The batch being written, kept between batches (up to [`MAX_KEPT_BUFFER`]).
    pub(super) buf: Vec<u8>,
    /// When the head was last logged (every [`HEAD_LOG_EVERY`], and at shutdown).
    pub(super) last_head_log: Instant,
}

/// How often the chain's head is logged at `info` (DESIGN §19).
const HEAD_LOG_EVERY: Duration = Duration::from_secs(60);

/// A batch buffer grown past this (a long backlog after an outage) is not kept.
const MAX_KEPT_BUFFER: usize = 1 << 20;

impl WriterTask {
    pub(super) fn run(&mut self, rx: mpsc::Receiver<Message>) {
        loop {
            let timeout = if self.backlog.is_empty() {
                self.sync_wait()
            } else {
                RETRY_EVERY
            };
            self.log_head_if_due();
            let timeout = timeout.min(
                HEAD_LOG_EVERY
                    .saturating_sub(self.last_head_log.elapsed())
                    .max(Duration::from_millis(1)),
            );
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
                    self.reopen_if_asked();
                }
                Ok(message) => self.handle(message),
                Err(RecvTimeoutError::Timeout) => {
                    if self.lost_unmarked() > 0 || !self.markers.is_empty() {
                        self.drain();
                    }
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
                    self.log_head("audit head at shutdown");
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

    fn log_head_if_due(&mut self) {
        if self.last_head_log.elapsed() >= HEAD_LOG_EVERY {
            self.log_head("audit head");
        }
    }

    /// The head at `info`, for a log pipeline to carry to another trust domain.
    fn log_head(&mut self, message: &str) {
        self.last_head_log = Instant::now();
        let head = self.chain.head(None);
        tracing::info!(audit_head_seq = head.seq, audit_head_sha256 = %head.sha256, "{message}");
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
            Message::Reopen => self.reopen_if_asked(),
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
                self.log_head("audit head at shutdown");
                let _ = done.send(());
            }
        }
    }

    /// Re-opens the file if a SIGHUP asked for it since the last time.
    fn reopen_if_asked(&mut self) {
        if !self.health.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        match self.sink.reopen() {
            Ok(()) => tracing::info!("audit log re-opened"),
            Err(e) => tracing::error!(error = %e, "audit log re-open failed"),
        }
        self.save_state();
        self.drain();
    }

    /// Records dropped since the last `records_lost` marker.
    fn lost_unmarked(&self) -> u64 {
        self.health
            .lost
            .load(Ordering::Acquire)
            .saturating_sub(self.lost_marked)
    }

    /// Writes the pending markers and the backlog in order, as one write: all of it, or (the
    /// sink failing) none of it, the chain then not advanced and the sink unhealthy. Records
    /// dropped since the last write are marked first by a chained `records_lost` line.
    fn drain(&mut self) {
        let lost_now = self.health.lost.load(Ordering::Acquire);
        let lost_unmarked = lost_now.saturating_sub(self.lost_marked);
        if !self.backlog.is_empty() || !self.markers.is_empty() || lost_unmarked > 0 {
            // One buffer for the writer's life: a batch allocates nothing once it has grown.
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            let mut seq = self.chain.next_seq;
            let mut prev = self.chain.prev_sha256.clone();
            let mut markers = self.markers.clone();
            if lost_unmarked > 0 {
                markers.push(Marker {
                    time: crate::rfc3339_millis(std::time::SystemTime::now()),
                    event: Marker::RECORDS_LOST,
                    count: Some(lost_unmarked),
                    expected_seq: None,
                    resumed_seq: None,
                });
            }
            for marker in &markers {
                let start = buf.len();
                if write_line(&mut buf, seq, marker, &prev).is_err() {
                    buf.truncate(start);
                    continue;
                }
                prev.clear();
                crate::push_hex(&mut prev, &crate::sha256(&buf[start..]));
                buf.push(b'\n');
                seq += 1;
            }
            let marker_lines = seq - self.chain.next_seq;
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
                .fetch_add(seq - self.chain.next_seq - marker_lines, Ordering::Relaxed);
            self.chain.next_seq = seq;
            self.chain.prev_sha256 = prev;
            self.health.set_head(
                self.chain
                    .head(Some(crate::rfc3339_millis(std::time::SystemTime::now()))),
            );
            self.backlog.clear();
            self.markers.clear();
            // Serialisation failures above were counted into `lost`: the next drain marks
            // them.
            self.lost_marked = lost_now;
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
            // Where the chain stands, for a restart that must notice a cut tail.
            self.save_state();
        }
    }

    /// Records where the chain stands, so a proxy restarted on an empty (rotated) log
    /// continues it.
    fn save_state(&self) {
        if let Sink::File { path, .. } = &self.sink {
            let state = serde_json::json!({"next_seq": self.chain.next_seq, "prev_sha256": self.chain.prev_sha256});
            // Written aside and renamed over the old one: a process that exits while this
            // thread is mid-write never leaves a damaged (empty) state file behind.
            let target = state_path(path);
            let mut aside = target.clone().into_os_string();
            aside.push(".tmp");
            let written = std::fs::write(&aside, state.to_string())
                .and_then(|()| std::fs::rename(&aside, &target));
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot write the audit chain state file");
            }
        }
    }
}
