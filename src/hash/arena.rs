//! Byte strings (paths) held for a long time, in one growing buffer instead of an allocation
//! each. Besides the 16 to 32 bytes of allocator overhead a small allocation costs, boxes made
//! by a walk's threads end up interleaved with the walk's temporaries, and once those are freed
//! the heap cannot give the pages back: a watch on 100k files kept ~15 MB that way.

/// Where one string is in an [`Arena`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    at: u32,
    len: u32,
}

impl Span {
    pub fn len(self) -> usize {
        self.len as usize
    }
}

/// Strings appended to one buffer. Freed strings leave garbage behind, which
/// [`Arena::compact`] removes once it is as big as what is in use.
#[derive(Debug, Default)]
pub struct Arena {
    bytes: Vec<u8>,
    garbage: usize,
}

impl Arena {
    pub fn with_capacity(n: usize) -> Arena {
        Arena {
            bytes: Vec::with_capacity(n),
            garbage: 0,
        }
    }

    /// Appends `parts` as one string.
    pub fn push(&mut self, parts: &[&[u8]]) -> Span {
        let at = u32::try_from(self.bytes.len()).expect("more than 4 GiB of paths");
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
        let len = (self.bytes.len() - at as usize) as u32;
        Span { at, len }
    }

    pub fn get(&self, s: Span) -> &[u8] {
        &self.bytes[s.at as usize..(s.at + s.len) as usize]
    }

    /// Notes that `s` is no longer used.
    pub fn free(&mut self, s: Span) {
        self.garbage += s.len();
    }

    /// Whether garbage is worth a [`Arena::compact`].
    pub fn wasteful(&self) -> bool {
        self.garbage >= 4096 && self.garbage * 2 >= self.bytes.len()
    }

    /// Copies the strings `spans` name (every string in use) into a new buffer and points the
    /// spans at their new places.
    pub fn compact<'s>(&mut self, spans: impl Iterator<Item = &'s mut Span>) {
        let old = std::mem::take(&mut self.bytes);
        self.bytes = Vec::with_capacity(old.len().saturating_sub(self.garbage));
        for s in spans {
            let from = s.at as usize;
            s.at = self.bytes.len() as u32;
            self.bytes.extend_from_slice(&old[from..from + s.len()]);
        }
        self.garbage = 0;
    }

    /// Bytes held, garbage included.
    #[cfg(test)]
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_keeps_what_is_used() {
        let mut a = Arena::default();
        let mut spans: Vec<Span> = (0..1000)
            .map(|i| a.push(&[b"dir/", format!("{i:05}.txt").as_bytes()]))
            .collect();
        assert_eq!(a.get(spans[7]), b"dir/00007.txt");
        for s in spans.drain(..600) {
            a.free(s);
        }
        assert!(a.wasteful());
        a.compact(spans.iter_mut());
        assert_eq!(a.size(), 400 * 13);
        assert!(!a.wasteful());
        assert_eq!(a.get(spans[0]), b"dir/00600.txt");
        assert_eq!(a.get(spans[399]), b"dir/00999.txt");
    }
}
