//! What the proxy forwards to, switched atomically, and the work in flight on each instance.

use std::fmt;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

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
pub(super) struct Count {
    n: AtomicUsize,
    /// Wakes every `zero()` caller when `n` drops to 0.
    zero: Notify,
}

impl Count {
    pub(super) fn get(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    pub(super) fn add(&self) {
        self.n.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn sub(&self) {
        if self.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.zero.notify_waiters();
        }
    }

    /// Resolves once the count is 0 (immediately if it already is).
    pub(super) async fn zero(&self) {
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
    pub(super) fn enter(self: &Arc<Self>) -> InFlight {
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
pub(super) struct InFlight(Arc<Upstream>);

impl InFlight {
    pub(super) fn upstream(&self) -> &Arc<Upstream> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.sub();
    }
}

/// One upgraded connection of the proxy, counted until it is dropped.
pub(super) struct Tunnel(Arc<Count>);

impl Tunnel {
    pub(super) fn enter(count: &Arc<Count>) -> Tunnel {
        count.add();
        Tunnel(count.clone())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.0.sub();
    }
}

/// Where the proxy reports what went wrong in detail (the client's page says it in words).
pub type FailureSink = Arc<dyn Fn(&str) + Send + Sync>;

/// The handle that switches the target; cheap to clone.
#[derive(Clone)]
pub struct Switch {
    /// The current target; every accepted request or connection reads it once.
    tx: Arc<watch::Sender<Target>>,
    /// The log of the proxy's failures, set by whoever runs the proxy.
    log: Arc<Mutex<Log>>,
}

/// The failure log: where it goes, and how many reports were held back since the last one.
#[derive(Default)]
struct Log {
    sink: Option<FailureSink>,
    last: Option<Instant>,
    held: usize,
}

/// At most one failure reported per this long: a crashed instance under load fails every
/// request, and one line a second says as much as a thousand.
const REPORT_EVERY: Duration = Duration::from_secs(1);

impl Switch {
    /// Creates a switch pointing at `initial`.
    pub fn new(initial: Target) -> Switch {
        Switch {
            tx: Arc::new(watch::Sender::new(initial)),
            log: Arc::default(),
        }
    }

    /// Sends the details of the proxy's failures (a 502's cause, a refused client) to
    /// `sink`, at most one a second.
    pub fn on_failure(&self, sink: FailureSink) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).sink = Some(sink);
    }

    /// Reports `detail` (see [`Switch::on_failure`]).
    pub(super) fn report(&self, detail: String) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sink) = log.sink.clone() else {
            return;
        };
        if log.last.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            log.held += 1;
            return;
        }
        let held = std::mem::take(&mut log.held);
        log.last = Some(Instant::now());
        drop(log);
        if held == 0 {
            sink(&detail);
        } else {
            sink(&format!("{detail} (and {held} more since the last report)"));
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

    /// The live instance, with one request counted on it; `None` in any other state.
    pub(super) fn live(&self) -> Option<InFlight> {
        match &*self.tx.borrow() {
            Target::Live(upstream) => Some(upstream.enter()),
            _ => None,
        }
    }

    /// Where a request arriving now goes: while Starting, waits (at most its `wait`) for the
    /// target to become Live or Down, and answers Starting if it did not.
    pub(super) async fn route(&self) -> Route {
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
pub(super) enum Route {
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
