//! A vector in a mapping of its own once big, given back to the system whole when dropped or
//! moved. glibc serves requests below its mmap threshold (which it raises up to 32 MiB as big
//! blocks are freed) from its arenas, and what is freed at the top of an arena other than the
//! main one stays resident: the polled directories' listings, which a pass may rewrite at the
//! end of their buffer (the first pass rewrites every one), grew through steps that stayed
//! resident that way.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Buffers smaller than this are left to the allocator.
const MAPPED_MIN: usize = 64 * 1024;

/// A vector of `Copy` values in a mapping of its own once big.
#[derive(Default)]
pub(super) struct MappedVec<T: Copy> {
    small: Vec<T>,
    /// The mapping, if any; then `small` is empty.
    mapped: Option<Mapping<T>>,
}

struct Mapping<T> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
}

// SAFETY: a Mapping owns its memory as a Vec does.
unsafe impl<T: Copy + Send> Send for MappedVec<T> {}
// SAFETY: as for Vec: shared access only reads.
unsafe impl<T: Copy + Sync> Sync for MappedVec<T> {}

fn bytes_of<T>(n: usize) -> usize {
    n.checked_mul(size_of::<T>())
        .expect("a scratch buffer within the address space")
}

impl<T: Copy> MappedVec<T> {
    pub(super) fn with_capacity(cap: usize) -> MappedVec<T> {
        let mut s = MappedVec {
            small: Vec::new(),
            mapped: None,
        };
        s.reserve(cap);
        s
    }

    #[cfg(test)]
    pub(super) fn push(&mut self, value: T) {
        self.reserve(1);
        match &mut self.mapped {
            Some(m) => {
                // SAFETY: `reserve` made room for one more within the mapping.
                unsafe { m.ptr.as_ptr().add(m.len).write(value) };
                m.len += 1;
            }
            None => self.small.push(value),
        }
    }

    pub(super) fn extend_from_slice(&mut self, values: &[T]) {
        self.reserve(values.len());
        match &mut self.mapped {
            Some(m) => {
                // SAFETY: `reserve` made room for them within the mapping, which `values`
                // (borrowed elsewhere) cannot overlap.
                unsafe {
                    let end = m.ptr.as_ptr().add(m.len);
                    std::ptr::copy_nonoverlapping(values.as_ptr(), end, values.len());
                }
                m.len += values.len();
            }
            None => self.small.extend_from_slice(values),
        }
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.mapped
            .as_ref()
            .map_or(self.small.capacity(), |m| m.cap)
    }

    /// Makes room for `additional` more, in a mapping once that is worth it. A mapping grows
    /// by doubling, as only the pages written to are resident.
    pub(super) fn reserve(&mut self, additional: usize) {
        let (len, cap) = match &self.mapped {
            Some(m) => (m.len, m.cap),
            None => (self.small.len(), self.small.capacity()),
        };
        let need = len
            .checked_add(additional)
            .expect("a scratch buffer within usize");
        if need <= cap {
            return;
        }
        if self.mapped.is_none() && bytes_of::<T>(need) < MAPPED_MIN {
            self.small.reserve(additional);
            return;
        }
        let cap = need.max(cap * 2);
        match &mut self.mapped {
            Some(m) => m.grow(cap),
            None => {
                let mut m = Mapping::new(cap);
                // SAFETY: the new mapping has room for `cap` >= len values.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.small.as_ptr(), m.ptr.as_ptr(), len);
                }
                m.len = len;
                self.small = Vec::new();
                self.mapped = Some(m);
            }
        }
    }
}

impl<T> Mapping<T> {
    fn new(cap: usize) -> Mapping<T> {
        // SAFETY: an anonymous private mapping touches no memory of ours.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes_of::<T>(cap),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(std::alloc::Layout::array::<T>(cap).expect("a layout"));
        }
        Mapping {
            // A mapping is page-aligned, so aligned for T; not null, as it did not fail.
            ptr: NonNull::new(ptr.cast()).expect("a mapping"),
            len: 0,
            cap,
        }
    }

    #[cfg(target_os = "linux")]
    fn grow(&mut self, cap: usize) {
        // SAFETY: the mapping is ours, of `self.cap` values; mremap may move it, contents and
        // all.
        let ptr = unsafe {
            libc::mremap(
                self.ptr.as_ptr().cast(),
                bytes_of::<T>(self.cap),
                bytes_of::<T>(cap),
                libc::MREMAP_MAYMOVE,
            )
        };
        if ptr == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(std::alloc::Layout::array::<T>(cap).expect("a layout"));
        }
        self.ptr = NonNull::new(ptr.cast()).expect("a mapping");
        self.cap = cap;
    }

    #[cfg(not(target_os = "linux"))]
    fn grow(&mut self, cap: usize) {
        let mut m = Mapping::new(cap);
        // SAFETY: both mappings are ours, the new one with room for the old one's values.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), m.ptr.as_ptr(), self.len) };
        m.len = self.len;
        *self = m;
    }
}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, and nothing refers to it past this point.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), bytes_of::<T>(self.cap));
        }
    }
}

impl<T: Copy> Deref for MappedVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.mapped {
            // SAFETY: the first `len` values of the mapping were written.
            Some(m) => unsafe { std::slice::from_raw_parts(m.ptr.as_ptr(), m.len) },
            None => &self.small,
        }
    }
}

impl<T: Copy> DerefMut for MappedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.mapped {
            // SAFETY: the first `len` values of the mapping were written, and `self` is
            // borrowed mutably.
            Some(m) => unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), m.len) },
            None => &mut self.small,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_vector_keeps_its_values_as_it_moves_into_a_mapping_and_grows() {
        let mut s = MappedVec::with_capacity(3);
        for i in 0..200_000u32 {
            s.push(i);
            if i == 10 {
                assert!(s.mapped.is_none());
            }
        }
        assert!(s.mapped.is_some());
        s.extend_from_slice(&[7, 8, 9]);
        assert_eq!(s.len(), 200_003);
        assert!(s.iter().take(200_000).copied().eq(0..200_000));
        assert_eq!(s[200_000..], [7, 8, 9]);
        s[0] = 42;
        assert_eq!(s[0], 42);
        assert!(s.capacity() >= 200_003);
    }
}
