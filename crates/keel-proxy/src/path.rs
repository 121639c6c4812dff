//! Request paths as routes see them: normalised before matching, and
//! matched by whole segments.
//!
//! Normalising decodes percent-encoded unreserved characters (RFC 3986
//! section 2.3: letters, digits, `-`, `.`, `_`, `~`) and removes dot
//! segments (section 5.2.4), so that `/api/%2e%2e/admin` and `/api/../admin`
//! are routed, limited and forwarded as `/admin`. A path whose `..` would
//! climb above the root is refused: no route can have meant it. Encoded
//! reserved characters (`%2F`, `%3F`) stay encoded: decoding them would
//! change what the path means. Empty segments (`//`) are kept: an upstream
//! may tell them apart.

use std::borrow::Cow;

/// A path whose dot segments climb above the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AboveRoot;

/// The normalised form of `path` (a request target's path, without its
/// query); borrowed when it is already normal, which is the common case.
/// A path not starting with `/` (the `*` of `OPTIONS *`) is left alone.
pub(crate) fn normalise(path: &str) -> Result<Cow<'_, str>, AboveRoot> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Ok(Cow::Borrowed(path));
    }
    let has_dot_segment = bytes.windows(2).any(|w| w == b"/.");
    if !has_dot_segment && !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path);
    let normal = remove_dot_segments(&decoded)?;
    Ok(if normal == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normal)
    })
}

/// Whether a route's `prefix` matches the normalised `path`: the prefix's
/// segments are the path's first ones. `/api` (or `/api/`) matches `/api`,
/// `/api/` and `/api/x`, not `/apiary`; `/` matches every path.
pub(crate) fn matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `%XX` decoded where it encodes an unreserved character; every other
/// byte as it was.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let mut out = String::new();
    // `path[copied..]` is still to be copied.
    let mut copied = 0;
    let mut i = 0;
    while i + 2 < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h << 4 | l;
                if is_unreserved(c) {
                    out.push_str(&path[copied..i]);
                    out.push(char::from(c));
                    i += 3;
                    copied = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    if copied == 0 {
        return Cow::Borrowed(path);
    }
    out.push_str(&path[copied..]);
    Cow::Owned(out)
}

/// RFC 3986 section 5.2.4 on an absolute path, by segments: `.` goes, `..`
/// takes the segment before it, and a final `.` or `..` leaves the path
/// ending in `/`.
fn remove_dot_segments(path: &str) -> Result<String, AboveRoot> {
    let mut out: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(AboveRoot);
                }
            }
            other => {
                out.push(other);
                continue;
            }
        }
        if last {
            out.push("");
        }
    }
    let mut normal = String::with_capacity(path.len());
    for segment in &out {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(path: &str) -> Result<String, AboveRoot> {
        normalise(path).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_as_they_are() {
        for path in ["/", "/api", "/api/x", "/a//b", "/a.b/c.", "/.well", "*"] {
            assert!(matches!(normalise(path), Ok(Cow::Borrowed(p)) if p == path));
        }
        // `.well` starts with a dot but is not a dot segment.
        assert_eq!(n("/.well-known/x").unwrap(), "/.well-known/x");
    }

    #[test]
    fn dot_segments_go() {
        assert_eq!(n("/a/./b").unwrap(), "/a/b");
        assert_eq!(n("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("/.").unwrap(), "/");
        assert_eq!(n("/a//..").unwrap(), "/a/");
        assert_eq!(n("/api/../admin").unwrap(), "/admin");
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        for path in [
            "/..",
            "/../a",
            "/a/../..",
            "/a/../../b",
            "/%2e%2e/x",
            "/.%2E/x",
        ] {
            assert_eq!(n(path), Err(AboveRoot), "{path}");
        }
    }

    #[test]
    fn unreserved_characters_are_decoded_and_reserved_ones_kept() {
        assert_eq!(n("/%61pi").unwrap(), "/api");
        assert_eq!(n("/api/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(n("/a%2Fb").unwrap(), "/a%2Fb");
        assert_eq!(n("/a%3fb%7E").unwrap(), "/a%3fb~");
        // Not an escape: left as it is.
        assert_eq!(n("/a%zz%4").unwrap(), "/a%zz%4");
        assert_eq!(n("/a%").unwrap(), "/a%");
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(matches("/api", "/api"));
        assert!(matches("/api", "/api/"));
        assert!(matches("/api", "/api/x"));
        assert!(!matches("/api", "/apiary"));
        assert!(!matches("/api", "/ap"));
        assert!(matches("/api/", "/api"));
        assert!(matches("/api/", "/api/x"));
        assert!(!matches("/api/", "/apix"));
        assert!(matches("/", "/"));
        assert!(matches("/", "/anything"));
        assert!(!matches("/", "*"));
    }

    /// RFC 3986 section 5.2.4 as written, on strings (the model), refusing
    /// where a `..` finds nothing to remove.
    fn model(input: &str) -> Result<String, AboveRoot> {
        let mut input = input.to_owned();
        let mut output = String::new();
        while !input.is_empty() {
            if let Some(rest) = input.strip_prefix("../").or(input.strip_prefix("./")) {
                input = rest.to_owned();
            } else if input.starts_with("/./") {
                input = input[2..].to_owned();
            } else if input == "/." {
                input = "/".into();
            } else if input.starts_with("/../") || input == "/.." {
                if output.is_empty() {
                    return Err(AboveRoot);
                }
                input = if input == "/.." {
                    "/".into()
                } else {
                    input[3..].to_owned()
                };
                let cut = output.rfind('/').unwrap_or(0);
                output.truncate(cut);
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input = input[end..].to_owned();
            }
        }
        Ok(output)
    }

    proptest! {
        /// Against the RFC's own algorithm, on paths made of the pieces
        /// that matter; and normalising twice changes nothing.
        #[test]
        fn normalising_matches_the_rfc_and_is_idempotent(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just("a"), Just("b"), Just("."), Just(".."), Just(""),
                    Just("%2e"), Just("%2E%2e"), Just("%41"), Just("%2F"), Just(".x"),
                ],
                0..10,
            ),
        ) {
            let path = format!("/{}", pieces.join("/"));
            let decoded = decode_unreserved(&path).into_owned();
            let expected = model(&decoded).map(|p| if p.is_empty() { "/".to_owned() } else { p });
            let got = n(&path);
            prop_assert_eq!(&got, &expected, "{}", path);
            if let Ok(normal) = got {
                prop_assert_eq!(n(&normal), Ok(normal.clone()));
                prop_assert!(normal.starts_with('/'));
            }
        }
    }
}
