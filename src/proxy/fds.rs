//! Open descriptors: the limit raised at start, the proxies' share of it, and what happens
//! when they run short (the newest client is refused; the listener and the connected clients
//! go on).

use std::io::ErrorKind;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

/// Pause after a failed accept that freeing a descriptor cannot help, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Descriptors left to the rest of pmesh-dev (the watcher, instances' pipes, the control
/// socket) when the proxies size their share of the limit.
const FD_RESERVE: u64 = 64;

/// Raises the soft limit on open descriptors to the hard one: each proxied connection takes
/// two (client and instance), and the common soft limit of 1,024 is reached by a few hundred
/// idle browser or test connections. Called once at start; failures leave the limit as it is.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let mut want = limit.rlim_max;
        // macOS refuses more than OPEN_MAX for the soft limit, whatever the hard one says.
        if cfg!(target_os = "macos") {
            want = want.min(10240);
        }
        if limit.rlim_cur < want {
            let original = limit.rlim_cur;
            limit.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                ORIGINAL_SOFT.store(original, Ordering::Relaxed);
            }
        }
    }
}

/// The soft limit pmesh-dev started with, if [`raise_fd_limit`] raised it (0: it did not).
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(0);

/// Has the process `cmd` starts begin with the soft limit pmesh-dev itself started with, not
/// the raised one: programs that use `select()` fail on descriptors past 1,024 (Go's os/exec
/// does the same for the same reason).
pub fn keep_child_fd_limit(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let original = ORIGINAL_SOFT.load(Ordering::Relaxed);
    if original == 0 {
        return;
    }
    // SAFETY: getrlimit and setrlimit are async-signal-safe and touch only the struct passed.
    unsafe {
        cmd.pre_exec(move || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = original.min(limit.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
            Ok(())
        });
    }
}

/// Client connections open on every proxy of this process, against [`client_slots`].
static CLIENTS: AtomicUsize = AtomicUsize::new(0);

/// How many client connections the proxies take at most: half of what the descriptor limit
/// leaves, since each may hold an upstream connection too. Past it the newest client is
/// refused, so that the connected ones can still reach their instance.
pub(super) fn client_slots() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return usize::MAX;
    }
    let spare = limit.rlim_cur.saturating_sub(FD_RESERVE) / 2;
    usize::try_from(spare).unwrap_or(usize::MAX).max(1)
}

/// One client connection counted in [`CLIENTS`] until dropped.
pub(super) struct ClientSlot;

impl ClientSlot {
    pub(super) fn take(slots: usize) -> Option<ClientSlot> {
        let mut n = CLIENTS.load(Ordering::Relaxed);
        loop {
            if n >= slots {
                return None;
            }
            match CLIENTS.compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(ClientSlot),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        CLIENTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A descriptor held in reserve: when accept fails for lack of descriptors, closing it lets
/// the proxy accept the waiting connection and close it at once (the newest client is refused,
/// instead of being left in the backlog while the accept loop retries).
static SPARE_FD: Mutex<Option<std::fs::File>> = Mutex::new(None);

pub(super) fn keep_spare_fd() {
    let mut spare = SPARE_FD.lock().unwrap_or_else(|e| e.into_inner());
    if spare.is_none() {
        *spare = std::fs::File::open("/dev/null").ok();
    }
}

/// What an accept loop does after `accept` failed with `e`.
pub(super) async fn accept_failed(listener: &TcpListener, e: &std::io::Error) {
    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    if out_of_fds {
        let spare = SPARE_FD.lock().unwrap_or_else(|e| e.into_inner()).take();
        if spare.is_some() {
            drop(spare);
            // Refused: accepted only to be closed.
            if let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
            {
                drop(stream);
            }
            keep_spare_fd();
            return;
        }
    }
    if e.kind() != ErrorKind::ConnectionAborted {
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// The answer to a client past [`client_slots`]: written in one go on the new socket, whose
/// send buffer is empty.
pub(super) const TOO_MANY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 64\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
The proxy has too many connections open; try again in a moment.\n";
