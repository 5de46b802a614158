//! How commands print data: `-o simple` (the default: values as raw bytes) or `-o json`.
//!
//! JSON values: a value that is valid UTF-8 is `"value": "..."`; any other is
//! `"value_base64": "..."` (standard alphabet, padded). Keys are UTF-8 (dcoord's keys are).

use std::io::Write;

use base64::Engine;
use clap::ValueEnum;
use serde_json::{Map, Value, json};

/// The output format of a command that prints data.
#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Values as raw bytes (a newline after a value only on a terminal); lists as lines.
    #[default]
    Simple,
    /// One JSON object per record, one per line.
    Json,
}

/// A JSON object for `key` and `value` (see the module docs), plus `extra` fields.
pub fn entry(key: &[u8], value: &[u8], extra: &[(&str, Value)]) -> Value {
    let mut obj = Map::new();
    obj.insert("key".into(), json!(String::from_utf8_lossy(key)));
    insert_value(&mut obj, value);
    for (k, v) in extra {
        obj.insert((*k).to_string(), v.clone());
    }
    Value::Object(obj)
}

/// `"value": "..."` into `obj`, or `"value_base64"` for bytes that are not UTF-8.
pub fn insert_value(obj: &mut Map<String, Value>, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) => obj.insert("value".into(), json!(text)),
        Err(_) => obj.insert(
            "value_base64".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(value)),
        ),
    };
}

/// Prints one JSON record on its own line.
pub fn json_line(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
}

/// Writes `bytes` to stdout exactly; adds a newline only when stdout is a terminal.
pub fn raw(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
}
