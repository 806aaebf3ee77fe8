//! The guardian: a small helper process that kills our process groups if pmesh-dev dies.
//!
//! pmesh-dev holds the write end of a pipe whose read end is the guardian's stdin, and tells it
//! which process groups exist (`+PGID` / `-PGID` lines). When pmesh-dev exits in any way, even
//! by SIGKILL, the kernel closes the pipe; the guardian reads end-of-file and sends SIGTERM,
//! then SIGKILL, to every group still listed. `PR_SET_PDEATHSIG` is no substitute: it reaches
//! only the direct child, and fires when the spawning *thread* exits.

use std::collections::BTreeSet;
use std::io::{self, BufRead, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The hidden subcommand the guardian runs as.
pub const SUBCOMMAND: &str = "__guardian";

/// Our end of the guardian's pipe.
pub struct Guardian {
    /// The pipe's write end; closing it (by exiting) tells the guardian to clean up.
    tx: Mutex<io::PipeWriter>,
}

static GLOBAL: OnceLock<Option<Guardian>> = OnceLock::new();

impl Guardian {
    /// The process-wide guardian, started on first use; `None` if it could not be started (a
    /// warning is printed once, and groups are then only cleaned up on orderly exits).
    pub fn get() -> Option<&'static Guardian> {
        GLOBAL
            .get_or_init(|| match Guardian::spawn() {
                Ok(g) => Some(g),
                Err(e) => {
                    eprintln!(
                        "warning: cannot start the guardian process ({e}); \
                         a killed pmesh-dev may leave build steps running"
                    );
                    None
                }
            })
            .as_ref()
    }

    fn spawn() -> io::Result<Guardian> {
        let (rx, tx) = io::pipe()?;
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg(SUBCOMMAND)
            .stdin(Stdio::from(rx))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own group: a Ctrl-C on the terminal must not take it down before it can work.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // The guardian is reaped by nobody on purpose: it outlives us by design and is
        // re-parented to init (or our subreaper) when we exit.
        cmd.spawn()?;
        Ok(Guardian { tx: Mutex::new(tx) })
    }

    fn send(&self, line: String) {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.write_all(line.as_bytes());
    }

    /// Makes each process `cmd` spawns (as the leader of its own group) tell the guardian
    /// about its group itself, between fork and exec: registered before it runs anything, so
    /// no moment exists at which pmesh-dev could die leaving it unknown.
    pub fn register_in_child(&self, cmd: &mut tokio::process::Command) {
        let fd = {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            tx.as_raw_fd()
        };
        let hook = move || {
            // Only async-signal-safe calls here: getpid and one write of a few bytes (atomic on
            // a pipe), formatted without allocating.
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            let mut buf = [0u8; 16];
            let mut i = buf.len();
            buf[i - 1] = b'\n';
            i -= 1;
            let mut n = pid;
            loop {
                i -= 1;
                buf[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            i -= 1;
            buf[i] = b'+';
            // SAFETY: writes bytes from a live stack buffer to a descriptor the child inherited
            // (it is closed on exec, which comes right after).
            unsafe { libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i) };
            Ok(())
        };
        // SAFETY: the hook only calls async-signal-safe functions (see above).
        unsafe {
            cmd.pre_exec(hook);
        }
    }

    /// Tells the guardian a process group is gone.
    pub fn forget(&self, pgid: i32) {
        self.send(format!("-{pgid}\n"));
    }
}

/// Whether any process is left in group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None).is_ok()
}

/// Sends `signal` to group `pgid` (and SIGCONT after SIGTERM, so that a stopped group can act
/// on it); a group that is gone already is no error.
pub fn signal_group(pgid: i32, signal: Signal) {
    if pgid <= 1 {
        return;
    }
    let _ = killpg(Pid::from_raw(pgid), signal);
    if signal == Signal::SIGTERM {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGCONT);
    }
}

/// Sends SIGTERM to each group, waits up to `grace` for them to go, then SIGKILLs the rest.
pub fn stop_groups(pgids: &[i32], grace: Duration) {
    for &g in pgids {
        let _ = killpg(Pid::from_raw(g), Signal::SIGTERM);
        let _ = killpg(Pid::from_raw(g), Signal::SIGCONT);
    }
    let deadline = Instant::now() + grace;
    while pgids.iter().any(|&g| group_alive(g)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &g in pgids {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
}

/// The guardian's main: track groups from stdin until it closes, then stop them all.
pub fn run() -> ! {
    // Signals meant for pmesh-dev's terminal must not stop the guardian early.
    // SAFETY: setting a signal disposition to ignore involves no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut groups = BTreeSet::new();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, n) = line.split_at(line.len().min(1));
        let Ok(pgid) = n.parse::<i32>() else { continue };
        if pgid <= 1 {
            continue;
        }
        match op {
            "+" => {
                groups.insert(pgid);
            }
            "-" => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    let pgids: Vec<i32> = groups.into_iter().collect();
    stop_groups(&pgids, Duration::from_secs(2));
    std::process::exit(0)
}
