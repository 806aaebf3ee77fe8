//! What one directory entry is and, for a regular file, its digest: from the cache when the
//! racy rule allows, else read.

use std::fs;
use std::io;
use std::os::fd::BorrowedFd;

use nix::errno::Errno;

use super::Kind;
use super::cache::{EntryType, FileRecord, StatKey};
use super::files::{self, Read_};

/// A regular file's digest.
#[derive(Clone, Copy)]
pub(super) struct Digested {
    pub(super) digest: u128,
    pub(super) key: StatKey,
    /// What to cache: `None` when it changed while being read.
    pub(super) record: Option<FileRecord>,
    /// Read now, not taken from the cache.
    pub(super) read: bool,
}

/// What one entry turned out to be.
pub(super) enum Found {
    Regular(Digested),
    Symlink(Box<[u8]>),
    Dir,
    /// A FIFO, socket or device.
    Other,
    Gone,
}

/// What the entry `name` of `dir` is now and, for a regular file, its digest: from
/// `before` when the racy rule allows, else read. `listed` is the type the listing gave.
pub(super) fn found(
    dir: BorrowedFd,
    name: &[u8],
    listed: Option<EntryType>,
    before: Option<&FileRecord>,
) -> io::Result<Found> {
    let gone = |e: io::Error| {
        if files::is_gone(&e) {
            Ok(Found::Gone)
        } else {
            Err(e)
        }
    };
    match listed {
        Some(EntryType::Symlink) => match files::read_link(dir, name) {
            Ok(t) => Ok(Found::Symlink(t)),
            Err(e) if files::errno(&e) == Some(Errno::EINVAL) => found(dir, name, None, before),
            Err(e) => gone(e),
        },
        // Nothing cached: open and read straight away (the stat comes after the read).
        Some(EntryType::File) if before.is_none() => match files::open_file(dir, name) {
            Ok(f) => match read(dir, name, Some(f))? {
                // Not a regular file after all: look at what it is.
                Found::Other => found(dir, name, None, None),
                found => Ok(found),
            },
            Err(e) => match files::errno(&e) {
                // A symlink now (O_NOFOLLOW), or a socket: look at what it is.
                Some(Errno::ELOOP | Errno::ENXIO) => found(dir, name, None, before),
                _ => gone(e),
            },
        },
        _ => {
            let key = match files::stat_at(dir, name) {
                Ok(k) => k,
                Err(e) => return gone(e),
            };
            match key.entry_type() {
                EntryType::File => match before.and_then(|b| b.digest_for(&key)) {
                    Some(digest) => Ok(Found::Regular(Digested {
                        digest,
                        key,
                        record: before.copied(),
                        read: false,
                    })),
                    None => read(dir, name, None),
                },
                EntryType::Dir => Ok(Found::Dir),
                EntryType::Symlink => found(dir, name, Some(EntryType::Symlink), None),
                EntryType::Other => Ok(Found::Other),
            }
        }
    }
}

/// Reads and digests the regular file `name` of `dir` (`opened` already).
fn read(dir: BorrowedFd, name: &[u8], opened: Option<fs::File>) -> io::Result<Found> {
    let taken_ns = now_ns();
    match files::read_digest(dir, name, opened, taken_ns) {
        Ok(Read_::Digest {
            digest,
            key,
            stable,
        }) => Ok(Found::Regular(Digested {
            digest,
            key,
            record: stable.then_some(FileRecord {
                key,
                taken_ns,
                digest,
            }),
            read: true,
        })),
        Ok(Read_::NotRegular) => Ok(Found::Other),
        Err(e) if files::is_gone(&e) => Ok(Found::Gone),
        Err(e) => Err(e),
    }
}

/// Wall-clock nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Regular or executable, the way git tells them apart: by the owner's execute bit.
pub fn kind_of_mode(mode: u32) -> Kind {
    if mode & 0o100 != 0 {
        Kind::Executable
    } else {
        Kind::Regular
    }
}
