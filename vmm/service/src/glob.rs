//! Redis glob patterns (`KEYS`, `CONFIG GET`): `*`, `?`, `[abc]`, `[^a-z]`, `\x`.
//!
//! Same language as Redis's `stringmatchlen`, matched without recursion: one star
//! position is remembered and retried (O(pattern x string) in the worst case), so a
//! pattern such as `a*a*a*a*b` cannot stall the single-threaded service.

fn lower(c: u8, nocase: bool) -> u8 {
    if nocase { c.to_ascii_lowercase() } else { c }
}

/// Tries to match one string byte against the pattern element at `*p`; on success
/// advances `*p` past the element.
fn match_one(pat: &[u8], p: &mut usize, c: u8, nocase: bool) -> bool {
    let mut i = *p;
    let ok = match pat[i] {
        b'?' => true,
        b'[' => {
            i += 1;
            let not = pat.get(i) == Some(&b'^');
            if not {
                i += 1;
            }
            let mut hit = false;
            loop {
                match pat.get(i) {
                    // An unterminated class ends with the pattern (as in Redis).
                    None => {
                        i -= 1;
                        break;
                    }
                    Some(b']') => break,
                    Some(b'\\') if i + 1 < pat.len() => {
                        i += 1;
                        hit |= pat[i] == c;
                    }
                    Some(&a) if pat.get(i + 1) == Some(&b'-') && i + 2 < pat.len() => {
                        let (mut lo, mut hi) = (lower(a, nocase), lower(pat[i + 2], nocase));
                        if lo > hi {
                            core::mem::swap(&mut lo, &mut hi);
                        }
                        let cc = lower(c, nocase);
                        hit |= lo <= cc && cc <= hi;
                        i += 2;
                    }
                    Some(&a) => hit |= lower(a, nocase) == lower(c, nocase),
                }
                i += 1;
            }
            hit != not
        }
        b'\\' if i + 1 < pat.len() => {
            i += 1;
            lower(pat[i], nocase) == lower(c, nocase)
        }
        a => lower(a, nocase) == lower(c, nocase),
    };
    if ok {
        *p = i + 1;
    }
    ok
}

/// True if `s` matches `pat`.
pub fn matches(pat: &[u8], s: &[u8], nocase: bool) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            while p < pat.len() && pat[p] == b'*' {
                p += 1;
            }
            if p == pat.len() {
                return true;
            }
            star = Some((p, i));
            continue;
        }
        let mut np = p;
        if p < pat.len() && match_one(pat, &mut np, s[i], nocase) {
            p = np;
            i += 1;
            continue;
        }
        match star {
            Some((sp, si)) => {
                star = Some((sp, si + 1));
                p = sp;
                i = si + 1;
            }
            None => return false,
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn redis_glob_cases() {
        let yes: &[(&str, &str)] = &[
            ("*", ""),
            ("*", "abc"),
            ("h?llo", "hello"),
            ("h*llo", "heeeello"),
            ("h[ae]llo", "hallo"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("h[b-a]llo", "hbllo"),
            ("key:*", "key:__rand_int__"),
            ("a\\*b", "a*b"),
            ("a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaab"),
            ("[abc", "a"),
        ];
        for (p, s) in yes {
            assert!(matches(p.as_bytes(), s.as_bytes(), false), "{p} vs {s}");
        }
        let no: &[(&str, &str)] = &[
            ("h[^e]llo", "hello"),
            ("h?llo", "hllo"),
            ("a\\*b", "axb"),
            (
                "a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac",
            ),
            ("abc", "ab"),
            ("", "a"),
        ];
        for (p, s) in no {
            assert!(!matches(p.as_bytes(), s.as_bytes(), false), "{p} vs {s}");
        }
        assert!(matches(b"MAXMEM*", b"maxmemory", true));
    }
}
