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

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head passed to hyper; a longer one is refused here with 431 (hyper's own read
/// buffer is larger, so the guard always decides first).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a head: hyper's own limit (it answers 431 beyond it).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// What hyper is handed in place of a refused head: a request it accepts, which the
/// connection's service answers with the refusal (see [`Verdict::next_request`]).
const STAND_IN_HEAD: &[u8] = b"GET / HTTP/1.1\r\nhost: refused.invalid\r\n\r\n";

/// Why the guard refused a head in hyper's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Both `Content-Length` and `Transfer-Encoding`.
    Smuggling,
    /// Two different `Content-Length`s, or one that is not a number.
    ContentLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`.
    TransferEncoding,
    /// A head httparse cannot parse.
    Malformed,
    /// A head longer than [`MAX_HEAD`] or with more than [`MAX_HEADERS`] fields.
    TooLarge,
}

/// A head the guard refused: which request it was, why, and its request line as far as it
/// could be read (for the audit record, which redacts it like any other).
#[derive(Debug)]
pub struct Refused {
    index: u64,
    pub why: Rejection,
    pub method: Option<String>,
    pub target: Option<String>,
}

/// What the guard learned about one connection, shared with its service.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The refused head, if any: after it the connection carries nothing more.
    refused: std::sync::OnceLock<Refused>,
    /// Requests the service has taken, to match against the refused head's index.
    served: AtomicU64,
}

impl Verdict {
    /// Called once per request by the service, in order: the refusal this request stands in
    /// for, if the guard refused its head.
    pub fn next_request(&self) -> Option<&Refused> {
        let index = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        self.refused.get().filter(|r| r.index == index)
    }

    /// The refused head's index and reason, for tests.
    #[cfg(test)]
    pub(crate) fn refused_for_tests(&self) -> Option<(u64, Rejection)> {
        self.refused.get().map(|r| (r.index, r.why))
    }
}

#[derive(Debug)]
enum State {
    /// Reading a head: the bytes of an incomplete one are held here, not passed to hyper,
    /// until the guard has seen all of it.
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers(Vec<u8>),
    /// HTTP/2, or a body hyper will fail by itself (a bad chunk): nothing more to follow.
    Off,
    /// A head was refused: nothing after it reaches hyper.
    Refused,
    /// Framing hyper would accept but the guard cannot follow (a chunk-size or trailer line
    /// longer than [`MAX_LINE`]): the connection is closed rather than left unguarded — the
    /// guard never switches itself off while hyper reads on (DESIGN §13b).
    Broken,
}

/// What of one read goes on to hyper: its first `keep` bytes as they are, then `extra`
/// (a held head released, or the stand-in for a refused one). Usually `keep` is the whole
/// read and `extra` is empty.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub keep: usize,
    pub extra: Vec<u8>,
}

/// Builds a [`Pass`] while the scanner walks one read.
struct Out<'a> {
    input: &'a [u8],
    keep: usize,
    extra: Option<Vec<u8>>,
}

impl Out<'_> {
    /// `input[at..at + n]` goes on unchanged.
    fn pass(&mut self, at: usize, n: usize) {
        match &mut self.extra {
            None if at == self.keep => self.keep += n,
            extra => extra
                .get_or_insert_with(Vec::new)
                .extend_from_slice(&self.input[at..at + n]),
        }
    }

    /// Bytes not in this read (a held head, the stand-in) go on.
    fn push(&mut self, bytes: &[u8]) {
        self.extra
            .get_or_insert_with(Vec::new)
            .extend_from_slice(bytes);
    }

    fn done(self) -> Pass {
        Pass {
            keep: self.keep,
            extra: self.extra.unwrap_or_default(),
        }
    }
}

/// Where a complete head is: in the read being walked, or held from earlier reads.
enum HeadAt {
    Input(usize),
    Held,
}

/// Follows request framing on a byte stream, and decides what of it hyper gets.
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

    /// Whether a head was refused (hyper gets nothing more).
    pub fn refused(&self) -> bool {
        matches!(self.state, State::Refused)
    }

    /// Whether part of a head is held back from hyper, waiting for the rest.
    pub fn holding(&self) -> bool {
        matches!(&self.state, State::Head(buf) if !buf.is_empty())
    }

    /// Walks bytes as they arrive from the client; says what of them hyper gets.
    pub fn feed(&mut self, input: &[u8]) -> Pass {
        let mut out = Out {
            input,
            keep: 0,
            extra: None,
        };
        let mut at = 0;
        while at < input.len() {
            let bytes = &input[at..];
            // The common case, a whole head in one read: read it in place, copying nothing.
            if matches!(&self.state, State::Head(buf) if buf.is_empty()) {
                if let Some(end) = find_head_end(bytes, 0).filter(|end| *end <= MAX_HEAD) {
                    self.on_head(&bytes[..end], HeadAt::Input(at), &mut out);
                    at += end;
                    continue;
                }
            }
            let consumed = match &mut self.state {
                State::Off => {
                    out.pass(at, bytes.len());
                    bytes.len()
                }
                State::Refused | State::Broken => return out.done(),
                State::Head(buf) => {
                    let held = buf.len();
                    let search_from = held.saturating_sub(3);
                    // Never hold more than one byte past the limit.
                    let take = bytes.len().min(MAX_HEAD + 1 - held.min(MAX_HEAD));
                    buf.extend_from_slice(&bytes[..take]);
                    match find_head_end(buf, search_from).filter(|end| *end <= MAX_HEAD) {
                        Some(end) => {
                            let mut head = std::mem::take(buf);
                            head.truncate(end);
                            self.on_head(&head, HeadAt::Held, &mut out);
                            end - held
                        }
                        None if buf.len() > MAX_HEAD => {
                            let head = std::mem::take(buf);
                            self.heads += 1;
                            let (method, target) = request_line(&head);
                            self.refuse(Rejection::TooLarge, method, target, &mut out);
                            return out.done();
                        }
                        None => take,
                    }
                }
                State::Fixed(remaining) => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    out.pass(at, n as usize);
                    n as usize
                }
                State::ChunkSize(line) => {
                    let (n, text) = take_line(line, bytes);
                    match text {
                        None if line.len() > MAX_LINE => {
                            self.state = State::Broken;
                            return out.done();
                        }
                        None => {}
                        Some(text) => {
                            self.state = match parse_chunk_size(&text) {
                                Some(0) => State::Trailers(Vec::new()),
                                Some(size) => State::ChunkData(size),
                                // hyper fails the body itself.
                                None => State::Off,
                            }
                        }
                    }
                    out.pass(at, n);
                    n
                }
                State::ChunkData(remaining) => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::ChunkDataEnd(0);
                    }
                    out.pass(at, n as usize);
                    n as usize
                }
                State::ChunkDataEnd(seen) => {
                    // The CRLF after chunk data.
                    match (*seen, bytes[0]) {
                        (0, b'\r') => *seen = 1,
                        (0, b'\n') | (1, b'\n') => self.state = State::ChunkSize(Vec::new()),
                        _ => self.state = State::Off,
                    }
                    out.pass(at, 1);
                    1
                }
                State::Trailers(line) => {
                    let (n, text) = take_line(line, bytes);
                    match text {
                        None if line.len() > MAX_LINE => {
                            self.state = State::Broken;
                            return out.done();
                        }
                        Some(text) if text.is_empty() => self.state = State::Head(Vec::new()),
                        None | Some(_) => {}
                    }
                    out.pass(at, n);
                    n
                }
            };
            at += consumed;
        }
        out.done()
    }

    /// A complete head: decide the body's framing and pass the head on, or refuse it.
    fn on_head(&mut self, head: &[u8], at: HeadAt, out: &mut Out<'_>) {
        let start = head
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(head.len());
        if head[start..].starts_with(H2_PREFACE) {
            // HTTP/2's preface: hyper takes the connection from here.
            self.state = State::Off;
            emit(head, at, out);
            return;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(&head[start..]);
        self.heads += 1;
        let owned = |v: Option<&str>| v.map(str::to_string);
        let (method, target) = (owned(req.method), owned(req.path));
        match parsed {
            Ok(httparse::Status::Complete(_)) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return self.refuse(Rejection::TooLarge, method, target, out)
            }
            Ok(httparse::Status::Partial) | Err(_) => {
                return self.refuse(Rejection::Malformed, method, target, out)
            }
        }
        let mut content_lengths = Vec::new();
        let mut transfer_encodings = Vec::new();
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_lengths.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encodings.push(h.value);
            }
        }
        let next = if !content_lengths.is_empty() && !transfer_encodings.is_empty() {
            Err(Rejection::Smuggling)
        } else if let Some(last) = transfer_encodings.last() {
            let last_coding = last.rsplit(|b| *b == b',').next().unwrap_or(b"");
            if last_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Ok(State::ChunkSize(Vec::new()))
            } else {
                Err(Rejection::TransferEncoding)
            }
        } else if !content_lengths.is_empty() {
            match content_length(&content_lengths) {
                Some(0) => Ok(State::Head(Vec::new())),
                Some(n) => Ok(State::Fixed(n)),
                None => Err(Rejection::ContentLength),
            }
        } else {
            Ok(State::Head(Vec::new()))
        };
        match next {
            Ok(state) => {
                self.state = state;
                emit(head, at, out);
            }
            Err(why) => self.refuse(why, method, target, out),
        }
    }

    /// Records the refusal for the service, hands hyper the stand-in head in its place, and
    /// passes nothing after it.
    fn refuse(
        &mut self,
        why: Rejection,
        method: Option<String>,
        target: Option<String>,
        out: &mut Out<'_>,
    ) {
        let _ = self.verdict.refused.set(Refused {
            index: self.heads,
            why,
            method,
            target,
        });
        out.push(STAND_IN_HEAD);
        self.state = State::Refused;
    }
}

fn emit(head: &[u8], at: HeadAt, out: &mut Out<'_>) {
    match at {
        HeadAt::Input(at) => out.pass(at, head.len()),
        HeadAt::Held => out.push(head),
    }
}

/// The one length all `Content-Length` values (comma lists included) agree on, as hyper
/// reads them; `None` when they differ or one is not a number.
fn content_length(values: &[&[u8]]) -> Option<u64> {
    let mut length = None;
    for value in values {
        for part in std::str::from_utf8(value).ok()?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = part.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}

/// The method and target of a head too large to parse whole, when its request line is
/// complete.
fn request_line(head: &[u8]) -> (Option<String>, Option<String>) {
    let start = head
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(head.len());
    let Some(line_end) = head[start..].iter().position(|b| *b == b'\n') else {
        return (None, None);
    };
    let line = head[start..start + line_end].trim_ascii_end();
    let mut parts = line.split(|b| *b == b' ');
    let token = |p: Option<&[u8]>| {
        p.filter(|p| !p.is_empty() && p.iter().all(|b| b.is_ascii_graphic()))
            .map(|p| String::from_utf8_lossy(p).into_owned())
    };
    (token(parts.next()), token(parts.next()))
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

/// The connection stream with a [`Scanner`] between the client and hyper.
pub struct Guard<S> {
    inner: S,
    scanner: Scanner,
    /// Bytes for hyper that did not fit its buffer yet (a released head, the stand-in).
    pending: Vec<u8>,
    pending_at: usize,
    /// How long a head may take to arrive once it has begun. hyper's own
    /// `header_read_timeout` cannot see a head the guard is still holding back.
    head_timeout: std::time::Duration,
    /// Set while part of a head is held.
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Guard<S> {
    pub fn new(inner: S, verdict: Arc<Verdict>, head_timeout: std::time::Duration) -> Guard<S> {
        Guard {
            inner,
            scanner: Scanner::new(verdict),
            pending: Vec::new(),
            pending_at: 0,
            head_timeout,
            head_deadline: None,
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
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.pending_at < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.pending_at);
                buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
                this.pending_at += n;
                if this.pending_at == this.pending.len() {
                    this.pending.clear();
                    this.pending_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.scanner.refused() {
                // hyper answers the stand-in with `Connection: close`; nothing more is read.
                return Poll::Pending;
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Pending => {
                    if let Some(deadline) = &mut this.head_deadline {
                        if deadline.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the request head did not arrive within header_read_timeout",
                            )));
                        }
                    }
                    return Poll::Pending;
                }
                other => return other,
            }
            if buf.filled().len() == before {
                return Poll::Ready(Ok(()));
            }
            let pass = this.scanner.feed(&buf.filled()[before..]);
            if this.scanner.broken() {
                // Hyper never sees bytes the guard could not follow: the connection ends.
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request framing the smuggling guard cannot follow (a chunk or trailer line over 4 KiB)",
                )));
            }
            buf.set_filled(before + pass.keep);
            match (this.scanner.holding(), this.head_deadline.is_some()) {
                (true, false) => {
                    this.head_deadline = Some(Box::pin(tokio::time::sleep(this.head_timeout)));
                }
                (false, true) => this.head_deadline = None,
                _ => {}
            }
            if !pass.extra.is_empty() {
                this.pending = pass.extra;
                this.pending_at = 0;
                continue;
            }
            if pass.keep > 0 {
                return Poll::Ready(Ok(()));
            }
            // Everything read is held (an incomplete head): read on.
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

    /// Feeds `input` in pieces of `step` bytes; returns the refused head's index (0 = none)
    /// and how many heads were followed.
    fn scan(input: &[u8], step: usize) -> (u64, u64) {
        let (verdict, heads, _) = scan_out(input, step);
        (verdict.refused.get().map_or(0, |r| r.index), heads)
    }

    /// Feeds `input` in pieces of `step` bytes; returns the verdict, the heads followed and
    /// the bytes hyper would get.
    fn scan_out(input: &[u8], step: usize) -> (Arc<Verdict>, u64, Vec<u8>) {
        let verdict = Arc::new(Verdict::default());
        let mut s = Scanner::new(verdict.clone());
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            let pass = s.feed(piece);
            out.extend_from_slice(&piece[..pass.keep]);
            out.extend_from_slice(&pass.extra);
        }
        (verdict, s.heads, out)
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
    fn http2_is_left_to_hyper_and_unparseable_input_is_refused() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00GET / HTTP/1.1\r\n\r\n";
        for step in [1, 4, 100] {
            let (verdict, heads, out) = scan_out(h2, step);
            assert_eq!((heads, &out[..]), (0, &h2[..]), "step {step}");
            assert!(verdict.refused.get().is_none());
        }
        assert_eq!(scan(b"GARBAGE\x00\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 8), (1, 1));
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
    fn the_service_matches_the_refusal_by_request_index() {
        let v = Verdict::default();
        v.refused
            .set(Refused {
                index: 2,
                why: Rejection::Smuggling,
                method: None,
                target: None,
            })
            .unwrap();
        assert!(v.next_request().is_none());
        assert_eq!(v.next_request().map(|r| r.why), Some(Rejection::Smuggling));
        assert!(v.next_request().is_none());
    }

    #[test]
    fn hyper_gets_every_byte_of_a_well_framed_stream_in_any_split() {
        let mut input = Vec::new();
        input.extend_from_slice(
            b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
        );
        input.extend_from_slice(b"PUT /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n");
        input.extend_from_slice(GET);
        for step in [1, 2, 5, 17, 64, 10_000] {
            let (verdict, heads, out) = scan_out(&input, step);
            assert_eq!(out, input, "step {step}");
            assert_eq!(heads, 3, "step {step}");
            assert!(verdict.refused.get().is_none());
        }
    }

    #[test]
    fn a_refused_head_reaches_hyper_as_the_stand_in_and_nothing_after_it_does() {
        let bad =
            b"POST /v1/x?token=1 HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!";
        let mut input = GET.to_vec();
        input.extend_from_slice(bad);
        input.extend_from_slice(GET);
        for step in [1, 7, 10_000] {
            let (verdict, _, out) = scan_out(&input, step);
            let mut want = GET.to_vec();
            want.extend_from_slice(STAND_IN_HEAD);
            assert_eq!(out, want, "step {step}");
            let refused = verdict.refused.get().expect("refused");
            assert_eq!((refused.index, refused.why), (2, Rejection::ContentLength));
            assert_eq!(refused.method.as_deref(), Some("POST"));
            assert_eq!(refused.target.as_deref(), Some("/v1/x?token=1"));
        }
    }

    #[test]
    fn heads_hyper_would_refuse_are_refused_here_first() {
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let big = format!(
            "GET /big HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let cases: Vec<(Vec<u8>, Rejection)> = vec![
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n".to_vec(),
                Rejection::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n".to_vec(),
                Rejection::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
                Rejection::TransferEncoding,
            ),
            (
                b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n".to_vec(),
                Rejection::Malformed,
            ),
            (b"GARBAGE\x00\r\n\r\n".to_vec(), Rejection::Malformed),
            (
                format!("GET /many HTTP/1.1\r\n{many}\r\n").into_bytes(),
                Rejection::TooLarge,
            ),
            (big.clone().into_bytes(), Rejection::TooLarge),
            // Too large before its end has even arrived.
            (
                big.as_bytes()[..MAX_HEAD + 10].to_vec(),
                Rejection::TooLarge,
            ),
        ];
        for (input, why) in cases {
            for step in [3, 4096, 1 << 20] {
                let (verdict, _, out) = scan_out(&input, step);
                assert_eq!(
                    verdict.refused.get().map(|r| r.why),
                    Some(why),
                    "{why:?} step {step}"
                );
                assert_eq!(out, STAND_IN_HEAD, "{why:?} step {step}");
            }
        }
        let (verdict, _, _) = scan_out(big.as_bytes(), 1000);
        let refused = verdict.refused.get().unwrap();
        assert_eq!(
            (refused.method.as_deref(), refused.target.as_deref()),
            (Some("GET"), Some("/big"))
        );
    }
}
