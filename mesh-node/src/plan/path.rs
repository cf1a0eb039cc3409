//! The request path as authorization sees it.
/// The path as authorization sees it and the app receives it, normalized as Istio's
/// `DECODE_AND_MERGE_SLASHES` (the option Istio recommends against policy bypasses; it is
/// Nodemesh's only behaviour, documented in the README's policy section):
/// * percent-encoded unreserved characters are decoded (`%61dmin` is `admin`, `%2e%2e` is
///   `..`), once: `%252e` stays `%252e`, and a stray `%` is escaped (`%25`), so the result
///   is its own normal form;
/// * encoded slashes and backslashes (`%2F`, `%5C`) and backslashes become `/`;
/// * runs of slashes merge into one;
/// * `.` and `..` segments are resolved (RFC 3986 §5.2.4).
///
/// So `//admin`, `/public/%2e%2e/admin`, `/public%2F..%2Fadmin` and `\admin` all meet the
/// policies for `/admin`, and the app gets the path that was authorized. `None` when the
/// path is already normal.
pub fn normalize_path(path: &str) -> Option<String> {
    // `*` (OPTIONS) is not a path to normalize.
    if !path.starts_with(['/', '\\']) {
        return None;
    }
    let decoded = decode_path(path);
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = decoded.split('/').skip(1).peekable();
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            // An empty segment inside the path is a doubled slash: merged away.
            "" if !last => {}
            "." | "" => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if last {
                    segments.push("");
                }
            }
            segment => segments.push(segment),
        }
    }
    let normalized = format!("/{}", segments.join("/"));
    (normalized != path).then_some(normalized)
}

/// One pass of percent-decoding for the characters that normalization may decode: the
/// unreserved ones (RFC 3986 §2.3), and slashes and backslashes, which become `/` as does a
/// literal backslash. Other escapes stay as sent; a `%` that starts none becomes `%25`.
fn decode_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escape = path
                .get(i + 1..i + 3)
                .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
            match escape.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                Some(b'/' | b'\\') => out.push('/'),
                Some(decoded) if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) => {
                    out.push(char::from(decoded));
                }
                Some(_) => out.push_str(&path[i..i + 3]),
                // A `%` that starts no escape is escaped itself, so that no decoded
                // character can complete it into a new escape (`%%32e` would otherwise
                // read `%2e` to the app, and `.` to an app that decodes again).
                None => {
                    out.push_str("%25");
                    i += 1;
                    continue;
                }
            }
            i += 3;
            continue;
        }
        let start = i;
        i += 1;
        while i < bytes.len() && !path.is_char_boundary(i) {
            i += 1;
        }
        let piece = &path[start..i];
        out.push_str(if piece == "\\" { "/" } else { piece });
    }
    out
}
