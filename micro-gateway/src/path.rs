//! Request paths in one canonical spelling, before routing and before the upstream sees
//! them, so that what the gateway authorized is what the upstream serves.
//!
//! [`normalize`] does what Envoy's `normalize_path` and `merge_slashes` do:
//!
//! 1. Percent-encoded unreserved characters (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`) are
//!    decoded (`%2e` becomes `.`, `%41` becomes `A`); every other encoding is kept, its
//!    hex digits uppercased (`%c3%a9` becomes `%C3%A9`).
//! 2. Dot segments are removed as RFC 3986 §5.2.4 says (`/a/./b/../c` becomes `/a/c`;
//!    `..` above the root stays at the root).
//! 3. Runs of slashes are merged (`//a///b` becomes `/a/b`).
//!
//! The query is not touched. Some spellings mean different things to different servers
//! and are refused ([`PathError`], `400 bad_path` at the gateway):
//!
//! | spelling | why |
//! |---|---|
//! | `%2F`, `%5C` (encoded slash, backslash) | some upstreams decode them into separators; refused unless the route allows encoded slashes ([`Options::allow_encoded_slashes`]), then passed on as `%2F`/`%5C` |
//! | a raw `\` | Windows and some frameworks read it as `/` |
//! | `%00` or a control character | truncates paths in C-based servers |
//! | encoded bytes that are not UTF-8 (`%ff`, overlong `%c0%ae`) | old decoders read `%c0%ae` as `.` |
//! | `%` not followed by two hex digits | undecodable |
//! | `;` after an empty, `.` or `..` segment (`/..;/`, `/.;x/`) | Tomcat and Spring strip `;` parameters and then see a dot segment |
//! | not starting with `/` (`*`, authority-form) | no path to route |
//!
//! Other `;` parameters (`/file;v=2`) are kept: they are part of their segment for the
//! route matcher as for the upstream. A doubly encoded character (`%252e`) is not decoded
//! twice: it reaches the upstream as `%252E`, a literal `%2e`.

use std::fmt;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path does not start with `/`")]
    NotAbsolute,
    /// A `%` is not followed by two hex digits.
    #[error("a `%` is not followed by two hex digits")]
    BadEscape,
    /// An encoded slash (`%2F`) or backslash (`%5C`) where the route does not allow them.
    #[error("the path has an encoded slash or backslash")]
    EncodedSlash,
    /// A raw backslash.
    #[error("the path has a backslash")]
    Backslash,
    /// `%00` or a control character.
    #[error("the path has a NUL or control character")]
    Control,
    /// Encoded bytes that do not form UTF-8.
    #[error("the path's encoded bytes are not UTF-8")]
    InvalidUtf8,
    /// A `;` parameter on an empty or dot segment.
    #[error("the path has a `;` parameter on a dot or empty segment")]
    AmbiguousParameter,
}

/// What [`normalize`] accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// Keep `%2F` and `%5C` (as part of their segment) instead of refusing them.
    pub allow_encoded_slashes: bool,
}

impl Options {
    /// The default: encoded slashes refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`allow_encoded_slashes`](Self::allow_encoded_slashes).
    pub fn allow_encoded_slashes(mut self, allow: bool) -> Self {
        self.allow_encoded_slashes = allow;
        self
    }
}

/// A normalized path and whether it kept an encoded slash or backslash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The canonical path.
    pub path: String,
    /// Whether `%2F` or `%5C` is in it (only possible with
    /// [`Options::allow_encoded_slashes`]).
    pub has_encoded_slash: bool,
}

impl fmt::Display for Normalized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes `path` (without its query); see the [module docs](self).
///
/// # Errors
///
/// A [`PathError`] for a spelling the gateway refuses.
pub fn normalize(path: &str, options: Options) -> Result<Normalized, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: decode unreserved escapes, check the others, uppercase their hex.
    let mut decoded = String::with_capacity(path.len());
    let mut has_encoded_slash = false;
    // Bytes of consecutive non-ASCII escapes, checked as UTF-8 together.
    let mut pending: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let value = hi << 4 | lo;
            i += 3;
            if value >= 0x80 {
                pending.push(value);
                continue;
            }
            flush_utf8(&mut pending, &mut decoded)?;
            if is_unreserved(value) {
                decoded.push(value as char);
                continue;
            }
            match value {
                0x00..=0x1f | 0x7f => return Err(PathError::Control),
                b'/' | b'\\' if !options.allow_encoded_slashes => {
                    return Err(PathError::EncodedSlash)
                }
                b'/' | b'\\' => has_encoded_slash = true,
                _ => {}
            }
            push_escape(&mut decoded, value);
            continue;
        }
        flush_utf8(&mut pending, &mut decoded)?;
        match b {
            b'\\' => return Err(PathError::Backslash),
            0x00..=0x1f | 0x7f => return Err(PathError::Control),
            _ => {}
        }
        // `path` is a `str`: copy the whole character.
        let width = utf8_width(b);
        decoded.push_str(&path[i..i + width]);
        i += width;
    }
    flush_utf8(&mut pending, &mut decoded)?;

    // Pass 2: merge slashes and remove dot segments.
    let trailing_slash = decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    let mut last_was_dot = false;
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if let Some((head, _)) = segment.split_once(';') {
            if head.is_empty() || head == "." || head == ".." {
                return Err(PathError::AmbiguousParameter);
            }
        }
        last_was_dot = true;
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => {
                last_was_dot = false;
                out.push(segment);
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for segment in &out {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() || ((trailing_slash || last_was_dot) && !out.is_empty()) {
        path.push('/');
    }
    Ok(Normalized {
        path,
        has_encoded_slash,
    })
}

/// Whether `path` is already its own normalized spelling with no encoded slash, which
/// most requests are: a cheap check that lets them skip [`normalize`]'s copies.
pub(crate) fn is_canonical(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.first() == Some(&b'/')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_graphic() && !matches!(b, b'%' | b'\\' | b';'))
        && !path.contains("//")
        && path[1..]
            .split('/')
            .all(|segment| segment != "." && segment != "..")
}

fn utf8_width(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

fn push_escape(out: &mut String, value: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(value >> 4)] as char);
    out.push(HEX[usize::from(value & 0xf)] as char);
}

fn flush_utf8(pending: &mut Vec<u8>, out: &mut String) -> Result<(), PathError> {
    if pending.is_empty() {
        return Ok(());
    }
    if std::str::from_utf8(pending).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    for &b in pending.iter() {
        push_escape(out, b);
    }
    pending.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p, Options::new()).map(|n| n.path)
    }

    #[test]
    fn dot_segments_in_every_spelling_are_removed() {
        for p in [
            "/public/../api/secret",
            "/public/%2e%2e/api/secret",
            "/public/%2E%2E/api/secret",
            "/public/.%2e/api/secret",
            "/public/%2e./api/secret",
            "/public/./../api/./secret",
            "//public//..//api///secret",
            "/../../api/secret",
        ] {
            assert_eq!(norm(p).unwrap(), "/api/secret", "{p}");
        }
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/..").unwrap(), "/");
        assert_eq!(norm("/").unwrap(), "/");
        assert_eq!(norm("/a/").unwrap(), "/a/");
        assert_eq!(norm("/%7euser/%41").unwrap(), "/~user/A");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(norm("/a%20b").unwrap(), "/a%20b");
        assert_eq!(norm("/file;v=2").unwrap(), "/file;v=2");
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        for (p, error) in [
            ("/public/..%2Fapi/secret", PathError::EncodedSlash),
            ("/public/..%2fapi", PathError::EncodedSlash),
            ("/public/..%5Capi", PathError::EncodedSlash),
            ("/public/..\\api", PathError::Backslash),
            ("/a%00b", PathError::Control),
            ("/a%0a", PathError::Control),
            ("/a%c0%ae%c0%ae/api", PathError::InvalidUtf8),
            ("/a%ff", PathError::InvalidUtf8),
            ("/a%2", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/public/..;/api", PathError::AmbiguousParameter),
            ("/public/.;x/api", PathError::AmbiguousParameter),
            ("/public/%2e%2e;/api", PathError::AmbiguousParameter),
            ("/;x/api", PathError::AmbiguousParameter),
            ("*", PathError::NotAbsolute),
        ] {
            assert_eq!(norm(p), Err(error), "{p}");
        }
    }

    #[test]
    fn encoded_slashes_pass_when_allowed() {
        let options = Options::new().allow_encoded_slashes(true);
        let n = normalize("/files/a%2fb/../c", options).unwrap();
        assert_eq!(n.path, "/files/c");
        let n = normalize("/files/a%2fb", options).unwrap();
        assert_eq!(n.path, "/files/a%2Fb");
        assert!(n.has_encoded_slash);
        assert!(!normalize("/files/ab", options).unwrap().has_encoded_slash);
    }

    proptest! {
        #[test]
        fn a_canonical_path_normalizes_to_itself(
            path in "/[a-zA-Z0-9./%;\\\\~_ -]{0,40}",
            allow in any::<bool>(),
        ) {
            if is_canonical(&path) {
                let normalized = normalize(&path, Options::new().allow_encoded_slashes(allow));
                prop_assert_eq!(
                    normalized,
                    Ok(Normalized { path: path.clone(), has_encoded_slash: false })
                );
            }
        }

        #[test]
        fn normalizing_never_panics_and_is_idempotent(
            path in "/[a-zA-Z0-9./%;\\\\~_-]{0,40}",
            allow in any::<bool>(),
        ) {
            let options = Options::new().allow_encoded_slashes(allow);
            if let Ok(once) = normalize(&path, options) {
                let twice = normalize(&once.path, options).unwrap();
                prop_assert_eq!(&twice.path, &once.path);
                prop_assert!(!once.path.contains("//"), "{}", once.path);
                for segment in once.path.split('/') {
                    prop_assert!(segment != "." && segment != "..", "{}", once.path);
                }
            }
        }

        #[test]
        fn normalizing_arbitrary_text_never_panics(path in "\\PC{0,60}", raw in any::<String>()) {
            let _ = normalize(&path, Options::new());
            let _ = normalize(&format!("/{raw}"), Options::new().allow_encoded_slashes(true));
        }

        #[test]
        fn dot_spellings_are_idempotent_too(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("%2e".to_owned()), Just("%2E".to_owned()), Just(".".to_owned()),
                    Just("..".to_owned()), Just(".%2e".to_owned()), Just("%2e.".to_owned()),
                    Just("".to_owned()), "[a-z]{1,4}",
                ],
                0..10,
            ),
        ) {
            let path = format!("/{}", parts.join("/"));
            let once = normalize(&path, Options::new()).unwrap();
            prop_assert_eq!(normalize(&once.path, Options::new()).unwrap().path, once.path.clone());
            prop_assert!(!once.path.contains("//"));
            for segment in once.path.split('/') {
                prop_assert!(segment != "." && segment != "..");
            }
        }
    }
}
