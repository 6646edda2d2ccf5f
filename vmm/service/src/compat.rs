//! Requests whose replies must be byte-identical to Redis 7.0's (Debian's redis-server
//! started with `--databases 1` and this service's `proto-max-bulk-len`). Shared by the
//! host test (`tests/redis_compat.rs`) and the guest test through the VMM
//! (`vmm/tests/service.rs`), which send each case on one connection, in order, and
//! compare replies.

/// How to compare a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Exact,
    /// An array whose order is unspecified (KEYS): compared sorted.
    Unordered,
}

/// Commands (argument lists), each sent as a RESP multibulk.
pub const CASES: &[(&[&str], Cmp)] = {
    use Cmp::*;
    &[
        (&["FLUSHALL"], Exact),
        (&["PING"], Exact),
        (&["ping", "hello"], Exact),
        (&["PING", "a", "b"], Exact),
        (&["ECHO", "hi there"], Exact),
        (&["ECHO"], Exact),
        (&["SET", "k", "v"], Exact),
        (&["GET", "k"], Exact),
        (&["GET", "missing"], Exact),
        (&["GET"], Exact),
        (&["SET", "k"], Exact),
        (&["SET", "k", "v", "NX"], Exact),
        (&["SET", "k2", "v", "XX"], Exact),
        (&["SET", "k2", "v", "nx"], Exact),
        (&["SET", "k", "v1", "XX", "GET"], Exact),
        (&["SET", "k", "v2", "GET"], Exact),
        (&["SET", "new", "v", "NX", "GET"], Exact),
        (&["SET", "k", "v", "NX", "XX"], Exact),
        (&["SET", "k", "v", "EX"], Exact),
        (&["SET", "k", "v", "EX", "0"], Exact),
        (&["SET", "k", "v", "EX", "-1"], Exact),
        (&["SET", "k", "v", "PX", "abc"], Exact),
        (&["SET", "k", "v", "EX", "9223372036854775807"], Exact),
        (&["SET", "k", "v", "PX", "9223372036854775807"], Exact),
        (&["SET", "k", "v", "EX", "100", "PX", "100"], Exact),
        (&["SET", "k", "v", "KEEPTTL", "EX", "100"], Exact),
        (&["SET", "k", "v", "EX", "100"], Exact),
        (&["TTL", "k"], Exact),
        (&["SET", "k", "v", "KEEPTTL"], Exact),
        (&["TTL", "k"], Exact),
        (&["SET", "k", "v", "EX", "10", "EX", "200"], Exact),
        (&["TTL", "k"], Exact),
        (&["SET", "k", "v"], Exact),
        (&["TTL", "k"], Exact),
        (&["SET", "k", "v", "FOO"], Exact),
        (&["MSET", "a", "1", "b", "2"], Exact),
        (&["MGET", "a", "b", "nope"], Exact),
        (&["MSET", "a"], Exact),
        (&["MSET", "a", "1", "b"], Exact),
        (&["MGET"], Exact),
        (&["INCR", "n"], Exact),
        (&["INCR", "n"], Exact),
        (&["INCRBY", "n", "10"], Exact),
        (&["INCRBY", "n", "x"], Exact),
        (&["INCRBY", "n", "+1"], Exact),
        (&["DECR", "n"], Exact),
        (&["DECRBY", "n", "5"], Exact),
        (&["DECRBY", "n", "-9223372036854775808"], Exact),
        (&["INCR", "k"], Exact),
        (&["SET", "big", "9223372036854775807"], Exact),
        (&["INCR", "big"], Exact),
        (&["SET", "neg", "-9223372036854775808"], Exact),
        (&["DECR", "neg"], Exact),
        (&["SET", "z", "007"], Exact),
        (&["INCR", "z"], Exact),
        (&["SET", "sp", " 1"], Exact),
        (&["INCR", "sp"], Exact),
        (&["INCR"], Exact),
        (&["INCRBY", "n"], Exact),
        (&["APPEND", "ap", "hello"], Exact),
        (&["APPEND", "ap", " world"], Exact),
        (&["GET", "ap"], Exact),
        (&["STRLEN", "ap"], Exact),
        (&["STRLEN", "nope"], Exact),
        (&["APPEND", "ap"], Exact),
        (&["EXPIRE", "ap", "100"], Exact),
        (&["TTL", "ap"], Exact),
        (&["PERSIST", "ap"], Exact),
        (&["TTL", "ap"], Exact),
        (&["PERSIST", "ap"], Exact),
        (&["PERSIST", "nope"], Exact),
        (&["EXPIRE", "nope", "10"], Exact),
        (&["EXPIRE", "ap", "abc"], Exact),
        (&["EXPIRE", "ap", "10", "XX"], Exact),
        (&["EXPIRE", "ap", "10", "NX"], Exact),
        (&["EXPIRE", "ap", "10", "NX"], Exact),
        (&["EXPIRE", "ap", "20", "XX"], Exact),
        (&["EXPIRE", "ap", "5", "GT"], Exact),
        (&["EXPIRE", "ap", "50", "gt"], Exact),
        (&["EXPIRE", "ap", "100", "LT"], Exact),
        (&["EXPIRE", "ap", "10", "LT"], Exact),
        (&["TTL", "ap"], Exact),
        (&["EXPIRE", "ap", "10", "NX", "XX"], Exact),
        (&["EXPIRE", "ap", "10", "GT", "LT"], Exact),
        (&["EXPIRE", "ap", "10", "FOO"], Exact),
        (&["EXPIRE", "ap", "9223372036854775807"], Exact),
        (&["PEXPIRE", "ap", "9223372036854775807"], Exact),
        (&["PEXPIRE", "ap", "100000"], Exact),
        (&["TTL", "ap"], Exact),
        (&["PTTL", "nope"], Exact),
        (&["PTTL", "n"], Exact),
        (&["TTL", "n"], Exact),
        (&["EXPIRE", "ap", "-1"], Exact),
        (&["EXISTS", "ap"], Exact),
        (&["EXPIRE"], Exact),
        (&["TTL"], Exact),
        (&["DEL", "a", "b", "c"], Exact),
        (&["EXISTS", "n", "n", "nope"], Exact),
        (&["UNLINK", "n"], Exact),
        (&["DEL"], Exact),
        (&["TYPE", "k"], Exact),
        (&["TYPE", "nope"], Exact),
        (&["MSET", "key:1", "a", "key:2", "b", "other", "c"], Exact),
        (&["KEYS", "key:*"], Unordered),
        (&["KEYS", "*"], Unordered),
        (&["KEYS", "k?y:[12]"], Unordered),
        (&["KEYS", "nothing*"], Exact),
        (&["DBSIZE"], Exact),
        (&["DBSIZE", "x"], Exact),
        (&["SELECT", "0"], Exact),
        (&["SELECT", "1"], Exact),
        (&["SELECT", "x"], Exact),
        (&["SELECT", "99999999999"], Exact),
        (&["SETNX", "snx", "v"], Exact),
        (&["SETNX", "snx", "v"], Exact),
        (&["SETEX", "sx", "100", "v"], Exact),
        (&["TTL", "sx"], Exact),
        (&["SETEX", "sx", "0", "v"], Exact),
        (&["SETEX", "sx", "abc", "v"], Exact),
        (&["PSETEX", "psx", "100000", "v"], Exact),
        (&["TTL", "psx"], Exact),
        (&["GETDEL", "psx"], Exact),
        (&["GETDEL", "psx"], Exact),
        (&["FLUSHALL", "FOO"], Exact),
        (&["FLUSHALL", "ASYNC"], Exact),
        (&["DBSIZE"], Exact),
        (&["FLUSHDB", "SYNC"], Exact),
        (&["FOO"], Exact),
        (&["foo", "a", "b"], Exact),
        (&["CONFIG"], Exact),
        (&["CONFIG", "FOO"], Exact),
        (&["COMMAND", "FOO"], Exact),
        (&["CLIENT", "FOO", "x"], Exact),
        (&["CONFIG", "GET"], Exact),
        (&["CONFIG", "GET", "appendonly"], Exact),
        (&["CONFIG", "GET", "save"], Exact),
        (&["CONFIG", "GET", "databases"], Exact),
        (&["CONFIG", "GET", "nosuchparam"], Exact),
        (&["CLIENT", "SETNAME", "a b"], Exact),
        (&["CLIENT", "SETNAME", "myname"], Exact),
        (&["CLIENT", "GETNAME"], Exact),
        (&["CLIENT", "SETNAME", ""], Exact),
        (&["CLIENT", "GETNAME"], Exact),
        (&["CLIENT", "SETNAME"], Exact),
        (&["COMMAND", "INFO", "get"], Exact),
        (&["COMMAND", "INFO", "mset", "nosuchcommand"], Exact),
        (&["QUIT"], Exact),
    ]
};

/// Raw request bytes (protocol errors and inline commands). Each is sent on a fresh
/// connection; replies must match, and so must whether the server closes the
/// connection afterwards.
pub const RAW: &[&[u8]] = &[
    b"PING\r\n",
    b"set k \"a b\" \r\nget k\r\n",
    b"set k 'it\\'s'\nget k\n",
    b"\r\n\r\nPING\r\n",
    b"*1\r\n$x\r\n",
    b"*1\r\n$-1\r\n",
    b"*1\r\n:1\r\n",
    b"*x\r\n",
    b"*3000000000\r\n",
    b"*-1\r\nPING\r\n",
    b"*0\r\nPING\r\n",
    b"$3\r\nfoo\r\n",
    b"set k \"unbalanced\r\n",
    b"set k \"a\"b\r\n",
    b"echo \"\\x41\\n\\t\"\r\n",
    b"*1\r\n$4\r\nPING\r\n*1\r\n$3\r\nFOO\r\n*1\r\n:x\r\n*1\r\n$4\r\nPING\r\n",
];

/// A request as a RESP multibulk.
pub fn multibulk(args: &[&[u8]]) -> alloc::vec::Vec<u8> {
    let mut v = alloc::vec::Vec::new();
    crate::resp::array(&mut v, args.len());
    for a in args {
        crate::resp::bulk(&mut v, a);
    }
    v
}

/// Length of the first complete RESP2 reply in `b`, if `b` holds one (for test clients
/// reading replies off a socket).
pub fn reply_len(b: &[u8]) -> Option<usize> {
    let cr = b.windows(2).position(|w| w == b"\r\n")?;
    let line = &b[1..cr];
    let after = cr + 2;
    match *b.first()? {
        b'+' | b'-' | b':' => Some(after),
        b'$' => {
            let n = crate::num::parse_i64(line)?;
            if n < 0 {
                return Some(after);
            }
            let end = after + n as usize + 2;
            (b.len() >= end).then_some(end)
        }
        b'*' => {
            let n = crate::num::parse_i64(line)?;
            let mut pos = after;
            for _ in 0..n.max(0) {
                pos += reply_len(&b[pos..])?;
            }
            Some(pos)
        }
        _ => None,
    }
}

/// The elements of an array reply, sorted (for [`Cmp::Unordered`]).
pub fn sorted_elements(reply: &[u8]) -> alloc::vec::Vec<&[u8]> {
    let Some(cr) = reply.windows(2).position(|w| w == b"\r\n") else {
        return alloc::vec::Vec::new();
    };
    let mut pos = cr + 2;
    let mut v = alloc::vec::Vec::new();
    while pos < reply.len() {
        let Some(n) = reply_len(&reply[pos..]) else {
            break;
        };
        v.push(&reply[pos..pos + n]);
        pos += n;
    }
    v.sort();
    v
}
