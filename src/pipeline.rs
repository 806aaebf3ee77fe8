//! One service's trip through the builder: hash, compare with `.run`, reuse an archive or
//! build, archive, flip `.run`, prune. Shared by `build` and (later) the watch engine.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::builder::{self, BuildFailure, BuildLog};
use crate::event::{Event, EventKind};
use crate::hash::{self, BuildId, CacheUse, HashSpec};
use crate::log::Reporter;
use crate::manifest::Service;
use crate::store::{Archive, Status, Store};

/// Unreferenced logs (of failed or cancelled builds) kept per service.
const KEEP_ORPHAN_LOGS: usize = 20;

/// How a build request ended. Errors of the file system are `Err`; a failed build is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    UpToDate(BuildId),
    Reused { id: BuildId, archive: String },
    Built { id: BuildId, archive: String },
    Failed { id: BuildId, error: String },
    Cancelled,
}

/// Builds `svc` if its tree's id differs from the live one (always, with `force`): the
/// one-shot `pmesh-dev build`. Takes the root's lock for the duration.
pub async fn build(
    svc: Arc<Service>,
    manifest_path: PathBuf,
    force: bool,
    reporter: Arc<Reporter>,
    cancel: CancellationToken,
) -> anyhow::Result<Outcome> {
    let store = Store::new(&svc.root);
    let _lock = store.lock("pmesh-dev build")?;
    store.recover()?;

    let tree = {
        let svc = svc.clone();
        tokio::task::spawn_blocking(move || {
            hash::hash_tree(&HashSpec::service(&svc, &manifest_path), CacheUse::Persist)
        })
        .await
        .context("the hashing task failed")??
    };
    for message in tree.warnings {
        reporter.emit(&Event::now(&svc.name, EventKind::Warning { message }));
    }
    if cancel.is_cancelled() {
        return Ok(Outcome::Cancelled);
    }
    let job = Job {
        id: tree.id,
        changed: tree.changed,
        force,
        in_use: Vec::new(),
        steps: StepsRunning::default(),
    };
    build_id(&svc, &store, job, &reporter, &cancel).await
}

/// One request to make `.run` hold a build.
#[derive(Debug)]
pub struct Job {
    pub id: BuildId,
    /// The paths that changed, for `build_started`.
    pub changed: Vec<String>,
    /// Build even if `.run` already holds `id`, and never reuse an archive.
    pub force: bool,
    /// Archives that running instances use: retention leaves them alone.
    pub in_use: Vec<String>,
    pub steps: StepsRunning,
}

/// True while a build's steps run: the window in which a write into the tree can be the
/// build's own (watch's loop guard reads it).
#[derive(Debug, Default, Clone)]
pub struct StepsRunning(Arc<std::sync::atomic::AtomicBool>);

impl StepsRunning {
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn set(&self, v: bool) {
        self.0.store(v, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Makes `.run` hold build `id` of `svc`: nothing if it already does (unless `force`), a
/// re-point if a good archive has it, else a build. The caller holds the store's lock.
pub async fn build_id(
    svc: &Service,
    store: &Store,
    job: Job,
    reporter: &Arc<Reporter>,
    cancel: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let Job {
        id,
        changed,
        force,
        in_use,
        steps,
    } = job;
    let emit = |kind| reporter.emit(&Event::now(&svc.name, kind));
    if !force {
        if store.live_id() == Some(id) {
            emit(EventKind::UpToDate {
                id: id.to_string(),
                archive: store.live(),
            });
            return Ok(Outcome::UpToDate(id));
        }
        if let Some(a) = store.reusable(id)? {
            store.point_run(&a.name)?;
            emit(EventKind::Reused {
                id: id.to_string(),
                archive: a.name.clone(),
            });
            prune(store, svc, &in_use, reporter)?;
            return Ok(Outcome::Reused {
                id,
                archive: a.name,
            });
        }
    }

    // The team's cache (issue 14): a build of this id made elsewhere, fetched instead of run.
    // A fetched build is a new archive, like a built one; the `fetched` event tells them apart.
    if !force && let Some(archive) = crate::cache::fetch(svc, store, id, reporter, cancel).await {
        prune(store, svc, &in_use, reporter)?;
        return Ok(Outcome::Built { id, archive });
    }

    emit(EventKind::BuildStarted {
        id: id.to_string(),
        changed,
    });
    let started = Instant::now();
    let build_dir = store.begin(id)?;
    let (log_path, log_name) = store.new_log()?;
    let mut log = BuildLog::new(File::create(&log_path).ok());
    steps.set(true);
    let result = builder::run_steps(svc, &build_dir, id, reporter, &mut log, cancel).await;
    steps.set(false);
    let duration = started.elapsed();
    let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok(()) => {
            let archive = store.commit(id, duration, Some(log_name))?;
            store.point_run(&archive.name)?;
            emit(EventKind::BuildFinished {
                id: id.to_string(),
                ok: true,
                duration_ms,
                archive: Some(archive.name.clone()),
                error: None,
            });
            prune(store, svc, &in_use, reporter)?;
            Ok(Outcome::Built {
                id,
                archive: archive.name,
            })
        }
        Err(BuildFailure::Cancelled) => {
            store.discard_build()?;
            emit(EventKind::Cancelled { id: id.to_string() });
            Ok(Outcome::Cancelled)
        }
        Err(e) => {
            store.discard_build()?;
            emit(EventKind::BuildFinished {
                id: id.to_string(),
                ok: false,
                duration_ms,
                archive: None,
                error: Some(format!("service `{}`: {e}", svc.name)),
            });
            let _ = store.prune_logs(KEEP_ORPHAN_LOGS);
            Ok(Outcome::Failed {
                id,
                error: e.to_string(),
            })
        }
    }
}

fn prune(
    store: &Store,
    svc: &Service,
    in_use: &[String],
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let removed = store.retain(svc.keep, in_use)?;
    if !removed.is_empty() {
        reporter.emit(&Event::now(&svc.name, EventKind::Pruned { removed }));
    }
    store.prune_logs(KEEP_ORPHAN_LOGS)?;
    Ok(())
}

/// Why a rollback did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error(
        "service `{service}`: no build named `{name}` in {root} (`pmesh-dev builds {service}` lists them)"
    )]
    NoSuchBuild {
        service: String,
        name: String,
        root: String,
    },
    #[error("service `{service}`: {name} has no valid .buildid, so it is not a complete build")]
    Incomplete { service: String, name: String },
    #[error("service `{0}`: there is no older good build to roll back to")]
    NothingOlder(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl RollbackError {
    /// The exit code it ends a command with: 2 for a build name that is no usable archive.
    pub fn code(&self) -> u8 {
        match self {
            RollbackError::NoSuchBuild { .. } | RollbackError::Incomplete { .. } => 2,
            _ => 1,
        }
    }
}

/// The archive a rollback of `svc` goes to: `target`, which must be a complete archive of its
/// root, or by default the newest good archive older than the live one.
pub fn rollback_target(
    svc: &Service,
    store: &Store,
    target: Option<&str>,
) -> Result<(Archive, BuildId), RollbackError> {
    let archive = match (target, store.live()) {
        (Some(name), _) => Some(
            store
                .archive(name)
                .ok_or_else(|| RollbackError::NoSuchBuild {
                    service: svc.name.clone(),
                    name: name.to_owned(),
                    root: svc.root.display().to_string(),
                })?,
        ),
        (None, Some(live)) => store.previous_good(&live)?,
        (None, None) => store
            .archives()?
            .into_iter()
            .find(|a| a.status() == Status::Ok && a.id.is_some()),
    }
    .ok_or_else(|| RollbackError::NothingOlder(svc.name.clone()))?;
    match archive.id {
        Some(id) => Ok((archive, id)),
        None => Err(RollbackError::Incomplete {
            service: svc.name.clone(),
            name: archive.name,
        }),
    }
}

/// Re-points `.run` at archive `target`, or by default at the newest good archive older than
/// the live one. Returns the archive now live.
pub fn rollback(
    svc: &Service,
    target: Option<&str>,
    reporter: &Reporter,
) -> Result<String, RollbackError> {
    let store = Store::new(&svc.root);
    let _lock = store.lock("pmesh-dev rollback")?;
    store.recover()?;
    let live = store.live();
    let (archive, _) = rollback_target(svc, &store, target)?;
    store.point_run(&archive.name)?;
    reporter.emit(&Event::now(
        &svc.name,
        EventKind::Rollback {
            from: live,
            to: archive.name.clone(),
            id: archive.id.map(|i| i.to_string()),
        },
    ));
    Ok(archive.name)
}
