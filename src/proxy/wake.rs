//! In-task wake-ups for the hyper path's connection tasks (see [`LocalWake`]).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Wake, Waker};

/// Rounds a connection task polls itself in one go while its parts keep waking each other,
/// before it yields to the scheduler like any other woken task.
const LOCAL_ROUNDS: usize = 16;

/// In-task wake-ups of a client connection's task, which has two parts: the client
/// connection (with its request handler) and its upstream connections.
///
/// The parts wake each other all the time: sending a request wakes the upstream connection,
/// its response wakes the handler, and so on. With the task's own waker each of those would
/// reschedule the task through the runtime. Instead each part gets a waker of its own
/// ([`PartWake`]) that notes which part to poll: while the task is being polled, the task
/// just polls that part again in place; outside of a poll (socket readiness, timers) the
/// waker also wakes the task. A round polls only the parts that were woken.
pub(super) struct LocalWake {
    /// The parts woken and not polled since (`SERVER`, `UPSTREAMS`).
    woken: AtomicU8,
    /// True while the task polls its parts.
    polling: AtomicBool,
    /// The task's waker, from its latest poll.
    task: Mutex<Option<Waker>>,
}

/// The part of a connection task that serves the client connection.
pub(super) const SERVER: u8 = 1;
/// The part of a connection task that drives its upstream connections.
pub(super) const UPSTREAMS: u8 = 2;

impl LocalWake {
    pub(super) fn new() -> Arc<LocalWake> {
        Arc::new(LocalWake {
            // Both parts start out to be polled.
            woken: AtomicU8::new(SERVER | UPSTREAMS),
            polling: AtomicBool::new(false),
            task: Mutex::new(None),
        })
    }

    /// The waker for `part`.
    pub(super) fn waker(self: &Arc<Self>, part: u8) -> Waker {
        Waker::from(Arc::new(PartWake {
            local: self.clone(),
            part,
        }))
    }

    pub(super) fn wake(&self, part: u8) {
        self.woken.fetch_or(part, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(task) = &*task {
                task.wake_by_ref();
            }
        }
    }

    /// Whether `part` was woken since it was last polled; it counts as polled from now on.
    pub(super) fn take(&self, part: u8) -> bool {
        self.woken.fetch_and(!part, Ordering::SeqCst) & part != 0
    }

    /// Runs `round` (which polls the parts it `take`s) until it is ready, or until a round
    /// ends with no part woken (then the task waits for a wake from outside).
    pub(super) async fn drive<T>(&self, mut round: impl FnMut() -> Poll<T>) -> T {
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
pub(super) struct PartWake {
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
