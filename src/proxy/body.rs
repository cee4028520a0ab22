//! Apple's bodies as the proxy passes or reads them. Streamed back untouched, or — where a
//! step must read one (the sandbox fallback's 404, the diagnosis's 401/403) — read whole
//! within a bound, so that the headers sent always describe the body sent.
//!
//! Imports `forward` for the body type; nothing else of the crate.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::Response;
use http_body_util::{BodyExt as _, BodyStream, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;

use crate::forward::{self, BoxError, ProxyBody};

/// How much of one of Apple's bodies a step reads whole.
pub(super) const READ_LIMIT: usize = 64 * 1024;
/// How long reading it may take.
pub(super) const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Apple's answer, streamed back with hop-by-hop headers removed. `note` (a diagnosis code)
/// marks a success worth knowing about.
pub(super) fn stream_back(
    response: Response<Incoming>,
    note: Option<&'static str>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    forward::clean_response_headers(&mut parts.headers);
    if let Some(code) = note {
        parts
            .headers
            .insert(super::X_PROXY_DIAGNOSIS, HeaderValue::from_static(code));
    }
    Response::from_parts(parts, forward::boxed(body))
}

/// Marks `head` for a body the proxy re-serialised as JSON (Apple's, with `diagnostics`
/// added): its length, encoding and framing no longer hold, its type is JSON.
pub(super) fn rewritten_as_json(head: &mut http::response::Parts) {
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
    ] {
        head.headers.remove(name);
    }
    head.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
}

/// One of Apple's bodies after a bounded read.
pub(super) enum Peeked {
    /// Read to its end within the bound.
    Whole(Bytes),
    /// Larger or slower than the bound: what was read, and the rest still unread.
    Partial(Bytes, Incoming),
    /// The body failed mid-way: what was read before.
    Broken(Bytes),
}

impl Peeked {
    /// The whole body, when it was read whole.
    pub(super) fn whole(&self) -> Option<&Bytes> {
        match self {
            Peeked::Whole(b) => Some(b),
            _ => None,
        }
    }
}

/// Reads `body` until its end, [`READ_LIMIT`] bytes or [`READ_TIMEOUT`], whichever is first.
pub(super) async fn peek(mut body: Incoming) -> Peeked {
    let mut read = BytesMut::new();
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Peeked::Partial(read.freeze(), body),
            Ok(None) => return Peeked::Whole(read.freeze()),
            Ok(Some(Err(_))) => return Peeked::Broken(read.freeze()),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
            if read.len() > READ_LIMIT {
                return Peeked::Partial(read.freeze(), body);
            }
        }
    }
}

/// A whole body as its `Content-Encoding` says to read it: identity as it is, gzip and
/// deflate decoded within [`READ_LIMIT`] (DESIGN §13b); `None` for another encoding, or one
/// that does not decode within the bound.
pub(super) fn decoded(headers: &http::HeaderMap, bytes: &Bytes) -> Option<Bytes> {
    use std::io::Read as _;
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => return Some(bytes.clone()),
        Some(v) => v.to_str().ok()?.trim().to_ascii_lowercase(),
    };
    let mut out = Vec::new();
    let limit = READ_LIMIT as u64 + 1;
    let read = match encoding.as_str() {
        "identity" => return Some(bytes.clone()),
        "gzip" | "x-gzip" => flate2::read::GzDecoder::new(&bytes[..])
            .take(limit)
            .read_to_end(&mut out),
        // HTTP's "deflate" is zlib-wrapped; some servers send it raw.
        "deflate" => flate2::read::ZlibDecoder::new(&bytes[..])
            .take(limit)
            .read_to_end(&mut out)
            .or_else(|_| {
                out.clear();
                flate2::read::DeflateDecoder::new(&bytes[..])
                    .take(limit)
                    .read_to_end(&mut out)
            }),
        _ => return None,
    };
    (read.is_ok() && out.len() <= READ_LIMIT).then(|| Bytes::from(out))
}

/// Apple's response put back together after a [`peek`]: the body is Apple's, in full where
/// Apple sent it in full, and `Content-Length` describes it (the read bytes' length for a
/// whole body, Apple's own for a partial one, none for a broken one).
pub(super) fn reassemble(mut head: http::response::Parts, peeked: Peeked) -> Response<ProxyBody> {
    forward::clean_response_headers(&mut head.headers);
    let body = match peeked {
        Peeked::Whole(bytes) => {
            head.headers.remove(header::TRANSFER_ENCODING);
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            forward::boxed(Full::new(bytes))
        }
        Peeked::Partial(read, rest) => {
            use futures_util::StreamExt as _;
            let first = futures_util::stream::once(async move { Ok(Frame::data(read)) });
            let rest = BodyStream::new(rest).map(|frame| frame.map_err(BoxError::from));
            forward::boxed(StreamBody::new(first.chain(rest)))
        }
        Peeked::Broken(read) => {
            head.headers.remove(header::CONTENT_LENGTH);
            forward::boxed(Full::new(read))
        }
    };
    Response::from_parts(head, body)
}
