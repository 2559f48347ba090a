//! Names from the facades in the ring's spelling.

use telemetry_abi::MAX_LABEL_KEY_LEN;

/// A name with the bytes the ring refuses in names replaced by `_`.
pub(crate) fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '"' | '\\' | '{' | '}' | '=' | ',' => '_',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '_',
        })
        .collect()
}

/// A label key in the ring's spelling: `[A-Za-z0-9_.]`, not starting with a digit or
/// `.` (prefixed with `_` then).
pub(crate) fn clean_label_key(key: &str) -> String {
    let mut out: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit() || c == '.') || out.is_empty() {
        out.insert(0, '_');
    }
    out.truncate(MAX_LABEL_KEY_LEN);
    out
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_keys_take_the_ring_spelling() {
        assert_eq!(clean_name("http.requests_total"), "http.requests_total");
        assert_eq!(clean_name("a{b}=c,\"d\\\n"), "a_b__c__d__");
        assert_eq!(clean_label_key("http-method"), "http_method");
        assert_eq!(clean_label_key("9lives"), "_9lives");
        assert_eq!(clean_label_key(".x"), "_.x");
        assert_eq!(clean_label_key(""), "_");
        assert_eq!(clean_label_key(&"k".repeat(40)).len(), MAX_LABEL_KEY_LEN);
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }
}
