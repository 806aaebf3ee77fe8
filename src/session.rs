//! The services one `watch` runs, kept in step with `pmesh.toml`: each service's root lock,
//! control socket and engine, started in `depends_on` order, and, when the manifest is edited
//! while watching, services added are started, removed ones stopped, and changed ones restarted
//! (their live build serves again at once), while the others are not touched. A manifest with
//! an error changes nothing: the error is shown, located, until it is fixed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::control;
use crate::deploy::Gate;
use crate::engine::{self, WatchOptions};
use crate::event::{Command, EventKind, Sink};
use crate::manifest::{Manifest, Service};
use crate::store::{Lock, Store};

/// How often the manifest file's metadata is looked at (a stat; its text is read only when
/// that changed).
pub const MANIFEST_EVERY: Duration = Duration::from_millis(250);

/// Where the TUI and other front ends reach each service's engine; services come and go.
pub type Senders = Arc<Mutex<BTreeMap<String, mpsc::UnboundedSender<Command>>>>;

/// One running service.
struct Running {
    svc: Arc<Service>,
    /// Stops this service only; a child of the watch's shutdown.
    stop: CancellationToken,
    /// Tells the engine's task apart from an earlier one of the same service.
    generation: u64,
    /// Fires once its engine has ended (its instances stopped).
    ended: CancellationToken,
    /// Held until the engine has stopped.
    _lock: Lock,
}

/// The watch's services.
pub struct Session {
    manifest: PathBuf,
    /// The services asked for on the command line (all when empty).
    names: Vec<String>,
    opts: WatchOptions,
    sink: Arc<Sink>,
    shutdown: CancellationToken,
    pub senders: Senders,
    running: BTreeMap<String, Running>,
    /// Whether each service is live, for `depends_on`; kept across restarts of the waiter.
    live: BTreeMap<String, watch::Sender<bool>>,
    tasks: JoinSet<(String, u64, anyhow::Result<()>)>,
    generation: u64,
    /// The manifest's stat and text as last applied (or found wrong).
    seen: (Option<(SystemTime, u64)>, String),
}

/// An engine that ended with an error.
pub struct Failed {
    pub service: String,
    pub error: anyhow::Error,
}

impl Session {
    pub fn new(
        m: &Manifest,
        names: &[String],
        opts: WatchOptions,
        sink: Arc<Sink>,
        shutdown: CancellationToken,
    ) -> Session {
        Session {
            manifest: m.path.clone(),
            names: names.to_vec(),
            opts,
            sink,
            shutdown,
            senders: Senders::default(),
            running: BTreeMap::new(),
            live: BTreeMap::new(),
            tasks: JoinSet::new(),
            generation: 0,
            seen: (
                stat(&m.path),
                std::fs::read_to_string(&m.path).unwrap_or_default(),
            ),
        }
    }

    /// Takes each root's lock (a second pmesh-dev on one is refused) before anything starts.
    pub fn lock_all(services: &[Arc<Service>]) -> anyhow::Result<Vec<Lock>> {
        services
            .iter()
            .map(|svc| {
                let store = Store::new(&svc.root);
                let lock = store
                    .lock("pmesh-dev watch")
                    .map_err(|e| anyhow::anyhow!("service `{}`: {e}", svc.name))?;
                store.recover()?;
                Ok(lock)
            })
            .collect()
    }

    /// Starts `svc`, whose root's lock is `lock`.
    pub fn start(&mut self, svc: Arc<Service>, lock: Lock) {
        self.generation += 1;
        let generation = self.generation;
        let stop = self.shutdown.child_token();
        let (tx, rx) = mpsc::unbounded_channel();
        (self.senders.lock().unwrap_or_else(|e| e.into_inner()))
            .insert(svc.name.clone(), tx.clone());
        control::start(&svc, tx, &self.sink, &stop);
        let live = self.live_flag(&svc.name);
        let mut deps = Vec::new();
        for d in &svc.depends_on {
            if self.selected(d) {
                deps.push((d.clone(), self.live_flag(d).subscribe()));
            }
        }
        let gate = Gate {
            live: Some(live),
            deps,
        };
        let watched = engine::Watched {
            svc: svc.clone(),
            store: Store::new(&svc.root),
            manifest_path: self.manifest.clone(),
            opts: self.opts,
        };
        let fut = engine::run(watched, self.sink.clone(), stop.clone(), rx, gate);
        let name = svc.name.clone();
        let ended = CancellationToken::new();
        let done = ended.clone();
        self.tasks.spawn(async move {
            let result = fut.await;
            done.cancel();
            (name, generation, result)
        });
        self.running.insert(
            svc.name.clone(),
            Running {
                svc,
                stop,
                generation,
                ended,
                _lock: lock,
            },
        );
    }

    fn live_flag(&mut self, name: &str) -> watch::Sender<bool> {
        self.live
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .clone()
    }

    fn selected(&self, name: &str) -> bool {
        self.names.is_empty() || self.names.iter().any(|n| n == name)
    }

    /// Waits for the next engine to end with an error; `None` once every engine has ended.
    /// An engine stopped on purpose (removed or restarted) ends quietly.
    pub async fn next_failure(&mut self) -> Option<Failed> {
        while let Some(joined) = self.tasks.join_next().await {
            let Ok((name, generation, result)) = joined else {
                continue;
            };
            let current = self
                .running
                .get(&name)
                .is_some_and(|r| r.generation == generation);
            if current {
                let r = self.running.remove(&name);
                control::remove(&r.map(|r| r.svc.root.clone()).unwrap_or_default());
            }
            if let Err(error) = result
                && current
            {
                return Some(Failed {
                    service: name,
                    error,
                });
            }
        }
        None
    }

    /// Whether engines still run.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Looks at the manifest; if it changed, applies it (or says what is wrong with it).
    pub async fn check_manifest(&mut self) {
        let now = stat(&self.manifest);
        if now == self.seen.0 {
            return;
        }
        let text = std::fs::read_to_string(&self.manifest).unwrap_or_default();
        self.seen.0 = now;
        if text == self.seen.1 {
            return;
        }
        self.seen.1 = text;
        let file = self.manifest.display().to_string();
        let m = match Manifest::load(&self.manifest) {
            Ok(m) => m,
            Err(e) => {
                self.sink.now(
                    "",
                    EventKind::ManifestError {
                        file,
                        message: e.to_string(),
                    },
                );
                return;
            }
        };
        let wanted: Vec<Arc<Service>> = (m.services.iter())
            .filter(|s| self.selected(&s.name))
            .cloned()
            .map(Arc::new)
            .collect();
        let removed: Vec<String> = (self.running.keys())
            .filter(|n| !wanted.iter().any(|s| s.name == **n))
            .cloned()
            .collect();
        let changed: Vec<String> = (wanted.iter())
            .filter(|s| self.running.get(&s.name).is_some_and(|r| *r.svc != ***s))
            .map(|s| s.name.clone())
            .collect();
        let added: Vec<String> = (wanted.iter())
            .filter(|s| !self.running.contains_key(&s.name))
            .map(|s| s.name.clone())
            .collect();
        for name in removed.iter().chain(&changed) {
            self.stop(name).await;
        }
        for name in &removed {
            self.live.remove(name);
        }
        let mut failed = Vec::new();
        for svc in wanted
            .iter()
            .filter(|s| changed.contains(&s.name) || added.contains(&s.name))
        {
            match Session::lock_all(std::slice::from_ref(svc)) {
                Ok(mut locks) => {
                    if let Some(lock) = locks.pop() {
                        self.start(svc.clone(), lock);
                    }
                }
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        self.sink.now(
            "",
            EventKind::ManifestApplied {
                file,
                added,
                removed,
                changed,
            },
        );
        for message in failed {
            self.sink.now("", EventKind::Warning { message });
        }
    }

    /// Stops one service and waits for its engine (and so its instances) to end.
    async fn stop(&mut self, name: &str) {
        let Some(r) = self.running.remove(name) else {
            return;
        };
        (self.senders.lock().unwrap_or_else(|e| e.into_inner())).remove(name);
        r.stop.cancel();
        // Its task ends quietly in `next_failure` (its generation is gone); here it is waited
        // for, so that its root, socket and port are free again.
        let _ = tokio::time::timeout(
            r.svc.stop_timeout + Duration::from_secs(10),
            r.ended.cancelled(),
        )
        .await;
        control::remove(&r.svc.root);
    }
}

fn stat(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}
