//! Runs a service's build steps: environment, process groups, output and cancellation.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, EventKind, Sink};
use crate::guardian::{self, Guardian};
use crate::hash::BuildId;
use crate::manifest::Service;

/// How many of a failed step's last output lines the error shows.
const TAIL_LINES: usize = 20;

/// How long a cancelled step gets between SIGTERM and SIGKILL.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Whether build steps and instances are told to print colours although their output is a
/// pipe: set when that output ends on a colour terminal or in the TUI.
static FORCE_COLOUR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells build tools that their output ends up where colours show (`FORCE_COLOR`,
/// `CLICOLOR_FORCE`, `CARGO_TERM_COLOR`); the manifest's `env` can still say otherwise.
pub fn force_colour(on: bool) {
    FORCE_COLOUR.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A timer that is not meant to fire until it is reset.
const FOREVER: Duration = Duration::from_secs(86_400 * 365);

/// Why the steps did not all succeed.
#[derive(Debug, thiserror::Error)]
pub enum BuildFailure {
    #[error("{}", step_failure(*.index, *.count, .step, .status, .tail))]
    Step {
        index: usize,
        count: usize,
        step: String,
        status: ExitStatus,
        tail: Vec<String>,
    },
    #[error("{}", install_failure(.command, .status, .tail))]
    Install {
        command: String,
        status: ExitStatus,
        tail: Vec<String>,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("cannot run build step `{step}`: {error}")]
    Spawn { step: String, error: io::Error },
}

fn step_failure(
    index: usize,
    count: usize,
    step: &str,
    status: &ExitStatus,
    tail: &[String],
) -> String {
    format!(
        "step {} of {count} (`{step}`) failed with {}{}",
        index + 1,
        describe_status(status),
        tail_text(tail)
    )
}

fn install_failure(command: &str, status: &ExitStatus, tail: &[String]) -> String {
    format!(
        "install (`{command}`) failed with {}{}",
        describe_status(status),
        tail_text(tail)
    )
}

/// `; its last lines:` and the lines, indented one a line; nothing without lines.
pub(crate) fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    let mut s = String::from("; its last lines:");
    for l in tail {
        s.push_str("\n    ");
        s.push_str(l);
    }
    s
}

/// `exit status 3` or `signal 9 (SIGKILL)`.
pub fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({s})"),
            Err(_) => format!("signal {sig}"),
        },
        _ => "an unknown status".to_owned(),
    }
}

/// Where a build's output goes besides the reporter.
pub struct BuildLog {
    file: Option<File>,
}

impl BuildLog {
    pub fn new(file: Option<File>) -> Self {
        BuildLog { file }
    }
    fn write(&mut self, line: &str) {
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Runs every build step of `svc` in order with `sh -c` in its root, each in its own process
/// group. Output goes line by line to the reporter and the log. A failing step stops the
/// build; `cancel` stops it too, killing the running step's whole group.
pub async fn run_steps(
    svc: &Service,
    build_dir: &Path,
    id: BuildId,
    reporter: &Arc<Sink>,
    log: &mut BuildLog,
    cancel: &CancellationToken,
) -> Result<(), BuildFailure> {
    let count = svc.build.len();
    for (index, step) in svc.build.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(BuildFailure::Cancelled);
        }
        log.write(&format!("$ {step}"));
        let (status, tail) = run_step(svc, step, build_dir, id, reporter, log, cancel).await?;
        if !status.success() {
            log.write(&format!("# failed with {}", describe_status(&status)));
            return Err(BuildFailure::Step {
                index,
                count,
                step: step.clone(),
                status,
                tail,
            });
        }
    }
    Ok(())
}

/// What the install step last succeeded with: its command and a digest of each input.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct InstallRecord {
    command: String,
    /// Input path -> xxh3-128 of its content (hex), or "" for a missing file.
    inputs: std::collections::BTreeMap<String, String>,
}

fn install_state(svc: &Service, install: &crate::manifest::Install) -> InstallRecord {
    let inputs = (install.inputs.iter())
        .map(|p| {
            let digest = std::fs::read(svc.root.join(p))
                .map(|b| format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&b)))
                .unwrap_or_default();
            (p.clone(), digest)
        })
        .collect();
    InstallRecord {
        command: install.run.clone(),
        inputs,
    }
}

/// Runs `svc`'s install step (its dependencies, in the service root) when its command or the
/// content of its inputs changed since it last succeeded; `record` is where that success is
/// kept. Its output goes where a step's goes; it fails like one.
pub async fn install(
    svc: &Service,
    record: &Path,
    build_dir: &Path,
    id: BuildId,
    reporter: &Arc<Sink>,
    log: &mut BuildLog,
    cancel: &CancellationToken,
) -> Result<(), BuildFailure> {
    let Some(install) = &svc.install else {
        return Ok(());
    };
    let last: InstallRecord = std::fs::read(record)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let now = install_state(svc, install);
    if now == last {
        return Ok(());
    }
    let why = if last.command.is_empty() {
        "not run here yet".to_owned()
    } else if last.command != now.command {
        "its command changed".to_owned()
    } else {
        let changed: Vec<&str> = (now.inputs.iter())
            .filter(|(p, d)| last.inputs.get(*p) != Some(*d))
            .map(|(p, _)| p.as_str())
            .collect();
        format!("{} changed", changed.join(", "))
    };
    let line = format!("$ {}   # install: {why}", install.run);
    log.write(&line);
    reporter.now(
        &svc.name,
        EventKind::Output {
            line,
            source: "build".to_owned(),
        },
    );
    let (status, tail) = run_step(svc, &install.run, build_dir, id, reporter, log, cancel).await?;
    if !status.success() {
        log.write(&format!("# failed with {}", describe_status(&status)));
        return Err(BuildFailure::Install {
            command: install.run.clone(),
            status,
            tail,
        });
    }
    // Read again: the install itself may rewrite its lockfile.
    let done = install_state(svc, install);
    if let Ok(body) = serde_json::to_vec_pretty(&done) {
        let tmp = record.with_extension("tmp");
        if std::fs::write(&tmp, body).is_ok() {
            let _ = std::fs::rename(&tmp, record);
        }
    }
    Ok(())
}

/// `sh -c script` for `svc`: in the service root, in a process group of its own (registered
/// with the guardian, so that it never outlives pmesh-dev), stdin empty, stdout and stderr into
/// one pipe (which keeps their lines in the order they were written), with `PMESH_BUILD_ID`,
/// `PMESH_SERVICE` and `vars` set and the manifest's `env` over them all. Returns the command and
/// the pipe's read end; the command must be dropped once spawned, or the reader never sees the
/// pipe's end.
pub(crate) fn shell(
    svc: &Service,
    script: &str,
    id: BuildId,
    vars: &[(&str, &std::ffi::OsStr)],
) -> io::Result<(Command, io::PipeReader)> {
    let (reader, writer) = io::pipe()?;
    let writer2 = writer.try_clone()?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(&svc.root)
        .env("PMESH_BUILD_ID", id.to_string())
        .env("PMESH_SERVICE", &svc.name)
        .envs(vars.iter().copied());
    if FORCE_COLOUR.load(std::sync::atomic::Ordering::Relaxed) {
        cmd.env("FORCE_COLOR", "1")
            .env("CLICOLOR_FORCE", "1")
            .env("CARGO_TERM_COLOR", "always");
    }
    cmd.envs(&svc.env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .process_group(0);
    // pmesh-dev raised its own descriptor limit for the proxy; not the children's.
    crate::proxy::keep_child_fd_limit(cmd.as_std_mut());
    if let Some(g) = Guardian::get() {
        g.register_in_child(&mut cmd);
    }
    Ok((cmd, reader))
}

/// Calls `f` with each line read from `reader` (lossy UTF-8, line end trimmed) until the end,
/// an error, or `f` returning false.
pub(crate) fn each_line(reader: impl io::Read, mut f: impl FnMut(String) -> bool) {
    let mut r = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if !f(line.trim_end_matches(['\n', '\r']).to_owned()) {
                    break;
                }
            }
        }
    }
}

async fn run_step(
    svc: &Service,
    step: &str,
    build_dir: &Path,
    id: BuildId,
    reporter: &Arc<Sink>,
    log: &mut BuildLog,
    cancel: &CancellationToken,
) -> Result<(ExitStatus, Vec<String>), BuildFailure> {
    let spawn_err = |error| BuildFailure::Spawn {
        step: step.to_owned(),
        error,
    };
    let (mut cmd, reader) =
        shell(svc, step, id, &[("PMESH_BUILD_DIR", build_dir.as_os_str())]).map_err(spawn_err)?;
    let guardian = Guardian::get();
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // Our copies of the pipe's write end must be gone, or the reader never sees its end.
    drop(cmd);
    let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);

    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let read_thread =
        std::thread::spawn(move || each_line(reader, |line| lines_tx.send(line).is_ok()));

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut on_line = |line: String| {
        log.write(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        reporter.emit(&Event::now(
            &svc.name,
            EventKind::Output {
                line,
                source: "build".to_owned(),
            },
        ));
    };

    let mut cancelled = false;
    let mut status = None;
    let mut output_open = true;
    let mut reader_done = false;
    // A process that left the group (setsid) may hold the output open; it gets a moment to
    // finish its lines once the step is over, then is no longer waited for.
    let drain = tokio::time::sleep(FOREVER);
    tokio::pin!(drain);
    // After a cancel: when the step is killed if it has not exited on SIGTERM.
    let grace = tokio::time::sleep(FOREVER);
    tokio::pin!(grace);
    while status.is_none() || output_open {
        tokio::select! {
            line = lines_rx.recv(), if output_open => match line {
                Some(l) => on_line(l),
                None => {
                    output_open = false;
                    reader_done = true;
                }
            },
            _ = &mut drain, if status.is_some() && output_open => output_open = false,
            s = child.wait(), if status.is_none() => {
                status = Some(s.map_err(spawn_err)?);
                drain.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(2));
                // Whatever the step left in its group goes with it: build steps never
                // outlive their build. This also ends the output of stragglers.
                let _ = tokio::task::spawn_blocking(move || {
                    guardian::stop_groups(&[pgid], Duration::ZERO)
                })
                .await;
            },
            _ = cancel.cancelled(), if !cancelled && status.is_none() => {
                // SIGTERM now; the step's own exit is awaited right here (it is reaped by
                // `child.wait()` above, so a dead step is seen at once, not polled for while it
                // is a zombie), and only a step that outlives the grace is killed.
                cancelled = true;
                guardian::signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
                grace.as_mut().reset(tokio::time::Instant::now() + CANCEL_GRACE);
            },
            _ = &mut grace, if cancelled && status.is_none() => {
                guardian::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
                grace.as_mut().reset(tokio::time::Instant::now() + FOREVER);
            },
        }
    }
    if reader_done {
        let _ = read_thread.join();
    }
    if let Some(g) = guardian {
        g.forget(pgid);
    }
    if cancelled {
        return Err(BuildFailure::Cancelled);
    }
    let status = status.ok_or(BuildFailure::Cancelled)?;
    Ok((status, tail.into_iter().collect()))
}
