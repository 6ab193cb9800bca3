//! Errors: the typed start-up error for a config that cannot be served, and small helpers
//! for building Pingora errors inside the proxy hooks.
//!
//! A [`ConfigError`] always names the file, the line (when the YAML parser or the locator
//! could find it) and the key path at fault, so `streamgate -t` output can be acted on
//! without reading source code.

use std::fmt;
use std::path::{Path, PathBuf};

use pingora_error::{Error, ErrorType};

/// What is wrong with a config, independent of where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigErrorKind {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    /// YAML syntax, a wrong type, an unknown field or a value that does not parse
    /// (URL, duration, pattern, address). The message is the parser's.
    #[error("{0}")]
    Parse(String),
    #[error("unknown key: it is neither a streamgate setting nor a Pingora server setting")]
    UnknownKey,
    #[error("service `{0}` is not defined in `services`")]
    UnknownService(String),
    #[error("middleware `{0}` is not defined in `middleware_services`")]
    UnknownMiddleware(String),
    #[error("middleware `{name}` is already defined in {first}")]
    DuplicateMiddleware { name: String, first: String },
    #[error("service `{name}` is already defined in {first}")]
    DuplicateService { name: String, first: String },
    #[error("host rule `{0}` is defined twice for the same port")]
    DuplicateHostRule(String),
    #[error("path rule `{0}` is defined twice for the same host")]
    DuplicateRouteRule(String),
    #[error("include pattern `{pattern}`: {reason}")]
    Include { pattern: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// A config error with its place: file, line, column and key path.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// Dotted key path, for example `host_rules[0].route_rules[1].target`.
    pub key: String,
    pub kind: ConfigErrorKind,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, kind: ConfigErrorKind) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: None,
            column: None,
            key: key.into(),
            kind,
        }
    }

    pub fn at(mut self, position: Option<(usize, usize)>) -> Self {
        if let Some((line, column)) = position {
            self.line = u32::try_from(line).ok();
            self.column = u32::try_from(column).ok();
        }
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.kind.source()
    }
}

/// A Pingora error that makes the proxy answer with `status` and `reason` as the body.
pub fn http_error(status: u16, reason: impl Into<String>) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), reason.into())
}
