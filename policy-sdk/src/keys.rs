//! Building keys, patterns and tags: normalisation, glob escaping and matching, tag joining.
//!
//! Patterns use the glob syntax of the gateway's pattern invalidation (Redis `SCAN MATCH`):
//! `*` any run of characters, `?` one character, `[abc]` / `[a-z]` / `[^a]` a class, `\x` a
//! literal `x`. Anything taken from a request (a user id, a path) must be escaped before it is
//! put into a pattern, or a user id like `*` would invalidate everyone's entries: build patterns
//! with [`Glob`], which escapes every literal part, or escape by hand with [`escape_glob`].

use std::fmt;

/// Normalises a key so that spellings of the same thing share one cache entry:
/// surrounding whitespace is trimmed and the key is lower-cased; if it contains `?`, the text
/// after the first `?` is a URL query string: a `#fragment` after it is dropped, its
/// `&`-separated parameters are sorted by name and then value, empty parameters are dropped
/// (an empty query drops the `?`) and `a=` is written `a`.
///
/// Lower-casing applies to the whole key, query values included: use it for keys whose case
/// carries no meaning.
///
/// ```
/// use cachegw_policy::normalize_key;
///
/// assert_eq!(normalize_key(" /Products?Size=M&color=Red "), "/products?color=red&size=m");
/// assert_eq!(normalize_key("/products?&b=2&a=1#top"), "/products?a=1&b=2");
/// assert_eq!(normalize_key("/products?"), "/products");
/// assert_eq!(normalize_key("Leaderboard:Today"), "leaderboard:today");
/// ```
pub fn normalize_key(key: &str) -> String {
    let key = key.trim().to_lowercase();
    let Some((path, rest)) = key.split_once('?') else {
        return key;
    };
    let query = rest
        .split_once('#')
        .map_or(rest, |(query, _fragment)| query);
    let mut params: Vec<(&str, &str)> = query
        .split('&')
        .filter(|param| !param.is_empty())
        .map(|param| param.split_once('=').unwrap_or((param, "")))
        .collect();
    if params.is_empty() {
        return path.to_owned();
    }
    params.sort_unstable();
    let mut normalized = String::with_capacity(key.len());
    normalized.push_str(path);
    for (i, (name, value)) in params.iter().enumerate() {
        normalized.push(if i == 0 { '?' } else { '&' });
        normalized.push_str(name);
        // `a=` and `a` both name an empty parameter: one spelling, one entry.
        if !value.is_empty() {
            normalized.push('=');
            normalized.push_str(value);
        }
    }
    normalized
}

/// Escapes the glob metacharacters `*`, `?`, `[`, `]` and `\` with a backslash, so that `text`
/// matches only itself inside a pattern. [`Glob`] does this for every literal part of the
/// pattern it builds: prefer it to formatting patterns by hand.
///
/// ```
/// use cachegw_policy::escape_glob;
///
/// assert_eq!(escape_glob("42"), "42");
/// assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
/// let pattern = format!("profile:{}:*", escape_glob("7*"));
/// assert_eq!(pattern, "profile:7\\*:*");
/// ```
pub fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    push_escaped(&mut escaped, text);
    escaped
}

/// Appends `text` to `pattern` with the glob metacharacters escaped (see [`escape_glob`]).
fn push_escaped(pattern: &mut String, text: &str) {
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
}

/// A glob pattern for the gateway's pattern invalidation, built from literal parts (escaped, so
/// they match only themselves) and explicit wildcards, so that request data can never turn into
/// a wildcard. Pass it to [`Decision::invalidate_pattern`](crate::Decision::invalidate_pattern)
/// as it is, or use [`Decision::invalidate_prefix`](crate::Decision::invalidate_prefix) for the
/// common "every key starting with" case.
///
/// ```
/// use cachegw_policy::{Glob, glob_match};
///
/// let user_id = "7*"; // from the request: must match only itself
/// let pattern = Glob::new().literal("profile:").literal(user_id).literal(":").any();
/// assert_eq!(pattern.as_str(), "profile:7\\*:*");
/// assert!(glob_match(pattern.as_str(), "profile:7*:email"));
/// assert!(!glob_match(pattern.as_str(), "profile:71:email"));
///
/// // The same pattern, shorter:
/// assert_eq!(Glob::prefix(format!("profile:{user_id}:")), pattern);
/// ```
///
/// A wildcard matches any character, `:` included: `Glob::prefix("profile:4")` also matches
/// `profile:42:email`. End a prefix with its separator (`"profile:4:"`) to stop at it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Glob {
    pattern: String,
}

impl Glob {
    /// The empty pattern, which matches only the empty key; extend it with the builder methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every key that starts with `text`: `text` escaped, then `*`.
    ///
    /// An empty `text` gives `*`, every key of the namespace.
    ///
    /// ```
    /// use cachegw_policy::Glob;
    ///
    /// assert_eq!(Glob::prefix("orders:42:").as_str(), "orders:42:*");
    /// assert_eq!(Glob::prefix("a?b:").as_str(), "a\\?b:*");
    /// ```
    pub fn prefix(text: impl AsRef<str>) -> Self {
        Self::exact(text).any()
    }

    /// Exactly the key `text`: `text` escaped, nothing else.
    ///
    /// ```
    /// use cachegw_policy::{Glob, glob_match};
    ///
    /// let glob = Glob::exact("report[2024]");
    /// assert_eq!(glob.as_str(), "report\\[2024\\]");
    /// assert!(glob_match(glob.as_str(), "report[2024]"));
    /// assert!(!glob_match(glob.as_str(), "report2"));
    /// ```
    pub fn exact(text: impl AsRef<str>) -> Self {
        Self::new().literal(text)
    }

    /// Appends `text`, escaped so that it matches only itself (see [`escape_glob`]). Use it for
    /// everything taken from a request.
    pub fn literal(mut self, text: impl AsRef<str>) -> Self {
        push_escaped(&mut self.pattern, text.as_ref());
        self
    }

    /// Appends `*`: any run of characters, including none.
    pub fn any(mut self) -> Self {
        self.pattern.push('*');
        self
    }

    /// Appends `?`: exactly one character.
    pub fn one(mut self) -> Self {
        self.pattern.push('?');
        self
    }

    /// Appends `pattern` verbatim, wildcards and all: for glob syntax the other methods do not
    /// cover, such as a class (`[0-9]`).
    ///
    /// `pattern` must be a trusted constant written by the policy's author and must never
    /// contain request data (a key, an attribute, anything derived from them): a `*` in it would
    /// reach other users' entries. Put request data in with [`Glob::literal`].
    ///
    /// ```
    /// use cachegw_policy::{Glob, glob_match};
    ///
    /// let glob = Glob::new().literal("country").raw("[-_]").literal("codes");
    /// assert_eq!(glob.as_str(), "country[-_]codes");
    /// assert!(glob_match(glob.as_str(), "country_codes"));
    /// ```
    pub fn raw(mut self, pattern: impl AsRef<str>) -> Self {
        self.pattern.push_str(pattern.as_ref());
        self
    }

    /// The pattern, in the gateway's glob syntax.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl From<Glob> for String {
    fn from(glob: Glob) -> Self {
        glob.pattern
    }
}

/// Whether `text` matches the glob `pattern`, over characters, with the syntax of the gateway's
/// pattern invalidation (Redis `SCAN MATCH`): `*` any run of characters, `?` one character,
/// `[abc]` / `[a-z]` / `[^a]` a class, `\x` a literal `x`. An unclosed `[` and a trailing `\`
/// match themselves.
///
/// ```
/// use cachegw_policy::glob_match;
///
/// assert!(glob_match("leaderboard*", "leaderboard:today"));
/// assert!(glob_match("country[-_]codes", "country_codes"));
/// assert!(glob_match("profile:7\\*:*", "profile:7*:email"));
/// assert!(!glob_match("profile:7\\*:*", "profile:71:email"));
/// ```
pub fn glob_match(pattern: &str, text: &str) -> bool {
    GlobMatcher::new(pattern).is_match(text)
}

/// A glob pattern parsed once, to match many keys: what a policy builds in `from_config` for
/// the patterns of its config, so that no decision parses them again. The syntax and the answer
/// are [`glob_match`]'s; matching allocates nothing.
///
/// ```
/// use cachegw_policy::GlobMatcher;
///
/// let leaderboards = GlobMatcher::new("leaderboard*");
/// assert!(leaderboards.is_match("leaderboard:today"));
/// assert!(!leaderboards.is_match("profile:7"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobMatcher {
    pattern: String,
    tokens: Vec<Token>,
}

impl GlobMatcher {
    /// Parses `pattern` (every string is a pattern: an unclosed `[` and a trailing `\` match
    /// themselves).
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.to_owned(),
            tokens: parse_glob(pattern),
        }
    }

    /// Whether `text` matches the pattern.
    pub fn is_match(&self, text: &str) -> bool {
        let tokens = &self.tokens;
        // Greedy matching with backtracking to the last `*` only: linear in practice and never
        // exponential, since a later `*` supersedes every earlier one. `c` is a byte offset in
        // `text`, always at a character boundary.
        let (mut t, mut c) = (0, 0);
        let mut last_star: Option<(usize, usize)> = None;
        while let Some(next) = text[c..].chars().next() {
            match tokens.get(t) {
                Some(Token::AnyRun) => {
                    last_star = Some((t, c));
                    t += 1;
                }
                Some(token) if token.matches(next) => {
                    t += 1;
                    c += next.len_utf8();
                }
                _ => match last_star {
                    Some((star_t, star_c)) => {
                        // The star takes one more character.
                        let taken = text[star_c..].chars().next().map_or(1, char::len_utf8);
                        last_star = Some((star_t, star_c + taken));
                        t = star_t + 1;
                        c = star_c + taken;
                    }
                    None => return false,
                },
            }
        }
        tokens[t..]
            .iter()
            .all(|token| matches!(token, Token::AnyRun))
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

impl From<&Glob> for GlobMatcher {
    fn from(glob: &Glob) -> Self {
        GlobMatcher::new(glob.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    AnyRun,
    AnyOne,
    Literal(char),
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
}

impl Token {
    fn matches(&self, c: char) -> bool {
        match self {
            Token::AnyRun | Token::AnyOne => true,
            Token::Literal(literal) => *literal == c,
            Token::Class { negated, items } => {
                items.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

fn parse_glob(pattern: &str) -> Vec<Token> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => tokens.push(Token::AnyRun),
            '?' => tokens.push(Token::AnyOne),
            '\\' if i + 1 < chars.len() => {
                i += 1;
                tokens.push(Token::Literal(chars[i]));
            }
            '[' => match parse_class(&chars[i + 1..]) {
                Some((token, used)) => {
                    tokens.push(token);
                    i += used;
                }
                None => tokens.push(Token::Literal('[')),
            },
            c => tokens.push(Token::Literal(c)),
        }
        i += 1;
    }
    tokens
}

/// Parses a class body after `[`; returns the token and how many characters it used, including
/// the closing `]`, or `None` if the class is never closed.
fn parse_class(body: &[char]) -> Option<(Token, usize)> {
    let mut i = 0;
    let negated = body.first() == Some(&'^');
    if negated {
        i += 1;
    }
    let mut items = Vec::new();
    while i < body.len() {
        let mut c = body[i];
        if c == ']' {
            return Some((Token::Class { negated, items }, i + 1));
        }
        if c == '\\' && i + 1 < body.len() {
            i += 1;
            c = body[i];
        }
        if i + 2 < body.len() && body[i + 1] == '-' && body[i + 2] != ']' {
            let (lo, hi) = (c, body[i + 2]);
            items.push(if lo <= hi { (lo, hi) } else { (hi, lo) });
            i += 3;
        } else {
            items.push((c, c));
            i += 1;
        }
    }
    None
}

/// Joins `parts` with `:` into a tag (surrogate key), escaping `%` as `%25` and `:` as `%3A`
/// inside each part, so that different part lists never produce the same tag.
///
/// ```
/// use cachegw_policy::tag;
///
/// assert_eq!(tag(["user", "42"]), "user:42");
/// assert_eq!(tag(["user", "a:b"]), "user:a%3Ab");
/// ```
pub fn tag<I, S>(parts: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut joined = String::new();
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            joined.push(':');
        }
        for c in part.as_ref().chars() {
            match c {
                '%' => joined.push_str("%25"),
                ':' => joined.push_str("%3A"),
                c => joined.push(c),
            }
        }
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_lowercases_and_trims() {
        assert_eq!(normalize_key("  Ref:Countries\t"), "ref:countries");
        assert_eq!(normalize_key(""), "");
    }

    #[test]
    fn normalize_sorts_query_parameters_by_name_then_value() {
        assert_eq!(normalize_key("/p?b=2&a=1"), normalize_key("/P?A=1&B=2"));
        assert_eq!(normalize_key("/p?b=2&a=1"), "/p?a=1&b=2");
        // By name first: `a` sorts before `a1` although `=` sorts after `1`.
        assert_eq!(normalize_key("/p?a1=0&a=1"), "/p?a=1&a1=0");
        assert_eq!(normalize_key("/p?a=2&a=1"), "/p?a=1&a=2");
        assert_eq!(
            normalize_key("https://Example.com/p?x&y=1"),
            "https://example.com/p?x&y=1"
        );
    }

    #[test]
    fn normalize_drops_empty_parameters_empty_queries_and_fragments() {
        assert_eq!(normalize_key("/p?&&a=1&"), "/p?a=1");
        assert_eq!(normalize_key("/p?a=&b"), "/p?a&b");
        assert_eq!(normalize_key("/p?"), "/p");
        assert_eq!(normalize_key("/p?#frag"), "/p");
        assert_eq!(normalize_key("/p?b=1#frag?x=1"), "/p?b=1");
        // Without a query the key is not treated as a URL: `#` stays.
        assert_eq!(normalize_key("page#Top"), "page#top");
    }

    #[test]
    fn normalize_is_idempotent() {
        for key in ["/P?b=2&A=1#x", " a ", "/p?", "x?y=1&&y=0"] {
            let once = normalize_key(key);
            assert_eq!(normalize_key(&once), once, "{key}");
        }
    }

    #[test]
    fn escaped_text_matches_only_itself() {
        for text in ["42", "*", "a?b", "[x]", "back\\slash", "ü*"] {
            let escaped = escape_glob(text);
            assert!(glob_match(&escaped, text), "{text}");
            assert!(!glob_match(&escaped, &format!("{text}x")), "{text}");
        }
        assert!(!glob_match(&escape_glob("*"), "anything"));
        assert!(!glob_match(&escape_glob("?"), "a"));
    }

    #[test]
    fn glob_literals_escape_every_metacharacter() {
        for (text, escaped) in [
            ("*", "\\*"),
            ("?", "\\?"),
            ("[", "\\["),
            ("]", "\\]"),
            ("\\", "\\\\"),
            ("a*b?[c]\\d", "a\\*b\\?\\[c\\]\\\\d"),
            ("plain:42-ü", "plain:42-ü"),
        ] {
            assert_eq!(Glob::exact(text).as_str(), escaped, "{text}");
            assert_eq!(Glob::new().literal(text).as_str(), escaped, "{text}");
            assert_eq!(Glob::exact(text).as_str(), escape_glob(text), "{text}");
        }
    }

    #[test]
    fn glob_prefix_and_exact() {
        assert_eq!(Glob::prefix("profile:42:").as_str(), "profile:42:*");
        assert_eq!(Glob::prefix("x*").as_str(), "x\\**");
        assert_eq!(Glob::prefix("").as_str(), "*");
        assert_eq!(Glob::exact("profile:42").as_str(), "profile:42");
        assert_eq!(Glob::exact("").as_str(), "");
        assert_eq!(Glob::new(), Glob::default());
        assert_eq!(Glob::new().as_str(), "");
    }

    #[test]
    fn glob_builder_chains_in_order() {
        let glob = Glob::new()
            .literal("a*")
            .any()
            .literal(String::from("b"))
            .one()
            .raw("[0-9]")
            .literal("?");
        assert_eq!(glob.as_str(), "a\\**b?[0-9]\\?");
        assert_eq!(glob.to_string(), glob.as_str());
        assert_eq!(String::from(glob.clone()), glob.as_str());
        assert_eq!(Glob::exact("x").any(), Glob::prefix("x"));
        assert_ne!(Glob::exact("x"), Glob::prefix("x"));
    }

    #[test]
    fn glob_round_trips_through_glob_match() {
        for text in ["42", "*", "a?b", "[x]", "back\\slash", "ü*", "[^a]"] {
            let exact = Glob::exact(text);
            assert!(glob_match(exact.as_str(), text), "{text}");
            assert!(!glob_match(exact.as_str(), &format!("{text}x")), "{text}");
            let prefix = Glob::prefix(text);
            assert!(glob_match(prefix.as_str(), text), "{text}");
            assert!(
                glob_match(prefix.as_str(), &format!("{text}:rest")),
                "{text}"
            );
            assert!(!glob_match(prefix.as_str(), &format!("x{text}")), "{text}");
        }
        // A hostile id reaches only its own keys.
        let glob = Glob::new()
            .literal("profile:")
            .literal("*")
            .literal(":")
            .any();
        assert!(glob_match(glob.as_str(), "profile:*:email"));
        assert!(!glob_match(glob.as_str(), "profile:42:email"));
        // `one` is one character, `any` a run.
        let glob = Glob::exact("v").one().literal(":").any();
        assert!(glob_match(glob.as_str(), "v1:x"));
        assert!(!glob_match(glob.as_str(), "v12:x"));
        assert!(!glob_match(glob.as_str(), "v:x"));
        // `raw` keeps its wildcards.
        let glob = Glob::exact("k").raw("[0-9]");
        assert!(glob_match(glob.as_str(), "k7"));
        assert!(!glob_match(glob.as_str(), "kx"));
    }

    #[test]
    fn glob_wildcards() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "abc"));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a*c", "ac"));
        assert!(!glob_match("a*c", "abcd"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*:*:email", "profile:7:email"));
        assert!(glob_match("a*b*c", "axxbyybzc"));
        assert!(!glob_match("", "a"));
        assert!(glob_match("", ""));
    }

    #[test]
    fn glob_classes() {
        assert!(glob_match("[abc]x", "bx"));
        assert!(!glob_match("[abc]x", "dx"));
        assert!(glob_match("[a-c]", "b"));
        assert!(glob_match("[c-a]", "b"));
        assert!(glob_match("[^a-c]", "d"));
        assert!(!glob_match("[^a-c]", "b"));
        assert!(glob_match("[\\]]", "]"));
        assert!(glob_match("[a-]", "-"));
        // An unclosed class is a literal `[`.
        assert!(glob_match("[ab", "[ab"));
        // A trailing backslash is literal.
        assert!(glob_match("a\\", "a\\"));
    }

    #[test]
    fn glob_counts_characters_not_bytes() {
        // `?` is one character of any width, and a `*` that backtracks gives up whole
        // characters: a byte-wise matcher would split `é` (2 bytes) or `€` (3 bytes).
        assert!(glob_match("?", "é"));
        assert!(!glob_match("??", "é"));
        assert!(glob_match("a?c", "a€c"));
        assert!(glob_match("*€?", "é€€x"));
        assert!(glob_match("*é€", "éé€"));
        assert!(!glob_match("*é€", "éé€x"));
        assert!(glob_match("[à-ê]*", "éa"));
        assert!(glob_match("*[^é]", "éé€"));
        assert!(!glob_match("*[^é€]", "éé€"));
    }

    #[test]
    fn a_matcher_answers_as_glob_match_for_every_pattern_and_key() {
        // Patterns and keys from a small alphabet that exercises every token, wide characters
        // and backtracking; the matcher is parsed once and asked many times.
        let alphabet = ['a', 'b', 'é', '€', '*', '?', '[', ']', '^', '-', '\\'];
        let keys = [
            "",
            "a",
            "ab",
            "aé€b",
            "é",
            "ba€",
            "[a]",
            "a-b",
            "*?",
            "\\a",
            "ééé€",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2_000 {
            let len = (next() % 7) as usize;
            let pattern: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let matcher = GlobMatcher::new(&pattern);
            assert_eq!(matcher.as_str(), pattern);
            for key in keys {
                assert_eq!(
                    matcher.is_match(key),
                    reference_match(&pattern, key),
                    "{pattern:?} against {key:?}"
                );
            }
        }
    }

    /// The matcher as it was before it took byte offsets: over a `Vec<char>` of the key.
    fn reference_match(pattern: &str, text: &str) -> bool {
        let tokens = parse_glob(pattern);
        let text: Vec<char> = text.chars().collect();
        let (mut t, mut c) = (0, 0);
        let mut last_star: Option<(usize, usize)> = None;
        while c < text.len() {
            match tokens.get(t) {
                Some(Token::AnyRun) => {
                    last_star = Some((t, c));
                    t += 1;
                }
                Some(token) if token.matches(text[c]) => {
                    t += 1;
                    c += 1;
                }
                _ => match last_star {
                    Some((star_t, star_c)) => {
                        last_star = Some((star_t, star_c + 1));
                        t = star_t + 1;
                        c = star_c + 1;
                    }
                    None => return false,
                },
            }
        }
        tokens[t..]
            .iter()
            .all(|token| matches!(token, Token::AnyRun))
    }

    #[test]
    fn glob_stays_fast_on_adversarial_input() {
        let pattern = "*a".repeat(50) + "b";
        let text = "a".repeat(5_000);
        assert!(!glob_match(&pattern, &text));
    }

    #[test]
    fn tags_join_and_escape_parts() {
        assert_eq!(tag(["user", "42"]), "user:42");
        assert_eq!(tag(["a:b", "c"]), "a%3Ab:c");
        assert_ne!(tag(["a:b", "c"]), tag(["a", "b:c"]));
        assert_eq!(tag(["100%"]), "100%25");
        assert_eq!(tag(Vec::<String>::new()), "");
    }
}
