//! The end of a chunked body, found as it streams by.

#[derive(Debug)]
pub(super) struct ChunkError;

/// Finds the end of a chunked body as it streams by (the bytes themselves are passed on as
/// they are): sizes, extensions, data, the last chunk and trailers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Reading a chunk size: its value so far and whether it has a digit.
    #[default]
    Size0,
    Size(u64),
    /// After the size: an extension, up to the end of the line.
    Ext(u64),
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// At the start of a trailer line (or of the final empty line).
    Trailer,
    TrailerLine,
    Done,
}

impl Chunked {
    /// How many of `bytes` belong to the body; stops at its end.
    pub(super) fn take(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < bytes.len() && *self != Chunked::Done {
            let b = bytes[i];
            match *self {
                Chunked::Size0 | Chunked::Size(_) => {
                    let n = if let Chunked::Size(n) = *self { n } else { 0 };
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let d = (b as char).to_digit(16).expect("a hex digit");
                            let n = n.checked_mul(16).ok_or(ChunkError)? + u64::from(d);
                            *self = Chunked::Size(n);
                        }
                        b';' | b' ' | b'\t' if matches!(self, Chunked::Size(_)) => {
                            *self = Chunked::Ext(n)
                        }
                        b'\r' if matches!(self, Chunked::Size(_)) => *self = Chunked::Ext(n),
                        b'\n' if matches!(self, Chunked::Size(_)) => {
                            *self = if n == 0 {
                                Chunked::Trailer
                            } else {
                                Chunked::Data(n)
                            }
                        }
                        _ => return Err(ChunkError),
                    }
                    i += 1;
                }
                Chunked::Ext(n) => {
                    if b == b'\n' {
                        *self = if n == 0 {
                            Chunked::Trailer
                        } else {
                            Chunked::Data(n)
                        };
                    }
                    i += 1;
                }
                Chunked::Data(left) => {
                    let n =
                        usize::try_from(left).map_or(bytes.len() - i, |l| l.min(bytes.len() - i));
                    i += n;
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                }
                Chunked::DataEnd => {
                    match b {
                        b'\r' => {}
                        b'\n' => *self = Chunked::Size0,
                        _ => return Err(ChunkError),
                    }
                    i += 1;
                }
                Chunked::Trailer => {
                    match b {
                        b'\r' => {}
                        b'\n' => *self = Chunked::Done,
                        _ => *self = Chunked::TrailerLine,
                    }
                    i += 1;
                }
                Chunked::TrailerLine => {
                    if b == b'\n' {
                        *self = Chunked::Trailer;
                    }
                    i += 1;
                }
                Chunked::Done => unreachable!(),
            }
        }
        Ok(i)
    }

    pub(super) fn done(&self) -> bool {
        *self == Chunked::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n";

    #[test]
    fn chunked_ends_where_the_body_ends_however_it_is_split() {
        let mut stream = BODY.to_vec();
        stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..stream.len() {
            let mut c = Chunked::default();
            let a = c.take(&stream[..split]).unwrap();
            assert_eq!(a, split.min(BODY.len()), "split at {split}");
            let b = c.take(&stream[split..]).unwrap();
            assert_eq!(a + b, BODY.len(), "split at {split}");
            assert!(c.done());
        }
        // Byte by byte.
        let mut c = Chunked::default();
        let mut n = 0;
        for b in &stream {
            n += c.take(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(n, BODY.len());
    }

    #[test]
    fn chunked_without_trailers_and_bad_sizes() {
        let mut c = Chunked::default();
        assert_eq!(c.take(b"3\r\nabc\r\n0\r\n\r\nrest").unwrap(), 13);
        assert!(c.done());
        assert!(Chunked::default().take(b"x\r\n").is_err());
        assert!(Chunked::default().take(b"\r\n").is_err());
        assert!(Chunked::default().take(b"ffffffffffffffffff\r\n").is_err());
        assert!(Chunked::default().take(b"3\r\nabcX").is_err());
    }
}
