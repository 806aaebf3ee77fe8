//! One task per service: it owns the service's tree and watcher and runs its builds. File
//! changes, build results, the deployer's reports and commands go in; what to build is decided
//! by [`core::Core`], which does no I/O; `.run` and the instances belong to the service's
//! [`Deployer`].
//!
//! Changes are debounced (quiet time after the last event), then only the paths named are read
//! again. A change during a build cancels it and the newest tree is built next: at most one
//! build runs and the newest tree always wins. A failed build leaves the live one in place and
//! is not retried until the tree changes again.

pub mod core;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::core::{Core, Effect, Ended};
use crate::deploy::{self, Deployer, Mode, Report, Ticket, Why};
use crate::event::{Command, Done, EventKind, Sink};
use crate::hash::live::Change;
use crate::hash::{BuildId, DirHook, HashSpec, LiveTree};
use crate::manifest::{DEFAULT_POLL, Service};
use crate::pipeline::{self, Job, Outcome, StepsRunning};
use crate::store::Store;
use crate::supervisor;
use crate::sys::trim_heap;
use crate::watch::{self, DirWatcher, WatchError, WatchMsg};

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
    /// Cancels this build only; a child of the shutdown token.
    cancel: CancellationToken,
    handle: JoinHandle<anyhow::Result<Outcome>>,
    /// Whether its steps still run: writes seen meanwhile may be the build's own.
    steps: StepsRunning,
}

/// The state of one service's watch; owned by its task alone.
struct Engine {
    svc: Arc<Service>,
    store: Store,
    sink: Arc<Sink>,
    shutdown: CancellationToken,
    /// The decisions.
    core: Core,
    /// The owner of `.run` and the instances; what `.run` holds is read from it.
    deployer: Deployer,
    /// Taken out while a blocking task updates it.
    tree: Option<LiveTree>,
    watcher: Option<DirWatcher>,
    /// `Some(interval)` when the tree is polled instead of watched.
    poll: Option<Duration>,
    /// Commands waiting for the end of the next build (and then for it to be live).
    build_waiters: Vec<oneshot::Sender<Done>>,
    building: Option<Running>,
    /// Paths named by events since the last update, and why the whole tree must be looked at.
    pending: BTreeSet<PathBuf>,
    rescan: Option<String>,
    /// What the paths of a quiet period's first events changed, read at once (see
    /// [`Engine::read_ahead`]); taken when the period ends.
    early: Option<Change>,
    /// `decide` was called while `early` was pending: the period's end must decide, whatever
    /// it finds.
    deferred: bool,
    /// When the digest cache was last written.
    saved_at: Instant,
}

/// What one service's watch is about.
pub struct Watched {
    pub svc: Arc<Service>,
    pub store: Store,
    pub manifest_path: PathBuf,
    pub opts: WatchOptions,
}

/// Watches `svc` until `shutdown`: serves what `.run` holds at once, builds if the tree
/// differs, then after every change, and carries out `commands` (of the TUI and of the control
/// socket). The caller holds the root's lock.
pub async fn run(
    watched: Watched,
    sink: Arc<Sink>,
    shutdown: CancellationToken,
    mut commands: mpsc::UnboundedReceiver<Command>,
    gate: deploy::Gate,
) -> anyhow::Result<()> {
    let Watched {
        svc,
        store,
        manifest_path,
        opts,
    } = watched;
    let started = Instant::now();
    let reaped = tokio::task::block_in_place(|| supervisor::reap_leftovers(&store));
    if reaped > 0 {
        sink.now(
            &svc.name,
            EventKind::Warning {
                message: format!("stopped {reaped} instance(s) left by an earlier pmesh-dev"),
            },
        );
    }
    let (deployer, mut reports, tasks) = Deployer::start(
        svc.clone(),
        store.clone(),
        sink.clone(),
        shutdown.clone(),
        Mode::Watch,
        gate,
    )
    .await?;
    // The live build serves while the tree is hashed and, if it changed, built.
    deployer.serve();

    // The watcher comes first: the first walk adds a directory's watch as it enters it, so
    // that what changes once the walk has looked is reported, and the adds run beside the
    // walk's stats instead of after them.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let root = HashSpec::service(&svc, &manifest_path).root.to_path_buf();
    // `poll` in the manifest, like `--poll`, polls every directory.
    let backend = match svc.poll {
        Some(_) => watch::Backend::Poll,
        None => opts.watcher,
    };
    let every = svc.poll.unwrap_or(DEFAULT_POLL);
    let mut watcher = DirWatcher::new(backend, every, tx.clone(), root);
    let prewatch = watcher.as_mut().ok().and_then(DirWatcher::early);
    let (tree, warnings, prewatch) = {
        let (svc, manifest_path) = (svc.clone(), manifest_path.clone());
        tokio::task::spawn_blocking(move || {
            let spec = HashSpec::service(&svc, &manifest_path);
            let hook = prewatch.as_ref().map(|e| e as &dyn DirHook);
            LiveTree::scan_hooked(&spec, hook).map(|(tree, warnings)| (tree, warnings, prewatch))
        })
        .await
        .context("the hashing task failed")??
    };
    let mut engine = Engine {
        core: Core::new(svc.debounce),
        deployer,
        store,
        sink,
        shutdown: shutdown.clone(),
        watcher: None,
        // Set only when no watcher can be made: then the whole tree is rescanned.
        poll: None,
        svc,
        tree: Some(tree),
        build_waiters: Vec::new(),
        building: None,
        pending: BTreeSet::new(),
        rescan: None,
        early: None,
        deferred: false,
        saved_at: Instant::now(),
    };
    trim_heap();
    for message in warnings {
        engine.emit(EventKind::Warning { message });
    }
    let added = watcher.and_then(|mut w| {
        let dirs = engine.tree().dir_paths();
        tokio::task::block_in_place(|| match prewatch {
            Some(pre) => w.adopt(pre, dirs),
            None => w.add(dirs),
        })
        .map(|()| w)
    });
    match added {
        Ok(w) => engine.watcher = Some(w),
        Err(e) => engine.fall_back_to_polling(&e),
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
        url: deploy::url_of(&engine.svc).filter(|_| engine.svc.serves()),
    });
    engine.decide();

    let mut poll_tick = tokio::time::interval(engine.poll.unwrap_or(DEFAULT_POLL));
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll_tick.tick().await;
    loop {
        let deadline = engine.core.quiet_at();
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
            Some(command) = commands.recv() => engine.on_command(command).await,
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
    for w in engine.build_waiters.drain(..) {
        let _ = w.send(Done::new(130, "pmesh-dev watch is stopping"));
    }
    if let Some(mut tree) = engine.tree.take() {
        tokio::task::block_in_place(|| tree.save_cache());
    }
    drop(engine);
    tasks.stopped().await;
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
        self.sink.now(&self.svc.name, kind);
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
                    self.core.written_while_building(rels);
                }
            }
            WatchMsg::Rescan(reason) => {
                self.rescan = Some(reason.to_owned());
            }
            WatchMsg::Error(message) => self.emit(EventKind::Warning { message }),
            WatchMsg::Interval { polled, every } => {
                self.emit(EventKind::Polling {
                    polled_dirs: polled,
                    poll_interval_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
                });
                return;
            }
        }
        let first = self.core.touched(tokio::time::Instant::now());
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
        self.core.quiet();
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
                    self.core.changed(early.changed);
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
            self.core.rules_reloaded();
        }
        if changed.is_empty() {
            if self.deferred {
                self.decide();
            }
            return Ok(());
        }
        self.core.changed(changed);
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
        if change.watch.is_empty() {
            return;
        }
        if let Err(e) = w.add(change.watch.iter()) {
            self.fall_back_to_polling(&e);
            return;
        }
        // A directory was read before its watch existed: whatever was created in it meanwhile
        // (`mkdir -p a/b/c` and a file in it, at once) has no event. Reading the new directories
        // once more, now that they are watched, closes that window; it finds nothing new when
        // nothing happened in it.
        self.pending.extend(change.watch.iter().cloned());
        self.core.touched(tokio::time::Instant::now());
    }

    /// Starts, cancels or leaves the build so that the newest tree ends up live.
    fn decide(&mut self) {
        if self.early.is_some() {
            // The tree is ahead of what was decided on: the quiet period's end decides.
            self.deferred = true;
            return;
        }
        self.deferred = false;
        let tree = self.tree().id();
        let live = self.deployer.run().id;
        let effects = self.core.decide(tree, live, self.shutdown.is_cancelled());
        self.apply(effects);
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Start { id, force, changed } => self.start_build(id, force, changed),
                Effect::Cancel => {
                    if let Some(b) = &self.building {
                        b.cancel.cancel();
                    }
                }
                Effect::Recovered { id } => {
                    self.deployer.recovered();
                    self.emit(EventKind::UpToDate {
                        id: id.to_string(),
                        archive: self.deployer.run().archive,
                    });
                }
                Effect::LoopDetected { paths, patterns } => {
                    self.emit(EventKind::LoopDetected { paths, patterns });
                }
            }
        }
    }

    fn start_build(&mut self, id: BuildId, force: bool, changed: Vec<String>) {
        let cancel = self.shutdown.child_token();
        let steps = StepsRunning::default();
        let handle = tokio::spawn({
            let svc = self.svc.clone();
            let store = self.store.clone();
            let deployer = self.deployer.clone();
            let sink = self.sink.clone();
            let cancel = cancel.clone();
            let job = Job {
                id,
                changed,
                force,
                steps: steps.clone(),
            };
            async move { pipeline::build_id(&svc, &store, &deployer, job, &sink, &cancel).await }
        });
        self.building = Some(Running {
            cancel,
            handle,
            steps,
        });
    }

    fn on_build_done(&mut self, done: Result<anyhow::Result<Outcome>, tokio::task::JoinError>) {
        self.building = None;
        let (ended, done) = match done {
            Ok(Ok(Outcome::Built { ticket, .. } | Outcome::Reused { ticket, .. })) => {
                (Ended::Good, Answer::When(ticket))
            }
            Ok(Ok(Outcome::UpToDate(id))) => (
                Ended::Good,
                Answer::Now(Done::new(0, format!("up to date ({})", id.short()))),
            ),
            Ok(Ok(Outcome::Failed { id, error })) => {
                self.deployer.build_failed(error.clone());
                (Ended::Failed(id), Answer::Now(Done::new(1, error)))
            }
            // A newer tree is built next; whoever waits gets that outcome.
            Ok(Ok(Outcome::Cancelled)) => (Ended::Cancelled, Answer::Later),
            Ok(Err(e)) => {
                let message = format!("{e:#}");
                self.emit(EventKind::Warning {
                    message: message.clone(),
                });
                (Ended::Error, Answer::Now(Done::new(1, message)))
            }
            Err(e) => {
                let message = format!("the build task failed: {e}");
                self.emit(EventKind::Warning {
                    message: message.clone(),
                });
                (Ended::Error, Answer::Now(Done::new(1, message)))
            }
        };
        self.core.build_done(ended);
        match done {
            Answer::Now(done) => {
                for w in self.build_waiters.drain(..) {
                    let _ = w.send(done.clone());
                }
            }
            Answer::When(ticket) => {
                for w in self.build_waiters.drain(..) {
                    answer_when(ticket.clone(), w);
                }
            }
            Answer::Later => {}
        }
        if self.saved_at.elapsed() >= SAVE_EVERY
            && let Some(tree) = self.tree.as_mut()
        {
            tokio::task::block_in_place(|| tree.save_cache());
            self.saved_at = Instant::now();
        }
        self.decide();
    }

    /// The deployer undid an unhealthy build: do not build that tree again until it changes.
    fn on_report(&mut self, report: Report) {
        match report {
            Report::Unhealthy { id } => {
                self.core.unhealthy(id);
                self.decide();
            }
            Report::NothingServes { .. } => {}
        }
    }

    /// Carries out a command of the TUI or the control socket.
    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Build { force, reply } => {
                let effects = self.core.build_requested(force);
                self.apply(effects);
                if !self.core.is_building() {
                    self.decide();
                }
                match (reply, self.core.is_building()) {
                    (Some(r), true) => self.build_waiters.push(r),
                    (Some(r), false) => {
                        // Said as the one-shot `build` says it, for the shell that asked.
                        let run = self.deployer.run();
                        let id = self.tree().id();
                        if run.id == Some(id) {
                            self.emit(EventKind::UpToDate {
                                id: id.to_string(),
                                archive: run.archive,
                            });
                        }
                        let _ = r.send(Done::new(0, format!("up to date ({})", id.short())));
                    }
                    (None, _) => {}
                }
            }
            Command::Rollback { build, reply } => match self.rollback(build.as_deref()).await {
                Ok(ticket) => {
                    if let Some(r) = reply {
                        answer_when(ticket, r);
                    }
                }
                Err(done) => match reply {
                    Some(r) => {
                        let _ = r.send(done);
                    }
                    None => self.emit(EventKind::Warning {
                        message: done.message,
                    }),
                },
            },
            Command::Restart { reply } => {
                let ticket = self.deployer.restart().await;
                if let Some(r) = reply {
                    answer_when(ticket, r);
                }
            }
        }
    }

    /// Has the deployer re-point `.run` and serve the build it points to now; the tree that
    /// was live is not rebuilt until it changes.
    async fn rollback(&mut self, build: Option<&str>) -> Result<Ticket, Done> {
        let (archive, id) = pipeline::rollback_target(&self.svc, &self.store, build)
            .map_err(|e| Done::new(e.code(), e.to_string()))?;
        // A build finishing now would flip `.run` away from the rollback: it is cancelled, and
        // the deployer refuses its publication once cancelled.
        let effects = self.core.rolled_back(self.tree().id());
        self.apply(effects);
        self.deployer
            .publish(&archive.name, id, Why::Rollback, None)
            .await
            .map_err(|e| Done::new(1, e.to_string()))
    }
}

/// How the commands waiting for a build are answered.
enum Answer {
    Now(Done),
    /// Once the build is live (or undone).
    When(Ticket),
    /// With the next build's answer.
    Later,
}

/// Sends `ticket`'s end to `reply` once it comes, without holding up the loop.
fn answer_when(ticket: Ticket, reply: oneshot::Sender<Done>) {
    tokio::spawn(async move {
        let _ = reply.send(ticket.done().await);
    });
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
