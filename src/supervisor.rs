//! Instances of a service: spawned from a build with `sh -c run` in their own process group,
//! their output kept in a bounded log, their health probed, and stopped gracefully (SIGTERM to
//! the group, SIGKILL after a grace period).
//!
//! No instance outlives pmesh-dev: the guardian kills their groups if pmesh-dev dies, and each
//! group is also recorded in `.pmesh/instances` with its leader's start time, so a pmesh-dev
//! that starts after a crash (or after the guardian itself was killed) stops what is left,
//! having checked that the process is still the one recorded.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::builder::{describe_status, each_line, shell, tail_text};
use crate::event::{Event, EventKind, Sink};
use crate::guardian::{self, Guardian};
use crate::hash::BuildId;
use crate::manifest::{Health, Service};
use crate::store::{STATE_DIR, Store};

/// Lines of an instance's output kept in memory.
const LOG_LINES: usize = 2000;
/// Size at which `.pmesh/runtime.log` is rotated to `runtime.log.1`.
const LOG_FILE_LIMIT: u64 = 4 << 20;
/// How often health is probed while an instance starts.
const PROBE_EVERY: Duration = Duration::from_millis(25);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Lines of output quoted when an instance fails.
pub const TAIL: usize = 10;

/// The recent output of an instance.
#[derive(Debug, Default)]
pub struct RuntimeLog {
    lines: VecDeque<String>,
    /// Its first lines, kept even once they scroll out: where an error usually names the file
    /// and line (a Node `SyntaxError`, a Python traceback's end is in the tail).
    head: Vec<String>,
    /// Every line pushed.
    count: usize,
    /// The instance's output has ended (every writer closed the pipe).
    ended: bool,
}

impl RuntimeLog {
    fn push(&mut self, line: String) {
        self.count += 1;
        if self.head.len() < TAIL {
            self.head.push(line.clone());
        }
        if self.lines.len() == LOG_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let skip = self.lines.len().saturating_sub(n);
        self.lines.iter().skip(skip).cloned().collect()
    }

    /// The first and the last `n` lines (all of them when there are at most `2n`), with a
    /// line saying how many were left out between.
    pub fn head_and_tail(&self, n: usize) -> Vec<String> {
        if self.count <= 2 * n {
            return self.tail(2 * n);
        }
        let mut out: Vec<String> = self.head.iter().take(n).cloned().collect();
        out.push(format!(
            "… ({} lines) …",
            self.count - n - n.min(self.lines.len())
        ));
        out.extend(self.tail(n));
        out
    }
}

/// A running instance of a service.
pub struct Instance {
    pub id: BuildId,
    /// The archive it runs from.
    pub archive: String,
    pub port: u16,
    /// What runs: a process group of the run command, or pmesh-dev's own file server.
    runs: Runs,
    /// Becomes `Some` when the instance's main process exits.
    exit: watch::Receiver<Option<ExitStatus>>,
    pub log: Arc<Mutex<RuntimeLog>>,
}

enum Runs {
    Group {
        pgid: i32,
        records: Records,
    },
    /// The file server task of a `static` service; cancelled to stop it.
    Files {
        stop: tokio_util::sync::CancellationToken,
    },
}

/// Why an instance is not healthy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unhealthy {
    #[error("exited with {status} before it was ready{}", tail_text(.tail))]
    Exited { status: String, tail: Vec<String> },
    #[error("not healthy after {}s ({check}){}", .after.as_secs(), tail_text(.tail))]
    Timeout {
        after: Duration,
        check: String,
        tail: Vec<String>,
    },
}

/// A free loopback port for a new instance.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

impl Instance {
    /// Starts `svc`'s run command for build `id` in `archive` (under `store`'s root).
    pub async fn start(
        svc: &Arc<Service>,
        store: &Store,
        archive: &str,
        id: BuildId,
        reporter: &Arc<Sink>,
    ) -> anyhow::Result<Instance> {
        if let Some(files) = &svc.static_files {
            return Instance::serve_files(svc, store, archive, id, files);
        }
        let run = svc
            .run
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("service `{}` has no `run` command", svc.name))?;
        let port = free_port()?;
        let run_dir = store.root().join(archive);
        let port_text = port.to_string();
        let (mut cmd, reader) = shell(
            svc,
            run,
            id,
            &[
                ("PORT", port_text.as_ref()),
                ("HOST", "127.0.0.1".as_ref()),
                ("PMESH_RUN_DIR", run_dir.as_os_str()),
            ],
        )?;
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("service `{}`: cannot start `{run}`: {e}", svc.name))?;
        drop(cmd);
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let records = Records::new(store);
        records.add(pid);

        let log = Arc::new(Mutex::new(RuntimeLog::default()));
        let log_file = store.state_dir("").ok().map(|d| d.join("runtime.log"));
        {
            let log = log.clone();
            let reporter = reporter.clone();
            let name = svc.name.clone();
            std::thread::spawn(move || {
                let mut file = log_file.as_deref().and_then(open_log);
                each_line(reader, |line| {
                    if let Some(f) = &mut file {
                        let _ = writeln!(f, "[{port}] {line}");
                    }
                    log.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.clone());
                    reporter.emit(&Event::now(
                        &name,
                        EventKind::Output {
                            line,
                            source: "run".to_owned(),
                        },
                    ));
                    true
                });
                log.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
            });
        }
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = exit_tx.send(status);
        });
        Ok(Instance {
            id,
            archive: archive.to_owned(),
            port,
            runs: Runs::Group { pgid: pid, records },
            exit,
            log,
        })
    }

    /// A `static` service's instance: the build's directory served by pmesh-dev itself.
    fn serve_files(
        _svc: &Service,
        store: &Store,
        archive: &str,
        id: BuildId,
        files: &crate::manifest::StaticFiles,
    ) -> anyhow::Result<Instance> {
        let dir = store.root().join(archive).join(&files.dir);
        if !dir.is_dir() {
            anyhow::bail!(
                "the build has no directory `{}` to serve (`static` in the manifest): its steps \
                 must write it into $PMESH_BUILD_DIR",
                files.dir
            );
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let stop = tokio_util::sync::CancellationToken::new();
        let (exit_tx, exit) = watch::channel(None);
        let log = Arc::new(Mutex::new(RuntimeLog::default()));
        log.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
            "serving {} (`{}` of {archive})",
            dir.display(),
            files.dir
        ));
        let (spa, task_stop) = (files.spa, stop.clone());
        tokio::spawn(async move {
            crate::files::serve(listener, dir, spa, task_stop).await;
            // It ends only when stopped: there is no exit status to report.
            drop(exit_tx);
        });
        Ok(Instance {
            id,
            archive: archive.to_owned(),
            port,
            runs: Runs::Files { stop },
            exit,
            log,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The last lines of its output.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).tail(n)
    }

    /// Its first and last lines of output; see [`RuntimeLog::head_and_tail`].
    pub fn head_and_tail(&self, n: usize) -> Vec<String> {
        (self.log.lock().unwrap_or_else(|e| e.into_inner())).head_and_tail(n)
    }

    /// What it takes to watch the instance's health and exit from another task.
    pub fn probe(&self) -> Probe {
        Probe {
            addr: self.addr(),
            exit: self.exit.clone(),
            log: self.log.clone(),
        }
    }

    /// Resolves with the exit status once the instance's main process has exited.
    pub async fn exited(&self) -> Option<ExitStatus> {
        self.probe().exited().await
    }

    /// SIGTERM to the whole group, then SIGKILL after `grace` if anything is left.
    pub async fn stop(self, grace: Duration) -> Option<ExitStatus> {
        let (pgid, records) = match &self.runs {
            Runs::Group { pgid, records } => (*pgid, records.clone()),
            Runs::Files { stop } => {
                stop.cancel();
                return None;
            }
        };
        tokio::task::spawn_blocking(move || guardian::stop_groups(&[pgid], grace))
            .await
            .ok();
        let status = tokio::time::timeout(Duration::from_secs(5), self.exited())
            .await
            .ok()
            .flatten();
        if let Some(g) = Guardian::get() {
            g.forget(pgid);
        }
        records.remove(pgid);
        status
    }
}

/// A cheap handle on an instance's address, exit and output, for health checks and for
/// noticing a crash.
#[derive(Clone)]
pub struct Probe {
    addr: SocketAddr,
    exit: watch::Receiver<Option<ExitStatus>>,
    log: Arc<Mutex<RuntimeLog>>,
}

impl Probe {
    /// Resolves with the exit status once the instance's main process has exited.
    pub async fn exited(&self) -> Option<ExitStatus> {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(s) => *s,
            Err(_) => None,
        }
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    fn tail(&self, n: usize) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).tail(n)
    }

    /// Probes health until it passes, the instance exits, or `timeout` passes.
    pub async fn wait_healthy(&self, health: &Health, timeout: Duration) -> Result<(), Unhealthy> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(self.exited_early(status).await);
            }
            if probe(self.addr, health).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Unhealthy::Timeout {
                    after: timeout,
                    check: health.to_string(),
                    tail: self.tail(TAIL),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                status = self.exited() => {
                    if let Some(status) = status {
                        return Err(self.exited_early(status).await);
                    }
                }
            }
        }
    }

    async fn exited_early(&self, status: ExitStatus) -> Unhealthy {
        // Let the last lines it printed reach the log before quoting them: the pipe ends once
        // the group's last writer is gone (a second at most: a child may keep it open).
        let until = Instant::now() + Duration::from_secs(1);
        while !self.log.lock().unwrap_or_else(|e| e.into_inner()).ended && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Unhealthy::Exited {
            status: describe_status(&status),
            tail: self
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .head_and_tail(TAIL),
        }
    }
}

fn open_log(path: &Path) -> Option<fs::File> {
    if fs::metadata(path).is_ok_and(|m| m.len() > LOG_FILE_LIMIT) {
        let _ = fs::rename(path, path.with_extension("log.1"));
    }
    OpenOptions::new().create(true).append(true).open(path).ok()
}

/// One health probe.
pub async fn probe(addr: SocketAddr, health: &Health) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let Health::Get(path) = health else {
            return Some(true);
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            match s.read(&mut buf[n..]).await.ok()? {
                0 => return Some(false),
                k => n += k,
            }
        }
        // "HTTP/1.1 200": 2xx and 3xx are healthy.
        Some(buf.starts_with(b"HTTP/1.") && matches!(buf[9], b'2' | b'3'))
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// `.pmesh/instances`: the process groups of running instances with their leaders' start
/// times, so that a later pmesh-dev can stop what a crashed one left.
#[derive(Clone)]
struct Records {
    path: PathBuf,
    lock: Arc<Mutex<()>>,
}

impl Records {
    fn new(store: &Store) -> Records {
        static LOCK: std::sync::OnceLock<Arc<Mutex<()>>> = std::sync::OnceLock::new();
        Records {
            path: store.root().join(STATE_DIR).join("instances"),
            lock: LOCK.get_or_init(Default::default).clone(),
        }
    }

    fn edit(&self, f: impl FnOnce(&mut Vec<(i32, u64)>)) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = read_records(&self.path);
        f(&mut list);
        let body: String = list.iter().map(|(p, t)| format!("{p} {t}\n")).collect();
        let tmp = self.path.with_extension("tmp");
        if fs::write(&tmp, body).is_ok() {
            let _ = fs::rename(&tmp, &self.path);
        }
    }

    fn add(&self, pid: i32) {
        if let Some(start) = crate::sys::process_start_time(pid) {
            self.edit(|l| l.push((pid, start)));
        }
    }

    fn remove(&self, pid: i32) {
        self.edit(|l| l.retain(|(p, _)| *p != pid));
    }
}

fn read_records(path: &Path) -> Vec<(i32, u64)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (p, t) = l.split_once(' ')?;
            Some((p.parse().ok()?, t.parse().ok()?))
        })
        .collect()
}

/// Stops instances a crashed pmesh-dev left in `store`'s root: only groups whose leader is
/// still the very process recorded (same pid, same start time). Returns how many.
pub fn reap_leftovers(store: &Store) -> usize {
    let path = store.root().join(STATE_DIR).join("instances");
    let list = read_records(&path);
    let alive: Vec<i32> = list
        .iter()
        .filter(|(pid, start)| crate::sys::process_start_time(*pid) == Some(*start))
        .map(|(pid, _)| *pid)
        .collect();
    if !alive.is_empty() {
        guardian::stop_groups(&alive, Duration::from_secs(2));
    }
    let _ = fs::remove_file(&path);
    alive.len()
}
