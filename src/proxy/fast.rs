//! The common case forwarded without hyper: HTTP/1.1 requests with no body or a
//! `Content-Length` one, to a live instance, with the responses' framing (length, chunked or
//! until close) passed through as it comes.
//!
//! hyper parses each message into a `Request`/`Response` with a header map, then writes it out
//! again with its own framing, on both sides of the proxy: on two cores that cost as much CPU
//! per request as the instance itself, and made the proxy the bottleneck. Here a request is
//! parsed in place (`httparse`), its head rewritten into one buffer (hop-by-hop headers out,
//! `X-Forwarded-*` in), and bodies are copied in chunks, never held whole.
//!
//! Anything else on a connection (an upgrade, `Expect`, a chunked, HTTP/1.0 or large request,
//! an absolute-form target, the service starting or down, a head that does not parse) hands the
//! connection, with what was read of it, to the hyper path for the rest of its life.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{HOP_BY_HOP, InFlight, Proxy, Target, UPSTREAM_IDLE, Upstream, connect};

/// The most headers a message may have here; more go to the hyper path.
const MAX_HEADERS: usize = 96;
/// The largest head read here; a bigger one goes to the hyper path (which answers 431).
const MAX_HEAD: usize = 64 << 10;
/// Read size for heads and body chunks.
const CHUNK: usize = 16 << 10;
/// The largest request body sent here. The whole body is sent before the response is read, so
/// an instance that answers while it reads (an echo, an upload with progress) could fill both
/// sockets' buffers and wait on us forever with a larger one; hyper's path reads and writes
/// both ways at once. Loopback buffers hold this much either way.
const MAX_BODY: u64 = 64 << 10;

/// How serving a connection here ended.
pub(super) enum Outcome {
    /// The connection is finished (closed by either side, failed, or the proxy stops).
    Done,
    /// The hyper path takes over; these bytes were read from the client and not handled.
    HandOver(Vec<u8>),
}

/// One client connection's state on the fast path.
struct Conn<'a> {
    proxy: &'a Proxy,
    client: &'a mut TcpStream,
    peer_ip: &'a str,
    /// Bytes read from the client and not handled yet.
    cbuf: Vec<u8>,
    up: Option<Up>,
    /// The request as it goes to the instance: rewritten head and the body read with it. Kept
    /// until a response starts, for a retry.
    req_out: Vec<u8>,
    /// The response head (and start of body) as it goes to the client.
    resp_out: Vec<u8>,
}

/// The upstream connection of a client connection.
struct Up {
    stream: TcpStream,
    upstream: Arc<Upstream>,
    /// When its last response ended.
    since: Instant,
    /// Bytes read from it and not handled yet.
    buf: Vec<u8>,
}

/// What the request head says, as far as forwarding goes.
struct RequestHead {
    /// Length of the head in the client buffer.
    len: usize,
    body: u64,
    close: bool,
    head_method: bool,
    /// The method is safe to send twice (see `forward`).
    idempotent: bool,
}

/// Serves requests on `client` until it closes or something asks for the hyper path.
pub(super) async fn serve(
    proxy: &Proxy,
    client: &mut TcpStream,
    peer_ip: &str,
    stop: &CancellationToken,
) -> Outcome {
    let mut conn = Conn {
        proxy,
        client,
        peer_ip,
        cbuf: Vec::with_capacity(CHUNK),
        up: None,
        req_out: Vec::with_capacity(1024),
        resp_out: Vec::with_capacity(1024),
    };
    loop {
        match conn.next_request(stop).await {
            Next::Done => return Outcome::Done,
            Next::HandOver => return Outcome::HandOver(std::mem::take(&mut conn.cbuf)),
            Next::Request(head, in_flight) => match conn.forward(head, in_flight).await {
                Ok(true) => {}
                Ok(false) | Err(()) => return Outcome::Done,
            },
        }
    }
}

enum Next {
    Request(RequestHead, InFlight),
    HandOver,
    Done,
}

/// The value of the header `name` in `headers`, if there is exactly one.
fn only<'h>(headers: &'h [httparse::Header<'h>], name: &str) -> Result<Option<&'h [u8]>, ()> {
    let mut found = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case(name) {
            if found.is_some() {
                return Err(());
            }
            found = Some(h.value);
        }
    }
    Ok(found)
}

/// The tokens of every `Connection` header.
fn connection_tokens<'h>(headers: &'h [httparse::Header<'h>]) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether `headers` has a `Connection` header (which may name more hop-by-hop headers).
fn names_hops(headers: &[httparse::Header<'_>]) -> bool {
    headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("connection"))
}

/// Whether the header `name` describes one hop only: a fixed hop-by-hop header, or one that
/// `Connection` names (looked for only if `named`, from [`names_hops`]).
fn hop_by_hop(headers: &[httparse::Header<'_>], named: bool, name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str()))
        || named && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 19 {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The request head's facts, or `None` for anything the hyper path handles.
fn classify(req: &httparse::Request<'_, '_>, len: usize) -> Option<RequestHead> {
    let (method, path) = (req.method?, req.path?);
    if req.version != Some(1) || !path.starts_with('/') {
        return None;
    }
    let headers = &*req.headers;
    let mut close = false;
    for t in connection_tokens(headers) {
        if t.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if t.eq_ignore_ascii_case(b"upgrade") {
            return None;
        }
    }
    for h in headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("transfer-encoding")
            || n.eq_ignore_ascii_case("upgrade")
            || n.eq_ignore_ascii_case("expect")
        {
            return None;
        }
    }
    let body = match only(headers, "content-length").ok()? {
        Some(v) => parse_length(v)?,
        None => 0,
    };
    if body > MAX_BODY {
        return None;
    }
    Some(RequestHead {
        len,
        body,
        close,
        head_method: method == "HEAD",
        idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
    })
}

impl Conn<'_> {
    /// Reads the next request head, decides whether it is ours, and routes it.
    async fn next_request(&mut self, stop: &CancellationToken) -> Next {
        loop {
            if !self.cbuf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&self.cbuf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let Some(head) = classify(&req, len) else {
                            return Next::HandOver;
                        };
                        let Some(in_flight) = self.live() else {
                            return Next::HandOver;
                        };
                        let addr = in_flight.upstream().addr();
                        write_request_head(&mut self.req_out, &req, self.peer_ip, addr);
                        return Next::Request(head, in_flight);
                    }
                    Ok(httparse::Status::Partial) if self.cbuf.len() < MAX_HEAD => {}
                    _ => return Next::HandOver,
                }
            }
            let read = if self.cbuf.is_empty() {
                // Between requests the proxy may stop (within one it finishes it), and the
                // upstream connection is closed once idle for `UPSTREAM_IDLE`, well before
                // the instance would close it under a request.
                let idle_until = self.up.as_ref().map(|up| up.since + UPSTREAM_IDLE);
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return Next::Done,
                    () = tokio::time::sleep_until(idle_until.unwrap_or_else(Instant::now)),
                        if idle_until.is_some() => {
                        self.up = None;
                        continue;
                    }
                    r = read_more(self.client, &mut self.cbuf) => r,
                }
            } else {
                read_more(self.client, &mut self.cbuf).await
            };
            match read {
                Ok(0) | Err(_) => return Next::Done,
                Ok(_) => {}
            }
        }
    }

    /// The live instance, with this request counted on it; any other state of the service is
    /// the hyper path's to answer (it waits while starting, and renders the pages).
    fn live(&self) -> Option<InFlight> {
        match &*self.proxy.switch.tx.borrow() {
            Target::Live(upstream) => Some(upstream.enter()),
            _ => None,
        }
    }

    /// The upstream connection to use for `upstream`: the kept one if it goes there, is
    /// recent and still open, else a new one. Whether it was reused.
    async fn upstream_for(&mut self, upstream: &Arc<Upstream>) -> Result<bool, String> {
        if let Some(up) = &self.up {
            let mut probe = [0u8; 1];
            let usable = Arc::ptr_eq(&up.upstream, upstream)
                && up.since.elapsed() < UPSTREAM_IDLE
                && up.buf.is_empty()
                // Open and quiet: nothing to read, no end of stream.
                && matches!(up.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            if usable {
                return Ok(true);
            }
        }
        self.up = None;
        let stream = connect(upstream.addr()).await.map_err(|e| e.to_string())?;
        self.up = Some(Up {
            stream,
            upstream: upstream.clone(),
            since: Instant::now(),
            buf: Vec::with_capacity(CHUNK),
        });
        Ok(false)
    }

    /// Forwards one request (its head already in `req_out`) and its response. `Ok(true)`: the
    /// connection goes on.
    async fn forward(&mut self, head: RequestHead, in_flight: InFlight) -> Result<bool, ()> {
        let upstream = in_flight.upstream().clone();
        let buffered = self.cbuf.len() - head.len;
        let body_now = usize::try_from(head.body).map_or(buffered, |b| b.min(buffered));
        self.req_out
            .extend_from_slice(&self.cbuf[head.len..head.len + body_now]);
        self.cbuf.drain(..head.len + body_now);
        let mut body_left = head.body - body_now as u64;
        // Sent twice only if it cannot have been acted on: the kept connection turned out to
        // be closed (an instance closing an idle connection) before any answer, and the whole
        // request is still at hand.
        let mut retry = head.idempotent && body_left == 0;
        let failure = loop {
            let reused = match self.upstream_for(&upstream).await {
                Ok(reused) => reused,
                Err(e) => break Failed::Answer(format!("did not answer: {e}")),
            };
            let up = self.up.as_mut().expect("just set");
            let mut answered = match up.stream.write_all(&self.req_out).await {
                Ok(()) if body_left > 0 => {
                    // The rest of the body streams through; from here on there is no retry.
                    retry = false;
                    match copy_exact(self.client, &mut up.stream, body_left, &mut self.cbuf).await {
                        Ok(()) => {
                            body_left = 0;
                            read_response_head(up, &head, &mut self.resp_out).await
                        }
                        Err(Copy::Read) => return Err(()),
                        // Part of the body is gone: answer, and end the connection.
                        Err(Copy::Write) => break Failed::Close,
                    }
                }
                Ok(()) => read_response_head(up, &head, &mut self.resp_out).await,
                Err(_) => Err(()),
            };
            // Interim responses (103 Early Hints, ...) are passed on as they come.
            while let Ok(resp) = &answered
                && resp.status < 200
            {
                // The instance is answering: never sent twice from here on.
                retry = false;
                let up = self.up.as_mut().expect("a response came from it");
                up.buf.drain(..resp.len);
                if self.client.write_all(&self.resp_out).await.is_err() {
                    return Err(());
                }
                answered = read_response_head(up, &head, &mut self.resp_out).await;
            }
            // Nothing at all came back: the instance cannot have started to answer.
            let silent = self.up.as_ref().is_some_and(|up| up.buf.is_empty());
            match answered {
                Ok(resp) => return self.respond(resp, in_flight).await,
                Err(()) if reused && retry && silent => retry = false,
                Err(()) => {
                    break Failed::Answer(
                        "did not answer: the connection closed before a response".to_owned(),
                    );
                }
            }
            self.up = None;
        };
        // The instance is no longer counted on for this request once the 502 is written.
        self.up = None;
        drop(in_flight);
        let addr = upstream.addr();
        match failure {
            Failed::Answer(why) => {
                self.drain_and_fail(&head, body_left, &format!("The instance at {addr} {why}"))
                    .await
            }
            Failed::Close => {
                let detail = format!(
                    "The instance at {addr} closed the connection while the request body was \
                     being sent"
                );
                let close = RequestHead {
                    close: true,
                    ..head
                };
                self.fail(&close, &detail).await?;
                Ok(false)
            }
        }
    }

    /// Answers 502 once the rest of the request body is read (and dropped), so the connection
    /// stays usable.
    async fn drain_and_fail(
        &mut self,
        head: &RequestHead,
        body_left: u64,
        detail: &str,
    ) -> Result<bool, ()> {
        let mut sink = tokio::io::sink();
        if body_left > 0 {
            copy_exact(self.client, &mut sink, body_left, &mut self.cbuf)
                .await
                .map_err(drop)?;
        }
        self.fail(head, detail).await?;
        Ok(!head.close)
    }

    /// Answers 502 with the proxy's page.
    async fn fail(&mut self, head: &RequestHead, detail: &str) -> Result<(), ()> {
        use std::io::Write;
        let html = self.proxy.failure_page(detail);
        let out = &mut self.resp_out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html; charset=utf-8\r\ncache-control: no-store\r\n");
        let _ = write!(out, "content-length: {}\r\n", html.len());
        if head.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head.head_method {
            out.extend_from_slice(html.as_bytes());
        }
        self.client.write_all(&self.resp_out).await.map_err(drop)
    }

    /// Sends the response whose head is at the start of the upstream buffer (and rewritten in
    /// `resp_out`), and its body.
    async fn respond(&mut self, resp: ResponseHead, in_flight: InFlight) -> Result<bool, ()> {
        let up = self.up.as_mut().expect("a response came from it");
        let mut framing = resp.framing;
        // The head, then as much of the body as was read with it: one write.
        up.buf.drain(..resp.len);
        let now = framing.take(&up.buf).map_err(drop)?;
        self.resp_out.extend_from_slice(&up.buf[..now]);
        up.buf.drain(..now);
        self.client.write_all(&self.resp_out).await.map_err(drop)?;
        // The rest of the body.
        loop {
            if framing.done() {
                break;
            }
            up.buf.clear();
            let n = match read_more(&mut up.stream, &mut up.buf).await {
                Ok(0) if matches!(framing, Framing::UntilClose) => break,
                Ok(0) | Err(_) => {
                    // Cut short: the client must see the response end abnormally.
                    self.up = None;
                    return Err(());
                }
                Ok(n) => n,
            };
            let used = framing.take(&up.buf[..n]).map_err(drop)?;
            self.client.write_all(&up.buf[..used]).await.map_err(drop)?;
            up.buf.drain(..used);
        }
        drop(in_flight);
        if resp.close || matches!(framing, Framing::UntilClose) || !up.buf.is_empty() {
            self.up = None;
        } else {
            up.since = Instant::now();
        }
        if resp.close_client {
            let _ = self.client.shutdown().await;
            return Ok(false);
        }
        Ok(true)
    }
}

/// Writes the head of `req` as it goes to the instance at `addr` into `out`: hop-by-hop
/// headers out, `X-Forwarded-For` (appending the client), `-Proto` and `-Host` set, and `Host`
/// if the client left it out.
fn write_request_head(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    peer_ip: &str,
    addr: std::net::SocketAddr,
) {
    use std::io::Write;
    out.clear();
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = &*req.headers;
    let named = names_hops(headers);
    let mut host = None;
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    for h in headers {
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(h.value);
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") {
            host = Some(h.value);
        }
        if hop_by_hop(headers, named, h.name)
            || h.name.eq_ignore_ascii_case("x-forwarded-proto")
            || h.name.eq_ignore_ascii_case("x-forwarded-host")
        {
            continue;
        }
        header_line(out, h.name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in forwarded_for {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer_ip.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    match host {
        Some(host) => header_line(out, b"x-forwarded-host", host),
        // HTTP/1.1 requires it; an instance may rely on it.
        None => {
            let _ = write!(out, "host: {addr}\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the response head `resp` as the client gets it: HTTP/1.1 whatever the instance speaks
/// (HTTP/1.0 servers such as Python's http.server; the framing kept is what keeps that right),
/// hop-by-hop headers out except a `Transfer-Encoding` whose chunked framing is passed on as it
/// is, and `Connection: close` if the client connection ends after it.
fn write_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    status: u16,
    chunked: bool,
    close: bool,
) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = &*resp.headers;
    let named = names_hops(headers);
    for h in headers {
        let keep_te = chunked && h.name.eq_ignore_ascii_case("transfer-encoding");
        if hop_by_hop(headers, named, h.name) && !keep_te
            // A length beside chunked framing is wrong, and the framing wins.
            || chunked && h.name.eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        header_line(out, h.name.as_bytes(), h.value);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: value\r\n`.
fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads what is there into the spare room of `buf` (growing it by up to `CHUNK`).
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.reserve(CHUNK);
    stream.read_buf(buf).await
}

enum Copy {
    Read,
    Write,
}

/// Copies exactly `n` bytes from `from` to `to` through `buf` (which must be empty, and is
/// left empty), never reading beyond them.
async fn copy_exact<W: tokio::io::AsyncWrite + Unpin>(
    from: &mut TcpStream,
    to: &mut W,
    mut n: u64,
    buf: &mut Vec<u8>,
) -> Result<(), Copy> {
    debug_assert!(buf.is_empty());
    while n > 0 {
        buf.clear();
        let want = usize::try_from(n).map_or(CHUNK, |n| n.min(CHUNK));
        buf.reserve(want);
        match (&mut *from).take(want as u64).read_buf(buf).await {
            Ok(0) | Err(_) => return Err(Copy::Read),
            Ok(got) => {
                to.write_all(&buf[..got]).await.map_err(|_| Copy::Write)?;
                n -= got as u64;
            }
        }
    }
    buf.clear();
    Ok(())
}

/// What a response head says about its message.
struct ResponseHead {
    /// Length of the head at the start of the upstream buffer.
    len: usize,
    status: u16,
    /// How its body ends (no body for a HEAD request, 204, 304 or an interim response).
    framing: Framing,
    /// The instance closes the connection after it.
    close: bool,
    /// The client connection ends after it.
    close_client: bool,
}

/// Reads a response head (final or interim) into the start of `up.buf`, and writes it as the
/// client gets it into `out`. `Err`: the connection ended or failed before a head, or the head
/// is not one we can pass on (`out` is then left as it was).
async fn read_response_head(
    up: &mut Up,
    req: &RequestHead,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, ()> {
    loop {
        if !up.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&up.buf) {
                Ok(httparse::Status::Complete(len)) => return response_head(&resp, len, req, out),
                Ok(httparse::Status::Partial) if up.buf.len() < MAX_HEAD => {}
                _ => return Err(()),
            }
        }
        match read_more(&mut up.stream, &mut up.buf).await {
            Ok(0) | Err(_) => return Err(()),
            Ok(_) => {}
        }
    }
}

fn response_head(
    resp: &httparse::Response<'_, '_>,
    len: usize,
    req: &RequestHead,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, ()> {
    let status = resp.code.ok_or(())?;
    if !(100..600).contains(&status) || status == 101 {
        // Switching protocols was not asked for: requests that ask go the hyper way.
        return Err(());
    }
    let headers = &*resp.headers;
    // HTTP/1.0 closes unless asked to keep the connection.
    let close = if resp.version == Some(1) {
        connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"close"))
    } else {
        !connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"keep-alive"))
    };
    let te = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .next_back();
    let framing = if let Some(last) = te {
        if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::UntilClose
        }
    } else {
        match only(headers, "content-length")? {
            Some(v) => Framing::Length(parse_length(v).ok_or(())?),
            None => Framing::UntilClose,
        }
    };
    let interim = status < 200;
    let framing = if interim || req.head_method || status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        framing
    };
    // The end of the body is the end of the connection, on both sides.
    let close_client = !interim && (req.close || matches!(framing, Framing::UntilClose));
    out.clear();
    let chunked = matches!(framing, Framing::Chunked(_));
    write_response_head(out, resp, status, chunked, close_client);
    Ok(ResponseHead {
        len,
        status,
        framing,
        close,
        close_client,
    })
}

/// Why a request got no answer from its instance.
enum Failed {
    /// The client gets a 502 saying the instance `…` (the rest of the sentence).
    Answer(String),
    /// The instance closed while the body was being sent: a 502, then the connection ends.
    Close,
}

/// How the end of a response body is found.
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// The instance closes the connection at the end.
    UntilClose,
}

impl Framing {
    /// How many of `bytes` (the next bytes from the instance) belong to the body.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        Ok(match self {
            Framing::Length(left) => {
                let n = usize::try_from(*left).map_or(bytes.len(), |l| l.min(bytes.len()));
                *left -= n as u64;
                n
            }
            Framing::Chunked(c) => c.take(bytes)?,
            Framing::UntilClose => bytes.len(),
        })
    }

    fn done(&self) -> bool {
        match self {
            Framing::Length(left) => *left == 0,
            Framing::Chunked(c) => c.done(),
            Framing::UntilClose => false,
        }
    }
}

#[derive(Debug)]
pub(super) struct ChunkError;

/// Finds the end of a chunked body as it streams by (the bytes themselves are passed on as
/// they are): sizes, extensions, data, the last chunk and trailers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Reading a chunk size: its value so far and whether it has a digit.
    #[default]
    Size0,
    Size(u64),
    /// After the size: an extension, up to the end of the line.
    Ext(u64),
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// At the start of a trailer line (or of the final empty line).
    Trailer,
    TrailerLine,
    Done,
}

impl Chunked {
    /// How many of `bytes` belong to the body; stops at its end.
    pub(super) fn take(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < bytes.len() && *self != Chunked::Done {
            let b = bytes[i];
            match *self {
                Chunked::Size0 | Chunked::Size(_) => {
                    let n = if let Chunked::Size(n) = *self { n } else { 0 };
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let d = (b as char).to_digit(16).expect("a hex digit");
                            let n = n.checked_mul(16).ok_or(ChunkError)? + u64::from(d);
                            *self = Chunked::Size(n);
                        }
                        b';' | b' ' | b'\t' if matches!(self, Chunked::Size(_)) => {
                            *self = Chunked::Ext(n)
                        }
                        b'\r' if matches!(self, Chunked::Size(_)) => *self = Chunked::Ext(n),
                        b'\n' if matches!(self, Chunked::Size(_)) => {
                            *self = if n == 0 {
                                Chunked::Trailer
                            } else {
                                Chunked::Data(n)
                            }
                        }
                        _ => return Err(ChunkError),
                    }
                    i += 1;
                }
                Chunked::Ext(n) => {
                    if b == b'\n' {
                        *self = if n == 0 {
                            Chunked::Trailer
                        } else {
                            Chunked::Data(n)
                        };
                    }
                    i += 1;
                }
                Chunked::Data(left) => {
                    let n =
                        usize::try_from(left).map_or(bytes.len() - i, |l| l.min(bytes.len() - i));
                    i += n;
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                }
                Chunked::DataEnd => {
                    match b {
                        b'\r' => {}
                        b'\n' => *self = Chunked::Size0,
                        _ => return Err(ChunkError),
                    }
                    i += 1;
                }
                Chunked::Trailer => {
                    match b {
                        b'\r' => {}
                        b'\n' => *self = Chunked::Done,
                        _ => *self = Chunked::TrailerLine,
                    }
                    i += 1;
                }
                Chunked::TrailerLine => {
                    if b == b'\n' {
                        *self = Chunked::Trailer;
                    }
                    i += 1;
                }
                Chunked::Done => unreachable!(),
            }
        }
        Ok(i)
    }

    pub(super) fn done(&self) -> bool {
        *self == Chunked::Done
    }
}

/// A client connection handed to the hyper path: first the bytes the fast path read, then the
/// socket.
pub(super) struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    stream: TcpStream,
}

impl Prefixed {
    pub(super) fn new(prefix: Vec<u8>, stream: TcpStream) -> Prefixed {
        Prefixed {
            prefix,
            at: 0,
            stream,
        }
    }
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n";

    #[test]
    fn chunked_ends_where_the_body_ends_however_it_is_split() {
        let mut stream = BODY.to_vec();
        stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..stream.len() {
            let mut c = Chunked::default();
            let a = c.take(&stream[..split]).unwrap();
            assert_eq!(a, split.min(BODY.len()), "split at {split}");
            let b = c.take(&stream[split..]).unwrap();
            assert_eq!(a + b, BODY.len(), "split at {split}");
            assert!(c.done());
        }
        // Byte by byte.
        let mut c = Chunked::default();
        let mut n = 0;
        for b in &stream {
            n += c.take(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(n, BODY.len());
    }

    #[test]
    fn chunked_without_trailers_and_bad_sizes() {
        let mut c = Chunked::default();
        assert_eq!(c.take(b"3\r\nabc\r\n0\r\n\r\nrest").unwrap(), 13);
        assert!(c.done());
        assert!(Chunked::default().take(b"x\r\n").is_err());
        assert!(Chunked::default().take(b"\r\n").is_err());
        assert!(Chunked::default().take(b"ffffffffffffffffff\r\n").is_err());
        assert!(Chunked::default().take(b"3\r\nabcX").is_err());
    }
}
