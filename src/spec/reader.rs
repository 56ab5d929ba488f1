//! A small walker over a YAML tree that collects every problem instead of
//! stopping at the first one (the Vector approach: parse, then compile into a
//! checked type, reporting all errors with their field path).

use serde_yaml::{Mapping, Value};

/// One problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, e.g. `backfill.chunk_rows` or `mapping.columns[2].expr`.
    pub field: String,
    pub reason: String,
}

/// Collects problems while fields are read.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// A mapping being read; remembers which keys were consumed so unknown keys
/// can be reported by [`Fields::finish`].
pub struct Fields<'a> {
    path: String,
    map: Option<&'a Mapping>,
    seen: Vec<String>,
}

impl<'a> Fields<'a> {
    /// Reads `value` as a mapping at `path`; a non-mapping is reported once.
    pub fn new(path: &str, value: Option<&'a Value>, problems: &mut Problems) -> Fields<'a> {
        let map = match value {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(m)) => Some(m),
            Some(_) => {
                problems.push(path, "must be a mapping of fields");
                None
            }
        };
        Fields {
            path: path.to_string(),
            map,
            seen: Vec::new(),
        }
    }

    pub fn present(&self) -> bool {
        self.map.is_some()
    }

    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    pub fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.seen.push(key.to_string());
        match self.map?.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn string(&mut self, key: &str, problems: &mut Problems) -> Option<String> {
        let path = self.path_of(key);
        match self.get(key)? {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::String(_) => {
                problems.push(path, "must not be empty");
                None
            }
            _ => {
                problems.push(path, "must be a string");
                None
            }
        }
    }

    pub fn boolean(&mut self, key: &str, problems: &mut Problems) -> Option<bool> {
        let path = self.path_of(key);
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => {
                problems.push(path, "must be true or false");
                None
            }
        }
    }

    /// A mapping of strings to strings (numbers and booleans are taken as text).
    pub fn string_map(&mut self, key: &str, problems: &mut Problems) -> Vec<(String, String)> {
        let path = self.path_of(key);
        let Some(value) = self.get(key) else {
            return Vec::new();
        };
        let Value::Mapping(map) = value else {
            problems.push(path, "must be a mapping of names to values");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let name = match k {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => {
                    problems.push(format!("{path}.{name}"), "must be a string");
                    continue;
                }
            };
            out.push((name, text));
        }
        out
    }

    pub fn required_string(&mut self, key: &str, problems: &mut Problems) -> Option<String> {
        let present = self.map.map(|m| m.contains_key(key)).unwrap_or(false);
        let got = self.string(key, problems);
        if !present {
            problems.push(self.path_of(key), "is required");
        }
        got
    }

    /// A positive integer within `[min, max]`.
    pub fn integer(
        &mut self,
        key: &str,
        min: u64,
        max: u64,
        problems: &mut Problems,
    ) -> Option<u64> {
        let path = self.path_of(key);
        let value = self.get(key)?;
        match value.as_u64() {
            Some(n) if n >= min && n <= max => Some(n),
            Some(n) => {
                problems.push(path, format!("{n} is out of range ({min}..={max})"));
                None
            }
            None => {
                problems.push(path, "must be a whole number");
                None
            }
        }
    }

    /// A byte size: a number of bytes or a string such as `512MB` / `1GB`.
    pub fn bytes(&mut self, key: &str, problems: &mut Problems) -> Option<u64> {
        let path = self.path_of(key);
        let value = self.get(key)?;
        let parsed = match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => parse_byte_size(s),
            _ => None,
        };
        if parsed.is_none() {
            problems.push(
                path,
                "must be a byte size such as 1048576, \"512MB\" or \"2GB\"",
            );
        }
        parsed
    }

    /// Reports every key that no reader asked for.
    pub fn finish(self, problems: &mut Problems) {
        let Some(map) = self.map else { return };
        for key in map.keys() {
            let name = match key {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            if !self.seen.contains(&name) {
                let mut expected = self.seen.clone();
                expected.sort();
                expected.dedup();
                problems.push(
                    self.path_of(&name),
                    format!("unknown field (expected one of: {})", expected.join(", ")),
                );
            }
        }
    }
}

/// Parses `123`, `64kB`, `512MB`, `2GB` (powers of 1024).
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" | "kib" => 1 << 10,
        "mb" | "m" | "mib" => 1 << 20,
        "gb" | "g" | "gib" => 1 << 30,
        "tb" | "t" | "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1024"), Some(1024));
        assert_eq!(parse_byte_size("512MB"), Some(512 << 20));
        assert_eq!(parse_byte_size("2 GB"), Some(2 << 30));
        assert_eq!(parse_byte_size("lots"), None);
        assert_eq!(parse_byte_size("5XB"), None);
    }
}
