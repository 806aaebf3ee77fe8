//! The few calls that differ between systems, each with a version for every system: glibc's
//! allocator knobs (a no-op elsewhere) and a process's start time (which tells a recorded pid
//! from a later process that reused it).

/// Hands memory freed by a full walk back to the system. glibc keeps freed memory in its
/// per-thread arenas; after the walk's threads are idle, nothing else would release it. Other
/// allocators (musl's, macOS's) return what they can on their own.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// glibc gives every thread that allocates its own heap arena, up to eight per core. A watch
/// holds its tree for hours, and the walk that built it ran on several threads: what each left
/// in its arena pins pages the heap cannot give back (about 4 MB on a 100k-file tree). Two
/// arenas keep that memory together. Must be called before any thread exists.
pub fn limit_heap_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// When process `pid` started, in a unit of the system's own (clock ticks since boot on
/// Linux, microseconds since the epoch on macOS and FreeBSD): equal for the same process,
/// different for a later one with the same pid. `None` if there is no such process.
pub fn process_start_time(pid: i32) -> Option<u64> {
    start_time(pid)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(any(target_os = "macos", target_os = "ios"))]
fn start_time(pid: i32) -> Option<u64> {
    let mut info = std::mem::MaybeUninit::<libc::proc_bsdinfo>::zeroed();
    let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: the buffer is as large as the size passed, and proc_pidinfo writes at most that.
    let n = unsafe {
        libc::proc_pidinfo(
            pid,
            libc::PROC_PIDTBSDINFO,
            0,
            info.as_mut_ptr().cast(),
            size,
        )
    };
    if n != size {
        return None;
    }
    // SAFETY: proc_pidinfo filled the whole structure (it returned its size).
    let info = unsafe { info.assume_init() };
    Some(info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec)
}

#[cfg(target_os = "freebsd")]
fn start_time(pid: i32) -> Option<u64> {
    let mut mib = [libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, pid];
    let mut info = std::mem::MaybeUninit::<libc::kinfo_proc>::zeroed();
    let mut len = std::mem::size_of::<libc::kinfo_proc>();
    // SAFETY: `info` has room for `len` bytes; sysctl writes at most that and sets `len`.
    let rc = unsafe {
        libc::sysctl(
            mib.as_mut_ptr(),
            mib.len() as libc::c_uint,
            info.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    if rc != 0 || len != std::mem::size_of::<libc::kinfo_proc>() {
        return None;
    }
    // SAFETY: sysctl filled the whole structure (it reported its size).
    let info = unsafe { info.assume_init() };
    let start = info.ki_start;
    Some(start.tv_sec as u64 * 1_000_000 + start.tv_usec as u64)
}

/// Elsewhere (the other BSDs, whose `kinfo_proc` layouts differ): what `ps` says of the start,
/// hashed. A record then still tells a reused pid from the process recorded.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd"
)))]
fn start_time(pid: i32) -> Option<u64> {
    let out = std::process::Command::new("ps")
        .args(["-o", "lstart=", "-p", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_has_a_stable_start_time_and_a_gone_one_none() {
        let me = std::process::id() as i32;
        let first = process_start_time(me).expect("this process has a start time");
        assert_eq!(process_start_time(me), Some(first));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        child.wait().expect("wait for true");
        assert_eq!(process_start_time(pid), None, "a reaped child is gone");
    }
}
