//! The hyper path: every request the fast path leaves (upgrades, chunked or large bodies,
//! `Expect`, HTTP/1.0, the service starting or down), served and forwarded through hyper.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::client_io::{Active, Activity, ClientIo};
use super::page::error_page;
use super::policy::{self, Failure, UPSTREAM_IDLE};
use super::switch::{InFlight, Route, Tunnel, Upstream};
use super::wake::{LocalWake, SERVER, UPSTREAMS};
use super::{Proxy, SHUTDOWN_GRACE, connect};

/// An upstream HTTP/1.1 connection as driven by its client connection's task.
type UpstreamConn = client::Connection<TokioIo<TcpStream>, ClientBody>;

/// One client connection: its peer and its upstream connections.
struct Downstream {
    /// The client's IP, for `X-Forwarded-For`.
    peer_ip: HeaderValue,
    /// The waker of the part of the connection task that drives the upstream connections
    /// (see [`LocalWake`]).
    waker: Waker,
    upstreams: Mutex<Upstreams>,
    /// What the connection is doing, for the client timeouts in [`ClientIo`].
    activity: Arc<Activity>,
}

/// The upstream side of one client connection. HTTP/1 serves one request at a time, so one
/// upstream connection is in use at a time; older ones stay here until they are done.
struct Upstreams {
    /// The connection for the next request, when it is not in use.
    idle: Option<IdleConn>,
    /// Every upstream connection still open: the idle or in-use one and any being let go.
    conns: Vec<Pin<Box<UpstreamConn>>>,
    /// Fires when `idle` may have been idle for `UPSTREAM_IDLE`; made on first use.
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer is set and wakes the upstream part when it fires.
    timer_armed: bool,
}

/// An upstream connection no request holds (the last response may still be streaming on it:
/// `ready` waits for that), and the instance it is bound to.
struct IdleConn {
    upstream: Arc<Upstream>,
    sender: client::SendRequest<ClientBody>,
    /// When its last response arrived.
    since: Instant,
}

impl Downstream {
    fn new(peer: SocketAddr, waker: Waker, activity: Arc<Activity>) -> Downstream {
        let ip = peer.ip().to_string();
        Downstream {
            peer_ip: HeaderValue::from_str(&ip).expect("an IP address is a valid header value"),
            waker,
            upstreams: Mutex::new(Upstreams {
                idle: None,
                conns: Vec::new(),
                timer: None,
                timer_armed: false,
            }),
            activity,
        }
    }

    fn upstreams(&self) -> MutexGuard<'_, Upstreams> {
        // Nothing panics while holding it; recover anyway rather than poison the connection.
        self.upstreams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives the upstream connections and closes the idle one once it has been idle for
    /// `UPSTREAM_IDLE`. Called whenever that part of the connection task was woken.
    fn poll_upstreams(&self) {
        let cx = &mut Context::from_waker(&self.waker);
        let mut guard = self.upstreams();
        let ups = &mut *guard;
        if !ups.conns.is_empty() {
            ups.conns
                .retain_mut(|conn| conn.as_mut().poll(cx).is_pending());
        }
        // `timer_armed`: the timer is set and will wake this part when it fires.
        if ups.timer_armed
            && let Some(timer) = &mut ups.timer
            && timer.as_mut().poll(cx).is_ready()
        {
            ups.timer_armed = false;
        }
        // Armed at most once per `UPSTREAM_IDLE`, not on every request: when it fires early
        // (the connection was used since), it is set again for the new deadline.
        if ups.timer_armed {
            return;
        }
        let Some(idle) = &ups.idle else {
            return;
        };
        let deadline = idle.since + UPSTREAM_IDLE;
        if Instant::now() >= deadline {
            // Dropping the sender lets the connection close; that wakes this part again.
            ups.idle = None;
            return;
        }
        let timer = ups
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().reset(deadline);
        // Registers the waker; it cannot have fired yet.
        ups.timer_armed = timer.as_mut().poll(cx).is_pending();
        if !ups.timer_armed {
            self.waker.wake_by_ref();
        }
    }

    /// The idle connection, if it goes to `upstream` and is still open; one to another
    /// instance (the target changed) is let go.
    fn take_idle(&self, upstream: &Arc<Upstream>) -> Option<client::SendRequest<ClientBody>> {
        let idle = self.upstreams().idle.take()?;
        (Arc::ptr_eq(&idle.upstream, upstream) && !idle.sender.is_closed()).then_some(idle.sender)
    }

    fn put_idle(&self, upstream: &Arc<Upstream>, sender: client::SendRequest<ClientBody>) {
        if sender.is_closed() {
            return;
        }
        let mut ups = self.upstreams();
        ups.idle = Some(IdleConn {
            upstream: upstream.clone(),
            sender,
            since: Instant::now(),
        });
        if !ups.timer_armed {
            // Have the idle timer set.
            self.waker.wake_by_ref();
        }
    }

    /// A new connection to `addr`, driven by this client connection's task from now on.
    async fn open(&self, addr: SocketAddr) -> Result<client::SendRequest<ClientBody>, Failure> {
        let stream = connect(addr).await?;
        let (sender, conn) = client::handshake(TokioIo::new(stream))
            .await
            .map_err(Failure::Http)?;
        self.upstreams().conns.push(Box::pin(conn));
        self.waker.wake_by_ref();
        Ok(sender)
    }

    /// Sends `req` to `upstream` on this connection's upstream connection (a new one if there
    /// is none for it), and sends it once more on a new connection when the retry rule says so
    /// ([`policy::retry`]).
    async fn send(
        &self,
        upstream: &Arc<Upstream>,
        mut req: Request<ClientBody>,
    ) -> Result<Response<Incoming>, Failure> {
        let idempotent = policy::idempotent(req.method().as_str().as_bytes());
        // What it takes to send it again once it went out whole: only a request without a
        // body is worth (and cheap enough) keeping.
        let copy = (idempotent && req.body().is_end_stream()).then(|| {
            let mut copy = Request::new(ClientBody::Empty);
            *copy.method_mut() = req.method().clone();
            *copy.uri_mut() = req.uri().clone();
            *copy.headers_mut() = req.headers().clone();
            copy
        });
        let mut copy = copy;
        let mut reused = self.take_idle(upstream);
        loop {
            let attempt = policy::Attempt {
                reused: reused.is_some(),
                silent: true,
                replayable: true,
                unsent: true,
                idempotent,
            };
            let mut sender = match reused.take() {
                Some(sender) => sender,
                // Boxed: opening is once per connection, and large.
                None => Box::pin(self.open(upstream.addr())).await?,
            };
            if let Err(e) = sender.ready().await {
                // Closed since it was last used: nothing was sent.
                if policy::retry(attempt) {
                    continue;
                }
                return Err(Failure::Http(e));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // Reusable for the next request once this exchange is done (`ready`).
                    self.put_idle(upstream, sender);
                    return Ok(resp);
                }
                Err(mut e) => {
                    let unsent = e.take_message();
                    let failure = Failure::Http(e.into_error());
                    let sent = policy::Attempt {
                        silent: failure.silent(),
                        replayable: copy.is_some(),
                        unsent: false,
                        ..attempt
                    };
                    req = match (unsent, copy.take()) {
                        (Some(unsent), _) if policy::retry(attempt) => unsent,
                        (None, Some(copy)) if policy::retry(sent) => copy,
                        _ => return Err(failure),
                    };
                }
            }
        }
    }
}

/// Sends an upgrade request on a connection of its own, which becomes the tunnel's upstream
/// side if the instance switches protocols.
async fn send_upgrade(
    addr: SocketAddr,
    req: Request<ClientBody>,
) -> Result<Response<Incoming>, Failure> {
    let stream = connect(addr).await?;
    let (mut sender, conn) = client::handshake(TokioIo::new(stream))
        .await
        .map_err(Failure::Http)?;
    // Ends once the connection is handed to the tunnel, or closed after a refusal.
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await.map_err(Failure::Http)
}

/// Serves a client connection with hyper: everything the fast path leaves to it.
pub(super) async fn serve(
    proxy: Arc<Proxy>,
    stream: ClientIo,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let wake = LocalWake::new();
    let server_waker = wake.waker(SERVER);
    let down = Arc::new(Downstream::new(
        peer,
        wake.waker(UPSTREAMS),
        stream.activity(),
    ));
    let service = {
        let (proxy, down) = (proxy.clone(), down.clone());
        service_fn(move |req| {
            let (proxy, down) = (proxy.clone(), down.clone());
            async move { Ok::<_, Infallible>(proxy.handle(&down, req).await) }
        })
    };
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = pin!(conn);
    let mut stopping = pin!(stop.cancelled());
    let mut stopped = false;
    wake.drive(|| {
        if wake.take(UPSTREAMS) {
            down.poll_upstreams();
        }
        if wake.take(SERVER) {
            let mut cx = Context::from_waker(&server_waker);
            if !stopped && stopping.as_mut().poll(&mut cx).is_ready() {
                // Finish the request in progress, if any, then close; `finish` bounds how
                // long this takes.
                conn.as_mut().graceful_shutdown();
                stopped = true;
            }
            return conn.as_mut().poll(&mut cx).map(drop);
        }
        Poll::Pending
    })
    .await;
}

impl Proxy {
    async fn handle(&self, down: &Arc<Downstream>, req: Request<Incoming>) -> Response<ProxyBody> {
        let active = down.activity.begin();
        let host = match check_request(&req) {
            Ok(host) => host,
            Err(refusal) => {
                let status =
                    StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
                let mut resp = page(status, self.refusal_page(refusal));
                // What follows on the connection cannot be trusted to be a request.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
        match self.switch.route().await {
            Route::Live(in_flight) => self.forward(down, in_flight, req, host, active).await,
            Route::Down { status, body } => page(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                body,
            ),
            Route::Starting { .. } => {
                let body = error_page(
                    &self.service,
                    "starting",
                    "The service is still starting; try again in a moment.",
                    &[],
                );
                let mut resp = page(StatusCode::SERVICE_UNAVAILABLE, body);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                resp
            }
        }
    }

    async fn forward(
        &self,
        down: &Arc<Downstream>,
        in_flight: InFlight,
        mut req: Request<Incoming>,
        host: Option<HeaderValue>,
        active: Active,
    ) -> Response<ProxyBody> {
        let upstream = in_flight.upstream();
        let addr = upstream.addr();
        let upgrade = upgrade_protocol(req.headers());
        // Taken before the request moves on: it resolves to the client's raw connection once
        // our 101 has been written.
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        // Origin form (`/path?query`), as an instance expects from a client.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = match parts.uri.path_and_query() {
                Some(path) => Uri::from(path.clone()),
                None => Uri::from_static("/"),
            };
        }
        // Keep-alive to the instance regardless of what the client speaks.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        // hyper already answers `Expect: 100-continue` to the client when we read the body.
        parts.headers.remove(header::EXPECT);
        if let Some(protocol) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        set_forwarded(&mut parts.headers, &down.peer_ip, host.as_ref());
        let host = host.or_else(|| HeaderValue::from_str(&policy::default_host(addr)).ok());
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        let body = if body.is_end_stream() {
            ClientBody::Empty
        } else {
            active.activity().body_started();
            ClientBody::Client {
                body,
                activity: active.activity().clone(),
            }
        };
        let req = Request::from_parts(parts, body);

        let sent = match client_upgrade {
            Some(_) => Box::pin(send_upgrade(addr, req)).await,
            None => down.send(upstream, req).await,
        };
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(failure) => return self.bad_gateway(addr, &failure),
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return self.bad_gateway(addr, &Failure::UnaskedUpgrade);
            };
            // No client timeouts on a tunnel.
            active.activity().upgraded();
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let shutdown = self.shutdown.clone();
            let counted = Tunnel::enter(&self.tunnels);
            tokio::spawn(async move {
                // The tunnel counts as in flight on this instance until it closes.
                let _in_flight = (in_flight, counted);
                tunnel(client_upgrade, backend_upgrade, shutdown).await;
            });
            let (mut parts, _) = resp.into_parts();
            let protocol = parts.headers.get(header::UPGRADE).cloned();
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(protocol) = protocol {
                parts.headers.insert(header::UPGRADE, protocol);
            }
            return Response::from_parts(parts, ProxyBody::Empty);
        }

        let (mut parts, body) = resp.into_parts();
        // hyper read the body by its Transfer-Encoding, which wins over a Content-Length
        // beside it: that length must not reach the client, which frames by it.
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        strip_hop_by_hop(&mut parts.headers);
        let body = ProxyBody::Upstream {
            body,
            down: down.clone(),
            _in_flight: in_flight,
            _active: active,
        };
        Response::from_parts(parts, body)
    }

    fn bad_gateway(&self, addr: SocketAddr, failure: &Failure) -> Response<ProxyBody> {
        let mut resp = page(StatusCode::BAD_GATEWAY, self.failure_page(addr, failure));
        if !failure.keeps_client() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The method and `Host` rules ([`policy::check_request`]); the `Host` to forward. For a
/// request in absolute form (`GET http://host/path`), the target's authority is the host.
fn check_request(req: &Request<Incoming>) -> Result<Option<HeaderValue>, policy::Refusal> {
    let method = req.method().as_str().as_bytes();
    let http11 = req.version() == Version::HTTP_11;
    if let Some(authority) = req.uri().authority()
        && req.method() != http::Method::CONNECT
    {
        policy::check_request(
            method,
            http11,
            std::iter::once(authority.as_str().as_bytes()),
        )?;
        return Ok(HeaderValue::from_str(authority.as_str()).ok());
    }
    let hosts = req.headers().get_all(header::HOST);
    let host = policy::check_request(method, http11, hosts.iter().map(HeaderValue::as_bytes))?;
    Ok(host.and_then(|h| HeaderValue::from_bytes(h).ok()))
}

/// A request body as it goes to an instance: the client's, read as it comes, or none.
pub(super) enum ClientBody {
    Client {
        body: Incoming,
        /// Told when the body has been read, so that the client's time stops counting.
        activity: Arc<Activity>,
    },
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Client { body, activity } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if matches!(polled, Poll::Ready(None | Some(Err(_)))) || body.is_end_stream() {
                    activity.body_done();
                }
                polled
            }
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Client { body, .. } => body.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Client { body, .. } => body.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        // Not read any further: nothing more is waited for from the client.
        if let ClientBody::Client { activity, .. } = self {
            activity.body_done();
        }
    }
}

/// Copies bytes both ways between an upgraded client connection and its instance until either
/// side closes, or a grace period after the proxy starts shutting down.
async fn tunnel(client: OnUpgrade, backend: OnUpgrade, shutdown: CancellationToken) {
    let copy = async {
        let (Ok(client), Ok(backend)) = tokio::join!(client, backend) else {
            return;
        };
        let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
    };
    let stopped = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        () = copy => {}
        () = stopped => {}
    }
}

/// The body of every response the proxy sends.
enum ProxyBody {
    /// A response body from an instance, which keeps its request counted until it is dropped:
    /// hyper does that once the body has been sent or the client went away.
    Upstream {
        body: Incoming,
        /// The client connection whose upstream connection reads this body.
        down: Arc<Downstream>,
        _in_flight: InFlight,
        /// The request stays in progress on the client connection until its response is done.
        _active: Active,
    },
    /// A page of the proxy's own; taken when sent.
    Page(Option<Bytes>),
    Empty,
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, down, .. } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if polled.is_ready() {
                    return polled;
                }
                // The upstream connection runs in this same task: let it hand over what it has
                // already read (typically the last chunk of a chunked body) before hyper
                // decides to flush, so that a small response leaves in one write, not two.
                down.poll_upstreams();
                Pin::new(body).poll_frame(cx)
            }
            ProxyBody::Page(page) => Poll::Ready(page.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Page(page) => page.is_none(),
            ProxyBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Page(page) => {
                SizeHint::with_exact(page.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Empty => SizeHint::with_exact(0),
        }
    }
}

fn page(status: StatusCode, html: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Page(Some(Bytes::from(html))));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The tokens of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    policy::tokens(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// The `Upgrade` header of a request that asks to switch protocols.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    headers.get(header::UPGRADE).filter(|_| asks).cloned()
}

/// Removes what [`policy::leaves_out`] says: hop-by-hop headers, those `Connection` names
/// (but framing and `Host`), and their look-alikes.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = headers.contains_key(header::CONNECTION);
    // Collected first (they borrow from `headers`); an empty Vec does not allocate.
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str().as_bytes();
            if named {
                policy::leaves_out(name, connection_tokens(headers))
            } else {
                policy::leaves_out(name, std::iter::empty())
            }
        })
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-For` (appending the client), `-Proto`, and `-Host` from the request's
/// `host` (the client's own `-Proto` and `-Host` never pass).
fn set_forwarded(headers: &mut HeaderMap, peer_ip: &HeaderValue, host: Option<&HeaderValue>) {
    const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

    if headers.contains_key(&FOR) {
        let mut chain: Vec<u8> = Vec::new();
        let previous = headers.get_all(&FOR).iter().map(HeaderValue::as_bytes);
        policy::forwarded_for(&mut chain, previous, peer_ip.as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&chain) {
            headers.insert(FOR, value);
        }
    } else {
        headers.insert(FOR, peer_ip.clone());
    }
    headers.insert(PROTO, HeaderValue::from_static("http"));
    match host {
        Some(host) => {
            headers.insert(HOST, host.clone());
        }
        None => {
            headers.remove(HOST);
        }
    }
}
