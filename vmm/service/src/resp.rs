//! RESP2: request parsing (multibulk and inline, resumable, every size bounded before
//! anything is allocated) and reply encoding, with Redis 7.0's exact protocol errors.
use crate::num::{parse_i64, push_i64};
use alloc::vec::Vec;

/// Longest inline command, and longest `*N`/`$N` line (Redis `PROTO_INLINE_MAX_SIZE`).
pub const INLINE_MAX: usize = 64 * 1024;
/// Arguments pre-allocated for a multibulk before they arrive (Redis allocates
/// `min(N, 1024)` too); the rest grows as arguments are actually received.
const ARGV_PREALLOC: usize = 1024;

/// A malformed request. The reply is sent, then the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    InvalidMultibulkLength,
    InvalidBulkLength,
    ExpectedDollar(u8),
    TooBigInline,
    TooBigMbulkCount,
    TooBigBulkCount,
    UnbalancedQuotes,
}

impl ProtoError {
    /// The error reply Redis sends (without `-` and CRLF).
    pub fn message(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"ERR Protocol error: ");
        match self {
            ProtoError::InvalidMultibulkLength => {
                out.extend_from_slice(b"invalid multibulk length")
            }
            ProtoError::InvalidBulkLength => out.extend_from_slice(b"invalid bulk length"),
            ProtoError::ExpectedDollar(c) => {
                out.extend_from_slice(b"expected '$', got '");
                out.push(*c);
                out.push(b'\'');
            }
            ProtoError::TooBigInline => out.extend_from_slice(b"too big inline request"),
            ProtoError::TooBigMbulkCount => out.extend_from_slice(b"too big mbulk count string"),
            ProtoError::TooBigBulkCount => out.extend_from_slice(b"too big bulk count string"),
            ProtoError::UnbalancedQuotes => out.extend_from_slice(b"unbalanced quotes in request"),
        }
    }
}

/// Where the arguments of a parsed command live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgSource {
    /// Spans into the query buffer (multibulk).
    Query,
    /// Spans into the parser's own buffer (inline commands, after unquoting).
    Inline,
}

/// Outcome of one parse step.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete command of this many query bytes; arguments in [`Parser::spans`].
    Command { len: usize, src: ArgSource },
    /// An empty command (`*0`, `*-1`, a blank inline line) of this many bytes.
    Empty(usize),
    /// More bytes are needed; the parser keeps its progress.
    Incomplete,
}

/// Resumable request parser. A partially received multibulk is not scanned again when
/// more bytes arrive (a command with a million small arguments arriving in many
/// segments costs linear time, not quadratic).
#[derive(Default)]
pub struct Parser {
    /// Multibulk in progress: arguments still to read.
    remaining: Option<usize>,
    /// Offset (from the command start) of the next unread byte of a multibulk.
    pos: usize,
    /// Arguments so far: (offset, length) into the query buffer or `inline`.
    pub spans: Vec<(u32, u32)>,
    /// Unquoted inline arguments.
    pub inline: Vec<u8>,
}

fn find(b: &[u8], c: u8) -> Option<usize> {
    b.iter().position(|&x| x == c)
}

impl Parser {
    pub fn reset(&mut self) {
        self.remaining = None;
        self.pos = 0;
        self.spans.clear();
        self.inline.clear();
        // Do not keep a huge argument vector around after one big command.
        if self.spans.capacity() > 4 * ARGV_PREALLOC {
            self.spans = Vec::new();
        }
        if self.inline.capacity() > INLINE_MAX {
            self.inline = Vec::new();
        }
    }

    /// Parses the command at the start of `b` (the unprocessed query bytes).
    /// `max_bulk` bounds every `$N` (Redis `proto-max-bulk-len`).
    pub fn parse(&mut self, b: &[u8], max_bulk: usize) -> Result<Parsed, ProtoError> {
        if b.is_empty() {
            return Ok(Parsed::Incomplete);
        }
        if self.remaining.is_none() && b[0] != b'*' {
            return self.parse_inline(b);
        }
        if self.remaining.is_none() {
            let Some(cr) = find(b, b'\r') else {
                if b.len() > INLINE_MAX {
                    return Err(ProtoError::TooBigMbulkCount);
                }
                return Ok(Parsed::Incomplete);
            };
            if cr + 2 > b.len() {
                return Ok(Parsed::Incomplete);
            }
            let n = parse_i64(&b[1..cr]).ok_or(ProtoError::InvalidMultibulkLength)?;
            if n > i32::MAX as i64 {
                return Err(ProtoError::InvalidMultibulkLength);
            }
            if n <= 0 {
                return Ok(Parsed::Empty(cr + 2));
            }
            self.remaining = Some(n as usize);
            self.pos = cr + 2;
            self.spans.clear();
            self.spans.reserve((n as usize).min(ARGV_PREALLOC));
        }
        while let Some(left) = self.remaining {
            if left == 0 {
                let len = self.pos;
                self.remaining = None;
                self.pos = 0;
                return Ok(Parsed::Command {
                    len,
                    src: ArgSource::Query,
                });
            }
            let rest = &b[self.pos..];
            if rest.is_empty() {
                return Ok(Parsed::Incomplete);
            }
            let Some(cr) = find(rest, b'\r') else {
                if rest.len() > INLINE_MAX {
                    return Err(ProtoError::TooBigBulkCount);
                }
                return Ok(Parsed::Incomplete);
            };
            if cr + 2 > rest.len() {
                return Ok(Parsed::Incomplete);
            }
            if rest[0] != b'$' {
                return Err(ProtoError::ExpectedDollar(rest[0]));
            }
            let n = parse_i64(&rest[1..cr]).ok_or(ProtoError::InvalidBulkLength)?;
            if n < 0 || n as u64 > max_bulk as u64 {
                return Err(ProtoError::InvalidBulkLength);
            }
            let start = cr + 2;
            let need = start + n as usize + 2;
            if rest.len() < need {
                return Ok(Parsed::Incomplete);
            }
            self.spans.push(((self.pos + start) as u32, n as u32));
            self.pos += need;
            self.remaining = Some(left - 1);
        }
        unreachable!("loop returns")
    }

    fn parse_inline(&mut self, b: &[u8]) -> Result<Parsed, ProtoError> {
        let Some(nl) = find(b, b'\n') else {
            if b.len() > INLINE_MAX {
                return Err(ProtoError::TooBigInline);
            }
            return Ok(Parsed::Incomplete);
        };
        if nl > INLINE_MAX {
            return Err(ProtoError::TooBigInline);
        }
        let mut line = &b[..nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        // Redis splits a C string: a NUL byte ends the line.
        if let Some(z) = find(line, 0) {
            line = &line[..z];
        }
        self.spans.clear();
        self.inline.clear();
        split_args(line, &mut self.inline, &mut self.spans)?;
        if self.spans.is_empty() {
            return Ok(Parsed::Empty(nl + 1));
        }
        Ok(Parsed::Command {
            len: nl + 1,
            src: ArgSource::Inline,
        })
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Redis's `sdssplitargs`: blanks separate arguments; "double quotes" with `\n \r \t
/// \b \a \xHH` escapes and 'single quotes' with `\'`; a closing quote must be followed
/// by a blank or the end.
fn split_args(
    line: &[u8],
    buf: &mut Vec<u8>,
    spans: &mut Vec<(u32, u32)>,
) -> Result<(), ProtoError> {
    let mut p = 0;
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Ok(());
        }
        let start = buf.len();
        let (mut inq, mut insq) = (false, false);
        loop {
            let c = at(p);
            if inq {
                if c == b'\\'
                    && at(p + 1) == b'x'
                    && let (Some(h), Some(l)) = (hex(at(p + 2)), hex(at(p + 3)))
                {
                    buf.push(h * 16 + l);
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    buf.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        o => o,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(ProtoError::UnbalancedQuotes);
                } else {
                    buf.push(c);
                }
            } else if insq {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    buf.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(ProtoError::UnbalancedQuotes);
                } else {
                    buf.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => break,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    o => buf.push(o),
                }
            }
            p += 1;
        }
        spans.push((start as u32, (buf.len() - start) as u32));
    }
}

// ------------------------------------------------------------------ replies

pub fn simple(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'+');
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

/// `-<msg>\r\n`; CR and LF inside `msg` become spaces (as Redis does), so an error never
/// breaks the protocol.
pub fn error(out: &mut Vec<u8>, msg: &[u8]) {
    out.push(b'-');
    out.extend(
        msg.iter()
            .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
    );
    out.extend_from_slice(b"\r\n");
}

pub fn int(out: &mut Vec<u8>, v: i64) {
    out.push(b':');
    push_i64(out, v);
    out.extend_from_slice(b"\r\n");
}

pub fn bulk(out: &mut Vec<u8>, v: &[u8]) {
    out.push(b'$');
    push_i64(out, v.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
}

pub fn nil(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

pub fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_i64(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn args(p: &Parser, b: &[u8], src: ArgSource) -> Vec<Vec<u8>> {
        let base = match src {
            ArgSource::Query => b,
            ArgSource::Inline => &p.inline[..],
        };
        p.spans
            .iter()
            .map(|&(o, l)| base[o as usize..(o + l) as usize].to_vec())
            .collect()
    }

    fn one(b: &[u8]) -> Result<(usize, Vec<Vec<u8>>), ProtoError> {
        let mut p = Parser::default();
        match p.parse(b, 512 << 20)? {
            Parsed::Command { len, src } => Ok((len, args(&p, b, src))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn multibulk_and_inline() {
        let (n, a) = one(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest").unwrap();
        assert_eq!(n, 20);
        assert_eq!(a, vec![b"GET".to_vec(), b"k".to_vec()]);
        let (n, a) = one(b"set  k \"a\\x41\\n b\" 'it\\'s'\r\n").unwrap();
        assert_eq!(n, 28);
        assert_eq!(
            a,
            vec![
                b"set".to_vec(),
                b"k".to_vec(),
                b"aA\n b".to_vec(),
                b"it's".to_vec()
            ]
        );
        assert_eq!(one(b"PING\n").unwrap().1, vec![b"PING".to_vec()]);
    }

    #[test]
    fn errors_like_redis() {
        let mut p = Parser::default();
        assert_eq!(
            p.parse(b"*x\r\n", 100),
            Err(ProtoError::InvalidMultibulkLength)
        );
        p.reset();
        assert_eq!(
            p.parse(b"*1\r\n$101\r\n", 100),
            Err(ProtoError::InvalidBulkLength)
        );
        p.reset();
        assert_eq!(
            p.parse(b"*1\r\n:1\r\n", 100),
            Err(ProtoError::ExpectedDollar(b':'))
        );
        p.reset();
        assert_eq!(
            p.parse(b"set k \"abc\r\n", 100),
            Err(ProtoError::UnbalancedQuotes)
        );
        p.reset();
        assert_eq!(
            p.parse(&vec![b'a'; INLINE_MAX + 1], 100),
            Err(ProtoError::TooBigInline)
        );
        p.reset();
        assert_eq!(p.parse(b"*0\r\n", 100), Ok(Parsed::Empty(4)));
        p.reset();
        assert_eq!(p.parse(b"\r\n", 100), Ok(Parsed::Empty(2)));
    }

    /// A huge argument count allocates nothing up front and parses incrementally.
    #[test]
    fn huge_count_is_lazy_and_resumable() {
        let mut p = Parser::default();
        let mut b = b"*1048576\r\n".to_vec();
        assert_eq!(p.parse(&b, 100), Ok(Parsed::Incomplete));
        assert!(p.spans.capacity() <= ARGV_PREALLOC);
        for _ in 0..1000 {
            b.extend_from_slice(b"$1\r\na\r\n");
            assert_eq!(p.parse(&b, 100), Ok(Parsed::Incomplete));
        }
        assert_eq!(p.spans.len(), 1000);
    }

    #[test]
    fn split_delivery_equals_whole() {
        let whole = b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$5\r\nworld\r\n";
        for cut in 1..whole.len() {
            let mut p = Parser::default();
            assert_eq!(p.parse(&whole[..cut], 100), Ok(Parsed::Incomplete), "{cut}");
            match p.parse(whole, 100).unwrap() {
                Parsed::Command { len, src } => {
                    assert_eq!(len, whole.len());
                    assert_eq!(args(&p, whole, src).len(), 3);
                }
                o => panic!("{o:?}"),
            }
        }
    }
}
