//! One task per service: it owns the service's tree, watcher and build, and turns file
//! changes, build results and shutdown into builds and events.
//!
//! Changes are debounced (quiet time after the last event), then only the paths named are read
//! again. A change during a build cancels it and the newest tree is built next: at most one
//! build runs and the newest tree always wins. A failed build leaves the live one in place and
//! is not retried until the tree changes again.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::control;
use crate::event::{Command, Done, Event, EventKind};
use crate::hash::live::Change;
use crate::hash::{BuildId, HashSpec, LiveTree};
use crate::log::Reporter;
use crate::manifest::{DEFAULT_POLL, Service};
use crate::pipeline::{self, Job, Outcome, StepsRunning};
use crate::serve::{Report, Server};
use crate::store::Store;
use crate::supervisor;
use crate::sys::trim_heap;
use crate::watch::{self, DirWatcher, WatchError, WatchMsg};

/// Builds in a row triggered only by files written while the previous build ran, after which
/// rebuilding pauses.
const LOOP_LIMIT: u32 = 3;

/// The digest cache is written at most this often while watching (and always at exit): on a
/// big tree it is tens of megabytes, and only the next start reads it.
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// How `watch` was asked to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOptions {
    /// Which watcher backend (`--watcher`; `--poll` is `poll`).
    pub watcher: watch::Backend,
}

/// The build in progress.
struct Running {
    id: BuildId,
    /// Cancels this build only; a child of the shutdown token.
    cancel: CancellationToken,
    handle: JoinHandle<anyhow::Result<Outcome>>,
    /// Whether its steps still run: writes seen meanwhile may be the build's own.
    steps: StepsRunning,
}

/// Detects builds that keep triggering themselves.
#[derive(Default)]
struct LoopGuard {
    /// Paths events named while the current build ran (relative to the root).
    written_now: BTreeSet<String>,
    /// Those of the previous build.
    written_by_last: BTreeSet<String>,
    /// Builds in a row triggered only by such paths.
    count: u32,
    /// Set while rebuilding is paused.
    paused: bool,
}

/// The state of one service's watch; owned by its task alone.
struct Engine {
    svc: Arc<Service>,
    store: Store,
    reporter: Arc<Reporter>,
    shutdown: CancellationToken,
    /// Taken out while a blocking task updates it.
    tree: Option<LiveTree>,
    watcher: Option<DirWatcher>,
    /// `Some(interval)` when the tree is polled instead of watched.
    poll: Option<Duration>,
    /// The id `.run` holds.
    live: Option<BuildId>,
    /// A tree id not to build on its own: its build failed or was unhealthy, or it was rolled
    /// back from. Building resumes when the tree changes (or on a forced build).
    skip: Option<BuildId>,
    /// The next build is forced (the `b` key, `build --force`).
    force_next: bool,
    /// Commands waiting for the end of the next build.
    build_waiters: Vec<oneshot::Sender<Done>>,
    /// Commands waiting for an archive to be served (or found unhealthy).
    live_waiters: Vec<(String, oneshot::Sender<Done>)>,
    building: Option<Running>,
    /// Paths named by events since the last update, and why the whole tree must be looked at.
    pending: BTreeSet<PathBuf>,
    rescan: Option<String>,
    /// When the pending changes are quiet long enough to be processed.
    deadline: Option<tokio::time::Instant>,
    /// What the paths of a quiet period's first events changed, read at once (see
    /// [`Engine::read_ahead`]); taken when the period ends.
    early: Option<Change>,
    /// `decide` was called while `early` was pending: the period's end must decide, whatever
    /// it finds.
    deferred: bool,
    /// Paths changed since the last build started, for `build_started`.
    changed: BTreeSet<String>,
    guard: LoopGuard,
    /// The proxy and instances, for a service with `run`.
    server: Option<Server>,
    /// The manifest: an edit is reported (it applies at the next start).
    manifest_path: PathBuf,
    manifest_warned: bool,
    /// When the digest cache was last written.
    saved_at: Instant,
}

/// Watches `svc` until `shutdown`: builds at start if needed, then after every change, and
/// carries out the `commands` of the TUI and of the control socket.
pub async fn run(
    svc: Arc<Service>,
    manifest_path: PathBuf,
    opts: WatchOptions,
    reporter: Arc<Reporter>,
    shutdown: CancellationToken,
    commands: (
        mpsc::UnboundedSender<Command>,
        mpsc::UnboundedReceiver<Command>,
    ),
) -> anyhow::Result<()> {
    let started = Instant::now();
    let store = Store::new(&svc.root);
    let _lock = store.lock("pmesh-dev watch")?;
    store.recover()?;
    let (command_tx, mut commands) = commands;
    match control::listen(&svc.root) {
        Ok(listener) => {
            tokio::spawn(control::serve(
                listener,
                svc.name.clone(),
                command_tx,
                reporter.clone(),
                shutdown.clone(),
            ));
        }
        // Watching still works; only commands from other shells cannot reach this watch
        // (they then fail on the root's lock, naming this process).
        Err(e) => reporter.emit(&Event::now(
            &svc.name,
            EventKind::Warning {
                message: format!(
                    "no control socket at {} ({e}); `build` and `rollback` from other shells \
                     cannot reach this watch",
                    control::socket_path(&svc.root).display()
                ),
            },
        )),
    }
    let reaped = tokio::task::block_in_place(|| supervisor::reap_leftovers(&store));
    if reaped > 0 {
        reporter.emit(&Event::now(
            &svc.name,
            EventKind::Warning {
                message: format!("stopped {reaped} instance(s) left by an earlier pmesh-dev"),
            },
        ));
    }
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let server = match svc.run {
        Some(_) => Some(
            Server::start(
                svc.clone(),
                store.clone(),
                reporter.clone(),
                shutdown.clone(),
                report_tx,
            )
            .await?,
        ),
        None => None,
    };

    let (tree, warnings) = {
        let (svc, manifest_path) = (svc.clone(), manifest_path.clone());
        tokio::task::spawn_blocking(move || {
            LiveTree::scan(&HashSpec::service(&svc, &manifest_path))
        })
        .await
        .context("the hashing task failed")??
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut engine = Engine {
        live: store.live_id(),
        store,
        reporter,
        shutdown: shutdown.clone(),
        watcher: None,
        // Set only when no watcher can be made: then the whole tree is rescanned.
        poll: None,
        svc,
        tree: Some(tree),
        skip: None,
        force_next: false,
        build_waiters: Vec::new(),
        live_waiters: Vec::new(),
        building: None,
        pending: BTreeSet::new(),
        rescan: None,
        deadline: None,
        early: None,
        deferred: false,
        changed: BTreeSet::new(),
        guard: LoopGuard::default(),
        server,
        manifest_path,
        manifest_warned: false,
        saved_at: Instant::now(),
    };
    trim_heap();
    for message in warnings {
        engine.emit(EventKind::Warning { message });
    }
    if engine.poll.is_none() {
        let tree = engine.tree();
        // The manifest's own directory too, so that an edit of it can be reported.
        let manifest_dir = (engine.manifest_path.parent()).filter(|d| !tree.has_dir(d));
        // `poll` in the manifest, like `--poll`, polls every directory.
        let backend = match engine.svc.poll {
            Some(_) => watch::Backend::Poll,
            None => opts.watcher,
        };
        let every = engine.svc.poll.unwrap_or(DEFAULT_POLL);
        let added = tokio::task::block_in_place(|| {
            let root = tree.root().to_path_buf();
            let mut w = DirWatcher::new(backend, every, tx.clone(), root)?;
            w.add(tree.dir_paths())?;
            w.add(manifest_dir.into_iter())?;
            Ok::<_, WatchError>(w)
        });
        match added {
            Ok(w) => engine.watcher = Some(w),
            Err(e) => engine.fall_back_to_polling(&e),
        }
    }
    trim_heap();
    drop(tx);
    let (files, dirs) = (engine.tree().files(), engine.tree().dirs());
    let (mode, (polled_dirs, every)) = match (&engine.watcher, engine.poll) {
        (Some(w), None) => (w.mode(), w.polled()),
        (_, every) => ("poll", (dirs, every.unwrap_or(DEFAULT_POLL))),
    };
    engine.emit(EventKind::Watching {
        files,
        dirs,
        mode: mode.to_owned(),
        polled_dirs,
        poll_interval_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        startup_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
    engine.decide();
    if engine.building.is_none()
        && let (Some(server), Some(archive), Some(id)) =
            (&engine.server, engine.store.live(), engine.store.live_id())
    {
        server.deploy(archive, id);
    }

    let mut poll_tick = tokio::time::interval(engine.poll.unwrap_or(DEFAULT_POLL));
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll_tick.tick().await;
    loop {
        let deadline = engine.deadline;
        let polling = engine.poll.is_some();
        // Biased: events are taken before a build's end is handled, so that whatever the build
        // wrote (inotify reports it before the build's exit is even noticed) counts as written
        // while it ran.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = rx.recv(), if engine.watcher.is_some() => match msg {
                Some(m) => engine.on_msg(m),
                None => engine.watcher = None,
            },
            done = wait(&mut engine.building) => engine.on_build_done(done),
            Some(report) = reports.recv() => engine.on_report(report),
            Some(command) = commands.recv() => engine.on_command(command),
            _ = sleep_until(deadline), if deadline.is_some() => engine.process().await?,
            _ = poll_tick.tick(), if polling => {
                engine.rescan.get_or_insert_with(|| "poll".to_owned());
                engine.process().await?;
            }
        }
    }
    if let Some(b) = engine.building.take() {
        b.cancel.cancel();
        let _ = b.handle.await;
    }
    let stopping = || Done::new(130, "pmesh-dev watch is stopping");
    for w in engine.build_waiters.drain(..) {
        let _ = w.send(stopping());
    }
    for (_, w) in engine.live_waiters.drain(..) {
        let _ = w.send(stopping());
    }
    if let Some(mut tree) = engine.tree.take() {
        tokio::task::block_in_place(|| tree.save_cache());
    }
    if let Some(server) = engine.server.take() {
        server.stopped().await;
    }
    // Removed here rather than by the socket's task, which the runtime may drop first.
    let _ = std::fs::remove_file(control::socket_path(engine.store.root()));
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn wait(
    building: &mut Option<Running>,
) -> Result<anyhow::Result<Outcome>, tokio::task::JoinError> {
    match building {
        Some(b) => (&mut b.handle).await,
        None => std::future::pending().await,
    }
}

impl Engine {
    fn emit(&self, kind: EventKind) {
        self.reporter.emit(&Event::now(&self.svc.name, kind));
    }

    fn tree(&self) -> &LiveTree {
        // The tree is only ever out while `process` awaits its blocking task.
        self.tree
            .as_ref()
            .expect("the tree is in place between updates")
    }

    fn fall_back_to_polling(&mut self, e: &WatchError) {
        self.watcher = None;
        let interval = DEFAULT_POLL;
        self.poll = Some(interval);
        let message = match e {
            WatchError::Limit => format!(
                "cannot watch every directory of `{}`: the inotify watch limit \
                 (fs.inotify.max_user_watches = {}) is reached; polling every {}s instead. \
                 Raise it with: sudo sysctl fs.inotify.max_user_watches=524288",
                self.svc.name,
                watch::max_user_watches().map_or_else(|| "?".to_owned(), |n| n.to_string()),
                interval.as_secs()
            ),
            WatchError::Other(e) => format!(
                "cannot watch `{}` ({e}); polling every {}s instead",
                self.svc.name,
                interval.as_secs()
            ),
        };
        self.emit(EventKind::Warning { message });
    }

    fn on_msg(&mut self, msg: WatchMsg) {
        let named_paths = matches!(msg, WatchMsg::Paths(_));
        match msg {
            WatchMsg::Paths(paths) => {
                let Some(tree) = self.tree.as_ref() else {
                    return;
                };
                let mut rels = Vec::new();
                if !self.manifest_warned && paths.contains(&self.manifest_path) {
                    self.manifest_warned = true;
                    let message = format!(
                        "{} changed: restart pmesh-dev watch to apply it",
                        self.manifest_path.display()
                    );
                    self.emit(EventKind::Warning { message });
                }
                for p in paths {
                    if tree.concerns(&p) {
                        if let Ok(rel) = p.strip_prefix(tree.root()) {
                            rels.push(rel.to_string_lossy().into_owned());
                        }
                        self.pending.insert(p);
                    }
                }
                if rels.is_empty() {
                    return;
                }
                if self.building.as_ref().is_some_and(|b| b.steps.get()) {
                    self.guard.written_now.extend(rels);
                }
            }
            WatchMsg::Rescan(reason) => {
                self.rescan = Some(reason.to_owned());
            }
            WatchMsg::Error(message) => self.emit(EventKind::Warning { message }),
        }
        let first = self.deadline.is_none();
        self.deadline = Some(tokio::time::Instant::now() + self.svc.debounce);
        if first && named_paths && self.rescan.is_none() && !self.pending.is_empty() {
            self.read_ahead();
        }
    }

    /// Reads the paths that the first events of a quiet period name right away, while the
    /// debounce runs, instead of when it ends. Whatever changes after is named by later events
    /// and read when the period ends; a save is usually one batch of events, so by then the
    /// tree and its id are up to date and only the last events' files are read again (with no
    /// change, the id is not recomputed). What a new build waits for beyond the debounce is
    /// then a re-read, not the id's pass over every entry after the edited one.
    fn read_ahead(&mut self) {
        let paths: Vec<PathBuf> = std::mem::take(&mut self.pending).into_iter().collect();
        let Some(tree) = self.tree.as_mut() else {
            self.pending.extend(paths);
            return;
        };
        match tokio::task::block_in_place(|| tree.apply(&paths)) {
            Ok(change) => {
                self.update_watches(&change);
                match &mut self.early {
                    Some(early) => merge(early, change),
                    None => self.early = Some(change),
                }
            }
            // Read again when the period ends, which reports the error.
            Err(_) => self.pending.extend(paths),
        }
    }

    /// Brings the tree up to date with the pending changes, then decides what to build.
    async fn process(&mut self) -> anyhow::Result<()> {
        self.deadline = None;
        let paths: Vec<PathBuf> = std::mem::take(&mut self.pending).into_iter().collect();
        let rescan = self.rescan.take();
        if let Some(reason) = &rescan
            && reason != "poll"
        {
            self.emit(EventKind::Rescan {
                reason: reason.clone(),
            });
        }
        let early = self.early.take();
        let result = if paths.is_empty() && rescan.is_none() {
            // Everything was read ahead.
            Ok(Change::default())
        } else {
            let Some(mut tree) = self.tree.take() else {
                return Ok(());
            };
            let rescan_done = rescan.is_some();
            let (tree, result) = tokio::task::spawn_blocking(move || {
                let r = if rescan.is_some() {
                    tree.rescan()
                } else {
                    tree.apply(&paths)
                };
                (tree, r)
            })
            .await
            .context("the hashing task failed")?;
            self.tree = Some(tree);
            if rescan_done {
                trim_heap();
            }
            result
        };
        let mut change = match result {
            Ok(c) => c,
            Err(e) => {
                self.emit(EventKind::Warning {
                    message: e.to_string(),
                });
                // As without the read-ahead: nothing builds until the next event; what was
                // read ahead is named by that build.
                if let Some(early) = early {
                    self.changed.extend(early.changed);
                }
                if self.deferred {
                    self.decide();
                }
                return Ok(());
            }
        };
        self.update_watches(&change);
        if let Some(early) = early {
            // Files that appeared for the read-ahead and are gone again (an editor's or sed's
            // temporary file, renamed over its target) never took part.
            let tree = self.tree();
            let transient: Vec<String> = (early.added.iter())
                .filter(|p| !tree.has_entry(p))
                .cloned()
                .collect();
            merge(&mut change, early);
            change.changed.retain(|p| !transient.contains(p));
        }
        let Change {
            changed,
            warnings,
            rules_reloaded,
            ..
        } = change;
        for message in warnings {
            self.emit(EventKind::Warning { message });
        }
        if rules_reloaded {
            self.guard = LoopGuard::default();
        }
        if changed.is_empty() {
            if self.deferred {
                self.decide();
            }
            return Ok(());
        }
        let self_triggered = changed
            .iter()
            .all(|p| self.guard.written_now.contains(p) || self.guard.written_by_last.contains(p));
        self.changed.extend(changed);
        if self.guard.paused {
            // Nothing builds while paused, so whatever changed now came from elsewhere.
            self.guard = LoopGuard::default();
        } else if self_triggered {
            self.guard.count += 1;
        } else {
            self.guard.count = 0;
        }
        self.decide();
        Ok(())
    }

    fn update_watches(&mut self, change: &Change) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        if !change.unwatch.is_empty() {
            w.remove(&change.unwatch);
        }
        if !change.watch.is_empty()
            && let Err(e) = w.add(change.watch.iter())
        {
            self.fall_back_to_polling(&e);
        }
    }

    /// Starts, cancels or leaves the build so that the newest tree ends up live.
    fn decide(&mut self) {
        if self.early.is_some() {
            // The tree is ahead of what was decided on: the quiet period's end decides.
            self.deferred = true;
            return;
        }
        self.deferred = false;
        let id = self.tree().id();
        if let Some(b) = &self.building {
            if b.id != id && !b.cancel.is_cancelled() {
                // A newer tree: this build is stale. The next starts once it has stopped.
                b.cancel.cancel();
            }
            return;
        }
        let force = std::mem::take(&mut self.force_next);
        if !force
            && (Some(id) == self.live || Some(id) == self.skip || self.shutdown.is_cancelled())
        {
            self.changed.clear();
            return;
        }
        if self.guard.count >= LOOP_LIMIT {
            self.guard.paused = true;
            self.guard.count = 0;
            let paths: Vec<String> = self.changed.iter().cloned().collect();
            let patterns = suggest_patterns(&paths);
            self.changed.clear();
            self.emit(EventKind::LoopDetected { paths, patterns });
            return;
        }
        let cancel = self.shutdown.child_token();
        let changed: Vec<String> = std::mem::take(&mut self.changed).into_iter().collect();
        let steps = StepsRunning::default();
        let handle = tokio::spawn({
            let svc = self.svc.clone();
            let store = self.store.clone();
            let reporter = self.reporter.clone();
            let cancel = cancel.clone();
            let steps = steps.clone();
            let job = Job {
                id,
                changed,
                force,
                in_use: self.server.as_ref().map(Server::in_use).unwrap_or_default(),
                steps,
            };
            async move { pipeline::build_id(&svc, &store, job, &reporter, &cancel).await }
        });
        self.guard.written_now.clear();
        self.building = Some(Running {
            id,
            cancel,
            handle,
            steps,
        });
    }

    fn on_build_done(&mut self, done: Result<anyhow::Result<Outcome>, tokio::task::JoinError>) {
        self.building = None;
        self.guard.written_by_last = std::mem::take(&mut self.guard.written_now);
        let done = match done {
            Ok(Ok(Outcome::Built { id, archive } | Outcome::Reused { id, archive })) => {
                self.live = Some(id);
                self.skip = None;
                let done = Done::new(0, format!("built {} -> {archive}", id.short()));
                if let Some(server) = &self.server {
                    server.deploy(archive, id);
                }
                Some(done)
            }
            Ok(Ok(Outcome::UpToDate(id))) => {
                self.live = Some(id);
                self.skip = None;
                Some(Done::new(0, format!("up to date ({})", id.short())))
            }
            Ok(Ok(Outcome::Failed { id, error })) => {
                self.skip = Some(id);
                if let Some(server) = &self.server {
                    server.build_failed(error.clone());
                }
                Some(Done::new(1, error))
            }
            // A newer tree is built next; whoever waits gets that outcome.
            Ok(Ok(Outcome::Cancelled)) => None,
            Ok(Err(e)) => {
                self.emit(EventKind::Warning {
                    message: format!("{e:#}"),
                });
                Some(Done::new(1, format!("{e:#}")))
            }
            Err(e) => {
                self.emit(EventKind::Warning {
                    message: format!("the build task failed: {e}"),
                });
                Some(Done::new(1, format!("the build task failed: {e}")))
            }
        };
        if let Some(done) = done {
            for w in self.build_waiters.drain(..) {
                let _ = w.send(done.clone());
            }
        }
        if self.saved_at.elapsed() >= SAVE_EVERY
            && let Some(tree) = self.tree.as_mut()
        {
            tokio::task::block_in_place(|| tree.save_cache());
            self.saved_at = Instant::now();
        }
        self.decide();
    }

    /// The server undid an unhealthy build: do not build that tree again until it changes,
    /// and serve whatever `.run` went back to.
    fn on_report(&mut self, report: Report) {
        match report {
            Report::Unhealthy { id, archive, live } => {
                self.skip = Some(id);
                self.live = live;
                self.answer_live_waiters(
                    &archive,
                    Done::new(1, format!("{archive} never became healthy; .run went back")),
                );
                if let (Some(server), Some(archive), Some(id)) =
                    (&self.server, self.store.live(), live)
                {
                    server.deploy(archive, id);
                }
            }
            Report::Live { id, archive } => {
                let done = Done::new(0, format!("{archive} ({}) is serving", id.short()));
                self.answer_live_waiters(&archive, done);
            }
        }
    }

    fn answer_live_waiters(&mut self, archive: &str, done: Done) {
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.live_waiters)
            .into_iter()
            .partition(|(a, _)| a == archive);
        self.live_waiters = rest;
        for (_, w) in ready {
            let _ = w.send(done.clone());
        }
    }

    /// Carries out a command of the TUI or the control socket.
    fn on_command(&mut self, command: Command) {
        match command {
            Command::Build { force, reply } => {
                if force {
                    self.force_next = true;
                } else {
                    self.skip = None;
                }
                if let Some(b) = &self.building {
                    if force {
                        b.cancel.cancel();
                    }
                } else {
                    self.decide();
                }
                match (reply, self.building.is_some()) {
                    (Some(r), true) => self.build_waiters.push(r),
                    (Some(r), false) => {
                        let id = self.tree().id();
                        let _ = r.send(Done::new(0, format!("up to date ({})", id.short())));
                    }
                    (None, _) => {}
                }
            }
            Command::Rollback { build, reply } => {
                let done = self.rollback(build.as_deref());
                match (done, reply) {
                    (Ok(archive), Some(r)) if self.server.is_some() => {
                        self.live_waiters.push((archive, r));
                    }
                    (Ok(archive), Some(r)) => {
                        let _ = r.send(Done::new(0, format!(".run -> {archive}")));
                    }
                    (Err(done), Some(r)) => {
                        let _ = r.send(done);
                    }
                    (Err(done), None) => self.emit(EventKind::Warning {
                        message: done.message,
                    }),
                    (Ok(_), None) => {}
                }
            }
            Command::Restart { reply } => match (&self.server, self.store.live()) {
                (Some(server), Some(archive)) => {
                    server.restart();
                    if let Some(r) = reply {
                        self.live_waiters.push((archive, r));
                    }
                }
                _ => {
                    if let Some(r) = reply {
                        let _ = r.send(Done::new(
                            2,
                            format!("service `{}` has nothing to restart", self.svc.name),
                        ));
                    }
                }
            },
        }
    }

    /// Re-points `.run` (the engine holds the root's lock) and serves the build it points to
    /// now; the tree that was live is not rebuilt until it changes.
    fn rollback(&mut self, build: Option<&str>) -> Result<String, Done> {
        let live = self.store.live();
        let (archive, id) = pipeline::rollback_target(&self.svc, &self.store, build)
            .map_err(|e| Done::new(e.code(), e.to_string()))?;
        if let Some(b) = &self.building {
            // A build finishing now would flip `.run` away from the rollback.
            b.cancel.cancel();
        }
        self.store
            .point_run(&archive.name)
            .map_err(|e| Done::new(1, e.to_string()))?;
        self.live = Some(id);
        self.skip = Some(self.tree().id());
        self.emit(EventKind::Rollback {
            from: live,
            to: archive.name.clone(),
            id: Some(id.to_string()),
        });
        if let Some(server) = &self.server {
            server.deploy(archive.name.clone(), id);
        }
        Ok(archive.name)
    }
}

/// Ignore patterns that would keep `paths` out of the tree: their top directory, or the file.
fn suggest_patterns(paths: &[String]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for p in paths {
        match p.split_once('/') {
            Some((dir, _)) => out.insert(format!("/{dir}/")),
            None => out.insert(format!("/{p}")),
        };
    }
    out.into_iter().collect()
}

/// Adds what `other` changed to `into`; their watches were updated already.
fn merge(into: &mut Change, other: Change) {
    into.changed.extend(other.changed);
    into.changed.sort();
    into.changed.dedup();
    into.warnings.extend(other.warnings);
    into.rules_reloaded |= other.rules_reloaded;
    into.added.extend(other.added);
}
