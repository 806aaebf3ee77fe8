//! The client side of a connection as the hyper path reads it: first the bytes the fast path
//! read, then the socket; and the client timeouts, which only run while the proxy waits on the
//! client (see [`Activity`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::policy::Timeouts;

/// What a client connection on the hyper path is doing, as far as its timeouts go: set by the
/// request handler, read by [`ClientIo`].
#[derive(Default)]
pub(super) struct Activity {
    /// Requests whose response is not finished.
    requests: AtomicUsize,
    /// A request's body is still being read from the client.
    body_open: AtomicBool,
    /// A request ended since `ClientIo` last looked: the idle time starts again.
    ended: AtomicBool,
    /// The connection switched protocols: it is a tunnel now, which may idle as it likes
    /// (a WebSocket between messages).
    upgraded: AtomicBool,
}

impl Activity {
    /// Counts a request until the guard drops: from now on the proxy waits on the instance
    /// (or on the service to start), not on the client.
    pub(super) fn begin(self: &Arc<Self>) -> Active {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.body_open.store(false, Ordering::SeqCst);
        Active(self.clone())
    }

    /// The request body is being forwarded: the proxy waits on the client for it.
    pub(super) fn body_started(&self) {
        self.body_open.store(true, Ordering::SeqCst);
    }

    /// The connection becomes a tunnel once the response being sent (a 101) is out.
    pub(super) fn upgraded(&self) {
        self.upgraded.store(true, Ordering::SeqCst);
    }

    /// The request body has been read to its end (or will not be read any more).
    pub(super) fn body_done(&self) {
        self.body_open.store(false, Ordering::SeqCst);
    }
}

/// A request in progress on a client connection (see [`Activity::begin`]).
pub(super) struct Active(Arc<Activity>);

impl Active {
    pub(super) fn activity(&self) -> &Arc<Activity> {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.body_open.store(false, Ordering::SeqCst);
        self.0.ended.store(true, Ordering::SeqCst);
        self.0.requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A client connection handed to the hyper path.
pub(super) struct ClientIo {
    prefix: Vec<u8>,
    at: usize,
    stream: TcpStream,
    timeouts: Timeouts,
    activity: Arc<Activity>,
    /// Since when nothing is in progress (no request, no byte of the next one).
    idle_since: Instant,
    /// When the first byte of the next request head came.
    head_since: Option<Instant>,
    /// When the proxy started waiting for more of a request body.
    body_wait: Option<Instant>,
    /// Fires at the deadline of what is being waited for; made on first use.
    timer: Option<Pin<Box<Sleep>>>,
}

impl ClientIo {
    pub(super) fn new(prefix: Vec<u8>, stream: TcpStream, timeouts: Timeouts) -> ClientIo {
        let now = Instant::now();
        ClientIo {
            // Bytes of a head are already here: its time runs.
            head_since: (!prefix.is_empty()).then_some(now),
            prefix,
            at: 0,
            stream,
            timeouts,
            activity: Arc::default(),
            idle_since: now,
            body_wait: None,
            timer: None,
        }
    }

    pub(super) fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Takes note of a request that ended since the last look: the idle time starts.
    fn sync(&mut self, now: Instant) {
        if self.activity.ended.swap(false, Ordering::SeqCst) {
            self.idle_since = now;
            self.head_since = None;
            self.body_wait = None;
        }
    }

    /// The deadline of what the connection waits for from the client now, if it waits.
    fn deadline(&mut self, now: Instant) -> Option<Instant> {
        self.sync(now);
        if self.activity.upgraded.load(Ordering::SeqCst) {
            return None;
        }
        if self.activity.requests.load(Ordering::SeqCst) > 0 {
            if !self.activity.body_open.load(Ordering::SeqCst) {
                // Waiting on the instance, not on the client.
                self.body_wait = None;
                return None;
            }
            let since = *self.body_wait.get_or_insert(now);
            return Some(since + self.timeouts.body_stall);
        }
        Some(match self.head_since {
            Some(since) => since + self.timeouts.head,
            None => self.idle_since + self.timeouts.idle,
        })
    }

    /// Bytes came from the client.
    fn got_bytes(&mut self, now: Instant) {
        self.sync(now);
        self.body_wait = None;
        if self.activity.requests.load(Ordering::SeqCst) == 0 && self.head_since.is_none() {
            self.head_since = Some(now);
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.got_bytes(Instant::now());
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some(deadline) = this.deadline(Instant::now()) else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    // hyper closes the connection on a read error.
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
