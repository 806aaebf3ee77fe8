//! Low-level file access for the walk: opens and stats relative to a directory's descriptor,
//! so that the kernel looks up one name instead of a whole path, and content digests read
//! with as few system calls as a file's size allows (open, one read, stat, close).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use super::cache::{EntryType, StatKey};

/// Opens the directory `name` of `dir` (or the absolute path `name`) for listing and for
/// opening what it holds; a symlink is never followed unless `follow`.
pub fn open_dir(dir: BorrowedFd, name: &[u8], follow: bool) -> io::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    Ok(nix::fcntl::openat(dir, name, flags, Mode::empty())?)
}

/// Opens the file `name` of `dir` for reading. O_NONBLOCK: a FIFO that took the place of a
/// regular file since it was listed must never block the walk; O_NOFOLLOW: a symlink is
/// never followed (the open fails with ELOOP).
pub fn open_file(dir: BorrowedFd, name: &[u8]) -> io::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    Ok(File::from(nix::fcntl::openat(
        dir,
        name,
        flags,
        Mode::empty(),
    )?))
}

/// The stat of `name` in `dir`, not following a symlink.
pub fn stat_at(dir: BorrowedFd, name: &[u8]) -> io::Result<StatKey> {
    let st = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    Ok(StatKey::of_stat(&st))
}

/// The stat of an open file.
pub fn stat(fd: impl AsFd) -> io::Result<StatKey> {
    Ok(StatKey::of_stat(&nix::sys::stat::fstat(fd)?))
}

/// The target of the symlink `name` in `dir`; EINVAL when it is not a symlink.
pub fn read_link(dir: BorrowedFd, name: &[u8]) -> io::Result<Box<[u8]>> {
    use std::os::unix::ffi::OsStringExt;
    let target = nix::fcntl::readlinkat(dir, name)?;
    Ok(target.into_vec().into_boxed_slice())
}

/// Whether an error means that the name is gone.
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// The OS error number of `e`.
pub fn errno(e: &io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw)
}

/// Reads the names in the directory `fd` (at `_path`) with their type as the directory entry
/// tells it (`None` when the file system does not say), leaving out `.` and `..`.
#[cfg(target_os = "linux")]
pub fn list(
    fd: BorrowedFd,
    _path: &std::path::Path,
    mut each: impl FnMut(&[u8], Option<EntryType>),
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    DIR_BUF.with_borrow_mut(|buf| {
        if buf.is_empty() {
            buf.resize(32 << 10, 0);
        }
        loop {
            // SAFETY: getdents64 writes at most `buf.len()` bytes to `buf`, which is valid
            // for writes of that many bytes; `fd` is an open descriptor.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    fd.as_raw_fd(),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            let n = match usize::try_from(n) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(_) => match Errno::last() {
                    Errno::EINTR => continue,
                    e => return Err(e.into()),
                },
            };
            // Records of struct linux_dirent64: d_ino (8 bytes), d_off (8), d_reclen (2),
            // d_type (1), then the NUL-terminated name, padded to d_reclen.
            let mut records = &buf[..n];
            while records.len() >= 19 {
                let reclen = usize::from(u16::from_ne_bytes([records[16], records[17]]));
                let Some(rec) = records.get(..reclen).filter(|_| reclen > 19) else {
                    return Err(io::Error::other("malformed directory entry"));
                };
                let name = &rec[19..];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                if name != b"." && name != b".." {
                    each(name, entry_type(rec[18]));
                }
                records = &records[reclen..];
            }
        }
    })
}

/// Reads the names in the directory at `path` (open as `_fd`) with their type as the directory
/// entry tells it (`None` when the file system does not say).
#[cfg(not(target_os = "linux"))]
pub fn list(
    _fd: BorrowedFd,
    path: &std::path::Path,
    mut each: impl FnMut(&[u8], Option<EntryType>),
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    for e in std::fs::read_dir(path)? {
        let e = e?;
        let ty = e.file_type().ok().map(|t| {
            if t.is_file() {
                EntryType::File
            } else if t.is_dir() {
                EntryType::Dir
            } else if t.is_symlink() {
                EntryType::Symlink
            } else {
                EntryType::Other
            }
        });
        each(e.file_name().as_bytes(), ty);
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn entry_type(d_type: u8) -> Option<EntryType> {
    match d_type {
        libc::DT_REG => Some(EntryType::File),
        libc::DT_DIR => Some(EntryType::Dir),
        libc::DT_LNK => Some(EntryType::Symlink),
        libc::DT_UNKNOWN => None,
        _ => Some(EntryType::Other),
    }
}

thread_local! {
    /// The directory entries of one getdents64 call.
    #[cfg(target_os = "linux")]
    static DIR_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// File content: whole for files up to `CHUNK`, in chunks beyond.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Files up to this size are read with one read and hashed in one go; larger ones stream.
const CHUNK: usize = 1 << 20;

/// What reading a file gave.
pub enum Read_ {
    /// The digest and the stat it belongs to; `stable` is false when the file kept changing
    /// while it was read, so the digest must not be cached.
    Digest {
        digest: u128,
        key: StatKey,
        stable: bool,
    },
    /// It is no longer a regular file.
    NotRegular,
}

/// Reads the regular file `name` of `dir` (`opened` already) and digests it; `taken_ns` is
/// when reading began.
///
/// The file is read first and stat'ed after: a write during the read leaves its mtime or ctime
/// within [`RACY_MARGIN_NS`](super::cache::RACY_MARGIN_NS) of `taken_ns` (a timestamp cannot
/// lag the write by more than a clock tick), so a stat safely older than `taken_ns` shows that
/// what was read is the content of that stat. A file written recently is read again, until
/// two reads agree; one that keeps changing is digested but not `stable`.
pub fn read_digest(
    dir: BorrowedFd,
    name: &[u8],
    mut opened: Option<File>,
    taken_ns: i64,
) -> io::Result<Read_> {
    let mut last = None;
    for _ in 0..3 {
        let f = match opened.take() {
            Some(f) => f,
            None => open_file(dir, name)?,
        };
        let Some((digest, key, complete)) = digest(&f)? else {
            return Ok(Read_::NotRegular);
        };
        let now = Some((digest, key));
        if complete && (key.safely_older_than(taken_ns) || last == now) {
            return Ok(Read_::Digest {
                digest,
                key,
                stable: true,
            });
        }
        last = now;
    }
    let (digest, key) = last.unwrap_or_default();
    Ok(Read_::Digest {
        digest,
        key,
        stable: false,
    })
}

/// The xxh3-128 of the content of `f` and its stat after reading, with whether the bytes read
/// are as many as that stat says; `None` if it is not a regular file.
fn digest(f: &File) -> io::Result<Option<(u128, StatKey, bool)>> {
    BUF.with_borrow_mut(|buf| {
        // Room for a chunk, never filled in advance: only the pages a read writes become
        // resident, one for most source files, instead of a whole chunk per thread for good.
        buf.clear();
        buf.reserve_exact(CHUNK);
        // One read gets a small file whole: a regular file's read stops short only at its end.
        let n = match read(f, buf) {
            Ok(n) => n,
            // A directory or a FIFO in its place (EISDIR, EAGAIN) is no error.
            Err(e) => match stat(f) {
                Ok(k) if k.entry_type() != EntryType::File => return Ok(None),
                _ => return Err(e),
            },
        };
        let key = stat(f)?;
        if key.entry_type() != EntryType::File {
            return Ok(None);
        }
        if n < CHUNK && n as u64 == key.size {
            return Ok(Some((xxh3_128(buf), key, true)));
        }
        // Bigger than one chunk (or not what the stat says): stream to the end.
        let mut h = Xxh3::new();
        h.update(buf);
        let mut total = n as u64;
        loop {
            match read(f, buf)? {
                0 => break,
                n => {
                    h.update(buf);
                    total += n as u64;
                }
            }
        }
        let key = stat(f)?;
        Ok(Some((h.digest128(), key, total == key.size)))
    })
}

/// Reads into `buf`'s spare room, at most a chunk, replacing what it held.
fn read(f: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    buf.clear();
    let room = buf.capacity().min(CHUNK);
    loop {
        // SAFETY: read writes at most `room` bytes to the vector's spare capacity, which is
        // valid for writes of that many bytes; the length is set to what it wrote.
        let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), room) };
        match usize::try_from(n) {
            Ok(n) => {
                // SAFETY: the first `n` bytes were just written by read.
                unsafe { buf.set_len(n) };
                return Ok(n);
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
