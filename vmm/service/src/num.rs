//! Integer parsing and formatting with Redis's exact rules (`string2ll`, `ll2string`).

/// Longest decimal representation Redis accepts (`LONG_STR_SIZE`).
const LONG_STR_SIZE: usize = 21;

/// Parses a signed 64-bit integer exactly as Redis's `string2ll`: optional `-`, no `+`,
/// no leading zeros (except `0` itself), no spaces, no overflow.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= LONG_STR_SIZE {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s[0] {
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    let first = *digits.first()?;
    if !(b'1'..=b'9').contains(&first) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as u64)?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// Appends the decimal representation of `v`.
pub fn push_i64(out: &mut alloc::vec::Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// Appends the decimal representation of `v`.
pub fn push_u64(out: &mut alloc::vec::Vec<u8>, v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut u = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// `12.34M`-style sizes as in Redis's `bytesToHuman`.
pub fn push_human(out: &mut alloc::vec::Vec<u8>, n: u64) {
    const UNITS: [(u64, u8); 5] = [
        (1 << 50, b'P'),
        (1 << 40, b'T'),
        (1 << 30, b'G'),
        (1 << 20, b'M'),
        (1 << 10, b'K'),
    ];
    for (div, unit) in UNITS {
        if n >= div {
            // Two decimals, rounded down like "%.2f" of an exact quotient is close enough.
            let hundredths = (n as u128 * 100 / div as u128) as u64;
            push_u64(out, hundredths / 100);
            out.push(b'.');
            let frac = hundredths % 100;
            out.push(b'0' + (frac / 10) as u8);
            out.push(b'0' + (frac % 10) as u8);
            out.push(unit);
            return;
        }
    }
    push_u64(out, n);
    out.push(b'B');
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn string2ll_rules() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"+1",
            b"01",
            b" 1",
            b"1 ",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"1e3",
            b"12345678901234567890123",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn formatting() {
        let mut v = Vec::new();
        for n in [0i64, 7, -7, i64::MAX, i64::MIN] {
            v.clear();
            push_i64(&mut v, n);
            assert_eq!(v, alloc::format!("{n}").into_bytes());
        }
        v.clear();
        push_human(&mut v, 1536);
        assert_eq!(v, b"1.50K");
        v.clear();
        push_human(&mut v, 900);
        assert_eq!(v, b"900B");
    }
}
