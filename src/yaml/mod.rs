//! YAML with errors that point at their place: every error names the file, the line and
//! column, and the key path.
//!
//! serde_yaml reports positions for what it finds itself (syntax, types, unknown keys,
//! values whose own check fails); [`locate`] turns a key path back into a position for
//! errors found later, such as a reference to a service that does not exist. The config
//! loader and the endpoint files of `file` discovery both read YAML through here.

pub mod locate;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{ConfigError, ConfigErrorKind as Kind};
pub use locate::{locate, locate_repeated, KeyPath};

/// One file's text, kept to locate errors found after parsing.
pub struct Source {
    pub file: PathBuf,
    pub text: String,
}

impl Source {
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        parse_yaml(&self.file, &self.text)
    }

    /// An error about the node at `path`, placed at its line and column; when the path
    /// is not in the text (a default that applies), at its nearest enclosing node that is,
    /// and at least at the first line.
    pub fn error(&self, path: KeyPath, kind: Kind) -> ConfigError {
        let mut at = path.clone();
        let position = loop {
            if let Some(position) = locate(&self.text, &at) {
                break position;
            }
            if at.0.pop().is_none() {
                break (1, 1);
            }
        };
        ConfigError::new(&self.file, path.to_string(), kind).at(Some(position))
    }
}

/// Parses YAML `text` from `file` into `T`; an error names the file, the line and the key
/// path.
pub fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let mut error = parse_error(file, &path, e.inner(), text);
        // A value refused by its own check (`try_from`) is reported by serde_yaml at the
        // start of the enclosing mapping; the key path finds the value's own line.
        if let Some(found) = key_path(&path).and_then(|p| locate(text, &p)) {
            if error.line.is_some_and(|line| (found.0 as u32) > line) {
                error = error.at(Some(found));
            }
        }
        // A key given twice is reported by serde_yaml at the start of its mapping: the
        // place to point at is where it is repeated.
        let repeated = e
            .inner()
            .to_string()
            .split_once("duplicate entry with key \"")
            .and_then(|(_, rest)| rest.split_once('"').map(|(key, _)| key.to_string()));
        let mapping = if path == "." {
            Some(KeyPath::root())
        } else {
            key_path(&path)
        };
        if let Some(found) = repeated
            .zip(mapping)
            .and_then(|(key, p)| locate_repeated(text, &p, &key))
        {
            error = error.at(Some(found));
        }
        error
    })
}

/// A dotted key path as serde_path_to_error prints it (`services.feed.hash_key`,
/// `listen[0]`), as a [`KeyPath`]; `None` for paths it cannot follow.
fn key_path(printed: &str) -> Option<KeyPath> {
    if printed == "." || printed.is_empty() {
        return None;
    }
    let mut path = KeyPath::root();
    for part in printed.split('.') {
        let (key, indices) = match part.find('[') {
            Some(at) => part.split_at(at),
            None => (part, ""),
        };
        if key == "?" {
            return None;
        }
        if !key.is_empty() {
            path = path.key(key);
        }
        for index in indices.split(['[', ']']).filter(|i| !i.is_empty()) {
            path = path.index(index.parse().ok()?);
        }
    }
    Some(path)
}

/// The line of the marker that starts a second YAML document (`---` after content, or a
/// line after `...`), if any.
fn second_document(text: &str) -> Option<usize> {
    let mut content = false;
    let mut ended = false;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        let is_start = trimmed == "---" || trimmed.starts_with("--- ");
        if (is_start && content) || (ended && !trimmed.is_empty() && !trimmed.starts_with('#')) {
            return Some(i + 1);
        }
        if trimmed == "..." {
            ended = true;
        } else if !is_start && !trimmed.is_empty() && !trimmed.starts_with('#') {
            content = true;
        }
    }
    None
}

/// A serde_yaml error as a config error with position and key path. `path` is the key
/// path serde_path_to_error tracked (`.` for the root).
fn parse_error(file: &Path, path: &str, e: &serde_yaml::Error, text: &str) -> ConfigError {
    // serde_yaml places nearly every error; the few it does not (a second document, an
    // empty stream) are about the file as a whole: the second document's marker, or the
    // first line.
    let position = e
        .location()
        .map(|l| (l.line(), l.column()))
        .or_else(|| Some((second_document(text).unwrap_or(1), 1)));
    let mut message = e.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    // serde_yaml prefixes its own (shorter) path; the tracked one replaces it.
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.is_empty() && !prefix.contains(' ') {
            message = rest.to_string();
        }
    }
    let mut key = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        if !key.ends_with(field) {
            key = if key.is_empty() {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
        }
        message = format!("unknown key; {message}");
    }
    ConfigError::new(file, key, Kind::Parse(message)).at(position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_without_a_position_get_one() {
        let e = parse_yaml::<serde_yaml::Value>(Path::new("f.yaml"), "a: 1\n# c\n---\nb: 2\n")
            .expect_err("two documents");
        assert_eq!((e.line, e.column), (Some(3), Some(1)), "{e}");
        let e = parse_yaml::<serde_yaml::Value>(Path::new("f.yaml"), "a: 1\n...\nb: 2\n")
            .expect_err("two documents");
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(second_document("--- \na: 1\n"), None);
    }
}
