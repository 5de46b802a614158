//! Key, prefix, value and name rules shared by every store and recipe.
//!
//! Every [`Store`](crate::store::Store) checks its input with these functions BEFORE anything is
//! sent, so bad input is rejected the same way by the in-memory store, the embedded engine and a
//! remote cluster, and nothing is half-written.
//!
//! - A key is 1..=[`MAX_KEY_LEN`] bytes. Keys that start with `/` can be prefix-watched; dcoord's
//!   own keys all live under `/dcoord/`.
//! - A watch prefix starts AND ends with `/` (d-engine's rule: `/cfg/` matches `/cfg/a` and
//!   `/cfg/sub/b`, never `/cfgX`).
//! - A scan prefix is any non-empty byte string (d-engine's scan is a plain `starts_with`).
//! - A value is at most [`MAX_VALUE_LEN`] bytes (d-engine's gRPC messages are capped at 4 MiB;
//!   dcoord keeps a margin so a value always fits in one request).
//! - A recipe name (lock name, queue name, ...) is 1..=[`MAX_NAME_LEN`] bytes of
//!   `[A-Za-z0-9._-]`: no `/`, so names cannot escape their recipe's key space.

use crate::error::{Error, Result, show};

/// The longest key dcoord accepts, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// The largest value dcoord accepts, in bytes (1 MiB).
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// The longest recipe name dcoord accepts, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// The longest key root dcoord accepts, in bytes (leaves room for recipe keys below it).
pub const MAX_ROOT_LEN: usize = 256;
/// Where dcoord's records live unless told otherwise.
pub const DEFAULT_ROOT: &str = "/dcoord/";

/// Checks a key root (the prefix every dcoord record lives under): starts and ends with `/`,
/// at most [`MAX_ROOT_LEN`] bytes, and no empty segment.
pub fn validate_root(root: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidArgument(format!(
            "invalid key root {root:?}: {reason}"
        )))
    };
    if !root.starts_with('/') || !root.ends_with('/') {
        return bad("must start and end with '/', like \"/dcoord/\"");
    }
    if root.len() > MAX_ROOT_LEN {
        return bad(&format!("longer than {MAX_ROOT_LEN} bytes"));
    }
    if root.len() > 1 && root[1..root.len() - 1].split('/').any(str::is_empty) {
        return bad("empty segment ('//')");
    }
    Ok(())
}

/// Checks a key: non-empty and at most [`MAX_KEY_LEN`] bytes.
pub fn validate_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            key: String::new(),
            reason: "a key must not be empty".into(),
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidKey {
            key: show(&key[..64]) + "...",
            reason: format!("{} bytes, over the limit of {MAX_KEY_LEN}", key.len()),
        });
    }
    Ok(())
}

/// Checks a value for `key`: at most [`MAX_VALUE_LEN`] bytes.
pub fn validate_value(key: &[u8], value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::ValueTooLarge {
            key: show(key),
            size: value.len(),
            limit: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// Checks a watch prefix: a valid key that starts and ends with `/`.
pub fn validate_watch_prefix(prefix: &[u8]) -> Result<()> {
    validate_key(prefix).map_err(|e| match e {
        Error::InvalidKey { key, reason } => Error::InvalidPrefix {
            prefix: key,
            reason,
        },
        other => other,
    })?;
    if !prefix.starts_with(b"/") || !prefix.ends_with(b"/") {
        return Err(Error::InvalidPrefix {
            prefix: show(prefix),
            reason: "a watch prefix must start and end with '/' (for example \"/app/config/\")"
                .into(),
        });
    }
    Ok(())
}

/// Checks a scan prefix: non-empty and at most [`MAX_KEY_LEN`] bytes.
pub fn validate_scan_prefix(prefix: &[u8]) -> Result<()> {
    validate_key(prefix).map_err(|e| match e {
        Error::InvalidKey { key, reason } => Error::InvalidPrefix {
            prefix: key,
            reason: reason.replace("key", "prefix"),
        },
        other => other,
    })
}

/// Checks a recipe name (lock, queue, config name): 1..=[`MAX_NAME_LEN`] bytes of
/// `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::InvalidArgument(format!(
            "invalid {kind} name {name:?}: {reason}"
        )))
    };
    if name.is_empty() {
        return bad("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return bad(format!("longer than {MAX_NAME_LEN} bytes"));
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(format!(
            "character {c:?} is not allowed (use A-Z, a-z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_oversized_keys_are_rejected() {
        assert!(matches!(validate_key(b""), Err(Error::InvalidKey { .. })));
        assert!(validate_key(&[b'a'; MAX_KEY_LEN]).is_ok());
        assert!(matches!(
            validate_key(&[b'a'; MAX_KEY_LEN + 1]),
            Err(Error::InvalidKey { .. })
        ));
    }

    #[test]
    fn watch_prefix_must_be_slash_bounded() {
        assert!(validate_watch_prefix(b"/cfg/").is_ok());
        assert!(validate_watch_prefix(b"/").is_ok());
        for bad in [&b"cfg/"[..], b"/cfg", b"cfg", b""] {
            let err = validate_watch_prefix(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidPrefix { .. }), "{err}");
        }
    }

    #[test]
    fn oversized_value_names_key_and_sizes() {
        let err = validate_value(b"/k", &vec![0; MAX_VALUE_LEN + 1]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/k") && msg.contains(&MAX_VALUE_LEN.to_string()),
            "{msg}"
        );
    }

    #[test]
    fn roots_are_slash_bounded() {
        assert!(validate_root("/dcoord/").is_ok());
        assert!(validate_root("/a/b/").is_ok());
        for bad in ["dcoord/", "/dcoord", "", "//", "/a//b/"] {
            assert!(validate_root(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_reject_slashes_and_dots() {
        assert!(validate_name("lock", "orders-1.v2_x").is_ok());
        for bad in ["", "a/b", "..", "sp ace", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(validate_name("lock", bad).is_err(), "{bad:?}");
        }
    }
}
