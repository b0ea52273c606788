//! Where a message body ends, found while its bytes stream through, never holding the body:
//! the proxy forwards every byte `feed` accepts as it is (chunk framing included) and learns
//! when the message is complete, so the next request on a kept-alive connection starts at the
//! right byte. Chunked framing is validated on the way (sizes, line ends, trailers) so that a
//! malformed or oversized body is refused, not passed on to confuse the upstream.

use super::head::Framing;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Not valid chunked framing.
    Malformed(&'static str),
    /// More body than the limit allows.
    TooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Bytes left of a sized body or of the current chunk's data.
    Data(u64),
    /// Reading a chunk-size line: digits so far, value, whether in an extension.
    Size {
        digits: u8,
        value: u64,
        ext: bool,
        cr: bool,
        line: u32,
    },
    /// After a chunk's data: its CRLF.
    DataCr,
    DataLf,
    /// Trailer section: at the start of a line (`start`), within one, after CR.
    Trailer {
        start: bool,
        cr: bool,
        len: u32,
    },
    UntilClose,
    Done,
}

/// Longest chunk-size line (with extensions) or trailer section accepted.
const MAX_LINE: u32 = 4096;

#[derive(Debug)]
pub struct BodyReader {
    state: State,
    chunked: bool,
    /// Body bytes (chunk data only, for chunked) seen so far, against `max`.
    seen: u64,
    max: u64,
}

impl BodyReader {
    pub fn new(framing: Framing, max_body: u64) -> BodyReader {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Data(n),
            Framing::Chunked => State::Size { digits: 0, value: 0, ext: false, cr: false, line: 0 },
            Framing::UntilClose => State::UntilClose,
        };
        BodyReader { state, chunked: framing == Framing::Chunked, seen: 0, max: max_body }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// A body that ends when the connection does.
    pub fn until_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Accepts bytes of the body from `input`; returns how many belong to this message (the rest
    /// starts the next one). After `is_done()`, accepts nothing.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => break,
                State::UntilClose => {
                    i = input.len();
                }
                State::Data(left) => {
                    let take = left.min((input.len() - i) as u64);
                    if self.chunked {
                        self.seen += take;
                        if self.seen > self.max {
                            return Err(BodyError::TooLarge);
                        }
                    }
                    i += take as usize;
                    let left = left - take;
                    self.state = match (left, self.chunked) {
                        (0, true) => State::DataCr,
                        (0, false) => State::Done,
                        (l, _) => State::Data(l),
                    };
                }
                State::DataCr | State::DataLf => {
                    let want = if self.state == State::DataCr { b'\r' } else { b'\n' };
                    if input[i] != want {
                        return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                    }
                    i += 1;
                    self.state = if want == b'\r' {
                        State::DataLf
                    } else {
                        State::Size { digits: 0, value: 0, ext: false, cr: false, line: 0 }
                    };
                }
                State::Size { mut digits, mut value, mut ext, mut cr, mut line } => {
                    let b = input[i];
                    i += 1;
                    line += 1;
                    if line > MAX_LINE {
                        return Err(BodyError::Malformed("chunk-size line too long"));
                    }
                    if cr {
                        if b != b'\n' {
                            return Err(BodyError::Malformed("bare CR in chunk-size line"));
                        }
                        if digits == 0 {
                            return Err(BodyError::Malformed("chunk size missing"));
                        }
                        self.state = if value == 0 {
                            State::Trailer { start: true, cr: false, len: 0 }
                        } else {
                            State::Data(value)
                        };
                        continue;
                    }
                    match b {
                        b'\r' => cr = true,
                        b'\n' => return Err(BodyError::Malformed("bare LF in chunk-size line")),
                        _ if ext => {
                            if b.is_ascii_control() && b != b'\t' {
                                return Err(BodyError::Malformed("control character in chunk extension"));
                            }
                        }
                        b';' | b' ' | b'\t' if digits > 0 => ext = true,
                        _ => {
                            let d = (b as char).to_digit(16).ok_or(BodyError::Malformed("bad chunk size"))? as u64;
                            digits += 1;
                            if digits > 16 {
                                return Err(BodyError::Malformed("chunk size too large"));
                            }
                            value = (value << 4) | d;
                            if self.seen.saturating_add(value) > self.max {
                                return Err(BodyError::TooLarge);
                            }
                        }
                    }
                    self.state = State::Size { digits, value, ext, cr, line };
                }
                State::Trailer { start, cr, len } => {
                    let b = input[i];
                    i += 1;
                    if len + 1 > MAX_LINE {
                        return Err(BodyError::Malformed("trailer section too long"));
                    }
                    self.state = match (cr, b) {
                        (true, b'\n') if start => State::Done,
                        (true, b'\n') => State::Trailer { start: true, cr: false, len: len + 1 },
                        (true, _) => return Err(BodyError::Malformed("bare CR in trailer")),
                        (false, b'\r') => State::Trailer { start, cr: true, len: len + 1 },
                        (false, b'\n') => return Err(BodyError::Malformed("bare LF in trailer")),
                        (false, _) => State::Trailer { start: false, cr: false, len: len + 1 },
                    };
                }
            }
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(framing: Framing, bytes: &[u8], max: u64) -> Result<(usize, bool), BodyError> {
        let mut r = BodyReader::new(framing, max);
        let n = r.feed(bytes)?;
        Ok((n, r.is_done()))
    }

    #[test]
    fn length_stops_at_the_end_of_the_body() {
        assert_eq!(all(Framing::Length(5), b"helloGET / HTTP/1.1", 100), Ok((5, true)));
        assert_eq!(all(Framing::Length(5), b"hel", 100), Ok((3, false)));
        assert_eq!(all(Framing::Empty, b"GET", 100), Ok((0, true)));
    }

    #[test]
    fn chunked_streams_in_any_split_and_finds_the_end() {
        let msg = b"5\r\nhello\r\n1a; name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let end = msg.len() - 4;
        for split in 0..msg.len() {
            let mut r = BodyReader::new(Framing::Chunked, 1000);
            let a = r.feed(&msg[..split]).unwrap();
            assert_eq!(a, split.min(end));
            let b = r.feed(&msg[a..]).unwrap();
            assert_eq!(a + b, end, "split at {split}");
            assert!(r.is_done());
        }
        // Byte by byte.
        let mut r = BodyReader::new(Framing::Chunked, 1000);
        let mut n = 0;
        for b in msg.iter() {
            n += r.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(n, end);
    }

    #[test]
    fn malformed_and_oversized_chunked_bodies_are_refused() {
        let bad: &[(&[u8], BodyError)] = &[
            (b"zz\r\n", BodyError::Malformed("bad chunk size")),
            (b"\r\n", BodyError::Malformed("chunk size missing")),
            (b"5\nhello", BodyError::Malformed("bare LF in chunk-size line")),
            (b"5\r\nhelloX", BodyError::Malformed("chunk data not followed by CRLF")),
            (b"0\r\nX: 1\rY", BodyError::Malformed("bare CR in trailer")),
            (b"ffff\r\n", BodyError::TooLarge),
        ];
        for (input, err) in bad {
            assert_eq!(all(Framing::Chunked, input, 1000), Err(*err), "{:?}", String::from_utf8_lossy(input));
        }
        assert_eq!(
            all(Framing::Chunked, b"11111111111111111\r\n", u64::MAX),
            Err(BodyError::Malformed("chunk size too large")),
            "17 hex digits overflow 64 bits"
        );
        let long = [b"1;".as_slice(), &[b'a'; 5000]].concat();
        assert_eq!(all(Framing::Chunked, &long, 1000), Err(BodyError::Malformed("chunk-size line too long")));
        // The limit counts data across chunks.
        let two =
            b"300\r\n".iter().chain([b'x'; 0x300].iter()).chain(b"\r\n300\r\n".iter()).copied().collect::<Vec<u8>>();
        assert_eq!(all(Framing::Chunked, &two, 1000), Err(BodyError::TooLarge));
    }
}
