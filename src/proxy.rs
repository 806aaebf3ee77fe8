//! The reverse proxy in front of a service: HTTP/1.1 (or raw TCP) to whichever instance is
//! live, switched atomically.
//!
//! Swaps lose no request because of three things working together:
//! - the target is read once when a request (or TCP connection) arrives, so after
//!   [`Switch::set`] every new request goes to the new instance while requests already sent to
//!   the old one finish there, counted on its [`Upstream`] until their response is done;
//! - an idle upstream connection is closed after `UPSTREAM_IDLE`, well before a dev server's
//!   own keep-alive timeout (Node's is 5 s) would close it under our feet;
//! - a request that fails on a reused connection before any of it was written is retried once
//!   on a fresh connection.
//!
//! Each client connection has its own upstream connection, opened on its first request, reused
//! while the target stays the same, and replaced when the target changes or it was closed. The
//! upstream connection is driven inside the client connection's task (see [`LocalWake`]), so
//! forwarding a request hands nothing to another task or thread: that hand-off (a pooled
//! client's connection task woken for every request) used to cost more than the forwarding.

use std::convert::Infallible;
use std::fmt;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// How long an idle upstream connection may be reused: shorter than any common dev server's
/// keep-alive timeout, so we never pick a connection the backend is about to close.
const UPSTREAM_IDLE: Duration = Duration::from_secs(1);
/// How long open connections may take to finish once the proxy is shutting down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Bound on connecting to an instance (loopback: a refusal is immediate, this is a backstop).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Rounds a connection task polls itself in one go while its parts keep waking each other,
/// before it yields to the scheduler like any other woken task.
const LOCAL_ROUNDS: usize = 16;

/// What the proxy forwards to right now. Switched atomically by `Switch::set`.
#[derive(Clone, Debug)]
pub enum Target {
    /// No instance yet (first start): hold new requests until the target becomes Live or Down,
    /// for at most `wait`; past that answer 503 saying the service is still starting.
    Starting { wait: Duration },
    /// Forward to this instance.
    Live(Arc<Upstream>),
    /// No instance: answer every request with `status` and this HTML `body` (see [`error_page`]).
    Down { status: u16, body: String },
}

/// A count of work in progress that can be waited on until it is 0.
#[derive(Default)]
struct Count {
    n: AtomicUsize,
    /// Wakes every `zero()` caller when `n` drops to 0.
    zero: Notify,
}

impl Count {
    fn get(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    fn add(&self) {
        self.n.fetch_add(1, Ordering::SeqCst);
    }

    fn sub(&self) {
        if self.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.zero.notify_waiters();
        }
    }

    /// Resolves once the count is 0 (immediately if it already is).
    async fn zero(&self) {
        loop {
            let mut zero = pin!(self.zero.notified());
            // Registered before the check: a drop to 0 right after it still wakes us.
            zero.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            zero.await;
        }
    }
}

/// One instance's address and its in-flight work.
pub struct Upstream {
    addr: SocketAddr,
    /// Requests, upgraded connections and TCP connections to this instance not finished yet.
    /// Incremented by the proxy when it forwards, decremented when its `InFlight` guard drops.
    in_flight: Count,
}

impl Upstream {
    /// Creates the upstream for an instance listening on `addr`, with nothing in flight.
    pub fn new(addr: SocketAddr) -> Arc<Upstream> {
        Arc::new(Upstream {
            addr,
            in_flight: Count::default(),
        })
    }

    /// The instance's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests (and upgraded connections / raw TCP connections) to it not finished yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Resolves once `in_flight()` is 0 (immediately if it already is).
    pub async fn drained(&self) {
        self.in_flight.zero().await;
    }

    /// Counts one unit of work on this upstream until the returned guard is dropped.
    fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.add();
        InFlight(self.clone())
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// One request or connection in flight on an upstream; dropping it ends the count.
struct InFlight(Arc<Upstream>);

impl InFlight {
    fn upstream(&self) -> &Arc<Upstream> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.sub();
    }
}

/// One upgraded connection of the proxy, counted until it is dropped.
struct Tunnel(Arc<Count>);

impl Tunnel {
    fn enter(count: &Arc<Count>) -> Tunnel {
        count.add();
        Tunnel(count.clone())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.0.sub();
    }
}

/// The handle that switches the target; cheap to clone.
#[derive(Clone)]
pub struct Switch {
    /// The current target; every accepted request or connection reads it once.
    tx: Arc<watch::Sender<Target>>,
}

impl Switch {
    /// Creates a switch pointing at `initial`.
    pub fn new(initial: Target) -> Switch {
        Switch {
            tx: Arc::new(watch::Sender::new(initial)),
        }
    }

    /// Points new requests and connections at `t`, atomically.
    pub fn set(&self, t: Target) {
        self.tx.send_replace(t);
    }

    /// The current target.
    pub fn get(&self) -> Target {
        self.tx.borrow().clone()
    }

    /// Where a request arriving now goes: while Starting, waits (at most its `wait`) for the
    /// target to become Live or Down, and answers Starting if it did not.
    async fn route(&self) -> Route {
        let route = Route::from(&*self.tx.borrow());
        match route {
            // Boxed: this rare wait would otherwise make every request's future larger.
            Route::Starting { wait } => Box::pin(self.wait_while_starting(wait)).await,
            route => route,
        }
    }

    async fn wait_while_starting(&self, wait: Duration) -> Route {
        // `wait_for` looks at the current value first, so a change since the borrow counts.
        let mut rx = self.tx.subscribe();
        let resolved = async {
            rx.wait_for(|t| !matches!(t, Target::Starting { .. }))
                .await
                .map(|t| Route::from(&*t))
        };
        match tokio::time::timeout(wait, resolved).await {
            Ok(Ok(route)) => route,
            _ => Route::Starting { wait },
        }
    }
}

/// A target as seen by one request: a Live one is already counted on its upstream.
enum Route {
    Starting { wait: Duration },
    Live(InFlight),
    Down { status: u16, body: String },
}

impl From<&Target> for Route {
    /// Called while the switch's value is borrowed: a `set` waits for the borrow to end, so by
    /// the time it returns, this request is counted and `drained()` on the old upstream
    /// waits for it.
    fn from(target: &Target) -> Route {
        match target {
            Target::Starting { wait } => Route::Starting { wait: *wait },
            Target::Live(upstream) => Route::Live(upstream.enter()),
            Target::Down { status, body } => Route::Down {
                status: *status,
                body: body.clone(),
            },
        }
    }
}

impl fmt::Debug for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Switch").field(&*self.tx.borrow()).finish()
    }
}

/// A short HTML page naming the service and its state, with a detail line and the last log
/// lines; every piece of text is HTML-escaped.
pub fn error_page(service: &str, state: &str, detail: &str, log_tail: &[String]) -> String {
    let (service, state, detail) = (escape(service), escape(state), escape(detail));
    let mut html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <title>{service}: {state}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}\
         pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head>\n\
         <body><h1>{service}: {state}</h1>\n<p>{detail}</p>\n"
    );
    if !log_tail.is_empty() {
        html.push_str("<h2>Last log lines</h2>\n<pre>");
        for line in log_tail {
            html.push_str(&escape(line));
            html.push('\n');
        }
        html.push_str("</pre>\n");
    }
    html.push_str("<p><small>pmesh-dev</small></p></body></html>\n");
    html
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Serves HTTP/1.1 on `listener` until `shutdown`, forwarding per the switch's current target.
///
/// The proxy runs on a thread of its own with a single-threaded runtime: a request through it
/// is a few small reads and writes on two sockets, which a worker pool makes more expensive by
/// handing tasks and wake-ups between its threads (and which one core serves far faster than
/// a typical dev server answers). Returns once that thread has finished.
pub async fn serve_http(
    listener: TcpListener,
    service: String,
    switch: Switch,
    shutdown: CancellationToken,
) {
    // Dropping this future (an aborted task) stops the thread too.
    let stop = shutdown.child_token();
    let _stop_on_drop = stop.clone().drop_guard();
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(_) => return,
    };
    // Handed back if the thread or its runtime cannot be made, to serve from here instead.
    let handed = Arc::new(Mutex::new(Some(listener)));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("proxy {service}"))
        .spawn({
            let (handed, service, switch, stop) = (
                handed.clone(),
                service.clone(),
                switch.clone(),
                stop.clone(),
            );
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    let listener = handed.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(listener) = listener {
                        runtime.block_on(async move {
                            if let Ok(listener) = TcpListener::from_std(listener) {
                                serve_http_here(listener, service, switch, stop).await;
                            }
                        });
                    }
                }
                let _ = done_tx.send(());
            }
        });
    if spawned.is_ok() {
        let _ = done_rx.await;
    }
    let listener = handed.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(listener) = listener
        && let Ok(listener) = TcpListener::from_std(listener)
    {
        serve_http_here(listener, service, switch, stop).await;
    }
}

/// Serves HTTP/1.1 on `listener` on the current runtime until `shutdown`.
async fn serve_http_here(
    listener: TcpListener,
    service: String,
    switch: Switch,
    shutdown: CancellationToken,
) {
    let proxy = Arc::new(Proxy {
        service,
        switch,
        shutdown: shutdown.clone(),
        tunnels: Arc::default(),
    });
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve_connection(proxy.clone(), stream, peer));
                }
                Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
            },
            // Reap finished connections so the set does not grow with the server's lifetime.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    finish(conns).await;
    // Upgraded connections end a grace period after the shutdown (see `tunnel`); they run on
    // this runtime, which ends with this function.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, proxy.tunnels.zero()).await;
}

/// Forwards raw TCP: each new connection goes to the live instance at accept time (Starting:
/// wait as for HTTP; Down: close).
pub async fn serve_tcp(
    listener: TcpListener,
    _service: String,
    switch: Switch,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(tunnel_tcp(switch.clone(), stream));
                }
                Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    finish(conns).await;
}

/// Gives open connections `SHUTDOWN_GRACE` to finish, then drops whatever is left.
async fn finish(mut conns: JoinSet<()>) {
    let all_done = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, all_done).await;
    conns.shutdown().await;
}

async fn tunnel_tcp(switch: Switch, mut inbound: TcpStream) {
    let Route::Live(in_flight) = switch.route().await else {
        // Down, or still starting past the wait: closing is all raw TCP can say.
        return;
    };
    let Ok(mut outbound) = connect(in_flight.upstream().addr()).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

/// A TCP connection to an instance, with Nagle off (requests and responses are small writes
/// that must go out at once).
async fn connect(addr: SocketAddr) -> Result<TcpStream, Failure> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(Failure::Connect(e)),
        Err(_) => return Err(Failure::ConnectTimeout),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Why a request could not be forwarded to its instance.
enum Failure {
    Connect(std::io::Error),
    ConnectTimeout,
    Http(hyper::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::ConnectTimeout => write!(
                f,
                "cannot connect: no answer within {}",
                humantime::format_duration(CONNECT_TIMEOUT)
            ),
            Failure::Http(e) => f.write_str(&error_chain(e)),
        }
    }
}

mod fast;

/// Everything a connection handler needs; shared by all connections of one `serve_http`.
struct Proxy {
    service: String,
    switch: Switch,
    /// Tells connections and upgraded tunnels, which outlive their HTTP connection, that the
    /// proxy is stopping.
    shutdown: CancellationToken,
    /// The upgraded connections open, which the proxy waits for when it stops.
    tunnels: Arc<Count>,
}

/// An upstream HTTP/1.1 connection as driven by its client connection's task.
type UpstreamConn = client::Connection<TokioIo<TcpStream>, Incoming>;

/// One client connection: its peer and its upstream connections.
struct Downstream {
    /// The client's IP, for `X-Forwarded-For`.
    peer_ip: HeaderValue,
    /// The waker of the part of the connection task that drives the upstream connections
    /// (see [`LocalWake`]).
    waker: Waker,
    upstreams: Mutex<Upstreams>,
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
    sender: client::SendRequest<Incoming>,
    /// When its last response arrived.
    since: Instant,
}

impl Downstream {
    fn new(peer: SocketAddr, waker: Waker) -> Downstream {
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
    fn take_idle(&self, upstream: &Arc<Upstream>) -> Option<client::SendRequest<Incoming>> {
        let idle = self.upstreams().idle.take()?;
        (Arc::ptr_eq(&idle.upstream, upstream) && !idle.sender.is_closed()).then_some(idle.sender)
    }

    fn put_idle(&self, upstream: &Arc<Upstream>, sender: client::SendRequest<Incoming>) {
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
    async fn open(&self, addr: SocketAddr) -> Result<client::SendRequest<Incoming>, Failure> {
        let stream = connect(addr).await?;
        let (sender, conn) = client::handshake(TokioIo::new(stream))
            .await
            .map_err(Failure::Http)?;
        self.upstreams().conns.push(Box::pin(conn));
        self.waker.wake_by_ref();
        Ok(sender)
    }

    /// Sends `req` to `upstream` on this connection's upstream connection (a new one if there
    /// is none for it), and retries once on a new connection if a reused one failed before
    /// any of the request was written.
    async fn send(
        &self,
        upstream: &Arc<Upstream>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, Failure> {
        let mut reused = self.take_idle(upstream);
        loop {
            let fresh = reused.is_none();
            let mut sender = match reused.take() {
                Some(sender) => sender,
                // Boxed: opening is once per connection, and large.
                None => Box::pin(self.open(upstream.addr())).await?,
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(Failure::Http(e));
                }
                // Closed since it was last used: nothing was sent, go again on a new one.
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // Reusable for the next request once this exchange is done (`ready`).
                    self.put_idle(upstream, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    _ => return Err(Failure::Http(e.into_error())),
                },
            }
        }
    }
}

/// Sends an upgrade request on a connection of its own, which becomes the tunnel's upstream
/// side if the instance switches protocols.
async fn send_upgrade(
    addr: SocketAddr,
    req: Request<Incoming>,
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

/// In-task wake-ups of a client connection's task, which has two parts: the client
/// connection (with its request handler) and its upstream connections.
///
/// The parts wake each other all the time: sending a request wakes the upstream connection,
/// its response wakes the handler, and so on. With the task's own waker each of those would
/// reschedule the task through the runtime. Instead each part gets a waker of its own
/// ([`PartWake`]) that notes which part to poll: while the task is being polled, the task
/// just polls that part again in place; outside of a poll (socket readiness, timers) the
/// waker also wakes the task. A round polls only the parts that were woken.
struct LocalWake {
    /// The parts woken and not polled since (`SERVER`, `UPSTREAMS`).
    woken: AtomicU8,
    /// True while the task polls its parts.
    polling: AtomicBool,
    /// The task's waker, from its latest poll.
    task: Mutex<Option<Waker>>,
}

/// The part of a connection task that serves the client connection.
const SERVER: u8 = 1;
/// The part of a connection task that drives its upstream connections.
const UPSTREAMS: u8 = 2;

impl LocalWake {
    fn new() -> Arc<LocalWake> {
        Arc::new(LocalWake {
            // Both parts start out to be polled.
            woken: AtomicU8::new(SERVER | UPSTREAMS),
            polling: AtomicBool::new(false),
            task: Mutex::new(None),
        })
    }

    /// The waker for `part`.
    fn waker(self: &Arc<Self>, part: u8) -> Waker {
        Waker::from(Arc::new(PartWake {
            local: self.clone(),
            part,
        }))
    }

    fn wake(&self, part: u8) {
        self.woken.fetch_or(part, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(task) = &*task {
                task.wake_by_ref();
            }
        }
    }

    /// Whether `part` was woken since it was last polled; it counts as polled from now on.
    fn take(&self, part: u8) -> bool {
        self.woken.fetch_and(!part, Ordering::SeqCst) & part != 0
    }

    /// Runs `round` (which polls the parts it `take`s) until it is ready, or until a round
    /// ends with no part woken (then the task waits for a wake from outside).
    async fn drive<T>(&self, mut round: impl FnMut() -> Poll<T>) -> T {
        poll_fn(|cx| {
            {
                let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
                if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                    *task = Some(cx.waker().clone());
                }
            }
            for _ in 0..LOCAL_ROUNDS {
                // A wake from now on is either taken in this round or seen at its end; one
                // after `polling` is cleared also wakes the task.
                self.polling.store(true, Ordering::SeqCst);
                let polled = round();
                self.polling.store(false, Ordering::SeqCst);
                if polled.is_ready() {
                    return polled;
                }
                if self.woken.load(Ordering::SeqCst) == 0 {
                    return Poll::Pending;
                }
            }
            // Still busy: let other tasks run first.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }
}

/// The waker of one part of a connection task (see [`LocalWake`]).
struct PartWake {
    local: Arc<LocalWake>,
    part: u8,
}

impl Wake for PartWake {
    fn wake(self: Arc<Self>) {
        self.local.wake(self.part);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.local.wake(self.part);
    }
}

async fn serve_connection(proxy: Arc<Proxy>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    // A child token: its lock is this connection's alone, unlike the proxy-wide one.
    let stop = proxy.shutdown.child_token();
    let ip = peer.ip().to_string();
    let read = match fast::serve(&proxy, &mut stream, &ip, &stop).await {
        fast::Outcome::Done => return,
        fast::Outcome::HandOver(read) => read,
    };
    serve_with_hyper(proxy, fast::Prefixed::new(read, stream), peer, stop).await;
}

/// Serves a client connection with hyper: everything the fast path leaves to it.
async fn serve_with_hyper(
    proxy: Arc<Proxy>,
    stream: fast::Prefixed,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let wake = LocalWake::new();
    let server_waker = wake.waker(SERVER);
    let down = Arc::new(Downstream::new(peer, wake.waker(UPSTREAMS)));
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
        match self.switch.route().await {
            Route::Live(in_flight) => self.forward(down, in_flight, req).await,
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
    ) -> Response<ProxyBody> {
        let upstream = in_flight.upstream();
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
        set_forwarded(&mut parts.headers, &down.peer_ip);
        if !parts.headers.contains_key(header::HOST) {
            // HTTP/1.0 clients may leave it out; HTTP/1.1 requires it.
            let host = HeaderValue::from_str(&upstream.addr().to_string());
            parts
                .headers
                .insert(header::HOST, host.expect("a valid value"));
        }
        let req = Request::from_parts(parts, body);

        let sent = match client_upgrade {
            Some(_) => Box::pin(send_upgrade(upstream.addr(), req)).await,
            None => down.send(upstream, req).await,
        };
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                let detail = format!("The instance at {} did not answer: {e}", upstream.addr());
                return page(StatusCode::BAD_GATEWAY, self.failure_page(&detail));
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                let detail = "The instance switched protocols on a request that did not ask to.";
                return page(StatusCode::BAD_GATEWAY, self.failure_page(detail));
            };
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
        strip_hop_by_hop(&mut parts.headers);
        let body = ProxyBody::Upstream {
            body,
            down: down.clone(),
            _in_flight: in_flight,
        };
        Response::from_parts(parts, body)
    }

    fn failure_page(&self, detail: &str) -> String {
        error_page(&self.service, "unreachable", detail, &[])
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

/// The comma-separated tokens of every `Connection` header, trimmed, as written.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The `Upgrade` header of a request that asks to switch protocols.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    headers.get(header::UPGRADE).filter(|_| asks).cloned()
}

/// The headers that describe one hop rather than the message: both sides of the proxy are
/// separate connections with their own framing and keep-alive.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The index of `name` in `HOP_BY_HOP`.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    HOP_BY_HOP.iter().position(|h| h == name)
}

/// Removes the hop-by-hop headers, and those that `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names, then a lookup only for those present (usually none in a
    // request; `Connection`, `Keep-Alive` and `Transfer-Encoding` in a response).
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Collected first (they borrow from `headers`); usually `Connection` names nothing
        // beyond the fixed ones (`keep-alive`), and an empty Vec does not allocate.
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Sets `X-Forwarded-For` (appending the client), `-Proto` and `-Host` (from `Host`).
fn set_forwarded(headers: &mut HeaderMap, peer_ip: &HeaderValue) {
    const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

    if headers.contains_key(&FOR) {
        let mut chain: Vec<u8> = Vec::new();
        for value in headers.get_all(&FOR) {
            chain.extend_from_slice(value.as_bytes());
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(peer_ip.as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&chain) {
            headers.insert(FOR, value);
        }
    } else {
        headers.insert(FOR, peer_ip.clone());
    }
    headers.insert(PROTO, HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(HOST, host);
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full};
    use std::collections::HashSet;
    use std::future::Future;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;
    use tokio::time::{Instant, sleep, timeout};

    type TestBody = UnsyncBoxBody<Bytes, Infallible>;

    /// Every test runs under this hard limit so a bug hangs nothing.
    async fn within<F: Future>(f: F) -> F::Output {
        timeout(Duration::from_secs(30), f)
            .await
            .expect("test timed out")
    }

    /// A server task and the token that stops it.
    struct Server {
        addr: SocketAddr,
        stop: CancellationToken,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn stop(self) {
            self.stop.cancel();
            timeout(Duration::from_secs(5), self.task)
                .await
                .expect("server did not stop")
                .expect("server task failed");
        }
    }

    async fn start_proxy(switch: &Switch) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_http(
            listener,
            "web".to_string(),
            switch.clone(),
            stop.clone(),
        ));
        Server { addr, stop, task }
    }

    async fn start_tcp_proxy(switch: &Switch) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_tcp(
            listener,
            "db".to_string(),
            switch.clone(),
            stop.clone(),
        ));
        Server { addr, stop, task }
    }

    /// A server on a free loopback port that runs `conn` on every connection it accepts, until
    /// stopped (which aborts the connections still open).
    async fn accept_each<F, Fut>(conn: F) -> Server
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    Ok((stream, _)) = listener.accept() => {
                        conns.spawn(conn(stream));
                    }
                }
            }
        });
        Server { addr, stop, task }
    }

    /// An HTTP backend that tags every response with `x-backend: id` and serves:
    /// `/echo` (streams the request body back), `/headers` (the request headers it saw, one
    /// per line), `/slow` (headers now, body after 500 ms), `/drip` ("first" now, "second"
    /// after 1.5 s), `Upgrade: echo` (101 then echoes raw bytes), anything else: the id.
    async fn backend(id: &'static str) -> Server {
        accept_each(move |stream| async move {
            // Like Node, which disables Nagle by default.
            let _ = stream.set_nodelay(true);
            let service = service_fn(move |req| backend_handle(id, req));
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let _ = conn.await;
        })
        .await
    }

    async fn backend_handle(
        id: &'static str,
        mut req: Request<Incoming>,
    ) -> Result<Response<TestBody>, Infallible> {
        let mut resp = if req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v == "echo")
        {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(io) = on.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut resp = Response::new(text(""));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("echo"));
            resp
        } else {
            match req.uri().path() {
                "/echo" => {
                    let (tx, body) = chan_body();
                    // Forward the request body chunk by chunk, as it arrives.
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(frame)) = body.frame().await {
                            if let Ok(data) = frame.into_data()
                                && tx.send(data).await.is_err()
                            {
                                return;
                            }
                        }
                    });
                    Response::new(body)
                }
                "/headers" => {
                    let mut seen = String::new();
                    for (name, value) in req.headers() {
                        seen.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
                    }
                    let mut resp = Response::new(text(&seen));
                    let headers = resp.headers_mut();
                    headers.insert(header::CONNECTION, HeaderValue::from_static("x-resp-hop"));
                    headers.insert("x-resp-hop", HeaderValue::from_static("1"));
                    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
                    resp
                }
                "/slow" => {
                    let (tx, body) = chan_body();
                    tokio::spawn(async move {
                        sleep(Duration::from_millis(500)).await;
                        let _ = tx.send(Bytes::from(format!("slow {id}"))).await;
                    });
                    Response::new(body)
                }
                "/drip" => {
                    let (tx, body) = chan_body();
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from("first")).await;
                        sleep(Duration::from_millis(1500)).await;
                        let _ = tx.send(Bytes::from("second")).await;
                    });
                    Response::new(body)
                }
                _ => Response::new(text(id)),
            }
        };
        resp.headers_mut()
            .insert("x-backend", HeaderValue::from_static(id));
        Ok(resp)
    }

    /// A raw TCP backend that greets each connection with `id\n`, then echoes.
    async fn tcp_backend(id: &'static str) -> Server {
        accept_each(move |mut stream| async move {
            let _ = stream.write_all(format!("{id}\n").as_bytes()).await;
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    fn text(s: &str) -> TestBody {
        Full::new(Bytes::from(s.to_string())).boxed_unsync()
    }

    /// A streaming body fed through a channel.
    struct ChanBody(mpsc::Receiver<Bytes>);

    impl Body for ChanBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn chan_body() -> (mpsc::Sender<Bytes>, TestBody) {
        let (tx, rx) = mpsc::channel(4);
        (tx, ChanBody(rx).boxed_unsync())
    }

    /// A keep-alive HTTP/1.1 client connection.
    async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    fn request(method: &str, path: &str, body: TestBody) -> Request<TestBody> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost:8080")
            .body(body)
            .unwrap()
    }

    /// Status, headers and body of one request on a fresh connection.
    async fn fetch(addr: SocketAddr, req: Request<TestBody>) -> (StatusCode, HeaderMap, String) {
        let mut send = connect(addr).await;
        let resp = send.send_request(req).await.expect("no response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body broken").to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        (parts.status, parts.headers, body)
    }

    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
        fetch(addr, request("GET", path, text(""))).await
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
    }

    #[tokio::test]
    async fn get_and_large_streamed_post_pass_through() {
        within(async {
            let a = backend("A").await;
            let switch = Switch::new(Target::Live(Upstream::new(a.addr)));
            let proxy = start_proxy(&switch).await;

            let (status, headers, body) = get(proxy.addr, "/").await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "A"));
            assert_eq!(headers["x-backend"], "A");

            // 8 MB sent in 64 KB chunks with no Content-Length, echoed back.
            let sent = pattern(8 << 20, 3);
            let (tx, body) = chan_body();
            let chunks: Vec<Bytes> = sent.chunks(64 << 10).map(Bytes::copy_from_slice).collect();
            tokio::spawn(async move {
                for chunk in chunks {
                    tx.send(chunk).await.unwrap();
                }
            });
            let mut send = connect(proxy.addr).await;
            let resp = send.send_request(request("POST", "/echo", body)).await;
            let resp = resp.expect("no response");
            assert_eq!(resp.status(), StatusCode::OK);
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), sent.len());
            assert!(got == sent, "echoed body differs");

            proxy.stop().await;
            a.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn bodies_stream_both_ways_without_buffering() {
        within(async {
            let a = backend("A").await;
            let switch = Switch::new(Target::Live(Upstream::new(a.addr)));
            let proxy = start_proxy(&switch).await;
            let mut send = connect(proxy.addr).await;

            // The first request chunk comes back before the second is even sent.
            let (tx, body) = chan_body();
            tx.send(Bytes::from("ping-1")).await.unwrap();
            let resp = send.send_request(request("POST", "/echo", body)).await;
            let mut body = resp.expect("no response").into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(first, "ping-1");
            tx.send(Bytes::from("ping-2")).await.unwrap();
            let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(second, "ping-2");
            drop(tx);
            assert!(body.frame().await.is_none());

            // A response's first chunk arrives while the backend is still producing the rest.
            send.ready().await.unwrap();
            let resp = send.send_request(request("GET", "/drip", text(""))).await;
            let mut body = resp.expect("no response").into_body();
            let first = timeout(Duration::from_millis(1000), body.frame()).await;
            let first = first.expect("first chunk was held back").unwrap().unwrap();
            assert_eq!(first.into_data().unwrap(), "first");
            let rest = body.collect().await.unwrap().to_bytes();
            assert_eq!(rest, "second");

            proxy.stop().await;
            a.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn hop_by_hop_headers_dropped_and_forwarded_headers_set() {
        within(async {
            let a = backend("A").await;
            let switch = Switch::new(Target::Live(Upstream::new(a.addr)));
            let proxy = start_proxy(&switch).await;

            let req = Request::builder()
                .uri("/headers")
                .header(header::HOST, "example.test:8080")
                .header(header::CONNECTION, "keep-alive, X-Custom-Hop")
                .header("x-custom-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-connection", "keep-alive")
                .header(header::TE, "trailers")
                .header("x-forwarded-for", "10.0.0.1")
                .header("x-kept", "yes")
                .body(text(""))
                .unwrap();
            let (status, headers, seen) = fetch(proxy.addr, req).await;
            assert_eq!(status, StatusCode::OK);
            let seen: Vec<&str> = seen.lines().collect();
            for gone in [
                "x-custom-hop",
                "keep-alive",
                "proxy-connection",
                "te",
                "connection",
            ] {
                assert!(
                    !seen.iter().any(|l| l.starts_with(&format!("{gone}:"))),
                    "{gone} reached the backend: {seen:?}"
                );
            }
            for want in [
                "x-forwarded-for: 10.0.0.1, 127.0.0.1",
                "x-forwarded-proto: http",
                "x-forwarded-host: example.test:8080",
                "host: example.test:8080",
                "x-kept: yes",
            ] {
                assert!(seen.contains(&want), "expected {want:?} in {seen:?}");
            }
            // And on the way back.
            assert!(headers.get("x-resp-hop").is_none(), "{headers:?}");
            assert!(headers.get("keep-alive").is_none(), "{headers:?}");
            assert_eq!(headers["x-backend"], "A");

            proxy.stop().await;
            a.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn starting_holds_requests_until_live() {
        within(async {
            let a = backend("A").await;
            let switch = Switch::new(Target::Starting {
                wait: Duration::from_secs(10),
            });
            let proxy = start_proxy(&switch).await;

            let held = tokio::spawn(get(proxy.addr, "/"));
            sleep(Duration::from_millis(300)).await;
            assert!(!held.is_finished(), "request was not held");
            switch.set(Target::Live(Upstream::new(a.addr)));
            let (status, _, body) = held.await.unwrap();
            assert_eq!((status, body.as_str()), (StatusCode::OK, "A"));

            proxy.stop().await;
            a.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn starting_then_down_answers_held_requests_with_the_error() {
        within(async {
            let switch = Switch::new(Target::Starting {
                wait: Duration::from_secs(10),
            });
            let proxy = start_proxy(&switch).await;

            let held = tokio::spawn(get(proxy.addr, "/"));
            sleep(Duration::from_millis(200)).await;
            switch.set(Target::Down {
                status: 503,
                body: "build failed".to_string(),
            });
            let (status, _, body) = held.await.unwrap();
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, "build failed")
            );

            proxy.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn starting_past_wait_answers_503() {
        within(async {
            let switch = Switch::new(Target::Starting {
                wait: Duration::from_millis(200),
            });
            let proxy = start_proxy(&switch).await;

            let started = Instant::now();
            let (status, headers, body) = get(proxy.addr, "/").await;
            assert!(started.elapsed() >= Duration::from_millis(200));
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
            assert!(body.contains("web") && body.contains("starting"), "{body}");

            proxy.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn down_answers_its_status_and_body() {
        within(async {
            let page = error_page("web", "restarting", "exit 1", &["<boom>".to_string()]);
            let switch = Switch::new(Target::Down {
                status: 502,
                body: page.clone(),
            });
            let proxy = start_proxy(&switch).await;

            let (status, headers, body) = get(proxy.addr, "/anything").await;
            assert_eq!(status, StatusCode::BAD_GATEWAY);
            assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
            assert_eq!(body, page);

            proxy.stop().await;
        })
        .await;
    }

    #[test]
    fn error_page_escapes_html() {
        let page = error_page(
            "w<eb>",
            "crashed & restarting",
            "\"quoted\" 'x'",
            &["<script>alert(1)</script>".to_string()],
        );
        assert!(page.contains("w&lt;eb&gt;"));
        assert!(page.contains("crashed &amp; restarting"));
        assert!(page.contains("&quot;quoted&quot; &#39;x&#39;"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<script>"));
    }

    #[tokio::test]
    async fn gone_backend_answers_502_not_a_reset() {
        within(async {
            let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = gone.local_addr().unwrap();
            drop(gone);
            let upstream = Upstream::new(addr);
            let switch = Switch::new(Target::Live(upstream.clone()));
            let proxy = start_proxy(&switch).await;

            let mut send = connect(proxy.addr).await;
            for _ in 0..2 {
                // The client connection survives the failure: keep-alive still works.
                send.ready()
                    .await
                    .expect("proxy closed the client connection");
                let resp = send.send_request(request("GET", "/", text(""))).await;
                let resp = resp.expect("connection reset instead of a 502");
                assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let body = String::from_utf8_lossy(&body);
                assert!(
                    body.contains("web") && body.contains(&addr.to_string()),
                    "{body}"
                );
            }
            assert_eq!(upstream.in_flight(), 0);

            proxy.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn switching_under_keep_alive_load_loses_nothing() {
        within(async {
            let a = backend("A").await;
            let b = backend("B").await;
            let (up_a, up_b) = (Upstream::new(a.addr), Upstream::new(b.addr));
            let switch = Switch::new(Target::Live(up_a.clone()));
            let proxy = start_proxy(&switch).await;
            let end = Instant::now() + Duration::from_secs(2);

            let mut clients = Vec::new();
            for task in 0..8 {
                let addr = proxy.addr;
                clients.push(tokio::spawn(async move {
                    let mut send = connect(addr).await;
                    let (mut done, mut failures, mut served) = (0, Vec::new(), HashSet::new());
                    while Instant::now() < end {
                        if send.ready().await.is_err() {
                            failures.push(format!("task {task}: connection closed"));
                            send = connect(addr).await;
                            continue;
                        }
                        let post = done % 2 == 1;
                        let sent = pattern(32 << 10, task * 1000 + done);
                        let req = if post {
                            request(
                                "POST",
                                "/echo",
                                Full::new(Bytes::from(sent.clone())).boxed_unsync(),
                            )
                        } else {
                            request("GET", "/", text(""))
                        };
                        let resp = match send.send_request(req).await {
                            Ok(resp) => resp,
                            Err(e) => {
                                failures.push(format!("task {task}: {e}"));
                                continue;
                            }
                        };
                        let status = resp.status();
                        let id = resp.headers().get("x-backend").cloned();
                        let body = resp.into_body().collect().await.map(|c| c.to_bytes());
                        match (status, id, body) {
                            (StatusCode::OK, Some(id), Ok(body)) => {
                                if post && body != sent {
                                    failures.push(format!("task {task}: echo differs"));
                                }
                                if !post && body != id.as_bytes() {
                                    failures.push(format!("task {task}: {body:?} from {id:?}"));
                                }
                                served.insert(id.to_str().unwrap().to_string());
                            }
                            (status, _, body) => {
                                failures.push(format!("task {task}: {status} {body:?}"))
                            }
                        }
                        done += 1;
                    }
                    (done, failures, served)
                }));
            }

            let mut flips = 0;
            while Instant::now() < end {
                sleep(Duration::from_millis(100)).await;
                flips += 1;
                let next = if flips % 2 == 1 { &up_b } else { &up_a };
                switch.set(Target::Live(next.clone()));
            }

            let (mut total, mut failures, mut served) = (0, Vec::new(), HashSet::new());
            for client in clients {
                let (done, f, s) = client.await.unwrap();
                assert!(done > 10, "a client made only {done} requests");
                total += done;
                failures.extend(f);
                served.extend(s);
            }
            assert!(
                failures.is_empty(),
                "{} of {total} failed: {failures:?}",
                failures.len()
            );
            assert_eq!(served, HashSet::from(["A".to_string(), "B".to_string()]));
            // Everything sent to either instance has finished.
            up_a.drained().await;
            up_b.drained().await;

            proxy.stop().await;
            a.stop().await;
            b.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn drained_waits_for_the_slow_response_on_the_old_instance() {
        within(async {
            let a = backend("A").await;
            let b = backend("B").await;
            let old = Upstream::new(a.addr);
            let switch = Switch::new(Target::Live(old.clone()));
            let proxy = start_proxy(&switch).await;

            let fresh = Upstream::new(b.addr);
            timeout(Duration::from_millis(100), fresh.drained())
                .await
                .expect("an idle upstream is drained at once");

            let slow = tokio::spawn(get(proxy.addr, "/slow"));
            while old.in_flight() == 0 {
                sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(old.in_flight(), 1);
            switch.set(Target::Live(fresh.clone()));

            // New requests go to the new instance while the old one finishes its work.
            let (_, _, body) = get(proxy.addr, "/").await;
            assert_eq!(body, "B");
            assert_eq!(old.in_flight(), 1);
            assert!(!slow.is_finished());

            let drained = tokio::spawn({
                let old = old.clone();
                async move { old.drained().await }
            });
            sleep(Duration::from_millis(100)).await;
            assert!(!drained.is_finished(), "drained before the slow response");
            let (status, _, body) = slow.await.unwrap();
            assert_eq!((status, body.as_str()), (StatusCode::OK, "slow A"));
            drained.await.unwrap();
            assert_eq!(old.in_flight(), 0);

            proxy.stop().await;
            a.stop().await;
            b.stop().await;
        })
        .await;
    }

    /// Reads from `stream` until the end of an HTTP response head.
    async fn read_head(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.unwrap();
            assert!(n == 1, "connection closed mid-head: {head:?}");
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    #[tokio::test]
    async fn upgrades_pass_through_and_count_as_in_flight() {
        within(async {
            let a = backend("A").await;
            let upstream = Upstream::new(a.addr);
            let switch = Switch::new(Target::Live(upstream.clone()));
            let proxy = start_proxy(&switch).await;

            let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
            stream
                .write_all(
                    b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\
                      Connection: Upgrade\r\nUpgrade: echo\r\n\r\n",
                )
                .await
                .unwrap();
            let head = read_head(&mut stream).await;
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let lower = head.to_ascii_lowercase();
            assert!(lower.contains("upgrade: echo"), "{head}");
            assert!(lower.contains("connection: upgrade"), "{head}");

            for message in [&b"hello"[..], b"over the tunnel"] {
                stream.write_all(message).await.unwrap();
                let mut got = vec![0u8; message.len()];
                stream.read_exact(&mut got).await.unwrap();
                assert_eq!(got, message);
            }
            assert_eq!(upstream.in_flight(), 1);

            drop(stream);
            timeout(Duration::from_secs(5), upstream.drained())
                .await
                .expect("closed tunnel still counted");

            proxy.stop().await;
            a.stop().await;
        })
        .await;
    }

    async fn tcp_greeting(stream: &mut TcpStream) -> String {
        let mut greeting = [0u8; 2];
        stream.read_exact(&mut greeting).await.unwrap();
        String::from_utf8_lossy(&greeting).into_owned()
    }

    #[tokio::test]
    async fn tcp_forwards_to_the_live_instance_at_accept_time() {
        within(async {
            let a = tcp_backend("A").await;
            let b = tcp_backend("B").await;
            let (up_a, up_b) = (Upstream::new(a.addr), Upstream::new(b.addr));
            let switch = Switch::new(Target::Starting {
                wait: Duration::from_secs(10),
            });
            let proxy = start_tcp_proxy(&switch).await;

            // Held while starting, then forwarded.
            let mut first = TcpStream::connect(proxy.addr).await.unwrap();
            sleep(Duration::from_millis(100)).await;
            switch.set(Target::Live(up_a.clone()));
            assert_eq!(tcp_greeting(&mut first).await, "A\n");

            switch.set(Target::Live(up_b.clone()));
            let mut second = TcpStream::connect(proxy.addr).await.unwrap();
            assert_eq!(tcp_greeting(&mut second).await, "B\n");

            // The old connection stays with its instance, and is counted there.
            assert_eq!((up_a.in_flight(), up_b.in_flight()), (1, 1));
            first.write_all(b"still A").await.unwrap();
            let mut echoed = [0u8; 7];
            first.read_exact(&mut echoed).await.unwrap();
            assert_eq!(&echoed, b"still A");
            drop(first);
            timeout(Duration::from_secs(5), up_a.drained())
                .await
                .expect("closed connection still counted");

            // Down: new connections are closed.
            switch.set(Target::Down {
                status: 502,
                body: String::new(),
            });
            let mut third = TcpStream::connect(proxy.addr).await.unwrap();
            let mut buf = [0u8; 8];
            let n = third.read(&mut buf).await.unwrap_or(0);
            assert_eq!(n, 0);

            drop(second);
            proxy.stop().await;
            a.stop().await;
            b.stop().await;
        })
        .await;
    }

    /// A raw HTTP backend that answers every request with `id` (Content-Length, keep-alive,
    /// no `Connection` header) and counts its open connections; with `close_after`, it closes
    /// each connection that long after answering, without saying so.
    async fn counting_backend(
        id: &'static str,
        close_after: Option<Duration>,
    ) -> (Server, Arc<AtomicUsize>) {
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let server = accept_each(move |mut stream| {
            // Counted from the accept on.
            let counter = counter.clone();
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{id}",
                            id.len()
                        );
                        if stream.write_all(resp.as_bytes()).await.is_err() {
                            break;
                        }
                        if let Some(after) = close_after {
                            sleep(after).await;
                            counter.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                counter.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .await;
        (server, open)
    }

    #[tokio::test]
    async fn idle_upstream_connections_are_closed_first_and_replaced() {
        within(async {
            let (a, open) = counting_backend("A", None).await;
            let switch = Switch::new(Target::Live(Upstream::new(a.addr)));
            let proxy = start_proxy(&switch).await;
            let mut send = connect(proxy.addr).await;

            for _ in 0..3 {
                send.ready().await.unwrap();
                let resp = send.send_request(request("GET", "/", text(""))).await;
                let body = resp
                    .unwrap()
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(body, "A");
            }
            // One upstream connection for this client connection, reused.
            assert_eq!(open.load(Ordering::SeqCst), 1);

            // Idle for longer than UPSTREAM_IDLE: the proxy closed it, the client connection
            // stays open and its next request gets a new upstream connection.
            sleep(UPSTREAM_IDLE + Duration::from_millis(500)).await;
            assert_eq!(open.load(Ordering::SeqCst), 0, "idle upstream not closed");
            send.ready().await.expect("client connection closed");
            let resp = send.send_request(request("GET", "/", text(""))).await;
            let body = resp
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(body, "A");
            assert_eq!(open.load(Ordering::SeqCst), 1);

            proxy.stop().await;
            a.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn an_upstream_connection_closed_by_the_backend_is_replaced() {
        within(async {
            let (a, open) = counting_backend("A", Some(Duration::from_millis(50))).await;
            let upstream = Upstream::new(a.addr);
            let switch = Switch::new(Target::Live(upstream.clone()));
            let proxy = start_proxy(&switch).await;
            let mut send = connect(proxy.addr).await;

            for _ in 0..3 {
                send.ready().await.unwrap();
                let resp = send.send_request(request("GET", "/", text(""))).await;
                let resp = resp.expect("client connection failed");
                assert_eq!(resp.status(), StatusCode::OK);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, "A");
                // The backend closes the connection meanwhile.
                sleep(Duration::from_millis(200)).await;
                assert_eq!(open.load(Ordering::SeqCst), 0);
            }
            assert_eq!(upstream.in_flight(), 0);

            proxy.stop().await;
            a.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn shutdown_lets_the_response_in_progress_finish() {
        within(async {
            let a = backend("A").await;
            let switch = Switch::new(Target::Live(Upstream::new(a.addr)));
            let proxy = start_proxy(&switch).await;

            // An idle keep-alive connection must not hold shutdown up.
            let mut idle = connect(proxy.addr).await;
            let resp = idle
                .send_request(request("GET", "/", text("")))
                .await
                .unwrap();
            resp.into_body().collect().await.unwrap();

            let slow = tokio::spawn(get(proxy.addr, "/slow"));
            sleep(Duration::from_millis(100)).await;
            let started = Instant::now();
            proxy.stop.cancel();
            let (status, _, body) = slow.await.unwrap();
            assert_eq!((status, body.as_str()), (StatusCode::OK, "slow A"));
            proxy.task.await.unwrap();
            assert!(
                started.elapsed() < SHUTDOWN_GRACE,
                "shutdown waited for idle connections"
            );
            assert!(
                TcpStream::connect(proxy.addr).await.is_err(),
                "still accepting"
            );

            a.stop().await;
        })
        .await;
    }

    /// A backend that answers the `n`th request (from 0) of a connection with
    /// `reply(n, request head)`, written raw, and closes the connection when the reply asks to.
    async fn raw_backend(reply: fn(usize, &str) -> (Vec<u8>, bool)) -> Server {
        accept_each(move |mut stream| async move {
            let mut buf = Vec::new();
            let mut n = 0;
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(got) => buf.extend_from_slice(&chunk[..got]),
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                buf.drain(..end + 4);
                let (bytes, close) = reply(n, &head);
                n += 1;
                if stream.write_all(&bytes).await.is_err() || close {
                    return;
                }
            }
        })
        .await
    }

    /// Sends `bytes` on a new connection to `addr` and reads until the proxy closes it or
    /// `until` is in what was read.
    async fn raw_exchange(addr: SocketAddr, bytes: &[u8], until: Option<&str>) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if until.is_some_and(|u| String::from_utf8_lossy(&got).contains(u)) {
                break;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn an_http_1_0_backend_that_closes_is_answered_in_http_1_1_and_closed() {
        within(async {
            // Like Python's http.server: HTTP/1.0, no length, the end of the body is the end
            // of the connection.
            let b = raw_backend(|_, _| {
                (
                    b"HTTP/1.0 200 OK\r\nServer: py\r\n\r\nuntil the end".to_vec(),
                    true,
                )
            })
            .await;
            let switch = Switch::new(Target::Live(Upstream::new(b.addr)));
            let proxy = start_proxy(&switch).await;
            let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            let got = raw_exchange(proxy.addr, req, None).await;
            assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
            assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
            assert!(got.ends_with("\r\n\r\nuntil the end"), "{got}");
            proxy.stop().await;
            b.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn pipelined_head_and_no_content_requests_keep_their_framing() {
        within(async {
            let b = raw_backend(|_, head| {
                let reply: &[u8] = if head.starts_with("HEAD ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-head: 1\r\n\r\n"
                } else if head.starts_with("DELETE ") {
                    b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 204 No Content\r\nx-del: 1\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                };
                (reply.to_vec(), false)
            })
            .await;
            let upstream = Upstream::new(b.addr);
            let switch = Switch::new(Target::Live(upstream.clone()));
            let proxy = start_proxy(&switch).await;
            // Three requests in one write, the last one with a body and `Connection: close`.
            let req = b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n\
                        DELETE /b HTTP/1.1\r\nHost: x\r\n\r\n\
                        POST /c HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbody";
            let got = raw_exchange(proxy.addr, req, None).await;
            let parts: Vec<&str> = got.split("HTTP/1.1 ").skip(1).collect();
            assert_eq!(parts.len(), 4, "{got}");
            // The interim response is passed on before the final one.
            assert!(parts[1].starts_with("103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n"), "{got}");
            let parts = [parts[0], parts[2], parts[3]];
            assert!(parts[0].starts_with("200 OK\r\n") && parts[0].contains("x-head: 1"), "{got}");
            assert!(parts[0].contains("content-length: 5") && parts[0].ends_with("\r\n\r\n"), "{got}");
            assert!(parts[1].starts_with("204 No Content\r\n") && parts[1].ends_with("\r\n\r\n"), "{got}");
            // Hop-by-hop headers go, the chunked framing passes through as it came.
            assert!(!parts[2].contains("x-hop") && !parts[2].contains("keep-alive"), "{got}");
            assert!(!parts[2].contains("content-length"), "{got}");
            assert!(parts[2].contains("connection: close"), "{got}");
            assert!(parts[2].ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{got}");
            assert_eq!(upstream.in_flight(), 0);
            proxy.stop().await;
            b.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn requests_the_fast_path_leaves_go_the_hyper_way_on_the_same_connection() {
        within(async {
            let b = backend("B").await;
            let switch = Switch::new(Target::Live(Upstream::new(b.addr)));
            let proxy = start_proxy(&switch).await;
            // A plain GET (fast path), then a chunked POST (handed over), then another GET
            // (hyper from then on), all on one connection.
            let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
                        POST /echo HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
                        GET / HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n";
            let got = raw_exchange(proxy.addr, req, None).await;
            assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 3, "{got}");
            assert!(got.contains("hello"), "{got}");
            assert_eq!(got.matches("x-backend: B").count(), 3, "{got}");
            proxy.stop().await;
            b.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_kept_connection_closed_without_an_answer_is_retried_once_for_a_get() {
        within(async {
            // Answers the first request of each connection, then closes on the next one
            // without a word: the race of an instance closing an idle connection just as a
            // request is sent on it.
            let b = raw_backend(|n, head| match n {
                0 => {
                    let path = head.split(' ').nth(1).unwrap_or("?").to_owned();
                    let body = format!("served {path}");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    (reply.into_bytes(), false)
                }
                _ => (Vec::new(), true),
            })
            .await;
            let switch = Switch::new(Target::Live(Upstream::new(b.addr)));
            let proxy = start_proxy(&switch).await;
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            let mut got = String::new();
            for path in ["/1", "/2"] {
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let want = format!("served {path}");
                let mut chunk = [0u8; 4096];
                while !got.contains(&want) {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "closed: {got}");
                    got.push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            }
            assert!(!got.contains("502"), "{got}");
            // A POST is not sent twice: it gets the 502.
            s.write_all(b"POST /3 HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(String::from_utf8_lossy(&chunk[..n]).starts_with("HTTP/1.1 502 "));
            proxy.stop().await;
            b.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_large_body_echoed_while_it_is_read_does_not_stall() {
        within(async {
            let b = backend("E").await;
            let switch = Switch::new(Target::Live(Upstream::new(b.addr)));
            let proxy = start_proxy(&switch).await;
            // 32 MB with a length: more than the socket buffers hold, echoed as it arrives.
            let body = pattern(32 << 20, 5);
            let mut req = format!(
                "POST /echo HTTP/1.1\r\nHost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            let (mut rd, mut wr) = s.split();
            let (_, got) = tokio::join!(
                async {
                    wr.write_all(&req).await.unwrap();
                },
                async {
                    let mut got = Vec::new();
                    rd.read_to_end(&mut got).await.unwrap();
                    got
                }
            );
            let text = String::from_utf8_lossy(&got[..64.min(got.len())]).into_owned();
            assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
            assert!(got.len() > body.len(), "{} bytes", got.len());
            proxy.stop().await;
            b.stop().await;
        })
        .await;
    }
}
