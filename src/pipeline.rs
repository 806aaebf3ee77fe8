//! One service's trip through the builder: hash, compare with `.run`, reuse an archive or
//! build, archive, then hand the archive to the deployer (which flips `.run` and prunes).
//! Shared by the one-shot `build` and the watch engine.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::builder::{self, BuildFailure, BuildLog};
use crate::deploy::{Deployer, KEEP_ORPHAN_LOGS, Mode, PublishError, Ticket, Why};
use crate::event::{EventKind, Sink};
use crate::hash::{self, BuildId, CacheUse, HashSpec};
use crate::manifest::Service;
use crate::store::{Archive, Status, Store};

/// How a build request ended. Errors of the file system are `Err`; a failed build is not.
pub enum Outcome {
    UpToDate(BuildId),
    /// `.run` points to the archive; the ticket resolves once it serves (or was undone).
    Reused {
        id: BuildId,
        archive: String,
        ticket: Ticket,
    },
    Built {
        id: BuildId,
        archive: String,
        ticket: Ticket,
    },
    Failed {
        id: BuildId,
        error: String,
    },
    Cancelled,
}

/// Builds `svc` if its tree's id differs from the live one (always, with `force`): the
/// one-shot `pmesh-dev build`. Takes the root's lock for the duration.
pub async fn build(
    svc: Arc<Service>,
    manifest_path: PathBuf,
    force: bool,
    sink: Arc<Sink>,
    cancel: CancellationToken,
) -> anyhow::Result<Outcome> {
    let store = Store::new(&svc.root);
    let _lock = store.lock("pmesh-dev build")?;
    store.recover()?;
    let (deployer, _, tasks) = Deployer::start(
        svc.clone(),
        store.clone(),
        sink.clone(),
        cancel.child_token(),
        Mode::Flip,
        crate::deploy::Gate::default(),
    )
    .await?;
    let outcome = build_tree(
        &svc,
        manifest_path,
        force,
        &store,
        &deployer,
        &sink,
        &cancel,
    )
    .await;
    drop(deployer);
    tasks.stopped().await;
    outcome
}

async fn build_tree(
    svc: &Arc<Service>,
    manifest_path: PathBuf,
    force: bool,
    store: &Store,
    deployer: &Deployer,
    sink: &Arc<Sink>,
    cancel: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let tree = {
        let svc = svc.clone();
        tokio::task::spawn_blocking(move || {
            hash::hash_tree(&HashSpec::service(&svc, &manifest_path), CacheUse::Persist)
        })
        .await
        .context("the hashing task failed")??
    };
    for message in tree.warnings {
        sink.now(&svc.name, EventKind::Warning { message });
    }
    if cancel.is_cancelled() {
        return Ok(Outcome::Cancelled);
    }
    let job = Job {
        id: tree.id,
        changed: tree.changed,
        force,
        steps: StepsRunning::default(),
    };
    build_id(svc, store, deployer, job, sink, cancel).await
}

/// One request to make `.run` hold a build.
#[derive(Debug)]
pub struct Job {
    pub id: BuildId,
    /// The paths that changed, for `build_started`.
    pub changed: Vec<String>,
    /// Build even if `.run` already holds `id`, and never reuse an archive.
    pub force: bool,
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
/// re-point if a good archive has it, else a build. The caller holds the store's lock; the
/// deployer re-points `.run`.
pub async fn build_id(
    svc: &Service,
    store: &Store,
    deployer: &Deployer,
    job: Job,
    sink: &Arc<Sink>,
    cancel: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let Job {
        id,
        changed,
        force,
        steps,
    } = job;
    let emit = |kind| sink.now(&svc.name, kind);
    if !force {
        let run = deployer.run();
        if run.id == Some(id) {
            emit(EventKind::UpToDate {
                id: id.to_string(),
                archive: run.archive,
            });
            return Ok(Outcome::UpToDate(id));
        }
        if let Some(a) = store.reusable(id)? {
            let Some(ticket) = publish(deployer, &a.name, id, cancel).await? else {
                emit(EventKind::Cancelled { id: id.to_string() });
                return Ok(Outcome::Cancelled);
            };
            emit(EventKind::Reused {
                id: id.to_string(),
                archive: a.name.clone(),
            });
            return Ok(Outcome::Reused {
                id,
                archive: a.name,
                ticket,
            });
        }
    }

    // The team's cache (issue 14): a build of this id made elsewhere, fetched instead of run.
    // A fetched build is a new archive, like a built one; the `fetched` event tells them apart.
    if !force && let Some(f) = crate::cache::fetch(svc, store, id, sink, cancel).await {
        let Some(ticket) = publish_new(store, deployer, &f.archive, id, cancel).await? else {
            emit(EventKind::Cancelled { id: id.to_string() });
            return Ok(Outcome::Cancelled);
        };
        emit(f.event(id));
        return Ok(Outcome::Built {
            id,
            archive: f.archive,
            ticket,
        });
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
    let record = store.state_dir("")?.join("install.json");
    let result = match builder::install(svc, &record, &build_dir, id, sink, &mut log, cancel).await
    {
        Ok(()) => builder::run_steps(svc, &build_dir, id, sink, &mut log, cancel).await,
        Err(e) => Err(e),
    };
    steps.set(false);
    let duration = started.elapsed();
    let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok(()) => {
            let archive = store.commit(id, duration, Some(log_name))?;
            // Cancelled after its steps (by a rollback): archived, for a later reuse, but not
            // put live.
            let Some(ticket) = publish_new(store, deployer, &archive.name, id, cancel).await?
            else {
                emit(EventKind::Cancelled { id: id.to_string() });
                return Ok(Outcome::Cancelled);
            };
            emit(EventKind::BuildFinished {
                id: id.to_string(),
                ok: true,
                duration_ms,
                archive: Some(archive.name.clone()),
                error: None,
            });
            Ok(Outcome::Built {
                id,
                archive: archive.name,
                ticket,
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

/// Publishes an archive this build just made; one that is not published (cancelled, or `.run`
/// could not move) is kept for a later reuse, but no longer counts as on its way to `.run`.
async fn publish_new(
    store: &Store,
    deployer: &Deployer,
    archive: &str,
    id: BuildId,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<Ticket>> {
    let published = publish(deployer, archive, id, cancel).await;
    if !matches!(published, Ok(Some(_))) {
        store.settle(archive);
    }
    published
}

/// Has the deployer point `.run` at `archive`; `None` if `cancel` fired first.
async fn publish(
    deployer: &Deployer,
    archive: &str,
    id: BuildId,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<Ticket>> {
    match deployer
        .publish(archive, id, Why::Build, Some(cancel))
        .await
    {
        Ok(t) => Ok(Some(t)),
        Err(PublishError::Cancelled) => Ok(None),
        Err(PublishError::Failed(e)) => Err(anyhow::anyhow!(e)),
    }
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
    #[error(
        "service `{service}`: `{name}` is the start of several builds' ids ({ids}): give more of it"
    )]
    Ambiguous {
        service: String,
        name: String,
        ids: String,
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
            RollbackError::NoSuchBuild { .. }
            | RollbackError::Ambiguous { .. }
            | RollbackError::Incomplete { .. } => 2,
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
        (Some(name), _) => Some(find_build(svc, store, name)?),
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

/// The archive `name` stands for: an archive's name, or a build id or a unique prefix of one
/// (the short ids shown everywhere), which names its newest good archive.
fn find_build(svc: &Service, store: &Store, name: &str) -> Result<Archive, RollbackError> {
    if let Some(a) = store.archive(name) {
        return Ok(a);
    }
    let none = || RollbackError::NoSuchBuild {
        service: svc.name.clone(),
        name: name.to_owned(),
        root: svc.root.display().to_string(),
    };
    let prefix = name.to_ascii_lowercase();
    if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(none());
    }
    let archives = store.archives()?;
    let matching: Vec<&Archive> = (archives.iter())
        .filter(|a| a.id.is_some_and(|id| id.to_string().starts_with(&prefix)))
        .collect();
    let mut ids: Vec<BuildId> = matching.iter().filter_map(|a| a.id).collect();
    ids.sort_by_key(BuildId::to_string);
    ids.dedup();
    match ids.as_slice() {
        [] => Err(none()),
        [_] => {
            let good = matching.iter().find(|a| a.status() == Status::Ok);
            Ok((*good.unwrap_or(&matching[0])).clone())
        }
        _ => Err(RollbackError::Ambiguous {
            service: svc.name.clone(),
            name: name.to_owned(),
            ids: ids.iter().map(|i| i.short()).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Re-points `.run` at archive `target`, or by default at the newest good archive older than
/// the live one. Returns the archive now live.
pub fn rollback(svc: &Service, target: Option<&str>, sink: &Sink) -> Result<String, RollbackError> {
    let store = Store::new(&svc.root);
    let _lock = store.lock("pmesh-dev rollback")?;
    store.recover()?;
    let live = store.live();
    let (archive, _) = rollback_target(svc, &store, target)?;
    store.point_run(&archive.name)?;
    sink.now(
        &svc.name,
        EventKind::Rollback {
            from: live,
            to: archive.name.clone(),
            id: archive.id.map(|i| i.to_string()),
        },
    );
    Ok(archive.name)
}
