//! The upstream side's HTTP/1.1: keel's own client codec.
//!
//! A connection is driven by the task of the request using it, with no task
//! and no channel of its own: the request's head (with a small body) goes
//! out in one write, the response head is parsed from the connection's read
//! buffer with httparse, and the response body is decoded from that buffer
//! as the server side polls it ([`decode`]), its data handed on as slices of
//! the buffer, without copies. The server side stays on hyper. hyper's
//! client, with its connection task, request channel and response-body
//! channel, was a third of keel's user-space instructions per proxied
//! request; see docs/BENCHMARKS.md for what this codec changed.
//!
//! Framing follows RFC 9112: no body for HEAD, 1xx, 204 and 304; chunked
//! when `Transfer-Encoding` ends in `chunked` (it then wins over a
//! `Content-Length`, which is dropped, and the connection is not reused);
//! else `Content-Length`, whose copies must agree; else the body runs to the
//! connection's close. Interim 1xx responses are skipped; a 101 is an error
//! (keel does not proxy upgrades).

use std::future::Future as _;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::stall::{ClientBody, ClientBodyError};

/// Longest response head (or trailer section) accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Free space ensured in the read buffer before a read.
const READ_SPACE: usize = 16 * 1024;
/// Request bodies up to this size go out in the same write as the head.
const INLINE_BODY: usize = 16 * 1024;
/// A buffered request body up to this size is sent before its response is
/// read, not beside it: with its head, well inside a socket's send buffer
/// (16 KiB at least on Linux), so the write never waits for the upstream.
const SMALL_REQUEST: usize = 4 * 1024;

/// A request body on its way to an upstream: buffered (so it can be sent
/// again) or streamed once. A streaming body is boxed: this is moved
/// through every layer of a route's policies, by value, and most requests
/// have no body at all.
#[derive(Debug)]
pub(crate) enum RequestBody {
    Buffered(Bytes),
    Streaming(Box<ClientBody>),
}

impl RequestBody {
    /// A client's body as it arrives: an empty one is buffered already.
    pub(crate) fn from_client(body: ClientBody) -> RequestBody {
        if body.is_end_stream() {
            RequestBody::Buffered(Bytes::new())
        } else {
            RequestBody::Streaming(Box::new(body))
        }
    }

    /// The body, when it is whole and small enough to go out with its head
    /// in one write ([`Conn::exchange_small`]); else itself.
    pub(crate) fn into_small(self) -> Result<Bytes, RequestBody> {
        match self {
            RequestBody::Buffered(bytes) if bytes.len() <= SMALL_REQUEST => Ok(bytes),
            RequestBody::Streaming(b) if b.is_end_stream() => Ok(Bytes::new()),
            other => Err(other),
        }
    }
}

/// How a response body is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes are left (none for a response without a body).
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    Close,
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl Framing {
    /// The body has been read to its end.
    pub(crate) fn is_done(self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunked::Done))
    }
}

/// One step of decoding a response body from what has been read.
#[derive(Debug)]
pub(crate) enum Step {
    Frame(Frame<Bytes>),
    /// More bytes must be read first.
    More,
    End,
}

/// The response head as parsed, with how its body is framed.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// The connection may carry another request after this response.
    pub(crate) keep_alive: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// The client's request body stalled, failed or ended short of its
    /// length: not the upstream's doing.
    RequestBody(ClientBodyError),
    /// The connection, or the upstream's answer.
    Io(io::Error),
    /// No response head within the upstream's `read_timeout` of the
    /// request's end.
    HeadTimeout,
}

impl From<io::Error> for ExchangeError {
    fn from(e: io::Error) -> ExchangeError {
        ExchangeError::Io(e)
    }
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::RequestBody(e) => write!(f, "the client's request body: {e}"),
            ExchangeError::Io(e) => e.fmt(f),
            ExchangeError::HeadTimeout => f.write_str("no response head within read_timeout"),
        }
    }
}

/// One kept-alive HTTP/1.1 connection to an upstream endpoint.
#[derive(Debug)]
pub(crate) struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed.
    read: BytesMut,
    /// The request head being written (kept for its capacity).
    write: Vec<u8>,
}

impl Conn {
    pub(crate) fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            read: BytesMut::with_capacity(READ_SPACE),
            write: Vec::with_capacity(1024),
        }
    }

    /// Whether an idle connection can carry a request: nothing arrived on
    /// it since its last response (an upstream closing it makes it
    /// readable). `try_read` reads the runtime's readiness first, so there
    /// is no system call while nothing arrived, and unlike a poll it is not
    /// turned away when the task's cooperative budget is spent.
    pub(crate) fn is_usable(&self) -> bool {
        self.read.is_empty()
            && matches!(self.io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether the connection may go back to the pool after a response
    /// read to its end: nothing unasked-for follows it.
    pub(crate) fn is_clean(&self) -> bool {
        self.read.is_empty()
    }

    /// Sends a small request (see [`RequestBody::into_small`]) in one
    /// write that the socket's buffer takes at once, so that nothing can
    /// answer before it is sent, then reads the response head.
    /// `head_timeout`, counted from the end of the request, bounds the wait
    /// for the head. Its future is small: it is moved through every layer
    /// of a route's policies.
    pub(crate) async fn exchange_small(
        &mut self,
        request: Outgoing<'_>,
        body: &Bytes,
        head_timeout: Option<Duration>,
    ) -> Result<Head, ExchangeError> {
        encode_head(&mut self.write, request);
        encode_buffered(&mut self.write, request.method, body);
        let sent = self.io.write_all(&self.write).await;
        let (mut reader, _) = self.io.split();
        let receive = read_head(&mut reader, &mut self.read, request.method);
        // `None`: no head within `head_timeout`.
        let head = match head_timeout {
            // Boxed: a timer is large, and most routes' own timeouts end
            // sooner (then there is none).
            Some(t) => Box::pin(tokio::time::timeout(t, receive)).await.ok(),
            None => Some(receive.await),
        };
        match (sent, head) {
            (Ok(()), Some(head)) => head.map_err(ExchangeError::Io),
            (Ok(()), None) => Err(ExchangeError::HeadTimeout),
            // A failed write still lets an answer already sent be read.
            (Err(_), Some(Ok(mut head))) => {
                head.keep_alive = false;
                Ok(head)
            }
            (Err(write), _) => Err(write.into()),
        }
    }

    /// Sends the request (origin-form `target`, `host` when the request has
    /// none) and reads the response head, both at once: an upstream may
    /// answer before the request's body is all sent (a 413, a 401), and
    /// close. An early refusal (4xx, 5xx) is then the exchange's answer,
    /// and the rest of the body is not sent (the connection is not reused:
    /// [`Head::keep_alive`] is false); an early success waits for the body
    /// to be sent. `head_timeout`, counted from the end of the request, bounds
    /// the wait for the head. Its future is large (the send and the receive
    /// live side by side): callers box it, and send small requests with
    /// [`Conn::exchange_small`].
    pub(crate) async fn exchange(
        &mut self,
        request: Outgoing<'_>,
        body: RequestBody,
        head_timeout: Option<Duration>,
    ) -> Result<Head, ExchangeError> {
        let method = request.method;
        let (mut reader, mut writer) = self.io.split();
        let send = write_request(&mut writer, &mut self.write, request, body);
        let receive = read_head(&mut reader, &mut self.read, method);
        let (mut send, mut receive) = (std::pin::pin!(send), std::pin::pin!(receive));
        let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
        let mut sent: Option<Result<(), ExchangeError>> = None;
        let mut early: Option<Head> = None;
        std::future::poll_fn(|cx| {
            if let Some(mut head) = early.take() {
                return match send.as_mut().poll(cx) {
                    Poll::Pending => {
                        early = Some(head);
                        Poll::Pending
                    }
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(head)),
                    Poll::Ready(Err(ExchangeError::RequestBody(e))) => {
                        Poll::Ready(Err(ExchangeError::RequestBody(e)))
                    }
                    Poll::Ready(Err(_)) => {
                        head.keep_alive = false;
                        Poll::Ready(Ok(head))
                    }
                };
            }
            if sent.is_none() {
                if let Poll::Ready(result) = send.as_mut().poll(cx) {
                    if let Err(ExchangeError::RequestBody(e)) = result {
                        // The client's doing: the exchange is over.
                        return Poll::Ready(Err(ExchangeError::RequestBody(e)));
                    }
                    // A failed write still lets an answer already sent be
                    // read.
                    sent = Some(result);
                    if let Some(t) = head_timeout {
                        timer.set(Some(tokio::time::sleep(t)));
                    }
                }
            }
            match receive.as_mut().poll(cx) {
                Poll::Ready(Ok(head)) if sent.is_none() && head.status.as_u16() < 400 => {
                    // An early answer that is not a refusal: the upstream
                    // may still read the body (an echo), so the rest of it
                    // goes out before the head goes on.
                    early = Some(head);
                }
                Poll::Ready(Ok(mut head)) => {
                    if !matches!(sent, Some(Ok(()))) {
                        head.keep_alive = false;
                    }
                    return Poll::Ready(Ok(head));
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(match sent.take() {
                        Some(Err(write)) => write,
                        _ => ExchangeError::Io(e),
                    }))
                }
                Poll::Pending => {}
            }
            if let Some(timer) = timer.as_mut().as_pin_mut() {
                if timer.poll(cx).is_ready() {
                    return Poll::Ready(Err(ExchangeError::HeadTimeout));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Reads what the upstream sent next into the buffer: `Ok(0)` at its end.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_SPACE / 4 {
            self.read.reserve(READ_SPACE);
        }
        let read = self.io.read_buf(&mut self.read);
        std::pin::pin!(read).poll(cx)
    }

    /// The next step of decoding the body framed by `framing`.
    pub(crate) fn decode(&mut self, framing: &mut Framing) -> io::Result<Step> {
        decode(framing, &mut self.read)
    }
}

/// A request's head as it goes upstream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub(crate) method: &'a Method,
    /// Origin form: path and query.
    pub(crate) target: &'a str,
    pub(crate) headers: &'a HeaderMap,
    /// Sent as `host` when the request has none.
    pub(crate) host: &'a str,
}

/// Writes the request head into `w` (after clearing it), up to the
/// framing headers and the blank line, which depend on the body.
fn encode_head(w: &mut Vec<u8>, request: Outgoing<'_>) {
    let Outgoing {
        method,
        target,
        headers,
        host,
    } = request;
    w.clear();
    w.extend_from_slice(method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    for (name, value) in headers {
        // Framing is keel's to write, for the body it sends.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        has_host |= name == header::HOST;
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    if !has_host {
        w.extend_from_slice(b"host: ");
        w.extend_from_slice(host.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
}

/// The framing of a buffered body and the end of the head, then the body
/// itself when it is small enough to go in the head's write.
fn encode_buffered(w: &mut Vec<u8>, method: &Method, bytes: &Bytes) {
    if !bytes.is_empty() || expects_body(method) {
        write_length(w, bytes.len() as u64);
    }
    w.extend_from_slice(b"\r\n");
    if bytes.len() <= INLINE_BODY {
        w.extend_from_slice(bytes);
    }
}

async fn write_request(
    io: &mut WriteHalf<'_>,
    w: &mut Vec<u8>,
    request: Outgoing<'_>,
    body: RequestBody,
) -> Result<(), ExchangeError> {
    encode_head(w, request);
    match body {
        RequestBody::Buffered(bytes) => {
            encode_buffered(w, request.method, &bytes);
            io.write_all(w).await?;
            if bytes.len() > INLINE_BODY {
                io.write_all(&bytes).await?;
            }
            Ok(())
        }
        RequestBody::Streaming(body) => stream_body(io, w, *body).await,
    }
}

/// A body as it arrives: with its length when that is known, else
/// chunked. Its trailers are dropped.
async fn stream_body(
    io: &mut WriteHalf<'_>,
    w: &mut Vec<u8>,
    mut body: ClientBody,
) -> Result<(), ExchangeError> {
    let length = body.size_hint().exact();
    match length {
        Some(n) => write_length(w, n),
        None => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    w.extend_from_slice(b"\r\n");
    io.write_all(w).await?;
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ExchangeError::RequestBody)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if length.is_some() {
            io.write_all(&data).await?;
        } else {
            // The chunk's size line, and a small chunk with its CRLF, in
            // one write.
            w.clear();
            let _ = write!(w, "{:x}\r\n", data.len());
            if data.len() <= INLINE_BODY {
                w.extend_from_slice(&data);
                w.extend_from_slice(b"\r\n");
                io.write_all(w).await?;
            } else {
                io.write_all(w).await?;
                io.write_all(&data).await?;
                io.write_all(b"\r\n").await?;
            }
        }
    }
    match length {
        Some(n) if n != sent => Err(ExchangeError::RequestBody(ClientBodyError::Short)),
        Some(_) => Ok(()),
        None => Ok(io.write_all(b"0\r\n\r\n").await?),
    }
}

async fn read_head(
    io: &mut ReadHalf<'_>,
    read: &mut BytesMut,
    method: &Method,
) -> io::Result<Head> {
    loop {
        if let Some(head) = parse_head(read, method)? {
            return Ok(head);
        }
        if read.len() >= MAX_HEAD {
            return Err(invalid("the response head is over 64 KiB"));
        }
        read.reserve(READ_SPACE);
        if io.read_buf(read).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection before a response",
            ));
        }
    }
}

fn write_length(w: &mut Vec<u8>, n: u64) {
    // Formatted into the buffer itself: no string per request.
    let _ = write!(w, "content-length: {n}\r\n");
}

/// Methods whose requests announce a body even when it is empty.
fn expects_body(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::TRACE
            | Method::CONNECT
    )
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Parses a final response head from the front of `read`, consuming it (and
/// any interim 1xx before it); `None` while it is incomplete. The header
/// values are slices of the buffer, not copies.
pub(crate) fn parse_head(read: &mut BytesMut, method: &Method) -> io::Result<Option<Head>> {
    loop {
        if read.is_empty() {
            return Ok(None);
        }
        // Name and value of each field as offsets into `read`: they lie in
        // the head, which is checked to be at most MAX_HEAD bytes before
        // any is taken, so they fit in 16 bits.
        let mut fields = [[0u16; 4]; MAX_HEADERS];
        let (len, code, version, count) =
            {
                let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
                let mut response = httparse::Response::new(&mut []);
                let len = match httparse::ParserConfig::default()
                    .parse_response_with_uninit_headers(&mut response, read, &mut headers)
                {
                    Ok(httparse::Status::Complete(len)) => len,
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(invalid("the response head has over 100 fields"))
                    }
                    Err(_) => return Err(invalid("the response head is malformed")),
                };
                if len > MAX_HEAD {
                    return Err(invalid("the response head is over 64 KiB"));
                }
                let base = read.as_ptr() as usize;
                let at = |p: *const u8, n: usize| (p as usize - base + n) as u16;
                for (field, h) in fields.iter_mut().zip(response.headers.iter()) {
                    let (name, value) = (h.name.as_ptr(), h.value.as_ptr());
                    *field = [
                        at(name, 0),
                        at(name, h.name.len()),
                        at(value, 0),
                        at(value, h.value.len()),
                    ];
                }
                (
                    len,
                    response.code.unwrap_or(0),
                    response.version.unwrap_or(1),
                    response.headers.len(),
                )
            };
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(invalid(
                    "the upstream switched protocols (upgrades are not proxied)",
                ));
            }
            read.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| invalid("the response status is invalid"))?;
        let head = read.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        // The fields that frame the body, noted on the way (a name compare
        // costs less than looking them up afterwards).
        let (mut close, mut coding, mut length) = (false, None, None);
        for &[ns, ne, vs, ve] in &fields[..count] {
            let [ns, ne, vs, ve] = [ns, ne, vs, ve].map(usize::from);
            let name = HeaderName::from_bytes(&head[ns..ne])
                .map_err(|_| invalid("a response header name is invalid"))?;
            let value = &head[vs..ve];
            if name == header::CONNECTION {
                close |= has_token(value, b"close");
            } else if name == header::TRANSFER_ENCODING {
                coding = Some(ends_in_chunked(value));
            } else if name == header::CONTENT_LENGTH {
                add_length(&mut length, value)?;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| invalid("a response header value is invalid"))?;
            headers.append(name, value);
        }
        let version = if version == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let mut keep_alive = version == Version::HTTP_11 && !close;
        let framing = if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else if let Some(chunked) = coding {
            // A length beside a transfer coding is ignored and the
            // connection not reused (RFC 9112, section 6.3).
            if length.is_some() {
                headers.remove(header::CONTENT_LENGTH);
                keep_alive = false;
            }
            if chunked {
                Framing::Chunked(Chunked::Size)
            } else {
                keep_alive = false;
                Framing::Close
            }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            keep_alive = false;
            Framing::Close
        };
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// Adds one `Content-Length` field to the length seen so far: every copy
/// (and every item of a list) must be the same number.
fn add_length(length: &mut Option<u64>, value: &[u8]) -> io::Result<()> {
    for item in value.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err(invalid("the response's content-length is not a number"));
        }
        let n = item.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(invalid("the response has conflicting content-lengths"));
        }
        *length = Some(n);
    }
    Ok(())
}

/// Whether a `Transfer-Encoding` field's last coding is `chunked`.
fn ends_in_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a comma-separated field value lists `token`.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The next step of decoding a body framed by `framing` from the front of
/// `read`: a frame (data as a slice of the buffer), a need for more bytes,
/// or the end. At the connection's end the caller decides: the end of a
/// `Close` body, an error for the others.
pub(crate) fn decode(framing: &mut Framing, read: &mut BytesMut) -> io::Result<Step> {
    match framing {
        Framing::Length(0) => Ok(Step::End),
        Framing::Length(left) => {
            if read.is_empty() {
                return Ok(Step::More);
            }
            let n = (*left).min(read.len() as u64);
            *left -= n;
            Ok(Step::Frame(Frame::data(read.split_to(n as usize).freeze())))
        }
        Framing::Close => {
            if read.is_empty() {
                return Ok(Step::More);
            }
            Ok(Step::Frame(Frame::data(read.split().freeze())))
        }
        Framing::Chunked(state) => decode_chunked(state, read),
    }
}

fn decode_chunked(state: &mut Chunked, read: &mut BytesMut) -> io::Result<Step> {
    loop {
        match state {
            Chunked::Size => {
                let Some(eol) = read.iter().position(|&b| b == b'\n') else {
                    if read.len() > MAX_CHUNK_LINE {
                        return Err(invalid("a chunk-size line is too long"));
                    }
                    return Ok(Step::More);
                };
                if eol > MAX_CHUNK_LINE {
                    return Err(invalid("a chunk-size line is too long"));
                }
                if eol == 0 || read[eol - 1] != b'\r' {
                    return Err(invalid("a chunk-size line is malformed"));
                }
                let size = chunk_size(&read[..eol - 1])?;
                read.advance(eol + 1);
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                if read.is_empty() {
                    return Ok(Step::More);
                }
                let n = (*left).min(read.len() as u64);
                *left -= n;
                if *left == 0 {
                    *state = Chunked::DataEnd;
                }
                return Ok(Step::Frame(Frame::data(read.split_to(n as usize).freeze())));
            }
            Chunked::DataEnd => {
                if read.len() < 2 {
                    return Ok(Step::More);
                }
                if &read[..2] != b"\r\n" {
                    return Err(invalid("a chunk's data is not followed by CRLF"));
                }
                read.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; 32];
                let (len, trailers) = match httparse::parse_headers(read, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::new();
                        for f in fields.iter() {
                            let name = HeaderName::from_bytes(f.name.as_bytes())
                                .map_err(|_| invalid("a trailer name is invalid"))?;
                            let value = HeaderValue::from_bytes(f.value)
                                .map_err(|_| invalid("a trailer value is invalid"))?;
                            trailers.append(name, value);
                        }
                        (len, trailers)
                    }
                    Ok(httparse::Status::Partial) if read.len() <= MAX_HEAD => {
                        return Ok(Step::More)
                    }
                    Ok(httparse::Status::Partial) => {
                        return Err(invalid("the trailer section is over 64 KiB"))
                    }
                    Err(_) => return Err(invalid("the trailer section is malformed")),
                };
                read.advance(len);
                *state = Chunked::Done;
                if !trailers.is_empty() {
                    return Ok(Step::Frame(Frame::trailers(trailers)));
                }
            }
            Chunked::Done => return Ok(Step::End),
        }
    }
}

/// A chunk size in hex, before any `;` extensions (which are ignored).
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(invalid("a chunk size is malformed"));
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char)
            .to_digit(16)
            .ok_or_else(|| invalid("a chunk size is not hexadecimal"))?;
        Ok(n * 16 + u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str, method: Method) -> io::Result<Option<(Head, BytesMut)>> {
        let mut read = BytesMut::from(text.as_bytes());
        Ok(parse_head(&mut read, &method)?.map(|h| (h, read)))
    }

    fn ok(text: &str) -> (Head, BytesMut) {
        head(text, Method::GET).unwrap().expect("a complete head")
    }

    fn error(text: &str) -> String {
        head(text, Method::GET).unwrap_err().to_string()
    }

    #[test]
    fn a_head_is_parsed_and_consumed() {
        let (h, rest) =
            ok("HTTP/1.1 201 Created\r\ncontent-length: 3\r\nX-A: b\r\nx-a: c\r\n\r\nok\n");
        assert_eq!(h.status, StatusCode::CREATED);
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.keep_alive);
        let a: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["b", "c"]);
        assert_eq!(&rest[..], b"ok\n");
    }

    #[test]
    fn an_incomplete_head_waits_and_keeps_its_bytes() {
        let partial = b"HTTP/1.1 200 OK\r\ncontent-len";
        let mut read = BytesMut::from(&partial[..]);
        assert!(parse_head(&mut read, &Method::GET).unwrap().is_none());
        assert_eq!(&read[..], partial);
    }

    #[test]
    fn interim_responses_are_skipped_and_upgrades_refused() {
        let (h, _) = ok("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(h.status, StatusCode::OK);
        assert!(!h.headers.contains_key("link"));
        assert!(error("HTTP/1.1 101 Switching Protocols\r\n\r\n").contains("upgrades"));
    }

    #[test]
    fn bodiless_responses_have_no_body_whatever_their_length_says() {
        let (h, _) = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        assert_eq!(h.headers[header::CONTENT_LENGTH], "10");
        for status in [204, 304] {
            let (h, _) = ok(&format!(
                "HTTP/1.1 {status} X\r\ncontent-length: 10\r\n\r\n"
            ));
            assert_eq!(h.framing, Framing::Length(0), "{status}");
        }
    }

    #[test]
    fn transfer_coding_wins_over_length_and_ends_the_connection() {
        let (h, _) =
            ok("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked(Chunked::Size));
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!h.keep_alive);
        let (h, _) = ok("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked(Chunked::Size));
        assert!(h.keep_alive);
        let (h, _) = ok("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.keep_alive);
    }

    #[test]
    fn lengths_must_agree_and_be_numbers() {
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n")
                .0
                .framing,
            Framing::Length(3)
        );
        assert!(error("HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\n").contains("conflicting"));
        assert!(
            error("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n")
                .contains("conflicting")
        );
        for bad in ["-1", "0x10", "", "1 2", "99999999999999999999"] {
            assert!(
                error(&format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n"))
                    .contains("not a number"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_body_without_framing_runs_to_the_close() {
        let (h, _) = ok("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.keep_alive);
    }

    #[test]
    fn keep_alive_needs_http_1_1_without_close() {
        assert!(
            !ok("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !ok("HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn malformed_heads_are_errors() {
        assert!(error("HTTP/1.1 2000 OK\r\n\r\n").contains("malformed"));
        assert!(error("SMTP ready\r\n\r\n").contains("malformed"));
        assert!(error("HTTP/1.1 200 OK\r\nbad header\r\n\r\n").contains("malformed"));
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(error(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).contains("over 100"));
        let huge = "v".repeat(MAX_HEAD);
        assert!(error(&format!("HTTP/1.1 200 OK\r\nx: {huge}\r\n\r\n")).contains("over 64 KiB"));
    }

    /// Decodes `wire` fed in pieces of the given sizes (cycled): the data,
    /// the trailers, and the bytes left after the body's end.
    fn decode_all(
        mut framing: Framing,
        wire: &[u8],
        pieces: &[usize],
    ) -> io::Result<(Vec<u8>, Option<HeaderMap>, Vec<u8>)> {
        let mut read = BytesMut::new();
        let (mut fed, mut piece) = (0, 0);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match decode(&mut framing, &mut read)? {
                Step::Frame(frame) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Step::End => {
                    let mut rest = read.to_vec();
                    rest.extend_from_slice(&wire[fed..]);
                    return Ok((data, trailers, rest));
                }
                Step::More if fed == wire.len() => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "more needed"))
                }
                Step::More => {
                    let n = pieces[piece % pieces.len()].clamp(1, wire.len() - fed);
                    read.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                    piece += 1;
                }
            }
        }
    }

    fn chunked(wire: &str) -> io::Result<(Vec<u8>, Option<HeaderMap>, Vec<u8>)> {
        decode_all(Framing::Chunked(Chunked::Size), wire.as_bytes(), &[1000])
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, trailers, rest) =
            chunked("3;name=value\r\nabc\r\nA \r\n0123456789\r\n0\r\nx-sum: 7\r\n\r\nHTTP/1.1")
                .unwrap();
        assert_eq!(data, b"abc0123456789");
        assert_eq!(trailers.unwrap()["x-sum"], "7");
        assert_eq!(rest, b"HTTP/1.1");
        let (data, trailers, _) = chunked("0\r\n\r\n").unwrap();
        assert!(data.is_empty() && trailers.is_none());
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for (wire, why) in [
            ("zz\r\n", "hexadecimal"),
            ("\r\n", "malformed"),
            (";x\r\n", "malformed"),
            ("3\nabc", "malformed"),
            ("3\r\nabcX\r\n", "CRLF"),
            ("1000000000000000\r\n", "malformed"),
            ("0\r\nbad trailer\r\n\r\n", "trailer"),
        ] {
            let e = chunked(wire).unwrap_err().to_string();
            assert!(e.contains(why), "{wire:?}: {e}");
        }
        let long = format!("1;{}\r\n", "x".repeat(MAX_CHUNK_LINE + 1));
        assert!(chunked(&long).unwrap_err().to_string().contains("too long"));
    }

    /// A body's chunked encoding: the chunks' sizes, each in upper or
    /// lower case hex, some with an extension.
    fn encode_chunked(body: &[u8], sizes: &[usize], upper: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            let size = if upper {
                format!("{n:X}")
            } else {
                format!("{n:x}")
            };
            let ext = if i % 3 == 1 { ";ext=1" } else { "" };
            wire.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
            wire.extend_from_slice(&rest[..n]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        wire
    }

    proptest! {
        /// Whatever the chunk sizes and however the bytes arrive, the
        /// decoded body is the body, and what follows it is left unread.
        #[test]
        fn chunked_decoding_matches_the_body(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            sizes in proptest::collection::vec(1usize..80, 1..8),
            pieces in proptest::collection::vec(1usize..40, 1..8),
            upper in any::<bool>(),
        ) {
            let mut wire = encode_chunked(&body, &sizes, upper);
            wire.extend_from_slice(b"NEXT");
            let (data, trailers, rest) = decode_all(Framing::Chunked(Chunked::Size), &wire, &pieces).unwrap();
            prop_assert_eq!(data, body);
            prop_assert!(trailers.is_none());
            prop_assert_eq!(rest, b"NEXT".to_vec());
        }

        /// A length-delimited body is exactly its length, however it arrives.
        #[test]
        fn length_decoding_matches_the_body(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            pieces in proptest::collection::vec(1usize..40, 1..8),
        ) {
            let mut wire = body.clone();
            wire.extend_from_slice(b"NEXT");
            let (data, _, rest) = decode_all(Framing::Length(body.len() as u64), &wire, &pieces).unwrap();
            prop_assert_eq!(data, body);
            prop_assert_eq!(rest, b"NEXT".to_vec());
        }
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let conn = Conn::new(client);
        assert!(conn.is_usable());
        drop(server);
        conn.io.readable().await.unwrap();
        assert!(!conn.is_usable());
        // Also with the task's cooperative budget spent, which turns polls
        // of readiness away.
        std::future::poll_fn(|cx| {
            while std::pin::pin!(tokio::task::consume_budget())
                .poll(cx)
                .is_ready()
            {}
            assert!(!conn.is_usable());
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_goes_out_as_http_1_1_with_keels_framing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let upstream = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"body") {
                let n = server.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let mut conn = Conn::new(client);
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        // The client's framing is replaced by keel's.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let head = conn
            .exchange(
                Outgoing {
                    method: &Method::POST,
                    target: "/p?q=1",
                    headers: &headers,
                    host: "up:80",
                },
                RequestBody::Buffered(Bytes::from_static(b"body")),
                None,
            )
            .await
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(&conn.read[..], b"hi");
        assert_eq!(
            upstream.await.unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nx-a: 1\r\nhost: up:80\r\ncontent-length: 4\r\n\r\nbody"
        );
    }
}
