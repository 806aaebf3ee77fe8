//! The bytes of a loaded digest cache: the file mapped read-only, so that while watching the
//! cache costs page cache, not heap, and its pages can be handed back after a walk read them.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

/// Bytes read from a file: mapped, or (for tests and empty files) on the heap.
pub enum Stored {
    Mapped(Mapping),
    Heap(Vec<u8>),
}

impl Deref for Stored {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Stored::Mapped(m) => m,
            Stored::Heap(v) => v,
        }
    }
}

impl From<Vec<u8>> for Stored {
    fn from(v: Vec<u8>) -> Stored {
        Stored::Heap(v)
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Stored::Mapped(_) => "mapped",
            Stored::Heap(_) => "heap",
        };
        write!(f, "Stored({kind}, {} bytes)", self.len())
    }
}

impl Stored {
    /// Maps the file at `path` (reads it where it cannot be mapped).
    pub fn open(path: &Path) -> io::Result<Stored> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        if len == 0 {
            return Ok(Stored::Heap(Vec::new()));
        }
        // SAFETY: a fresh private read-only mapping of an open file; the result is checked.
        // The cache is only ever replaced by renaming a new file over it, never written in
        // place, so the mapped file does not shrink under us.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            // A filesystem that cannot map files (some FUSE ones): read it instead.
            return std::fs::read(path).map(Stored::Heap);
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Stored::Mapped(Mapping { ptr, len }))
    }

    /// Lets the kernel take back the pages read so far: they stay in the page cache and come
    /// back on the next read, but no longer count towards this process's memory.
    pub fn release(&self) {
        if let Stored::Mapped(m) = self {
            // SAFETY: the range is exactly our mapping; MADV_DONTNEED on a private mapping
            // that was never written only drops page-table entries, and later reads fault
            // the same file contents back in.
            unsafe {
                libc::madvise(m.ptr.as_ptr().cast(), m.len, libc::MADV_DONTNEED);
            }
        }
    }
}

/// A read-only private mapping of a whole file.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing or sending it is like sharing `&[u8]`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Deref for Mapping {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `Stored::open`, once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
