//! The reverse proxy in front of a service: HTTP/1.1 (or raw TCP) to whichever instance is
//! live, switched atomically.
//!
//! Swaps lose no request because of three things working together:
//! - the target is read once when a request (or TCP connection) arrives, so after
//!   [`Switch::set`] every new request goes to the new instance while requests already sent to
//!   the old one finish there, counted on its [`Upstream`] until their response is done;
//! - an idle upstream connection is closed after `UPSTREAM_IDLE`, well before a dev server's
//!   own keep-alive timeout (Node's is 5 s) would close it under our feet;
//! - a request whose reused connection turned out closed with no answer is sent once more on
//!   a fresh connection, when that cannot act on it twice (the retry rule in [`policy`]).
//!
//! Each client connection has its own upstream connection, opened on its first request, reused
//! while the target stays the same, and replaced when the target changes or it was closed. The
//! upstream connection is driven inside the client connection's task (see [`wake`]), so
//! forwarding a request hands nothing to another task or thread: that hand-off (a pooled
//! client's connection task woken for every request) used to cost more than the forwarding.
//!
//! The pieces: [`switch`] (what is live, and what is in flight on it), [`policy`] (what is
//! forwarded and how failures are told: written once, used by both HTTP paths), [`fast`] (the
//! common requests, parsed in place, with [`chunked`]), [`hyper_path`] (everything else,
//! through hyper, with [`client_io`] timing out clients and [`wake`]), [`tcp`] (raw TCP),
//! [`fds`] (descriptor limits) and [`page`] (the HTML pages the proxy answers with).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod chunked;
mod client_io;
mod fast;
mod fds;
mod hyper_path;
mod page;
mod policy;
mod switch;
mod tcp;
#[cfg(test)]
mod tests;
mod wake;

pub use fds::{keep_child_fd_limit, raise_fd_limit};
pub use page::error_page;
pub use policy::Timeouts;
pub use switch::{Switch, Target, Upstream};
pub use tcp::serve_tcp;

use fds::{ClientSlot, accept_failed, client_slots, keep_spare_fd};
use policy::{CONNECT_TIMEOUT, Failure};
use switch::Count;

/// How long open connections may take to finish once the proxy is shutting down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

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
    serve_http_with(listener, service, switch, shutdown, Timeouts::default()).await;
}

/// [`serve_http`] with the client timeouts given (tests use short ones).
pub(crate) async fn serve_http_with(
    listener: TcpListener,
    service: String,
    switch: Switch,
    shutdown: CancellationToken,
    timeouts: Timeouts,
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
                                serve_http_here(listener, service, switch, stop, timeouts).await;
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
        serve_http_here(listener, service, switch, stop, timeouts).await;
    }
}

/// Serves HTTP/1.1 on `listener` on the current runtime until `shutdown`.
async fn serve_http_here(
    listener: TcpListener,
    service: String,
    switch: Switch,
    shutdown: CancellationToken,
    timeouts: Timeouts,
) {
    let proxy = Arc::new(Proxy {
        service,
        switch,
        shutdown: shutdown.clone(),
        tunnels: Arc::default(),
        timeouts,
    });
    keep_spare_fd();
    let slots = client_slots();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match ClientSlot::take(slots) {
                    Some(slot) => {
                        conns.spawn(serve_connection(proxy.clone(), stream, peer, slot));
                    }
                    None => {
                        let _ = stream.try_write(fds::TOO_MANY);
                        proxy.switch.report(format!(
                            "refused a client: {slots} connections open, the most the \
                             descriptor limit allows"
                        ));
                    }
                },
                Err(e) => accept_failed(&listener, &e).await,
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

/// Gives open connections `SHUTDOWN_GRACE` to finish, then drops whatever is left.
async fn finish(mut conns: JoinSet<()>) {
    let all_done = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, all_done).await;
    conns.shutdown().await;
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

/// Everything a connection handler needs; shared by all connections of one `serve_http`.
struct Proxy {
    service: String,
    switch: Switch,
    /// Tells connections and upgraded tunnels, which outlive their HTTP connection, that the
    /// proxy is stopping.
    shutdown: CancellationToken,
    /// The upgraded connections open, which the proxy waits for when it stops.
    tunnels: Arc<Count>,
    /// How long the proxy waits on its clients.
    timeouts: Timeouts,
}

impl Proxy {
    /// The 502 page for `failure` on the instance at `addr`: what happened in words; the
    /// details go to the log.
    fn failure_page(&self, addr: SocketAddr, failure: &Failure) -> String {
        self.switch.report(format!(
            "a request to the instance at {addr} failed: {failure}"
        ));
        error_page(&self.service, "bad gateway", failure.words(), &[])
    }

    /// The page for a request the proxy refuses to forward.
    fn refusal_page(&self, refusal: policy::Refusal) -> String {
        error_page(&self.service, "bad request", refusal.words(), &[])
    }
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    mut stream: TcpStream,
    peer: SocketAddr,
    _slot: ClientSlot,
) {
    let _ = stream.set_nodelay(true);
    // A child token: its lock is this connection's alone, unlike the proxy-wide one.
    let stop = proxy.shutdown.child_token();
    let ip = peer.ip().to_string();
    let read = match fast::serve(&proxy, &mut stream, &ip, &stop).await {
        fast::Outcome::Done => return,
        fast::Outcome::HandOver(read) => read,
    };
    let io = client_io::ClientIo::new(read, stream, proxy.timeouts);
    hyper_path::serve(proxy, io, peer, stop).await;
}
