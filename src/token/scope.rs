//! The App Store Connect `scope` claim, built from the exact request forwarded (DESIGN §4,
//! APPLE.md §2).

use crate::apple;

/// `"GET /v1/apps?filter[platform]=IOS"` from the forwarded method, path and raw query.
///
/// - Query parameters Apple ignores when matching (`limit`, `cursor`, `sort`) are left out.
/// - The remaining parameters keep the client's order and bytes, except that percent-encoded
///   brackets (`%5B`/`%5D`) are written as literal `[`/`]`, the form of Apple's documented
///   example (`filter[platform]=IOS`). How Apple matches encoded brackets is UNCONFIRMED
///   (APPLE.md §2); this one form is what the proxy uses and what diagnoses name.
pub fn scope_entry(method: &str, path: &str, query: Option<&str>) -> String {
    let mut entry =
        String::with_capacity(method.len() + 1 + path.len() + query.map_or(0, str::len) + 1);
    push_scope_entry(&mut entry, method, path, query);
    entry
}

/// [`scope_entry`], appended to `entry`.
pub(super) fn push_scope_entry(entry: &mut String, method: &str, path: &str, query: Option<&str>) {
    entry.push_str(method);
    entry.push(' ');
    entry.push_str(path);
    let mut first = true;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or("");
        if apple::SCOPE_IGNORED_PARAMS.contains(&name) {
            continue;
        }
        entry.push(if first { '?' } else { '&' });
        first = false;
        push_literal_brackets(entry, pair);
    }
}

fn push_literal_brackets(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3);
        match code.map(str::to_ascii_uppercase).as_deref() {
            Some("5B") => out.push('['),
            Some("5D") => out.push(']'),
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
}
