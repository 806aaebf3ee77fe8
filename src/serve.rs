//! Serving one service: the proxy on `listen`, and an actor that owns the instances. It starts
//! an instance for each build the engine deploys, waits for it to be healthy, switches the
//! proxy to it in one step, then drains and stops the old one. A build that never becomes
//! healthy is undone (`.run` goes back, the archive is marked unhealthy) while the old
//! instance keeps serving. A crashed instance is restarted from `.run` with backoff.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::builder::describe_status;
use crate::event::{Event, EventKind};
use crate::hash::BuildId;
use crate::log::Reporter;
use crate::manifest::{Protocol, Service};
use crate::proxy::{self, Switch, Target, Upstream};
use crate::store::{Status, Store};
use crate::supervisor::{Instance, TAIL, Unhealthy};

/// The first restart delay after a crash; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// An instance that served this long resets the backoff when it crashes.
const HEALTHY_STRETCH: Duration = Duration::from_secs(10);

/// What the engine asks of the server.
#[derive(Debug)]
enum Cmd {
    /// `.run` now holds this build: serve it.
    Deploy { archive: String, id: BuildId },
    /// The first build failed: tell waiting requests why (if nothing serves yet).
    BuildFailed { error: String },
    /// Start a fresh instance of the live build and swap to it.
    Restart,
}

/// What the server tells the engine.
#[derive(Debug)]
pub enum Report {
    /// Build `id` never became healthy; `.run` now holds `live`.
    Unhealthy {
        id: BuildId,
        archive: String,
        live: Option<BuildId>,
    },
    /// An instance of `archive` serves now.
    Live { id: BuildId, archive: String },
}

/// The engine's handle on a service's server.
pub struct Server {
    cmds: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
    proxy: Option<JoinHandle<()>>,
    /// Archives that instances run from, for retention.
    in_use: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Binds the service's `listen` address (if any) and starts the proxy and the actor.
    pub async fn start(
        svc: Arc<Service>,
        store: Store,
        reporter: Arc<Reporter>,
        shutdown: CancellationToken,
        reports: mpsc::UnboundedSender<Report>,
    ) -> anyhow::Result<Server> {
        let switch = Switch::new(Target::Starting {
            wait: svc.ready_timeout,
        });
        let proxy = match svc.listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("service `{}`: cannot listen on {addr}", svc.name))?;
                let (name, switch, shutdown) = (svc.name.clone(), switch.clone(), shutdown.clone());
                let protocol = svc.protocol;
                Some(tokio::spawn(async move {
                    match protocol {
                        Protocol::Http => proxy::serve_http(listener, name, switch, shutdown).await,
                        Protocol::Tcp => proxy::serve_tcp(listener, name, switch, shutdown).await,
                    }
                }))
            }
            None => None,
        };
        let (cmds, rx) = mpsc::unbounded_channel();
        let in_use = Arc::new(Mutex::new(Vec::new()));
        let actor = Actor {
            svc,
            store,
            reporter,
            switch,
            reports,
            live: None,
            candidate: None,
            backoff: MIN_BACKOFF,
            restart_at: None,
            stopping: JoinSet::new(),
            in_use: in_use.clone(),
        };
        let task = tokio::spawn(actor.run(rx, shutdown));
        Ok(Server {
            cmds,
            task,
            proxy,
            in_use,
        })
    }

    /// Serves build `id` from `archive` (health-gated).
    pub fn deploy(&self, archive: String, id: BuildId) {
        let _ = self.cmds.send(Cmd::Deploy { archive, id });
    }

    /// Replaces the live instance with a fresh one of the same build (health-gated).
    pub fn restart(&self) {
        let _ = self.cmds.send(Cmd::Restart);
    }

    /// Tells waiting requests that the first build failed.
    pub fn build_failed(&self, error: String) {
        let _ = self.cmds.send(Cmd::BuildFailed { error });
    }

    /// Archives that instances run from now.
    pub fn in_use(&self) -> Vec<String> {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the actor and the proxy have stopped (after the shutdown token fired).
    pub async fn stopped(self) {
        let _ = self.task.await;
        if let Some(p) = self.proxy {
            let _ = p.await;
        }
    }
}

/// An instance that receives traffic.
struct Serving {
    inst: Instance,
    upstream: Arc<Upstream>,
    since: Instant,
}

/// An instance that is starting, and the task checking its health.
struct Candidate {
    inst: Instance,
    health: JoinHandle<Result<(), Unhealthy>>,
    /// A restart after a crash, rather than a new build.
    restart: bool,
}

/// Owns the instances of one service; runs as one task.
struct Actor {
    svc: Arc<Service>,
    store: Store,
    reporter: Arc<Reporter>,
    switch: Switch,
    reports: mpsc::UnboundedSender<Report>,
    live: Option<Serving>,
    candidate: Option<Candidate>,
    backoff: Duration,
    /// When to restart after a crash.
    restart_at: Option<tokio::time::Instant>,
    /// Old instances being drained and stopped.
    stopping: JoinSet<()>,
    in_use: Arc<Mutex<Vec<String>>>,
}

async fn health_of(
    c: &mut Option<Candidate>,
) -> Result<Result<(), Unhealthy>, tokio::task::JoinError> {
    match c {
        Some(c) => (&mut c.health).await,
        None => std::future::pending().await,
    }
}

async fn exit_of(s: &Option<Serving>) -> Option<std::process::ExitStatus> {
    match s {
        Some(s) => s.inst.exited().await,
        None => std::future::pending().await,
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
        self.reporter.emit(&Event::now(&self.svc.name, kind));
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, shutdown: CancellationToken) {
        loop {
            let restart_at = self.restart_at;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Deploy { archive, id }) => self.deploy(archive, id, false).await,
                    Some(Cmd::BuildFailed { error }) => self.build_failed(&error),
                    Some(Cmd::Restart) => {
                        if let (Some(archive), Some(id)) = (self.store.live(), self.store.live_id()) {
                            self.start_candidate(archive, id, false).await;
                        }
                    }
                    None => break,
                },
                res = health_of(&mut self.candidate) => self.on_health(res),
                status = exit_of(&self.live) => self.on_crash(status),
                _ = sleep_until(restart_at), if restart_at.is_some() => self.restart().await,
                Some(_) = self.stopping.join_next(), if !self.stopping.is_empty() => {}
            }
        }
        // Quitting: nothing new is accepted; what runs is drained briefly and stopped.
        let grace = self.svc.stop_timeout;
        if let Some(c) = self.candidate.take() {
            c.health.abort();
            self.stop_in_background(c.inst, None, grace);
        }
        if let Some(s) = self.live.take() {
            self.stop_in_background(s.inst, Some(s.upstream), grace);
        }
        while self.stopping.join_next().await.is_some() {}
    }

    fn set_in_use(&self) {
        let mut v = Vec::new();
        v.extend(self.live.as_ref().map(|s| s.inst.archive.clone()));
        v.extend(self.candidate.as_ref().map(|c| c.inst.archive.clone()));
        *self.in_use.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    /// Starts an instance of `archive` beside the live one; traffic moves once it is healthy.
    async fn deploy(&mut self, archive: String, id: BuildId, restart: bool) {
        if !restart
            && let Some(s) = &self.live
            && s.inst.archive == archive
        {
            // The newest request wins: a build still starting must not take over afterwards.
            if let Some(c) = self.candidate.take() {
                c.health.abort();
                self.stop_in_background(c.inst, None, Duration::ZERO);
                self.set_in_use();
            }
            let _ = self.reports.send(Report::Live { id, archive });
            return;
        }
        self.start_candidate(archive, id, restart).await;
    }

    /// Starts an instance of `archive`; `restart` marks a restart after a crash.
    async fn start_candidate(&mut self, archive: String, id: BuildId, restart: bool) {
        if let Some(c) = self.candidate.take() {
            // A newer build supersedes the one still starting.
            c.health.abort();
            self.stop_in_background(c.inst, None, Duration::ZERO);
        }
        self.restart_at = None;
        match Instance::start(&self.svc, &self.store, &archive, id, &self.reporter).await {
            Ok(inst) => {
                let probe = inst.probe();
                let (health, timeout) = (self.svc.health.clone(), self.svc.ready_timeout);
                let health =
                    tokio::spawn(async move { probe.wait_healthy(&health, timeout).await });
                self.candidate = Some(Candidate {
                    inst,
                    health,
                    restart,
                });
            }
            Err(e) => {
                let reason = format!("{e:#}");
                if restart {
                    self.schedule_restart(id, reason);
                } else {
                    self.undo(&archive, id, reason);
                }
            }
        }
        self.set_in_use();
    }

    fn on_health(&mut self, res: Result<Result<(), Unhealthy>, tokio::task::JoinError>) {
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
            Ok(()) => {
                let upstream = Upstream::new(c.inst.addr());
                self.switch.set(Target::Live(upstream.clone()));
                self.emit(EventKind::Live {
                    id: c.inst.id.to_string(),
                    archive: c.inst.archive.clone(),
                    port: c.inst.port,
                });
                // The team's cache (issue 14): upload what is now proven live, in the background.
                crate::cache::push_in_background(
                    &self.svc,
                    &c.inst.archive,
                    c.inst.id,
                    &self.reporter,
                );
                let _ = self.reports.send(Report::Live {
                    id: c.inst.id,
                    archive: c.inst.archive.clone(),
                });
                let old = self.live.replace(Serving {
                    inst: c.inst,
                    upstream,
                    since: Instant::now(),
                });
                if let Some(old) = old {
                    self.stop_in_background(old.inst, Some(old.upstream), self.svc.stop_timeout);
                }
            }
            Err(why) => {
                let (id, archive) = (c.inst.id, c.inst.archive.clone());
                self.stop_in_background(c.inst, None, Duration::ZERO);
                if c.restart {
                    self.schedule_restart(id, why.to_string());
                } else {
                    self.undo(&archive, id, why.to_string());
                }
            }
        }
        self.set_in_use();
    }

    /// An unhealthy build: mark it, put `.run` back, keep (or explain) what serves.
    fn undo(&mut self, archive: &str, id: BuildId, reason: String) {
        let _ = self.store.set_status(archive, Status::Unhealthy);
        let back = match &self.live {
            Some(s) => Some(s.inst.archive.clone()),
            None => self
                .store
                .previous_good(archive)
                .ok()
                .flatten()
                .map(|a| a.name),
        };
        if let Some(back) = &back {
            let _ = self.store.point_run_if(archive, back);
        }
        self.emit(EventKind::Unhealthy {
            id: id.to_string(),
            archive: archive.to_owned(),
            reason: reason.clone(),
        });
        if self.live.is_none() {
            self.switch.set(Target::Down {
                status: 503,
                body: proxy::error_page(&self.svc.name, "the build is not healthy", &reason, &[]),
            });
        }
        let _ = self.reports.send(Report::Unhealthy {
            id,
            archive: archive.to_owned(),
            live: self.store.live_id(),
        });
    }

    fn build_failed(&mut self, error: &str) {
        if self.live.is_none() && self.candidate.is_none() {
            self.switch.set(Target::Down {
                status: 503,
                body: proxy::error_page(&self.svc.name, "the build failed", error, &[]),
            });
        }
    }

    fn on_crash(&mut self, status: Option<std::process::ExitStatus>) {
        let Some(s) = self.live.take() else {
            return;
        };
        if s.since.elapsed() > HEALTHY_STRETCH {
            self.backoff = MIN_BACKOFF;
        }
        let reason = match status {
            Some(st) => format!("exited with {}", describe_status(&st)),
            None => "exited".to_owned(),
        };
        let tail = s.inst.tail(TAIL);
        let id = s.inst.id;
        self.switch.set(Target::Down {
            status: 502,
            body: proxy::error_page(&self.svc.name, "crashed, restarting", &reason, &tail),
        });
        self.stop_in_background(s.inst, None, Duration::ZERO);
        self.schedule_restart(id, reason);
        self.set_in_use();
    }

    fn schedule_restart(&mut self, id: BuildId, reason: String) {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.restart_at = Some(tokio::time::Instant::now() + delay);
        self.emit(EventKind::Crashed {
            id: id.to_string(),
            reason,
            restart_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        });
    }

    /// Restarts from whatever `.run` points to now.
    async fn restart(&mut self) {
        self.restart_at = None;
        match (self.store.live(), self.store.live_id()) {
            (Some(archive), Some(id)) => self.deploy(archive, id, true).await,
            _ => self.switch.set(Target::Down {
                status: 503,
                body: proxy::error_page(&self.svc.name, "no build to run", "", &[]),
            }),
        }
    }

    /// Drains `inst` (when it had traffic) for up to `grace`, then stops its group.
    fn stop_in_background(
        &mut self,
        inst: Instance,
        upstream: Option<Arc<Upstream>>,
        grace: Duration,
    ) {
        let reporter = self.reporter.clone();
        let name = self.svc.name.clone();
        let stop_grace = self.svc.stop_timeout;
        self.stopping.spawn(async move {
            if let Some(u) = upstream {
                let _ = tokio::time::timeout(grace, u.drained()).await;
            }
            let (id, archive, port) = (inst.id, inst.archive.clone(), inst.port);
            inst.stop(stop_grace).await;
            reporter.emit(&Event::now(
                &name,
                EventKind::Stopped {
                    id: id.to_string(),
                    archive,
                    port,
                },
            ));
        });
    }
}

/// `pmesh-dev run`: serves what `.run` points to, without building, until `shutdown`.
/// Fails when nothing can be served healthily.
pub async fn run_only(
    svc: Arc<Service>,
    reporter: Arc<Reporter>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = Store::new(&svc.root);
    let _lock = store.lock("pmesh-dev run")?;
    store.recover()?;
    tokio::task::block_in_place(|| crate::supervisor::reap_leftovers(&store));
    let (Some(archive), Some(id)) = (store.live(), store.live_id()) else {
        anyhow::bail!(
            "service `{}` has no build to run ({}/.run leads to none): run `pmesh-dev build` first",
            svc.name,
            svc.root.display()
        );
    };
    let (tx, mut reports) = mpsc::unbounded_channel();
    let server = Server::start(svc.clone(), store.clone(), reporter, shutdown.clone(), tx).await?;
    server.deploy(archive, id);
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(report) = reports.recv() => {
                let Report::Unhealthy { id, live, .. } = report else { continue };
                match (store.live(), live) {
                    (Some(archive), Some(back)) if back != id => server.deploy(archive, back),
                    _ => {
                        result = Err(anyhow::anyhow!(
                            "service `{}`: no build of it becomes healthy", svc.name
                        ));
                        shutdown.cancel();
                        break;
                    }
                }
            }
        }
    }
    server.stopped().await;
    result
}
