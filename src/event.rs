//! Events: everything the engine tells its front ends, and the NDJSON shape scripts rely on.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One thing that happened to one service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub service: String,
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    pub fn now(service: &str, kind: EventKind) -> Event {
        Event {
            service: service.to_owned(),
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind,
        }
    }
}

/// What happened. The `event` field of the JSON form is the variant's snake_case name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The service's tree is watched; `mode` is `inotify`, `fsevents`, `native` or `poll`.
    /// `polled_dirs` of the `dirs` are polled (past the watch limit, or all of them), one
    /// pass every `poll_interval_ms` for now (it grows with what a pass costs).
    Watching {
        files: usize,
        dirs: usize,
        mode: String,
        polled_dirs: usize,
        poll_interval_ms: u64,
        startup_ms: u64,
        /// Where the service is reached (its proxy), when it is served.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    /// The wait between two passes over the polled directories moved by a quarter or more from
    /// the one last stated (in `watching` or an earlier `polling`): it follows what a pass
    /// costs. An edit under a polled directory is seen within it.
    Polling {
        polled_dirs: usize,
        poll_interval_ms: u64,
    },
    /// The whole tree is looked at again (lost events, ignore rules edited).
    Rescan {
        reason: String,
    },
    /// Builds kept triggering themselves by writing into the watched tree; rebuilding is
    /// paused until another file changes.
    LoopDetected {
        paths: Vec<String>,
        patterns: Vec<String>,
    },
    /// `.run` already holds this id; nothing to do. While watching, also sent when the tree
    /// is back at the live build after a build of it failed or was unhealthy: that failure no
    /// longer stands.
    UpToDate {
        id: String,
        archive: Option<String>,
    },
    /// An archive with this id existed and `.run` now points to it; nothing was built.
    Reused {
        id: String,
        archive: String,
    },
    BuildStarted {
        id: String,
        changed: Vec<String>,
    },
    /// A line a build step (`source` = `build`) or an instance (`run`) printed.
    Output {
        line: String,
        source: String,
    },
    /// An instance of build `id` is serving: the proxy sends new requests to it.
    Live {
        id: String,
        archive: String,
        /// The instance's own port (a new one for every instance).
        port: u16,
        /// Where to reach the service: its proxy's address, which stays the same.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    /// Build `id` (in `archive`) is ready to start, but its service's first instance waits
    /// until the services it depends on (`for_services`) are live.
    Waiting {
        id: String,
        archive: String,
        #[serde(rename = "for")]
        for_services: Vec<String>,
    },
    /// An instance never became healthy: the archive is marked unhealthy and `.run` went
    /// `back` to the build that serves (or the newest good one before it). With nothing to go
    /// back to, `watch` starts the same build again after `retry_in_ms`.
    Unhealthy {
        id: String,
        archive: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        back: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_in_ms: Option<u64>,
    },
    /// The live instance exited on its own; it is restarted after `restart_in_ms`.
    Crashed {
        id: String,
        reason: String,
        restart_in_ms: u64,
    },
    /// An instance was stopped (replaced, or pmesh-dev is quitting).
    Stopped {
        id: String,
        archive: String,
        port: u16,
    },
    /// Sent once the archive exists and `.run` points to it (when `ok`).
    BuildFinished {
        id: String,
        ok: bool,
        duration_ms: u64,
        archive: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Build `id` came from the team's cache (issue 14): a new archive that `.run` now points
    /// to; no step ran. `bytes` were downloaded in `duration_ms`.
    Fetched {
        id: String,
        archive: String,
        bytes: u64,
        duration_ms: u64,
    },
    /// Build `id` was uploaded to the team's cache: `bytes` in `duration_ms`.
    Pushed {
        id: String,
        bytes: u64,
        duration_ms: u64,
    },
    /// Old archives deleted by retention.
    Pruned {
        removed: Vec<String>,
    },
    /// `.run` moved back to an older build.
    Rollback {
        from: Option<String>,
        to: String,
        id: Option<String>,
    },
    /// The build was cancelled (Ctrl-C, SIGTERM or a newer change).
    Cancelled {
        id: String,
    },
    Warning {
        message: String,
    },
    /// `pmesh.toml` was edited while watching and has an error (located in `message`):
    /// nothing changed. `service` is empty.
    ManifestError {
        file: String,
        message: String,
    },
    /// `pmesh.toml` was edited while watching and applied. `service` is empty.
    ManifestApplied {
        file: String,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
    },
}

/// What a front end (the TUI, or a command sent over the control socket) asks of a service's
/// engine. The keyboard and the socket send the same commands.
#[derive(Debug)]
pub enum Command {
    /// Build the current tree (even if `.run` holds it already, when `force`).
    Build {
        force: bool,
        reply: Option<tokio::sync::oneshot::Sender<Done>>,
    },
    /// Re-point `.run` at `build` (default: the newest good build older than the live one),
    /// then serve it through the same health-gated swap as a new build.
    Rollback {
        build: Option<String>,
        reply: Option<tokio::sync::oneshot::Sender<Done>>,
    },
    /// Start a fresh instance of the live build and swap to it.
    Restart {
        reply: Option<tokio::sync::oneshot::Sender<Done>>,
    },
}

/// How a command ended: the exit code the CLI ends with, and a line saying why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Done {
    pub code: u8,
    pub message: String,
}

impl Done {
    pub fn new(code: u8, message: impl Into<String>) -> Done {
        Done {
            code,
            message: message.into(),
        }
    }
}

/// Output lines one subscriber may have waiting; beyond them new lines are dropped (and
/// counted). State events are never dropped.
const OUTPUT_BACKLOG: usize = 8192;

/// Where every event goes. Front ends (plain lines, NDJSON, the TUI, control-socket clients)
/// subscribe to it; emitting never blocks, and a slow subscriber loses output lines only, each
/// loss reported to it as a count in the place the lines would have been.
#[derive(Default)]
pub struct Sink {
    /// Live subscriptions; dead ones are dropped on the next emit.
    subscribers: std::sync::Mutex<Vec<std::sync::Weak<Queue>>>,
    /// Set by [`Sink::close`]: subscriptions end once they have read what was emitted.
    closed: std::sync::atomic::AtomicBool,
    /// Subscribers called in `emit` itself: the printers, whose lines then leave as the event
    /// happens (a hop through a task would add a scheduler's delay to every line on a busy
    /// machine). They must be quick and never emit.
    direct: std::sync::RwLock<Vec<DirectSubscriber>>,
}

type DirectSubscriber = Box<dyn Fn(&Event) + Send + Sync>;

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Received {
    Event(Event),
    /// This many output lines were dropped here, the subscriber being too slow for them.
    Dropped(u64),
}

#[derive(Default)]
struct Queue {
    state: std::sync::Mutex<QueueState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    items: std::collections::VecDeque<Received>,
    /// Output events among `items`.
    outputs: usize,
    closed: bool,
}

/// One subscriber's view of the events emitted since it subscribed.
pub struct Subscription {
    queue: std::sync::Arc<Queue>,
}

impl Sink {
    pub fn new() -> std::sync::Arc<Sink> {
        std::sync::Arc::new(Sink::default())
    }

    /// Calls `f` with every event from now on, from the emitting thread.
    pub fn attach(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        (self.direct.write().unwrap_or_else(|e| e.into_inner())).push(Box::new(f));
    }

    /// Hands `e` to every subscriber.
    pub fn emit(&self, e: &Event) {
        for f in self.direct.read().unwrap_or_else(|e| e.into_inner()).iter() {
            f(e);
        }
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|w| w.strong_count() > 0);
        let output = matches!(e.kind, EventKind::Output { .. });
        for q in subs.iter().filter_map(std::sync::Weak::upgrade) {
            let mut st = q.state.lock().unwrap_or_else(|e| e.into_inner());
            if output && st.outputs >= OUTPUT_BACKLOG {
                match st.items.back_mut() {
                    Some(Received::Dropped(n)) => *n += 1,
                    _ => st.items.push_back(Received::Dropped(1)),
                }
            } else {
                st.outputs += usize::from(output);
                st.items.push_back(Received::Event(e.clone()));
            }
            drop(st);
            q.ready.notify_one();
        }
    }

    /// Events from now on.
    pub fn subscribe(&self) -> Subscription {
        let queue = std::sync::Arc::new(Queue::default());
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            queue.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        }
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.push(std::sync::Arc::downgrade(&queue));
        Subscription { queue }
    }

    /// No more events: every subscription ends after what it has queued.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for q in subs.iter().filter_map(std::sync::Weak::upgrade) {
            q.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            q.ready.notify_one();
        }
    }

    /// Emits an event of `service` stamped now.
    pub fn now(&self, service: &str, kind: EventKind) {
        self.emit(&Event::now(service, kind));
    }
}

impl Subscription {
    /// The next event (or count of dropped lines); `None` once the sink is closed and
    /// everything before was read.
    pub async fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(r) = self.try_recv() {
                return Some(r);
            }
            if self.is_closed() {
                return None;
            }
            // One consumer: a notification sent while we were not waiting is kept as a permit.
            self.queue.ready.notified().await;
        }
    }

    /// The next item, if one is queued.
    pub fn try_recv(&mut self) -> Option<Received> {
        let mut st = self.queue.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = st.items.pop_front()?;
        if let Received::Event(Event {
            kind: EventKind::Output { .. },
            ..
        }) = &r
        {
            st.outputs -= 1;
        }
        Some(r)
    }

    fn is_closed(&self) -> bool {
        self.queue
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(n: usize) -> Event {
        Event::now(
            "s",
            EventKind::Output {
                line: format!("line {n}"),
                source: "build".to_owned(),
            },
        )
    }

    #[tokio::test]
    async fn a_slow_subscriber_loses_output_lines_with_a_count_but_never_a_state_event() {
        let sink = Sink::new();
        let mut sub = sink.subscribe();
        for n in 0..OUTPUT_BACKLOG + 10 {
            sink.emit(&output(n));
        }
        sink.now("s", EventKind::Cancelled { id: "x".into() });
        for n in 0..5 {
            sink.emit(&output(n));
        }
        sink.close();
        let mut lines = 0;
        let mut seen = Vec::new();
        while let Some(r) = sub.recv().await {
            match r {
                Received::Event(Event {
                    kind: EventKind::Output { .. },
                    ..
                }) => lines += 1,
                Received::Event(e) => seen.push(format!("{:?}", e.kind)),
                Received::Dropped(n) => seen.push(format!("dropped {n}")),
            }
        }
        assert_eq!(lines, OUTPUT_BACKLOG);
        assert_eq!(
            seen,
            vec![
                "dropped 10".to_owned(),
                "Cancelled { id: \"x\" }".to_owned(),
                "dropped 5".to_owned()
            ]
        );
    }

    #[tokio::test]
    async fn a_subscription_wakes_for_events_emitted_while_it_waits_and_ends_on_close() {
        let sink = Sink::new();
        let mut sub = sink.subscribe();
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Received::Event(e)) = sub.recv().await {
                got.push(e.service);
            }
            got
        });
        tokio::task::yield_now().await;
        sink.now("a", EventKind::Cancelled { id: "1".into() });
        sink.now("b", EventKind::Cancelled { id: "2".into() });
        sink.close();
        assert_eq!(waiter.await.unwrap(), vec!["a", "b"]);
        // Subscribing after the close ends at once.
        assert!(sink.subscribe().recv().await.is_none());
    }
}
