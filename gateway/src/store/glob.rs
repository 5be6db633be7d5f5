//! Redis's glob matching (`stringmatchlen` in Redis's util.c), so the
//! in-process store selects exactly the keys `SCAN MATCH` would in Redis:
//! `*` any run of bytes, `?` one byte, `[abc]` / `[^abc]` / `[a-z]` a set,
//! `\x` the byte `x` literally. Matching is anchored at both ends.

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, text index).
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    while p < pattern.len() && pattern[p] == b'*' {
                        p += 1;
                    }
                    if p == pattern.len() {
                        return true;
                    }
                    backtrack = Some((p, t));
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_set(pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == b'[' {
                        // An unterminated set matches a literal `[`.
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == text[t] {
                        p += 2;
                        t += 1;
                        continue;
                    }
                }
                literal => {
                    if literal == text[t] {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
            }
        }
        // Mismatch: let the last `*` swallow one more byte, if there was one.
        match backtrack {
            Some((star_p, star_t)) => {
                backtrack = Some((star_p, star_t + 1));
                p = star_p;
                t = star_t + 1;
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&byte| byte == b'*')
}

/// Matches `byte` against the set starting at `pattern[start] == b'['`.
/// Returns whether it matched and the index after the set, or `None` if the
/// set is not terminated.
fn match_set(pattern: &[u8], start: usize, byte: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        match *pattern.get(i)? {
            b']' => break,
            b'\\' => {
                let escaped = *pattern.get(i + 1)?;
                matched |= escaped == byte;
                i += 2;
            }
            low if pattern.get(i + 1) == Some(&b'-')
                && pattern.get(i + 2).is_some_and(|&c| c != b']') =>
            {
                let high = pattern[i + 2];
                let (low, high) = if low <= high {
                    (low, high)
                } else {
                    (high, low)
                };
                matched |= (low..=high).contains(&byte);
                i += 3;
            }
            literal => {
                matched |= literal == byte;
                i += 1;
            }
        }
    }
    Some((matched != negate, i + 1))
}

/// Escapes every glob metacharacter so `key` matches only itself.
pub fn escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        matches(pattern.as_bytes(), text.as_bytes())
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("profile:42:*", "profile:42:email"));
        assert!(m("profile:42:*", "profile:42:"));
        assert!(!m("profile:42:*", "profile:420:email"));
        assert!(!m("profile:42:*", "profile:42"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("**a", "bbba"));
    }

    #[test]
    fn sets_ranges_and_negation() {
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("h[b-a]llo", "hallo"), "reversed ranges work as in Redis");
        assert!(!m("h[a-b]llo", "hcllo"));
        assert!(m("[\\]]", "]"));
    }

    #[test]
    fn escapes_make_metacharacters_literal() {
        assert!(m("a\\*", "a*"));
        assert!(!m("a\\*", "ab"));
        for key in ["a*b", "x?y", "[set]", "back\\slash", "plain", "ключ*"] {
            let escaped = escape(key);
            assert!(m(&escaped, key), "{key} vs {escaped}");
            assert!(!m(&escaped, &format!("{key}x")));
        }
        assert!(!m(&escape("a*"), "abc"));
    }
}
