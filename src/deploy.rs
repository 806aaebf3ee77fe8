//! The deployer of one service: while `watch` or `run` goes on, the one owner of what is live.
//!
//! It alone re-points `.run`, starts instances, runs the health-gated swap, undoes a build that
//! never becomes healthy, restarts a crashed instance with backoff, and deletes old archives once
//! no instance (live, candidate or draining) runs from them. Each request to it returns a
//! [`Ticket`] that resolves when the request has been carried out: a published build is live,
//! or was undone. The engine decides what to build and reads what `.run` holds from here.
//!
//! The order is the seed's: flip `.run`, start the new instance, check it. Every instance reads
//! its files from its own archive (`$PMESH_RUN_DIR`), never through `.run`, because `.run` moves
//! before the new instance is proven healthy and moves back if it is not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::builder::{describe_status, tail_text};
use crate::event::{Done, EventKind, Sink};
use crate::hash::BuildId;
use crate::manifest::{Protocol, Service};
use crate::proxy::{self, Notices, Switch, Target, Upstream};
use crate::store::{Status, Store};
use crate::supervisor::{Instance, TAIL, Unhealthy};

/// The first restart delay after a crash; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// An instance that served this long resets the backoff when it crashes.
const HEALTHY_STRETCH: Duration = Duration::from_secs(10);
/// Unreferenced logs (of failed or cancelled builds) kept per service.
pub const KEEP_ORPHAN_LOGS: usize = 20;

/// How the deployer serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Flip `.run` and prune only: a one-shot `build`, or a service with no `run`.
    Flip,
    /// Run instances behind the proxy, and keep retrying (with backoff) when nothing can serve:
    /// `watch`, where the next edit may fix it.
    Watch,
    /// Run instances behind the proxy; when no build of the service becomes healthy, say so
    /// ([`Report::NothingServes`]): `pmesh-dev run`.
    Run,
}

/// Why a build is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A new (or reused) build of the tree.
    Build,
    /// A rollback asked for by the user.
    Rollback,
}

/// Start order between services (`depends_on`): this service's first instance starts once
/// every service it depends on is live; and it says when it is.
#[derive(Default)]
pub struct Gate {
    /// Set once this service is live (or, with nothing to run, once `.run` holds a build).
    pub live: Option<watch::Sender<bool>>,
    /// The services waited for, and whether each is live.
    pub deps: Vec<(String, watch::Receiver<bool>)>,
}

impl Gate {
    fn open(&self) -> bool {
        self.deps.iter().all(|(_, rx)| *rx.borrow())
    }

    fn waiting_for(&self) -> Vec<String> {
        (self.deps.iter())
            .filter(|(_, rx)| !*rx.borrow())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Resolves once every dependency is live.
    async fn opened(deps: &mut [(String, watch::Receiver<bool>)]) {
        for (_, rx) in deps.iter_mut() {
            if rx.wait_for(|live| *live).await.is_err() {
                // That service's watch stopped: it is waited for no more.
                continue;
            }
        }
    }

    fn set_live(&self) {
        if let Some(tx) = &self.live {
            tx.send_replace(true);
        }
    }
}

/// What the deployer tells its owner.
#[derive(Debug)]
pub enum Report {
    /// Build `id` never became healthy and was undone: not worth building again as it is.
    Unhealthy { id: BuildId },
    /// No build of the service could be served (only in [`Mode::Run`]).
    NothingServes { reason: String },
}

/// Resolves once a request has been carried out. Cheap to clone; every clone sees the end.
#[derive(Clone)]
pub struct Ticket(watch::Receiver<Option<Done>>);

impl Ticket {
    /// Waits for the request's end.
    pub async fn done(mut self) -> Done {
        match self.0.wait_for(Option::is_some).await {
            Ok(d) => d
                .clone()
                .unwrap_or_else(|| Done::new(1, "the deployer stopped")),
            Err(_) => Done::new(1, "pmesh-dev is stopping"),
        }
    }

    fn resolved(done: Done) -> Ticket {
        let (tx, rx) = watch::channel(Some(done));
        drop(tx);
        Ticket(rx)
    }
}

/// The deployer's end of a ticket.
struct Resolver(watch::Sender<Option<Done>>);

fn ticket() -> (Resolver, Ticket) {
    let (tx, rx) = watch::channel(None);
    (Resolver(tx), Ticket(rx))
}

impl Resolver {
    fn resolve(self, done: Done) {
        let _ = self.0.send(Some(done));
    }
}

/// What `.run` holds, as the deployer last left it; read by the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunState {
    pub archive: Option<String>,
    pub id: Option<BuildId>,
}

enum Request {
    /// Serve what `.run` holds now (at start), health-gated, without re-pointing it.
    Serve,
    /// Re-point `.run` at `archive` (answering `flipped` once it points there), then serve it.
    Publish {
        archive: String,
        id: BuildId,
        why: Why,
        /// Not carried out if this was cancelled by the time the request is handled.
        unless: Option<CancellationToken>,
        flipped: oneshot::Sender<Result<Ticket, PublishError>>,
    },
    /// Start a fresh instance of the live build and swap to it.
    Restart { reply: oneshot::Sender<Ticket> },
    /// The newest build failed: say so to waiting requests if nothing serves.
    BuildFailed { error: String },
    /// The tree is the live build's again after a failure: the failure no longer stands.
    Recovered,
}

/// Why `.run` was not re-pointed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The publication was cancelled before its turn came (a rollback came first).
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

/// The handle on a service's deployer. Cheap to clone.
#[derive(Clone)]
pub struct Deployer {
    requests: mpsc::UnboundedSender<Request>,
    state: watch::Receiver<RunState>,
}

/// The deployer's tasks, to wait for once shutdown has fired.
pub struct Tasks {
    actor: JoinHandle<()>,
    proxy: Option<JoinHandle<()>>,
}

impl Tasks {
    /// Waits until the deployer and its proxy have stopped (after the shutdown token fired):
    /// every instance is stopped by then.
    pub async fn stopped(self) {
        let _ = self.actor.await;
        if let Some(p) = self.proxy {
            let _ = p.await;
        }
    }
}

impl Deployer {
    /// Starts the deployer of `svc` (binding its `listen` address, if any, in the serving modes).
    /// The caller holds the root's lock.
    pub async fn start(
        svc: Arc<Service>,
        store: Store,
        sink: Arc<Sink>,
        shutdown: CancellationToken,
        mode: Mode,
        gate: Gate,
    ) -> anyhow::Result<(Deployer, mpsc::UnboundedReceiver<Report>, Tasks)> {
        let mode = if svc.serves() { mode } else { Mode::Flip };
        let switch = Switch::new(Target::Starting {
            wait: svc.ready_timeout,
        });
        // Told when a build goes live or fails; HTML pages through the proxy listen, unless
        // `reload = false`.
        let notices = Notices::new(&svc.name);
        let switch = match (svc.reload, svc.protocol) {
            (true, Protocol::Http) => switch.with_notices(notices.clone()),
            _ => switch,
        };
        // The proxy's failures in detail (its pages say them in words): a warning each.
        switch.on_failure({
            let (sink, name) = (sink.clone(), svc.name.clone());
            Arc::new(move |detail: &str| {
                let message = format!("proxy: {detail}");
                sink.now(&name, EventKind::Warning { message });
            })
        });
        let proxy = match (svc.listen, mode) {
            (Some(addr), Mode::Watch | Mode::Run) => {
                let listener =
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
                                "cannot listen on {addr}: something else listens there already \
                             (another pmesh-dev, or the app started by hand?)"
                            ),
                            _ => anyhow::anyhow!("cannot listen on {addr}: {e}"),
                        })?;
                let (name, switch, shutdown) = (svc.name.clone(), switch.clone(), shutdown.clone());
                let protocol = svc.protocol;
                Some(tokio::spawn(async move {
                    match protocol {
                        Protocol::Http => proxy::serve_http(listener, name, switch, shutdown).await,
                        Protocol::Tcp => proxy::serve_tcp(listener, name, switch, shutdown).await,
                    }
                }))
            }
            _ => None,
        };
        let (requests, rx) = mpsc::unbounded_channel();
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(RunState {
            archive: store.live(),
            id: store.live_id(),
        });
        let actor = Actor {
            url: url_of(&svc),
            svc,
            store,
            sink,
            switch,
            notices,
            reports,
            mode,
            state: state_tx,
            phase: Phase::Idle,
            candidate: None,
            backoff: MIN_BACKOFF,
            stopping: JoinSet::new(),
            draining: Vec::new(),
            gate,
            held: None,
        };
        let actor = tokio::spawn(actor.run(rx, shutdown));
        Ok((
            Deployer { requests, state },
            reports_rx,
            Tasks { actor, proxy },
        ))
    }

    /// What `.run` holds now.
    pub fn run(&self) -> RunState {
        self.state.borrow().clone()
    }

    /// Serves what `.run` holds now, without re-pointing it.
    pub fn serve(&self) {
        let _ = self.requests.send(Request::Serve);
    }

    /// Re-points `.run` at `archive` (build `id`) and serves it, unless `unless` was cancelled
    /// by the time the deployer gets to it. Returns once `.run` points there, with the ticket
    /// of the swap.
    pub async fn publish(
        &self,
        archive: &str,
        id: BuildId,
        why: Why,
        unless: Option<&CancellationToken>,
    ) -> Result<Ticket, PublishError> {
        let stopping = || PublishError::Failed("pmesh-dev is stopping".to_owned());
        let (flipped, rx) = oneshot::channel();
        let request = Request::Publish {
            archive: archive.to_owned(),
            id,
            why,
            unless: unless.cloned(),
            flipped,
        };
        if self.requests.send(request).is_err() {
            return Err(stopping());
        }
        rx.await.unwrap_or_else(|_| Err(stopping()))
    }

    /// Replaces the live instance with a fresh one of the same build (health-gated).
    pub async fn restart(&self) -> Ticket {
        let (reply, rx) = oneshot::channel();
        if self.requests.send(Request::Restart { reply }).is_err() {
            return Ticket::resolved(Done::new(1, "pmesh-dev is stopping"));
        }
        rx.await
            .unwrap_or_else(|_| Ticket::resolved(Done::new(1, "pmesh-dev is stopping")))
    }

    /// Tells waiting requests that the newest build failed, if nothing serves.
    pub fn build_failed(&self, error: String) {
        let _ = self.requests.send(Request::BuildFailed { error });
    }

    /// Tells open pages that the last failure no longer stands: the tree is the live build's.
    pub fn recovered(&self) {
        let _ = self.requests.send(Request::Recovered);
    }
}

/// `http://127.0.0.1:8080` for a service whose proxy speaks HTTP.
pub fn url_of(svc: &Service) -> Option<String> {
    match (svc.listen, svc.protocol) {
        (Some(addr), Protocol::Http) => Some(format!("http://{addr}")),
        (Some(addr), Protocol::Tcp) => Some(format!("tcp://{addr}")),
        (None, _) => None,
    }
}

/// An instance that receives traffic.
struct Serving {
    inst: Instance,
    upstream: Arc<Upstream>,
    since: Instant,
}

/// What serves. A build being proven runs beside it, as the [`Candidate`].
enum Phase {
    /// Nothing serves, and nothing is due: no build yet, or the first one is being proven.
    Idle,
    Serving(Serving),
    /// Nothing serves: the instance crashed, or no build could start. What `.run` holds is
    /// started again at `at` (unless a candidate is being proven by then).
    Down {
        archive: String,
        at: tokio::time::Instant,
    },
}

impl Phase {
    /// The archive of what serves (or should, once it is up again).
    fn archive(&self) -> Option<&str> {
        match self {
            Phase::Idle => None,
            Phase::Serving(s) => Some(&s.inst.archive),
            Phase::Down { archive, .. } => Some(archive),
        }
    }
}

/// What a candidate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A build that `.run` was pointed at: undone if it never becomes healthy.
    Publish,
    /// The build that serves, started again (after a crash, or asked for): never undone.
    Restart,
}

/// An instance being proven, and the task checking its health.
struct Candidate {
    inst: Instance,
    health: JoinHandle<Result<(), Unhealthy>>,
    kind: Kind,
    /// Whoever waits for it to be live (or undone).
    waiters: Vec<Resolver>,
}

/// Owns the instances of one service; runs as one task.
struct Actor {
    svc: Arc<Service>,
    store: Store,
    sink: Arc<Sink>,
    switch: Switch,
    /// What open pages are told: a new build live (they reload), a failure (an overlay).
    notices: Notices,
    reports: mpsc::UnboundedSender<Report>,
    mode: Mode,
    url: Option<String>,
    /// What `.run` holds, for the engine; written only here, right after each flip.
    state: watch::Sender<RunState>,
    phase: Phase,
    candidate: Option<Candidate>,
    backoff: Duration,
    /// Old instances being drained and stopped; each task ends with its archive's name.
    stopping: JoinSet<String>,
    /// The archives those instances run from: not to be deleted until they stop.
    draining: Vec<String>,
    gate: Gate,
    /// The first instance, held until the services this one depends on are live.
    held: Option<(String, BuildId, Kind, Vec<Resolver>)>,
}

async fn health_of(
    c: &mut Option<Candidate>,
) -> Result<Result<(), Unhealthy>, tokio::task::JoinError> {
    match c {
        Some(c) => (&mut c.health).await,
        None => std::future::pending().await,
    }
}

async fn exit_of(phase: &Phase) -> Option<std::process::ExitStatus> {
    match phase {
        Phase::Serving(s) => s.inst.exited().await,
        _ => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Actor {
    fn emit(&self, kind: EventKind) {
        self.sink.now(&self.svc.name, kind);
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>, shutdown: CancellationToken) {
        loop {
            // A restart waits while a candidate is proven: it would start the same `.run`.
            let restart_at = match (&self.phase, &self.candidate) {
                (Phase::Down { at, .. }, None) => Some(*at),
                _ => None,
            };
            let holding = self.held.is_some();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = Gate::opened(&mut self.gate.deps), if holding => {
                    // Only the first instance waits (and a dependency whose watch stopped is
                    // waited for no more).
                    self.gate.deps.clear();
                    if let Some((archive, id, kind, waiters)) = self.held.take() {
                        self.start_candidate(archive, id, kind, waiters).await;
                    }
                }
                request = rx.recv() => match request {
                    Some(r) => self.on_request(r).await,
                    None => break,
                },
                res = health_of(&mut self.candidate) => self.on_health(res).await,
                status = exit_of(&self.phase) => self.on_crash(status),
                _ = sleep_until(restart_at), if restart_at.is_some() => self.restart_down().await,
                Some(done) = self.stopping.join_next(), if !self.stopping.is_empty() => {
                    if let Ok(archive) = done
                        && let Some(i) = self.draining.iter().position(|a| *a == archive)
                    {
                        self.draining.swap_remove(i);
                    }
                    self.prune();
                }
            }
        }
        // Quitting: nothing new is accepted; what runs is drained briefly and stopped.
        let grace = self.svc.stop_timeout;
        if let Some(c) = self.candidate.take() {
            c.health.abort();
            for w in c.waiters {
                w.resolve(Done::new(130, "pmesh-dev is stopping"));
            }
            self.stop_in_background(c.inst, None, grace);
        }
        if let Phase::Serving(s) = std::mem::replace(&mut self.phase, Phase::Idle) {
            self.stop_in_background(s.inst, Some(s.upstream), grace);
        }
        while self.stopping.join_next().await.is_some() {}
    }

    async fn on_request(&mut self, request: Request) {
        match request {
            Request::Serve => {
                if let (Some(archive), Some(id)) = (self.store.live(), self.store.live_id())
                    && self.mode != Mode::Flip
                {
                    self.start_candidate(archive, id, Kind::Publish, Vec::new())
                        .await;
                }
            }
            Request::Publish {
                archive,
                id,
                why,
                unless,
                flipped,
            } => {
                if unless.is_some_and(|c| c.is_cancelled()) {
                    let _ = flipped.send(Err(PublishError::Cancelled));
                    return;
                }
                if self.store.archive(&archive).is_none() {
                    // `.run` is only ever pointed at an archive that exists.
                    let gone = format!("{archive} is gone; .run stays where it is");
                    let _ = flipped.send(Err(PublishError::Failed(gone)));
                    return;
                }
                let from = self.store.live();
                if let Err(e) = self.point_run(&archive) {
                    let _ = flipped.send(Err(PublishError::Failed(e)));
                    return;
                }
                if why == Why::Rollback {
                    self.emit(EventKind::Rollback {
                        from,
                        to: archive.clone(),
                        id: Some(id.to_string()),
                    });
                }
                let (resolver, ticket) = ticket();
                let _ = flipped.send(Ok(ticket));
                self.serve_published(archive, id, resolver).await;
            }
            Request::Restart { reply } => {
                let (resolver, ticket) = ticket();
                let _ = reply.send(ticket);
                match (self.store.live(), self.store.live_id(), self.mode) {
                    (Some(archive), Some(id), Mode::Watch | Mode::Run) => {
                        self.start_candidate(archive, id, Kind::Restart, vec![resolver])
                            .await;
                    }
                    _ => resolver.resolve(Done::new(
                        2,
                        format!("service `{}` has nothing to restart", self.svc.name),
                    )),
                }
            }
            Request::BuildFailed { error } => {
                self.notices.problem("the build failed", &error);
                if matches!(self.phase, Phase::Idle) && self.candidate.is_none() {
                    self.switch.set(Target::Down {
                        status: 503,
                        body: page(&self.svc.name, "the build failed", &error, &[]),
                    });
                }
            }
            Request::Recovered => self.notices.recovered(),
        }
    }

    /// Re-points `.run` and tells the engine what it holds now.
    fn point_run(&self, archive: &str) -> Result<(), String> {
        self.store.point_run(archive).map_err(|e| e.to_string())?;
        self.publish_state();
        Ok(())
    }

    fn publish_state(&self) {
        let _ = self.state.send(RunState {
            archive: self.store.live(),
            id: self.store.live_id(),
        });
    }

    /// `.run` now holds `archive`: prove it (or, with nothing to run, settle at once).
    async fn serve_published(&mut self, archive: String, id: BuildId, resolver: Resolver) {
        if self.mode == Mode::Flip {
            self.gate.set_live();
            self.prune();
            resolver.resolve(Done::new(0, format!(".run -> {archive} ({})", id.short())));
            return;
        }
        if let Phase::Serving(s) = &self.phase
            && s.inst.archive == archive
        {
            // What serves already: the newest request wins over a candidate still starting.
            let mut waiters = vec![resolver];
            if let Some(c) = self.candidate.take() {
                c.health.abort();
                waiters.extend(c.waiters);
                self.stop_in_background(c.inst, None, Duration::ZERO);
            }
            let done = Done::new(0, format!("{archive} ({}) is serving", id.short()));
            for w in waiters {
                w.resolve(done.clone());
            }
            self.prune();
            return;
        }
        self.start_candidate(archive, id, Kind::Publish, vec![resolver])
            .await;
    }

    /// Starts an instance of `archive` beside what serves; traffic moves once it is healthy. A
    /// candidate still starting is superseded: its waiters wait for this one.
    async fn start_candidate(
        &mut self,
        mut archive: String,
        mut id: BuildId,
        mut kind: Kind,
        mut waiters: Vec<Resolver>,
    ) {
        if matches!(self.phase, Phase::Idle) && !self.gate.open() {
            // Newest wins here too: what was held waits with this one.
            if let Some((.., held)) = self.held.take() {
                waiters.extend(held);
            }
            self.emit(EventKind::Waiting {
                id: id.to_string(),
                archive: archive.clone(),
                for_services: self.gate.waiting_for(),
            });
            self.held = Some((archive, id, kind, waiters));
            return;
        }
        loop {
            if let Some(c) = self.candidate.take() {
                c.health.abort();
                waiters.extend(c.waiters);
                self.stop_in_background(c.inst, None, Duration::ZERO);
            }
            match Instance::start(&self.svc, &self.store, &archive, id, &self.sink).await {
                Ok(inst) => {
                    let probe = inst.probe();
                    let (health, timeout) = (self.svc.health.clone(), self.svc.ready_timeout);
                    let health =
                        tokio::spawn(async move { probe.wait_healthy(&health, timeout).await });
                    self.candidate = Some(Candidate {
                        inst,
                        health,
                        kind,
                        waiters,
                    });
                    return;
                }
                Err(e) => match self.failed(&archive, id, kind, format!("{e:#}"), waiters) {
                    Some(next) => {
                        (archive, id) = next;
                        (kind, waiters) = (Kind::Publish, Vec::new());
                    }
                    None => return,
                },
            }
        }
    }

    async fn on_health(&mut self, res: Result<Result<(), Unhealthy>, tokio::task::JoinError>) {
        let Some(c) = self.candidate.take() else {
            return;
        };
        let result = res.unwrap_or_else(|e| {
            Err(Unhealthy::Exited {
                status: format!("a failed health check task ({e})"),
                tail: Vec::new(),
            })
        });
        match result {
            Ok(()) => self.go_live(c),
            Err(why) => {
                let (id, archive) = (c.inst.id, c.inst.archive.clone());
                self.stop_in_background(c.inst, None, Duration::ZERO);
                if let Some((archive, id)) =
                    self.failed(&archive, id, c.kind, why.to_string(), c.waiters)
                {
                    self.start_candidate(archive, id, Kind::Publish, Vec::new())
                        .await;
                }
            }
        }
    }

    /// The candidate is healthy: traffic moves to it, and the old instance is drained.
    fn go_live(&mut self, c: Candidate) {
        self.gate.set_live();
        let upstream = Upstream::new(c.inst.addr());
        self.switch.set(Target::Live(upstream.clone()));
        let (id, archive) = (c.inst.id, c.inst.archive.clone());
        // After the swap, never before: a page reloading now lands on this build.
        self.notices.live(&upstream, &id.to_string());
        // A build once marked unhealthy that serves now (a retry, or a flaky check) is good.
        if self
            .store
            .archive(&archive)
            .is_some_and(|a| a.status() == Status::Unhealthy)
        {
            let _ = self.store.set_status(&archive, Status::Ok);
        }
        self.emit(EventKind::Live {
            id: id.to_string(),
            archive: archive.clone(),
            port: c.inst.port,
            url: self.url.clone(),
        });
        // The team's cache (issue 14): upload what `watch` proved live, in the background.
        if self.mode == Mode::Watch {
            crate::cache::push_in_background(&self.svc, &archive, id, &self.sink);
        }
        let old = std::mem::replace(
            &mut self.phase,
            Phase::Serving(Serving {
                inst: c.inst,
                upstream,
                since: Instant::now(),
            }),
        );
        if let Phase::Serving(old) = old {
            self.stop_in_background(old.inst, Some(old.upstream), self.svc.stop_timeout);
        }
        let done = Done::new(0, format!("{archive} ({}) is serving", id.short()));
        for w in c.waiters {
            w.resolve(done.clone());
        }
        self.prune();
    }

    /// A candidate that could not start or never became healthy. Returns the build to start
    /// next, when `.run` went back to one that nothing serves yet.
    fn failed(
        &mut self,
        archive: &str,
        id: BuildId,
        kind: Kind,
        reason: String,
        waiters: Vec<Resolver>,
    ) -> Option<(String, BuildId)> {
        let mut next = None;
        let done = match kind {
            Kind::Restart if matches!(self.phase, Phase::Serving(_)) => {
                // A restart asked for while the build serves: the running instance stays.
                self.emit(EventKind::Warning {
                    message: format!(
                        "a fresh instance of {} did not become healthy ({reason}); the running \
                         one keeps serving",
                        id.short()
                    ),
                });
                Done::new(1, format!("{archive} did not restart: {reason}"))
            }
            Kind::Restart => {
                // Nothing serves: the same build is tried again, later each time.
                let delay = self.go_down(archive, 502, "crashed, restarting", &reason, &[]);
                self.emit(EventKind::Crashed {
                    id: id.to_string(),
                    reason: reason.clone(),
                    restart_in_ms: millis(delay),
                });
                Done::new(1, format!("{archive} did not start: {reason}"))
            }
            Kind::Publish => {
                let (done, back) = self.undo(archive, id, reason);
                next = back;
                done
            }
        };
        for w in waiters {
            w.resolve(done.clone());
        }
        next
    }

    /// An unhealthy build: mark it, put `.run` back on what serves (or the newest good build
    /// before it), and keep or explain what serves. Returns the build `.run` went back to
    /// when nothing serves it yet, to be started.
    fn undo(
        &mut self,
        archive: &str,
        id: BuildId,
        reason: String,
    ) -> (Done, Option<(String, BuildId)>) {
        let _ = self.store.set_status(archive, Status::Unhealthy);
        let back = match self.phase.archive() {
            Some(a) if a != archive => Some(a.to_owned()),
            _ => self
                .store
                .previous_good(archive)
                .ok()
                .flatten()
                .map(|a| a.name),
        };
        if let Some(back) = &back
            && let Err(e) = self.store.point_run_if(archive, back)
        {
            self.emit(EventKind::Warning {
                message: format!("cannot put .run back on {back}: {e}"),
            });
        }
        self.publish_state();
        let _ = self.reports.send(Report::Unhealthy { id });
        let retry = match (&back, &self.phase) {
            // Nothing to go back to: in `watch` the same build is tried again with backoff
            // (the next edit may well fix it); `run` gives up.
            (None, _) if self.mode == Mode::Run => {
                let _ = self.reports.send(Report::NothingServes {
                    reason: reason.clone(),
                });
                None
            }
            (None, _) => {
                let detail = format!("{} never became healthy: {reason}", id.short());
                Some(self.go_down(archive, 503, "not healthy", &detail, &[]))
            }
            _ => None,
        };
        let detail = format!("{} never became healthy: {reason}", id.short());
        self.notices.problem("not healthy", &detail);
        self.emit(EventKind::Unhealthy {
            id: id.to_string(),
            archive: archive.to_owned(),
            reason: reason.clone(),
            back: back.clone(),
            retry_in_ms: retry.map(millis),
        });
        // Nothing serves what `.run` went back to yet (the first instance of this watch was
        // never healthy): it is started next, and undone in turn if it fails too.
        let next = match (&back, &self.phase) {
            (Some(b), Phase::Idle) => self.store.archive(b).and_then(|a| Some((a.name, a.id?))),
            _ => None,
        };
        let done = match back {
            Some(b) => Done::new(
                1,
                format!("{archive} never became healthy; .run went back to {b}"),
            ),
            None => Done::new(
                1,
                format!(
                    "{archive} never became healthy, and there is no earlier build to go back to"
                ),
            ),
        };
        (done, next)
    }

    /// Nothing serves `archive`: the proxy answers `status` with a page saying `state` and
    /// `detail`, and the build is started again after the backoff, which doubles.
    fn go_down(
        &mut self,
        archive: &str,
        status: u16,
        state: &str,
        detail: &str,
        tail: &[String],
    ) -> Duration {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.phase = Phase::Down {
            archive: archive.to_owned(),
            at: tokio::time::Instant::now() + delay,
        };
        let body = page(&self.svc.name, state, detail, tail);
        self.switch.set(Target::Down { status, body });
        delay
    }

    fn on_crash(&mut self, status: Option<std::process::ExitStatus>) {
        let Phase::Serving(s) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        if s.since.elapsed() > HEALTHY_STRETCH {
            self.backoff = MIN_BACKOFF;
        }
        let reason = match status {
            Some(st) => format!("exited with {}", describe_status(&st)),
            None => "exited".to_owned(),
        };
        let tail = s.inst.head_and_tail(TAIL);
        let (id, archive) = (s.inst.id, s.inst.archive.clone());
        self.stop_in_background(s.inst, None, Duration::ZERO);
        let delay = self.go_down(&archive, 502, "crashed, restarting", &reason, &tail);
        let detail = format!("{} {reason}{}", id.short(), tail_text(&tail));
        self.notices.problem("crashed", &detail);
        self.emit(EventKind::Crashed {
            id: id.to_string(),
            reason,
            restart_in_ms: millis(delay),
        });
    }

    /// Starts what `.run` holds now again, nothing serving.
    async fn restart_down(&mut self) {
        match (self.store.live(), self.store.live_id()) {
            (Some(archive), Some(id)) => {
                // Still Down (its page shown) while the new instance starts.
                self.start_candidate(archive, id, Kind::Restart, Vec::new())
                    .await;
            }
            _ => {
                self.phase = Phase::Idle;
                self.switch.set(Target::Down {
                    status: 503,
                    body: proxy::error_page(&self.svc.name, "no build to run", "", &[]),
                });
            }
        }
    }

    /// Deletes the archives beyond `keep` that nothing runs from.
    fn prune(&self) {
        let mut in_use: Vec<String> = self.draining.clone();
        in_use.extend(self.phase.archive().map(str::to_owned));
        in_use.extend(self.candidate.as_ref().map(|c| c.inst.archive.clone()));
        match self.store.retain(self.svc.keep, &in_use) {
            Ok(removed) if !removed.is_empty() => self.emit(EventKind::Pruned { removed }),
            Ok(_) => {}
            Err(e) => self.emit(EventKind::Warning {
                message: format!("cannot delete old builds: {e}"),
            }),
        }
        let _ = self.store.prune_logs(KEEP_ORPHAN_LOGS);
    }

    /// Drains `inst` (when it had traffic) for up to `grace`, then stops its group.
    fn stop_in_background(
        &mut self,
        inst: Instance,
        upstream: Option<Arc<Upstream>>,
        grace: Duration,
    ) {
        let sink = self.sink.clone();
        let name = self.svc.name.clone();
        let stop_grace = self.svc.stop_timeout;
        self.draining.push(inst.archive.clone());
        self.stopping.spawn(async move {
            if let Some(u) = upstream {
                let _ = tokio::time::timeout(grace, u.drained()).await;
            }
            let (id, archive, port) = (inst.id, inst.archive.clone(), inst.port);
            inst.stop(stop_grace).await;
            sink.now(
                &name,
                EventKind::Stopped {
                    id: id.to_string(),
                    archive: archive.clone(),
                    port,
                },
            );
            archive
        });
    }
}

/// An error page whose detail's first line is the sentence and the rest (a step's or an
/// instance's last lines) is shown as log lines, in `<pre>`.
fn page(service: &str, state: &str, detail: &str, tail: &[String]) -> String {
    let mut lines = detail.lines();
    let first = lines.next().unwrap_or("");
    let first = first.strip_suffix("; its last lines:").unwrap_or(first);
    let mut log: Vec<String> = lines.map(|l| l.trim_start().to_owned()).collect();
    log.extend(tail.iter().cloned());
    proxy::error_page(service, state, first, &log)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `pmesh-dev run`: serves what `.run` points to, without building, until `shutdown`.
/// Fails when no build of the service becomes healthy.
pub async fn run_only(
    svc: Arc<Service>,
    sink: Arc<Sink>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = Store::new(&svc.root);
    let _lock = store.lock("pmesh-dev run")?;
    store.recover()?;
    tokio::task::block_in_place(|| crate::supervisor::reap_leftovers(&store));
    if store.live_id().is_none() {
        anyhow::bail!(
            "service `{}` has no build to run ({}/.run leads to none): run `pmesh-dev build` first",
            svc.name,
            svc.root.display()
        );
    }
    let (deployer, mut reports, tasks) = Deployer::start(
        svc.clone(),
        store,
        sink,
        shutdown.clone(),
        Mode::Run,
        Gate::default(),
    )
    .await?;
    deployer.serve();
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(report) = reports.recv() => {
                if let Report::NothingServes { reason } = report {
                    result = Err(anyhow::anyhow!(
                        "service `{}`: no build of it becomes healthy ({reason})", svc.name
                    ));
                    shutdown.cancel();
                    break;
                }
            }
        }
    }
    tasks.stopped().await;
    result
}
