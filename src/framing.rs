//! A guard under hyper that spots HTTP/1 request-smuggling framing before hyper hides it.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding` the way
//! RFC 9112 §6.3 allows — Transfer-Encoding wins and Content-Length is dropped — so the
//! handler never sees the conflict. DESIGN §13 requires such a request to be refused with 400
//! and the connection closed, because a front end that honoured the other header would
//! disagree with us about where the next request starts.
//!
//! [`Guard`] wraps the connection's byte stream (after TLS), passes every byte through
//! untouched, and follows HTTP/1 framing on the side: it parses each request head with
//! `httparse` (hyper's own parser, so the two agree on what a head is), then skips the body
//! by its length or its chunks to find the next head. When a head carries both headers it
//! records that request's index; the connection's service refuses exactly that request.
//! HTTP/2 (the connection preface) and anything it cannot follow are left to hyper, which
//! rejects malformed framing itself.
//!
//! Imports nothing from the crate.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head followed; longer ones are hyper's to refuse (431).
const MAX_HEAD: usize = 96 * 1024;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// What the guard learned about one connection, shared with its service.
#[derive(Debug, Default)]
pub struct Verdict {
    /// 1-based index of the first request whose head had conflicting framing; 0 = none.
    conflict_at: AtomicU64,
    /// Requests the service has taken, to match against `conflict_at`.
    served: AtomicU64,
}

impl Verdict {
    /// Called once per request by the service, in order: whether this request is the one
    /// with conflicting framing.
    pub fn next_request_is_smuggled(&self) -> bool {
        let index = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        self.conflict_at.load(Ordering::Relaxed) == index
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers(Vec<u8>),
    /// HTTP/2, a conflict already found, or framing hyper refuses itself (and then closes
    /// the connection): nothing more to follow.
    Off,
    /// Framing hyper would accept but the guard cannot follow (a chunk-size or trailer line
    /// longer than [`MAX_LINE`]): the connection is closed rather than left unguarded — the
    /// guard never switches itself off while hyper reads on (DESIGN §13b).
    Broken,
}

/// Follows request framing on a byte stream it does not change.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    heads: u64,
    verdict: Arc<Verdict>,
}

impl Scanner {
    pub fn new(verdict: Arc<Verdict>) -> Scanner {
        Scanner {
            state: State::Head(Vec::new()),
            heads: 0,
            verdict,
        }
    }

    /// Whether the connection must be closed: the guard lost track of its framing.
    pub fn broken(&self) -> bool {
        matches!(self.state, State::Broken)
    }

    /// Feeds bytes as they arrive from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // The common case, a whole head in one read: read it in place, copying nothing.
            if matches!(&self.state, State::Head(buf) if buf.is_empty()) {
                if let Some(end) = find_head_end(bytes, 0) {
                    self.on_head(&bytes[..end]);
                    bytes = &bytes[end..];
                    continue;
                }
            }
            let consumed = match &mut self.state {
                State::Off | State::Broken => return,
                State::Head(buf) => {
                    let search_from = buf.len().saturating_sub(3);
                    buf.extend_from_slice(bytes);
                    match find_head_end(buf, search_from) {
                        None => {
                            if buf.len() > MAX_HEAD
                                || (buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE))
                            {
                                self.state = State::Off;
                            }
                            return;
                        }
                        Some(end) => {
                            let head_len = end;
                            let rest = buf.split_off(head_len);
                            let head = std::mem::take(buf);
                            self.on_head(&head);
                            // Re-feed what followed the head under the new state.
                            self.feed_owned(rest);
                            return;
                        }
                    }
                }
                State::Fixed(remaining) => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    n as usize
                }
                State::ChunkSize(line) => match take_line(line, bytes) {
                    (n, None) => {
                        if line.len() > MAX_LINE {
                            self.state = State::Broken;
                        }
                        n
                    }
                    (n, Some(text)) => {
                        self.state = match parse_chunk_size(&text) {
                            Some(0) => State::Trailers(Vec::new()),
                            Some(size) => State::ChunkData(size),
                            None => State::Off,
                        };
                        n
                    }
                },
                State::ChunkData(remaining) => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::ChunkDataEnd(0);
                    }
                    n as usize
                }
                State::ChunkDataEnd(seen) => {
                    // The CRLF after chunk data.
                    let b = bytes[0];
                    match (*seen, b) {
                        (0, b'\r') => *seen = 1,
                        (0, b'\n') | (1, b'\n') => self.state = State::ChunkSize(Vec::new()),
                        _ => self.state = State::Off,
                    }
                    1
                }
                State::Trailers(line) => match take_line(line, bytes) {
                    (n, None) => {
                        if line.len() > MAX_LINE {
                            self.state = State::Broken;
                        }
                        n
                    }
                    (n, Some(text)) => {
                        if text.is_empty() {
                            self.state = State::Head(Vec::new());
                        }
                        n
                    }
                },
            };
            bytes = &bytes[consumed..];
        }
    }

    fn feed_owned(&mut self, rest: Vec<u8>) {
        if !rest.is_empty() {
            self.feed(&rest);
        }
    }

    /// A complete head: decide the body's framing, or flag a conflict.
    fn on_head(&mut self, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        let start = head
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(head.len());
        if !matches!(req.parse(&head[start..]), Ok(httparse::Status::Complete(_))) {
            // hyper refuses what httparse cannot parse, and closes the connection.
            self.state = State::Off;
            return;
        }
        self.heads += 1;
        let mut content_lengths = Vec::new();
        let mut transfer_encodings = Vec::new();
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_lengths.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encodings.push(h.value);
            }
        }
        self.state = if !content_lengths.is_empty() && !transfer_encodings.is_empty() {
            self.verdict
                .conflict_at
                .store(self.heads, Ordering::Relaxed);
            State::Off
        } else if let Some(last) = transfer_encodings.last() {
            let last_coding = last.rsplit(|b| *b == b',').next().unwrap_or(b"");
            if last_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                State::ChunkSize(Vec::new())
            } else {
                State::Off
            }
        } else if let Some(first) = content_lengths.first() {
            let parsed: Option<u64> = std::str::from_utf8(first)
                .ok()
                .and_then(|v| v.trim().parse().ok());
            match parsed {
                Some(n) if content_lengths.iter().all(|v| v == first) => {
                    if n == 0 {
                        State::Head(Vec::new())
                    } else {
                        State::Fixed(n)
                    }
                }
                _ => State::Off,
            }
        } else {
            State::Head(Vec::new())
        };
    }
}

/// The end of the head (index just past the blank line), searching from `from`: where
/// httparse ends one — `\r\n\r\n`, `\n\n` or `\n\r\n`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    // Skip the empty lines a client may send before the request line (RFC 9112 §2.2).
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let mut i = from.max(start);
    // Every ending has a `\n` followed by `\n` or `\r\n` (`\r\n\r\n` included): jump from
    // one `\n` to the next rather than testing every byte against every ending.
    while let Some(at) = buf.get(i..)?.iter().position(|b| *b == b'\n') {
        let lf = i + at;
        match buf.get(lf + 1..) {
            Some([b'\n', ..]) => return Some(lf + 2),
            Some([b'\r', b'\n', ..]) => return Some(lf + 3),
            _ => i = lf + 1,
        }
    }
    None
}

/// Appends to `line` up to and including a `\n`; returns bytes consumed and, when the line is
/// complete, its text without the line ending.
fn take_line(line: &mut Vec<u8>, bytes: &[u8]) -> (usize, Option<Vec<u8>>) {
    match bytes.iter().position(|b| *b == b'\n') {
        Some(i) => {
            line.extend_from_slice(&bytes[..i]);
            let mut text = std::mem::take(line);
            if text.last() == Some(&b'\r') {
                text.pop();
            }
            (i + 1, Some(text))
        }
        None => {
            line.extend_from_slice(bytes);
            (bytes.len(), None)
        }
    }
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|b| *b == b';').next()?.trim_ascii();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

/// The connection stream with a [`Scanner`] watching what the client sends.
pub struct Guard<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> Guard<S> {
    pub fn new(inner: S, verdict: Arc<Verdict>) -> Guard<S> {
        Guard {
            inner,
            scanner: Scanner::new(verdict),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.scanner.feed(&buf.filled()[before..]);
                if this.scanner.broken() {
                    // Hyper never sees bytes the guard could not follow: the connection ends.
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "request framing the smuggling guard cannot follow (a chunk or trailer line over 4 KiB)",
                    )));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the flagged index (0 = none) and how
    /// many heads were followed.
    fn scan(input: &[u8], step: usize) -> (u64, u64) {
        let verdict = Arc::new(Verdict::default());
        let mut s = Scanner::new(verdict.clone());
        for piece in input.chunks(step.max(1)) {
            s.feed(piece);
        }
        (verdict.conflict_at.load(Ordering::Relaxed), s.heads)
    }

    const GET: &[u8] = b"GET /v1/apps HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn follows_fixed_and_chunked_bodies_to_the_next_head_in_any_split() {
        let mut input = Vec::new();
        input.extend_from_slice(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(b"PUT /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n");
        input.extend_from_slice(GET);
        for step in [1, 2, 3, 7, 64, 10_000] {
            assert_eq!(scan(&input, step), (0, 3), "step {step}");
        }
    }

    #[test]
    fn flags_exactly_the_request_with_both_length_headers() {
        let mut input = GET.to_vec();
        input.extend_from_slice(
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        input.extend_from_slice(GET);
        assert_eq!(scan(&input, 5).0, 2);
        let te_first =
            b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(scan(te_first, 1).0, 1);
    }

    #[test]
    fn a_body_that_looks_like_a_conflicting_head_is_not_a_head() {
        let smuggled =
            b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        )
        .into_bytes();
        input.extend_from_slice(smuggled);
        assert_eq!(scan(&input, 3), (0, 1));
    }

    #[test]
    fn http2_and_unparseable_input_switch_the_guard_off() {
        assert_eq!(scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", 4), (0, 0));
        assert_eq!(scan(b"GARBAGE\x00\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 8).0, 0);
    }

    #[test]
    fn a_head_ending_in_lf_cr_lf_is_a_head() {
        let mut input = b"GET /a HTTP/1.1\nHost: x\n\r\n".to_vec();
        input.extend_from_slice(
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        for step in [1, 3, 1000] {
            assert_eq!(scan(&input, step), (2, 2), "step {step}");
        }
    }

    #[test]
    fn a_chunk_line_too_long_to_follow_breaks_the_connection_instead_of_switching_off() {
        let verdict = Arc::new(Verdict::default());
        let mut s = Scanner::new(verdict);
        s.feed(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;");
        s.feed(&vec![b'x'; MAX_LINE + 1]);
        assert!(s.broken());
    }

    #[test]
    fn the_service_matches_the_flag_by_request_index() {
        let v = Verdict::default();
        v.conflict_at.store(2, Ordering::Relaxed);
        assert!(!v.next_request_is_smuggled());
        assert!(v.next_request_is_smuggled());
        assert!(!v.next_request_is_smuggled());
    }
}
