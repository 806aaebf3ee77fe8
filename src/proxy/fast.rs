//! The common case forwarded without hyper: HTTP/1.1 requests with no body or a
//! `Content-Length` one, to a live instance, with the responses' framing (length, chunked or
//! until close) decided here and written as it was decided.
//!
//! hyper parses each message into a `Request`/`Response` with a header map, then writes it out
//! again with its own framing, on both sides of the proxy: on two cores that cost as much CPU
//! per request as the instance itself, and made the proxy the bottleneck. Here a request is
//! parsed in place (`httparse`), its head rewritten into one buffer (what [`policy`] leaves out
//! left out, `X-Forwarded-*` in), and bodies are copied in chunks, never held whole.
//!
//! Anything else on a connection (an upgrade, `Expect`, a chunked, HTTP/1.0 or large request,
//! an absolute-form target, a request the policy refuses, the service starting or down, a head
//! that does not parse) hands the connection, with what was read of it, to the hyper path for
//! the rest of its life.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::chunked::{ChunkError, Chunked};
use super::policy::{self, Failure, Timeouts, UPSTREAM_IDLE};
use super::switch::{InFlight, Upstream};
use super::{Proxy, connect};

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
/// The answer to a head that did not arrive in time.
const HEAD_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// How serving a connection here ended.
pub(super) enum Outcome {
    /// The connection is finished (closed by either side, failed, timed out, or the proxy
    /// stops).
    Done,
    /// The hyper path takes over; these bytes were read from the client and not handled.
    HandOver(Vec<u8>),
}

/// One client connection's state on the fast path.
struct Conn<'a> {
    proxy: &'a Proxy,
    client: &'a mut TcpStream,
    peer_ip: &'a str,
    timeouts: Timeouts,
    /// Bytes read from the client and not handled yet.
    cbuf: Vec<u8>,
    /// When the last response ended (or the connection opened).
    idle_since: Instant,
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
    /// The method is safe to send twice (see [`policy::retry`]).
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
        timeouts: proxy.timeouts,
        cbuf: Vec::with_capacity(CHUNK),
        idle_since: Instant::now(),
        up: None,
        req_out: Vec::with_capacity(1024),
        resp_out: Vec::with_capacity(1024),
    };
    loop {
        match conn.next_request(stop).await {
            Next::Done => return Outcome::Done,
            Next::HandOver => return Outcome::HandOver(std::mem::take(&mut conn.cbuf)),
            Next::Request(head, in_flight) => match conn.forward(head, in_flight).await {
                Ok(true) => conn.idle_since = Instant::now(),
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

/// The values of every header `name`.
fn all<'h>(headers: &'h [httparse::Header<'h>], name: &'h str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The tokens of every `Connection` header.
fn connection_tokens<'h>(headers: &'h [httparse::Header<'h>]) -> impl Iterator<Item = &'h [u8]> {
    policy::tokens(all(headers, "connection"))
}

/// The headers a message's `Connection` header names, found once per message rather than for
/// each of its headers. Tokens that are hop-by-hop anyway, or `close`, are not kept: the common
/// `Connection: keep-alive` names nothing more.
struct Named<'h> {
    tokens: [&'h [u8]; 8],
    len: usize,
    /// More than fit: every header is looked for in the `Connection` header itself.
    overflow: bool,
}

impl<'h> Named<'h> {
    fn of(headers: &'h [httparse::Header<'h>]) -> Named<'h> {
        let mut named = Named {
            tokens: [&[][..]; 8],
            len: 0,
            overflow: false,
        };
        for t in connection_tokens(headers) {
            if t.eq_ignore_ascii_case(b"close") || policy::leaves_out(t, std::iter::empty()) {
                continue;
            }
            if named.len == named.tokens.len() {
                named.overflow = true;
                break;
            }
            named.tokens[named.len] = t;
            named.len += 1;
        }
        named
    }

    /// Whether the header `name` stays out ([`policy::leaves_out`], or
    /// [`policy::leaves_out_of_request`] for a `request`).
    fn leaves_out(&self, headers: &'h [httparse::Header<'h>], name: &str, request: bool) -> bool {
        let name = name.as_bytes();
        let kept = self.tokens[..self.len].iter().copied();
        match (self.overflow, request) {
            (true, true) => policy::leaves_out_of_request(name, connection_tokens(headers)),
            (true, false) => policy::leaves_out(name, connection_tokens(headers)),
            (false, true) => policy::leaves_out_of_request(name, kept),
            (false, false) => policy::leaves_out(name, kept),
        }
    }
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 19 {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The request head's facts, or `None` for anything the hyper path handles (which answers
/// what the policy refuses).
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
    // The first two `Host`s: one is right, two are refused.
    let mut hosts: [Option<&[u8]>; 2] = [None; 2];
    for h in headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("transfer-encoding")
            || n.eq_ignore_ascii_case("upgrade")
            || n.eq_ignore_ascii_case("expect")
        {
            return None;
        }
        if n.eq_ignore_ascii_case("host") {
            let slot = if hosts[0].is_none() { 0 } else { 1 };
            hosts[slot] = Some(h.value);
        }
    }
    let hosts = hosts.into_iter().flatten();
    policy::check_request(method.as_bytes(), true, hosts).ok()?;
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
        idempotent: policy::idempotent(method.as_bytes()),
    })
}

impl Conn<'_> {
    /// Reads the next request head, decides whether it is ours, and routes it.
    async fn next_request(&mut self, stop: &CancellationToken) -> Next {
        // When the first byte of this head came.
        let mut head_since = (!self.cbuf.is_empty()).then(Instant::now);
        loop {
            if !self.cbuf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&self.cbuf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let Some(head) = classify(&req, len) else {
                            return Next::HandOver;
                        };
                        let Some(in_flight) = self.proxy.switch.live() else {
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
            let read = if let Some(since) = head_since {
                let deadline = since + self.timeouts.head;
                match tokio::time::timeout_at(deadline, read_more(self.client, &mut self.cbuf))
                    .await
                {
                    Ok(read) => read,
                    Err(_) => {
                        let _ = self.client.write_all(HEAD_TIMEOUT).await;
                        return Next::Done;
                    }
                }
            } else {
                // Between requests the proxy may stop (within one it finishes it), the client
                // connection ends once idle too long, and the upstream connection is closed
                // once idle for `UPSTREAM_IDLE`, well before the instance would close it under
                // a request.
                // One timer for both: one registration per request, not two.
                let up_until = self.up.as_ref().map(|up| up.since + UPSTREAM_IDLE);
                let client_until = self.idle_since + self.timeouts.idle;
                let until = up_until.map_or(client_until, |u| u.min(client_until));
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return Next::Done,
                    () = tokio::time::sleep_until(until) => {
                        if Instant::now() >= client_until {
                            return Next::Done;
                        }
                        self.up = None;
                        continue;
                    }
                    r = read_more(self.client, &mut self.cbuf) => r,
                }
            };
            match read {
                Ok(0) | Err(_) => return Next::Done,
                Ok(_) => {
                    head_since.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    /// The upstream connection to use for `upstream`: the kept one if it goes there, is
    /// recent and still open, else a new one. Whether it was reused.
    async fn upstream_for(&mut self, upstream: &Arc<Upstream>) -> Result<bool, Failure> {
        if let Some(up) = &self.up {
            let mut probe = [0u8; 1];
            let usable = Arc::ptr_eq(&up.upstream, upstream)
                && policy::fresh(up.since)
                && up.buf.is_empty()
                // Open and quiet: nothing to read, no end of stream.
                && matches!(up.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            if usable {
                return Ok(true);
            }
        }
        self.up = None;
        let stream = connect(upstream.addr()).await?;
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
        let stall = self.timeouts.body_stall;
        // A retry needs the whole request at hand: no body left to stream from the client.
        let mut replayable = body_left == 0;
        let failure = loop {
            let reused = match self.upstream_for(&upstream).await {
                Ok(reused) => reused,
                Err(e) => break e,
            };
            let up = self.up.as_mut().expect("just set");
            let mut answered = match up.stream.write_all(&self.req_out).await {
                Ok(()) if body_left > 0 => {
                    // The rest of the body streams through; from here on there is no retry.
                    replayable = false;
                    match copy_exact(
                        self.client,
                        &mut up.stream,
                        body_left,
                        &mut self.cbuf,
                        stall,
                    )
                    .await
                    {
                        Ok(()) => {
                            body_left = 0;
                            read_response_head(up, &head, &mut self.resp_out).await
                        }
                        Err(Copy::Read) => return Err(()),
                        // Part of the body is gone: answer, and end the connection.
                        Err(Copy::Write) => break Failure::ClosedDuringBody,
                    }
                }
                Ok(()) => read_response_head(up, &head, &mut self.resp_out).await,
                Err(_) => Err(Failure::Closed),
            };
            // Interim responses (103 Early Hints, ...) are passed on as they come.
            while let Ok(resp) = &answered
                && resp.status < 200
            {
                // The instance is answering: never sent twice from here on.
                replayable = false;
                let up = self.up.as_mut().expect("a response came from it");
                up.buf.drain(..resp.len);
                if self.client.write_all(&self.resp_out).await.is_err() {
                    return Err(());
                }
                answered = read_response_head(up, &head, &mut self.resp_out).await;
            }
            let failure = match answered {
                Ok(resp) => return self.respond(resp, in_flight).await,
                Err(failure) => failure,
            };
            let attempt = policy::Attempt {
                reused,
                // Nothing at all came back: the instance cannot have started to answer.
                silent: self.up.as_ref().is_some_and(|up| up.buf.is_empty())
                    && matches!(failure, Failure::Closed),
                replayable,
                // Written to a socket that may have been closed already: it may have arrived.
                unsent: false,
                idempotent: head.idempotent,
            };
            if !policy::retry(attempt) {
                break failure;
            }
            replayable = false;
            self.up = None;
        };
        // The instance is no longer counted on for this request once the 502 is written.
        self.up = None;
        drop(in_flight);
        let addr = upstream.addr();
        let page = self.proxy.failure_page(addr, &failure);
        // The connection to the client stays usable when the policy says so: its request was
        // read whole, or is read to its end now.
        match failure.keeps_client() {
            true => {
                if body_left > 0 {
                    let mut sink = tokio::io::sink();
                    copy_exact(self.client, &mut sink, body_left, &mut self.cbuf, stall)
                        .await
                        .map_err(drop)?;
                }
                self.fail(&head, &page).await?;
                Ok(!head.close)
            }
            // Part of the body is gone, or the instance said something the proxy cannot
            // read: a 502, and the connection ends.
            false => {
                let close = RequestHead {
                    close: true,
                    ..head
                };
                self.fail(&close, &page).await?;
                let _ = self.client.shutdown().await;
                Ok(false)
            }
        }
    }

    /// Answers 502 with the proxy's page.
    async fn fail(&mut self, head: &RequestHead, html: &str) -> Result<(), ()> {
        use std::io::Write;
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

/// Writes the head of `req` as it goes to the instance at `addr` into `out`: what the policy
/// leaves out left out, `X-Forwarded-For` (appending the client), `-Proto` and `-Host` set.
/// The request passed [`policy::check_request`] (in [`classify`]): one valid `Host`.
fn write_request_head(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    peer_ip: &str,
    addr: std::net::SocketAddr,
) {
    out.clear();
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = &*req.headers;
    let named = Named::of(headers);
    let mut host = None;
    let mut forwarded_for = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = true;
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") {
            host = Some(h.value);
        }
        if named.leaves_out(headers, h.name, true) {
            continue;
        }
        header_line(out, h.name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if forwarded_for {
        policy::forwarded_for(out, all(headers, "x-forwarded-for"), peer_ip.as_bytes());
    } else {
        out.extend_from_slice(peer_ip.as_bytes());
    }
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(policy::FORWARDED_PROTO);
    out.extend_from_slice(b"\r\n");
    match host {
        Some(host) => header_line(out, b"x-forwarded-host", host),
        None => header_line(out, b"host", policy::default_host(addr).as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the response head `resp` as the client gets it: HTTP/1.1 whatever the instance speaks
/// (HTTP/1.0 servers such as Python's http.server), the headers the policy leaves out left
/// out, and the framing as decided in `framing`, whatever the instance's framing headers said:
/// its `Transfer-Encoding` for a chunked body, a `Content-Length` of ours for a length, neither
/// (and `Connection: close`) for a body that ends with the connection. A body-less response
/// keeps the instance's length, which describes the resource (HEAD, 304).
fn write_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    status: u16,
    framing: &Framing,
    bodyless: bool,
    close: bool,
) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = &*resp.headers;
    let named = Named::of(headers);
    let chunked = matches!(framing, Framing::Chunked(_));
    for h in headers {
        let te = h.name.eq_ignore_ascii_case("transfer-encoding");
        let cl = h.name.eq_ignore_ascii_case("content-length");
        let keep = if te {
            chunked
        } else if cl {
            bodyless && status != 204 && status >= 200
        } else {
            !named.leaves_out(headers, h.name, false)
        };
        if keep {
            header_line(out, h.name.as_bytes(), h.value);
        }
    }
    if let (Framing::Length(n), false) = (framing, bodyless) {
        let _ = write!(out, "content-length: {n}\r\n");
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
    /// The client closed, failed, or sent nothing for `stall`.
    Read,
    Write,
}

/// Copies exactly `n` bytes from `from` to `to` through `buf` (which must be empty, and is
/// left empty), never reading beyond them; each read waits at most `stall`.
async fn copy_exact<W: tokio::io::AsyncWrite + Unpin>(
    from: &mut TcpStream,
    to: &mut W,
    mut n: u64,
    buf: &mut Vec<u8>,
    stall: std::time::Duration,
) -> Result<(), Copy> {
    debug_assert!(buf.is_empty());
    while n > 0 {
        buf.clear();
        let want = usize::try_from(n).map_or(CHUNK, |n| n.min(CHUNK));
        buf.reserve(want);
        let mut limited = (&mut *from).take(want as u64);
        match tokio::time::timeout(stall, limited.read_buf(buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => return Err(Copy::Read),
            Ok(Ok(got)) => {
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
) -> Result<ResponseHead, Failure> {
    loop {
        if !up.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&up.buf) {
                Ok(httparse::Status::Complete(len)) => return response_head(&resp, len, req, out),
                Ok(httparse::Status::Partial) if up.buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(Failure::BadResponse("a head over 64 KiB".to_owned()));
                }
                Err(e) => return Err(Failure::BadResponse(e.to_string())),
            }
        }
        match read_more(&mut up.stream, &mut up.buf).await {
            Ok(0) | Err(_) if up.buf.is_empty() => return Err(Failure::Closed),
            Ok(0) | Err(_) => {
                return Err(Failure::BadResponse(
                    "the connection closed in the middle of a head".to_owned(),
                ));
            }
            Ok(_) => {}
        }
    }
}

fn response_head(
    resp: &httparse::Response<'_, '_>,
    len: usize,
    req: &RequestHead,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, Failure> {
    let bad = |why: &str| Failure::BadResponse(why.to_owned());
    let status = resp.code.ok_or_else(|| bad("no status"))?;
    if !(100..600).contains(&status) {
        return Err(bad("a status out of range"));
    }
    if status == 101 {
        // Requests that ask to switch protocols go the hyper way.
        return Err(Failure::UnaskedUpgrade);
    }
    let headers = &*resp.headers;
    // HTTP/1.0 closes unless asked to keep the connection.
    let close = if resp.version == Some(1) {
        connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"close"))
    } else {
        !connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"keep-alive"))
    };
    // RFC 9112 6.3: a Transfer-Encoding wins over a Content-Length; chunked must be the last
    // coding, else the body ends with the connection.
    let te = policy::tokens(all(headers, "transfer-encoding")).last();
    let framing = if let Some(last) = te {
        if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::UntilClose
        }
    } else {
        let length = only(headers, "content-length").map_err(|()| bad("two Content-Lengths"))?;
        match length {
            Some(v) => Framing::Length(parse_length(v).ok_or_else(|| bad("a bad Content-Length"))?),
            None => Framing::UntilClose,
        }
    };
    let interim = status < 200;
    let bodyless = interim || req.head_method || status == 204 || status == 304;
    let framing = if bodyless {
        Framing::Length(0)
    } else {
        framing
    };
    // The end of the body is the end of the connection, on both sides.
    let close_client = !interim && (req.close || matches!(framing, Framing::UntilClose));
    out.clear();
    write_response_head(out, resp, status, &framing, bodyless, close_client);
    Ok(ResponseHead {
        len,
        status,
        framing,
        close,
        close_client,
    })
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
