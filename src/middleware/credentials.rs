//! Credentials shared by `basic_auth` and `api_key`: reading credential files, and
//! comparing secrets in constant time.

use std::path::Path;

use subtle::ConstantTimeEq;

/// Non-empty, non-comment lines of a credentials file.
pub fn read_lines(base: &Path, file: &str) -> Result<Vec<String>, String> {
    let path = base.join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// Whether `candidate` equals one of `known`, without an early exit on the first match or
/// mismatch, so timing does not tell which byte differed.
pub fn matches_any(known: &[Vec<u8>], candidate: &[u8]) -> bool {
    let mut found = subtle::Choice::from(0u8);
    for k in known {
        found |= k.as_slice().ct_eq(candidate);
    }
    found.into()
}
