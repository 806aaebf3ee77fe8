//! The on-disk store of one service root: `.build`, the `.build-<ts>` archives, the `.run`
//! symlink, build records, retention, recovery and the lock.
//!
//! Every change that a reader can observe is one rename(2): `.build` becomes an archive in one
//! step, `.run` is re-pointed by renaming a fresh symlink over it, and an archive is deleted by
//! first renaming it into `.pmesh/trash`. A kill at any moment therefore leaves `.run` on a
//! complete build and never leaves a half-deleted archive under an archive's name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::hash::BuildId;

pub const BUILD_DIR: &str = ".build";
pub const RUN_LINK: &str = ".run";
pub const ARCHIVE_PREFIX: &str = ".build-";
pub const STATE_DIR: &str = ".pmesh";
pub const BUILDID_FILE: &str = ".buildid";
const RUN_TMP_PREFIX: &str = ".run.tmp-";

/// The store of one service root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Serialises `.run` flips made by this process (a build finishing and an unhealthy
    /// instance being undone may race); shared by clones.
    flip: Arc<Mutex<()>>,
    /// Archives committed by this process and not yet published (or given up): retention
    /// leaves them alone. Shared by clones.
    pending: Arc<Mutex<Vec<String>>>,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} is in use by another pmesh-dev ({holder}); stop it or wait for it to finish", .root.display())]
    Locked { root: PathBuf, holder: String },
    #[error("{what} {}: {error}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error(
        "{} exists and is not a symlink: move it away so pmesh-dev can manage it",
        .0.display()
    )]
    RunNotSymlink(PathBuf),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |error| StoreError::Io { what, path, error }
}

/// What became of a build once it was archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Built successfully (and healthy, once served).
    Ok,
    /// Built, but its instance never became healthy.
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// The small record kept for each archive under `.pmesh/builds/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub duration_ms: u64,
    pub status: Status,
    /// The build log's file name under `.pmesh/logs/`.
    pub log: Option<String>,
}

/// An archived build.
#[derive(Debug, Clone)]
pub struct Archive {
    /// `.build-<ts>`.
    pub name: String,
    /// The content of its `.buildid`, when it holds a valid id.
    pub id: Option<BuildId>,
    pub record: Option<BuildRecord>,
}

impl Archive {
    /// The recorded status; an archive without a record was still built successfully.
    pub fn status(&self) -> Status {
        self.record.as_ref().map_or(Status::Ok, |r| r.status)
    }

    /// When it was created, from its record or else from its name.
    pub fn created(&self) -> Option<SystemTime> {
        self.record
            .as_ref()
            .and_then(|r| humantime::parse_rfc3339(&r.created).ok())
            .or_else(|| time_of_archive_name(&self.name))
    }
}

/// `.build-20261125T123456.789Z` for a moment in time.
pub fn archive_name(t: SystemTime) -> String {
    let ts = humantime::format_rfc3339_millis(t).to_string();
    format!("{ARCHIVE_PREFIX}{}", ts.replace(['-', ':'], ""))
}

/// The moment an archive name stands for.
pub fn time_of_archive_name(name: &str) -> Option<SystemTime> {
    let s = name.strip_prefix(ARCHIVE_PREFIX)?.as_bytes();
    if s.len() != 20 {
        return None;
    }
    let part = |r: std::ops::Range<usize>| std::str::from_utf8(&s[r]).ok();
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}",
        part(0..4)?,
        part(4..6)?,
        part(6..8)?,
        part(9..11)?,
        part(11..13)?,
        part(13..20)?
    );
    humantime::parse_rfc3339(&rfc).ok()
}

/// Whether `name` is a plain archive name (no path, no `..`).
pub fn is_archive_name(name: &str) -> bool {
    name.starts_with(ARCHIVE_PREFIX)
        && name.len() > ARCHIVE_PREFIX.len()
        && !name.contains('/')
        && !name.contains('\0')
}

/// Holds a service root for one pmesh-dev process; released when dropped or when the process
/// dies, whatever the way.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            flip: Arc::default(),
            pending: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `.pmesh/` and `sub` below it, created if missing.
    pub fn state_dir(&self, sub: &str) -> Result<PathBuf, StoreError> {
        let base = self.root.join(STATE_DIR);
        if !base.exists() {
            fs::create_dir_all(&base).map_err(io_err("cannot create", &base))?;
            // Keeps the state out of git even before `init` adds it to .gitignore.
            let _ = fs::write(base.join(".gitignore"), "*\n");
        }
        let dir = if sub.is_empty() { base } else { base.join(sub) };
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        Ok(dir)
    }

    /// Takes the root's lock, or names the process that holds it.
    pub fn lock(&self, what: &str) -> Result<Lock, StoreError> {
        let path = self.state_dir("")?.join("lock");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "a process that has not said which".to_owned(),
                    h => h.replace('\n', " "),
                };
                return Err(StoreError::Locked {
                    root: self.root.clone(),
                    holder,
                });
            }
            return Err(io_err("cannot lock", &path)(err));
        }
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = write!(f, "pid {}: {what}", std::process::id());
        Ok(Lock { _file: f })
    }

    /// Removes what an interrupted run left: a stale `.build`, temporary links, the trash.
    pub fn recover(&self) -> Result<(), StoreError> {
        self.discard_build()?;
        let entries = fs::read_dir(&self.root).map_err(io_err("cannot list", &self.root))?;
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(RUN_TMP_PREFIX) {
                let p = e.path();
                fs::remove_file(&p).map_err(io_err("cannot remove", &p))?;
            }
        }
        let trash = self.root.join(STATE_DIR).join("trash");
        if trash.exists() {
            fs::remove_dir_all(&trash).map_err(io_err("cannot remove", &trash))?;
        }
        Ok(())
    }

    /// Removes `.build`, if there is one.
    pub fn discard_build(&self) -> Result<(), StoreError> {
        let p = self.root.join(BUILD_DIR);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).map_err(io_err("cannot remove", &p)),
            Ok(_) => fs::remove_file(&p).map_err(io_err("cannot remove", &p)),
            Err(_) => Ok(()),
        }
    }

    /// The archive `.run` points to, if it points to one that exists.
    pub fn live(&self) -> Option<String> {
        let target = fs::read_link(self.root.join(RUN_LINK)).ok()?;
        let name = target.to_str()?;
        (is_archive_name(name) && self.root.join(name).is_dir()).then(|| name.to_owned())
    }

    /// The id in `.run/.buildid`, when `.run` leads to a build.
    pub fn live_id(&self) -> Option<BuildId> {
        read_id(&self.root.join(RUN_LINK))
    }

    /// Every archive, newest first.
    pub fn archives(&self) -> Result<Vec<Archive>, StoreError> {
        let entries = fs::read_dir(&self.root).map_err(io_err("cannot list", &self.root))?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_archive_name(n))
            .collect();
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(names.into_iter().map(|n| self.load_archive(n)).collect())
    }

    /// The archive called `name`, if it exists.
    pub fn archive(&self, name: &str) -> Option<Archive> {
        (is_archive_name(name) && self.root.join(name).is_dir())
            .then(|| self.load_archive(name.to_owned()))
    }

    fn load_archive(&self, name: String) -> Archive {
        let id = read_id(&self.root.join(&name));
        let record = fs::read(self.record_path(&name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        Archive { name, id, record }
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root
            .join(STATE_DIR)
            .join("builds")
            .join(format!("{name}.json"))
    }

    /// The newest good archive older than `name` (by creation), to fall back on.
    pub fn previous_good(&self, name: &str) -> Result<Option<Archive>, StoreError> {
        Ok(self
            .archives()?
            .into_iter()
            .find(|a| a.name.as_str() < name && a.status() == Status::Ok && a.id.is_some()))
    }

    /// The newest good archive whose `.buildid` is `id`.
    pub fn reusable(&self, id: BuildId) -> Result<Option<Archive>, StoreError> {
        Ok(self
            .archives()?
            .into_iter()
            .find(|a| a.id == Some(id) && a.status() == Status::Ok))
    }

    /// A fresh `.build` holding `.buildid`; returns its absolute path.
    pub fn begin(&self, id: BuildId) -> Result<PathBuf, StoreError> {
        self.discard_build()?;
        let dir = self.root.join(BUILD_DIR);
        fs::create_dir(&dir).map_err(io_err("cannot create", &dir))?;
        let f = dir.join(BUILDID_FILE);
        fs::write(&f, format!("{id}\n")).map_err(io_err("cannot write", &f))?;
        Ok(dir)
    }

    /// Archives the finished `.build` under a new, unique, sortable name and records it.
    pub fn commit(
        &self,
        id: BuildId,
        duration: Duration,
        log: Option<String>,
    ) -> Result<Archive, StoreError> {
        let build = self.root.join(BUILD_DIR);
        // The steps may have replaced `.build`; the archive's `.buildid` must match it.
        if read_id(&build) != Some(id) {
            let f = build.join(BUILDID_FILE);
            fs::write(&f, format!("{id}\n")).map_err(io_err("cannot write", &f))?;
        }
        self.adopt(&build, id, duration, log)
    }

    /// Makes `dir`, a complete build of `id` on this root's file system whose `.buildid` the
    /// caller has verified (a finished `.build`, or a verified cache download), an archive
    /// under a new, unique, sortable name, in one rename, and records it.
    pub fn adopt(
        &self,
        dir: &Path,
        id: BuildId,
        duration: Duration,
        log: Option<String>,
    ) -> Result<Archive, StoreError> {
        let mut t = SystemTime::now();
        // Creation order and uniqueness, even if the clock stepped back or two builds
        // finished within one millisecond.
        if let Some(newest) = self.archives()?.first().and_then(Archive::created)
            && t <= newest
        {
            t = newest + Duration::from_millis(1);
        }
        let mut name = archive_name(t);
        while self.root.join(&name).exists() {
            t += Duration::from_millis(1);
            name = archive_name(t);
        }
        let dest = self.root.join(&name);
        (self.pending.lock().unwrap_or_else(|e| e.into_inner())).push(name.clone());
        if let Err(e) = fs::rename(dir, &dest) {
            self.settle(&name);
            return Err(io_err("cannot archive", dir)(e));
        }
        let record = BuildRecord {
            id: id.to_string(),
            created: humantime::format_rfc3339_millis(t).to_string(),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            status: Status::Ok,
            log,
        };
        self.write_record(&name, &record)?;
        sync_dir(&self.root);
        Ok(Archive {
            name,
            id: Some(id),
            record: Some(record),
        })
    }

    fn write_record(&self, name: &str, record: &BuildRecord) -> Result<(), StoreError> {
        self.state_dir("builds")?;
        let path = self.record_path(name);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let body = serde_json::to_vec_pretty(record).unwrap_or_default();
        fs::write(&tmp, body).map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("cannot write", &path))
    }

    /// Records a new status for archive `name`.
    pub fn set_status(&self, name: &str, status: Status) -> Result<(), StoreError> {
        let a = self.load_archive(name.to_owned());
        let mut record = a.record.clone().unwrap_or_else(|| BuildRecord {
            id: a.id.map(|i| i.to_string()).unwrap_or_default(),
            created: a
                .created()
                .map(|t| humantime::format_rfc3339_millis(t).to_string())
                .unwrap_or_default(),
            duration_ms: 0,
            status,
            log: None,
        });
        record.status = status;
        self.write_record(name, &record)
    }

    /// Archive `name`, committed by [`Store::commit`], is published or given up: retention may
    /// look at it again.
    pub fn settle(&self, name: &str) {
        (self.pending.lock().unwrap_or_else(|e| e.into_inner())).retain(|n| n != name);
    }

    /// Re-points `.run` at archive `name` in one rename: a temporary symlink renamed over it.
    pub fn point_run(&self, name: &str) -> Result<(), StoreError> {
        let _flip = self.flip.lock().unwrap_or_else(|e| e.into_inner());
        self.point_run_unlocked(name)
    }

    /// Re-points `.run` at `to` only if it still points at `from`; `false` if it had moved.
    pub fn point_run_if(&self, from: &str, to: &str) -> Result<bool, StoreError> {
        let _flip = self.flip.lock().unwrap_or_else(|e| e.into_inner());
        if self.live().as_deref() != Some(from) {
            return Ok(false);
        }
        self.point_run_unlocked(to).map(|()| true)
    }

    fn point_run_unlocked(&self, name: &str) -> Result<(), StoreError> {
        self.settle(name);
        let run = self.root.join(RUN_LINK);
        if let Ok(m) = fs::symlink_metadata(&run)
            && !m.file_type().is_symlink()
        {
            return Err(StoreError::RunNotSymlink(run));
        }
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join(format!("{RUN_TMP_PREFIX}{}-{n}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).map_err(io_err("cannot create", &tmp))?;
        if let Err(e) = fs::rename(&tmp, &run) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot re-point", &run)(e));
        }
        sync_dir(&self.root);
        Ok(())
    }

    /// Deletes old archives: a build archived again (a forced rebuild of the same id) replaces
    /// its older copies, and beyond `keep` distinct builds the oldest go, unhealthy ones first.
    /// Never the live one, nor one in `in_use` (an instance runs from it), nor one archived by
    /// this process and not yet published (on its way to `.run`), nor the newest copy of a
    /// build. Returns the names removed, oldest first.
    pub fn retain(&self, keep: usize, in_use: &[String]) -> Result<Vec<String>, StoreError> {
        let archives = self.archives()?;
        let live = self.live();
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let protected = |a: &Archive| {
            live.as_deref() == Some(a.name.as_str())
                || in_use.contains(&a.name)
                || pending.contains(&a.name)
        };
        // Archives come newest first: the first of each id is its newest copy.
        let mut ids: Vec<BuildId> = Vec::new();
        let mut older_copy = vec![false; archives.len()];
        for (i, a) in archives.iter().enumerate() {
            if let Some(id) = a.id {
                if ids.contains(&id) {
                    older_copy[i] = true;
                } else {
                    ids.push(id);
                }
            }
        }
        let mut doomed: Vec<usize> = (0..archives.len())
            .filter(|&i| older_copy[i] && !protected(&archives[i]))
            .collect();
        // Copies still in use count once, as their build.
        let builds = ids.len() + archives.iter().filter(|a| a.id.is_none()).count();
        let excess = builds.saturating_sub(keep.max(1));
        let mut victims: Vec<usize> = (0..archives.len())
            .rev()
            .filter(|&i| !older_copy[i] && !protected(&archives[i]))
            .collect();
        // Stable: unhealthy archives go before good ones, each group oldest first.
        victims.sort_by_key(|&i| archives[i].status() == Status::Ok);
        doomed.extend(victims.into_iter().take(excess));
        // Oldest first.
        doomed.sort_unstable_by(|a, b| b.cmp(a));
        let mut removed = Vec::new();
        for i in doomed {
            let name = &archives[i].name;
            self.remove_archive(name)?;
            removed.push(name.clone());
        }
        Ok(removed)
    }

    fn remove_archive(&self, name: &str) -> Result<(), StoreError> {
        let trash = self.state_dir("trash")?;
        let src = self.root.join(name);
        let dest = trash.join(format!("{name}-{}", std::process::id()));
        fs::rename(&src, &dest).map_err(io_err("cannot remove", &src))?;
        let _ = fs::remove_file(self.record_path(name));
        fs::remove_dir_all(&dest).map_err(io_err("cannot remove", &dest))
    }

    /// A path for a new build log under `.pmesh/logs/`, and its file name.
    pub fn new_log(&self) -> Result<(PathBuf, String), StoreError> {
        let dir = self.state_dir("logs")?;
        let stem = archive_name(SystemTime::now());
        let stem = stem.trim_start_matches(ARCHIVE_PREFIX);
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("build-{stem}-{}-{n}.log", std::process::id());
        Ok((dir.join(&name), name))
    }

    /// Deletes build logs that no archive refers to, keeping the newest `keep` of those.
    pub fn prune_logs(&self, keep: usize) -> Result<(), StoreError> {
        let dir = self.root.join(STATE_DIR).join("logs");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        let referenced: Vec<String> = self
            .archives()?
            .into_iter()
            .filter_map(|a| a.record.and_then(|r| r.log))
            .collect();
        let mut orphans: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".log") && !referenced.contains(n))
            .collect();
        orphans.sort_unstable_by(|a, b| b.cmp(a));
        for n in orphans.into_iter().skip(keep) {
            let _ = fs::remove_file(dir.join(n));
        }
        Ok(())
    }

    /// The absolute path of a log named in a record.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.root.join(STATE_DIR).join("logs").join(name)
    }
}

/// The build id in `dir/.buildid`.
pub fn read_id(dir: &Path) -> Option<BuildId> {
    fs::read_to_string(dir.join(BUILDID_FILE))
        .ok()?
        .parse()
        .ok()
}

/// Makes renames in `dir` durable; a failure only weakens durability, so it is not an error.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_sort_and_round_trip() {
        let t = humantime::parse_rfc3339("2026-11-25T12:34:56.789Z").unwrap();
        let name = archive_name(t);
        assert_eq!(name, ".build-20261125T123456.789Z");
        assert_eq!(time_of_archive_name(&name), Some(t));
        let later = archive_name(t + Duration::from_millis(1));
        assert!(later > name);
    }

    fn archived(store: &Store, n: u8) -> String {
        let id: BuildId = format!("{n:032x}").parse().expect("an id");
        store.begin(id).expect("begin");
        store.commit(id, Duration::ZERO, None).expect("commit").name
    }

    #[test]
    fn retention_keeps_distinct_builds_and_never_what_is_on_its_way_or_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        let a = archived(&store, 1);
        let b = archived(&store, 2);
        store.point_run(&b).expect("flip");
        // A forced rebuild of b, archived but not yet published: it stays, and so does a.
        let b2 = archived(&store, 2);
        assert_eq!(store.retain(2, &[]).expect("retain"), Vec::<String>::new());
        assert_eq!(
            Store::new(dir.path()).retain(1, &[]).expect("retain"),
            vec![a.clone()],
            "another process's pending archives are not protected (it holds the lock anyway)"
        );
        let a = archived(&store, 1);
        // Published, with the old copy's instance still draining: nothing goes yet.
        store.point_run(&b2).expect("flip");
        assert_eq!(
            store.retain(2, std::slice::from_ref(&b)).expect("retain"),
            Vec::<String>::new()
        );
        // Drained: the old copy goes, and a (another build) is kept.
        assert_eq!(store.retain(2, &[]).expect("retain"), vec![b]);
        assert!(dir.path().join(&a).is_dir() && dir.path().join(&b2).is_dir());
        // keep = 1 with a newer build not yet published: only the older one may go.
        store.settle(&a);
        let c = archived(&store, 3);
        assert_eq!(store.retain(1, &[]).expect("retain"), vec![a]);
        assert!(dir.path().join(&c).is_dir(), "the build on its way stays");
    }

    #[test]
    fn archive_names_reject_paths() {
        assert!(is_archive_name(".build-20261125T123456.789Z"));
        assert!(!is_archive_name(".build-"));
        assert!(!is_archive_name("../.build-x"));
        assert!(!is_archive_name(".build-x/../../etc"));
        assert!(!is_archive_name(".."));
    }
}
