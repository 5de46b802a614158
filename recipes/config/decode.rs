//! Turning stored bytes into a typed value: one key (JSON or TOML) or a prefix of keys.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::reconcile::Snapshot;

/// How a single-key source is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// JSON (the default).
    #[default]
    Json,
    /// TOML.
    Toml,
}

impl Format {
    /// TOML for keys ending in `.toml`, JSON otherwise.
    pub fn for_key(key: &str) -> Format {
        if key.ends_with(".toml") {
            Format::Toml
        } else {
            Format::Json
        }
    }

    /// The format a key's name implies, refusing names that imply one dcoord does not read
    /// (`.yaml`, `.yml`): reading them as JSON would reject every valid YAML value.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] naming the key.
    pub fn checked_for_key(key: &str) -> crate::Result<Format> {
        if key.ends_with(".yaml") || key.ends_with(".yml") {
            return Err(crate::Error::InvalidArgument(format!(
                "config key {key:?}: YAML is not supported; name it .json or .toml, or set \
                 ConfigOptions::format"
            )));
        }
        Ok(Format::for_key(key))
    }

    pub(crate) fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            Format::Toml => {
                let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
                toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
            }
        }
    }

    pub(crate) fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, String> {
        match self {
            Format::Json => serde_json::to_vec_pretty(value).map_err(|e| e.to_string()),
            Format::Toml => toml::to_string(value)
                .map(String::into_bytes)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The entries under `prefix` as one JSON object: `<prefix>a/b` = `1` becomes `{"a": {"b": 1}}`.
/// A value that is not JSON is taken as a string. Returns the object, or the name of the key
/// that does not fit (a key that is both a value and a folder).
pub(crate) fn prefix_object(
    prefix: &[u8],
    view: &Snapshot,
) -> Result<serde_json::Value, (String, String)> {
    use serde_json::{Map, Value};
    let mut root = Map::new();
    for entry in view.with_prefix(prefix) {
        let rel = String::from_utf8_lossy(&entry.key[prefix.len()..]).into_owned();
        let value: Value = serde_json::from_slice(&entry.value)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&entry.value).into_owned()));
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        let Some((last, dirs)) = parts.split_last() else {
            continue;
        };
        let mut node = &mut root;
        for dir in dirs {
            let next = node
                .entry(dir.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            node = match next {
                Value::Object(m) => m,
                _ => {
                    return Err((
                        show(&entry.key),
                        format!("{dir:?} is both a value and a folder"),
                    ));
                }
            };
        }
        node.insert(last.to_string(), value);
    }
    Ok(Value::Object(root))
}

pub(crate) fn show(key: &Bytes) -> String {
    String::from_utf8_lossy(key).into_owned()
}
