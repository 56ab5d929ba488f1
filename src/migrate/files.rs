//! Migration files: `migrations/<service>/V<version>__<description>.sql`
//! and the optional undo file `U<version>__<description>.sql`.
//!
//! Versions are dotted numbers compared numerically, trailing zeros
//! ignored (`1.2` = `1.2.0` < `1.10`). A header of `-- key: value` comment
//! lines at the top of a file carries metadata:
//!
//! ```sql
//! -- depends_on: 1.2, billing:3      (this service's versions, or service:version)
//! -- environments: staging, prod     (run only there; everywhere when absent)
//! -- risk: high                      (low | medium | high; default low)
//! -- estimated_duration: 5m
//! -- transactional: false            (run statement by statement, outside a transaction)
//! ```
//!
//! The checksum is the SHA-256 of the file's normalised text (line endings
//! `\n`, trailing whitespace of every line and trailing blank lines removed),
//! so an editor's line-ending or whitespace change is not "drift".

use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A dotted version number.
#[derive(Debug, Clone)]
pub struct Version {
    pub text: String,
    parts: Vec<u64>,
}

impl Version {
    pub fn parse(text: &str) -> Option<Version> {
        let parts: Option<Vec<u64>> = text.split('.').map(|p| p.parse().ok()).collect();
        let mut parts = parts?;
        if parts.is_empty() || text.starts_with('.') || text.ends_with('.') {
            return None;
        }
        while parts.len() > 1 && parts.last() == Some(&0) {
            parts.pop();
        }
        Some(Version {
            text: text.to_string(),
            parts,
        })
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
    }
}
impl Eq for Version {}
impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts.cmp(&other.parts)
    }
}
impl std::hash::Hash for Version {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts.hash(state)
    }
}
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A dependency named in `depends_on`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    /// `None`: the same service.
    pub service: Option<String>,
    pub version: Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Low,
    Medium,
    High,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
        }
    }
}

/// Header metadata of a migration file.
#[derive(Debug, Clone)]
pub struct Meta {
    pub depends_on: Vec<Dep>,
    /// Empty: every environment.
    pub environments: Vec<String>,
    pub risk: Risk,
    pub estimated_duration: Option<String>,
    /// `Some(false)` from the header; `None`: decided from the statements.
    pub transactional: Option<bool>,
}

/// One versioned migration of a service.
#[derive(Debug, Clone)]
pub struct Migration {
    pub service: String,
    pub version: Version,
    pub description: String,
    pub path: PathBuf,
    pub sql: String,
    pub checksum: String,
    pub meta: Meta,
    /// The undo file, if there is one.
    pub undo: Option<PathBuf>,
}

impl Migration {
    /// `service:version`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.service, self.version)
    }
    pub fn runs_in(&self, env: Option<&str>) -> bool {
        self.meta.environments.is_empty()
            || env.is_some_and(|e| self.meta.environments.iter().any(|x| x == e))
    }
}

/// A problem with a file (reported by `validate`, and refused by `up`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileProblem {
    pub file: String,
    pub reason: String,
}

/// Every service's migrations, sorted by version.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub services: BTreeMap<String, Vec<Migration>>,
    pub problems: Vec<FileProblem>,
}

/// SHA-256 (hex) of the normalised text.
pub fn checksum(text: &str) -> String {
    let mut normal = String::with_capacity(text.len());
    for line in text.replace("\r\n", "\n").lines() {
        normal.push_str(line.trim_end());
        normal.push('\n');
    }
    let normal = normal.trim_end_matches('\n');
    let digest = Sha256::digest(normal.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `dir/<service>/*.sql` for every service (or only `only`).
pub fn load(dir: &Path, only: Option<&str>) -> std::io::Result<Catalog> {
    let mut catalog = Catalog::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for service_dir in entries {
        let Some(service) = service_dir
            .file_name()
            .and_then(|n| n.to_str())
            .map(String::from)
        else {
            continue;
        };
        if only.is_some_and(|o| o != service) {
            continue;
        }
        if !service
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            catalog.problems.push(FileProblem {
                file: service_dir.display().to_string(),
                reason: "service folder names must be a-z, 0-9, _ or -".into(),
            });
            continue;
        }
        let migrations = load_service(&service, &service_dir, &mut catalog.problems)?;
        catalog.services.insert(service, migrations);
    }
    Ok(catalog)
}

fn load_service(
    service: &str,
    dir: &Path,
    problems: &mut Vec<FileProblem>,
) -> std::io::Result<Vec<Migration>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let mut out: Vec<Migration> = Vec::new();
    let mut undos: Vec<(Version, PathBuf)> = Vec::new();
    for path in files {
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let problem = |reason: String| FileProblem {
            file: path.display().to_string(),
            reason,
        };
        let (kind, rest) = name.split_at(name.len().min(1));
        let Some((version, description)) = rest.split_once("__") else {
            problems.push(problem(
                "file names must be V<version>__<description>.sql or U<version>__<description>.sql"
                    .into(),
            ));
            continue;
        };
        let Some(version) = Version::parse(version) else {
            problems.push(problem(format!(
                "{version:?} is not a version (dotted numbers, e.g. 1, 1.2, 1.2.0)"
            )));
            continue;
        };
        match kind {
            "V" => {
                let sql = std::fs::read_to_string(&path)?;
                let meta = match parse_meta(&sql) {
                    Ok(m) => m,
                    Err(reasons) => {
                        problems.extend(reasons.into_iter().map(&problem));
                        continue;
                    }
                };
                if let Some(other) = out.iter().find(|m| m.version == version) {
                    problems.push(problem(format!(
                        "version {version} is also used by {}",
                        other.path.display()
                    )));
                    continue;
                }
                out.push(Migration {
                    service: service.to_string(),
                    version,
                    description: description.replace('_', " "),
                    checksum: checksum(&sql),
                    sql,
                    path,
                    meta,
                    undo: None,
                });
            }
            "U" => undos.push((version, path)),
            _ => problems.push(problem(
                "file names must start with V (migration) or U (undo)".into(),
            )),
        }
    }
    for (version, path) in undos {
        match out.iter_mut().find(|m| m.version == version) {
            Some(m) => m.undo = Some(path),
            None => problems.push(FileProblem {
                file: path.display().to_string(),
                reason: format!("undo file for version {version}, which has no V file"),
            }),
        }
    }
    out.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(out)
}

/// Reads the `-- key: value` header.
fn parse_meta(sql: &str) -> Result<Meta, Vec<String>> {
    let mut meta = Meta {
        depends_on: Vec::new(),
        environments: Vec::new(),
        risk: Risk::Low,
        estimated_duration: None,
        transactional: None,
    };
    let mut problems = Vec::new();
    for line in sql.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some(comment) = line.strip_prefix("--") else {
            break;
        };
        let Some((key, value)) = comment.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let list = || -> Vec<String> {
            value
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        match key.trim() {
            "depends_on" => {
                for item in list() {
                    let (service, version) = match item.split_once(':') {
                        Some((s, v)) => (Some(s.trim().to_string()), v.trim()),
                        None => (None, item.as_str()),
                    };
                    match Version::parse(version) {
                        Some(version) => meta.depends_on.push(Dep { service, version }),
                        None => problems.push(format!(
                            "depends_on: {item:?} is not a version or service:version"
                        )),
                    }
                }
            }
            "environments" => meta.environments = list(),
            "risk" => {
                meta.risk = match value {
                    "low" => Risk::Low,
                    "medium" => Risk::Medium,
                    "high" => Risk::High,
                    other => {
                        problems.push(format!("risk: {other:?} is not low, medium or high"));
                        Risk::Low
                    }
                }
            }
            "estimated_duration" => meta.estimated_duration = Some(value.to_string()),
            "transactional" => match value {
                "true" => meta.transactional = Some(true),
                "false" => meta.transactional = Some(false),
                other => problems.push(format!("transactional: {other:?} is not true or false")),
            },
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok(meta)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let v = |s: &str| Version::parse(s).unwrap();
        assert!(v("1.2") < v("1.10"));
        assert_eq!(v("1.2"), v("1.2.0"));
        assert!(v("2") > v("1.99.99"));
        assert!(Version::parse("1..2").is_none());
        assert!(Version::parse("a").is_none());
        assert!(Version::parse("1.").is_none());
    }

    #[test]
    fn checksum_ignores_line_endings_and_trailing_space() {
        assert_eq!(checksum("SELECT 1;\n"), checksum("SELECT 1;  \r\n\r\n"));
        assert_ne!(checksum("SELECT 1;"), checksum("SELECT 2;"));
    }

    #[test]
    fn header_metadata() {
        let m = parse_meta(
            "-- add a column\n-- depends_on: 1.2, billing:3\n-- environments: staging, prod\n\
             -- risk: high\n-- transactional: false\nALTER TABLE t ADD c int;\n-- risk: low\n",
        )
        .unwrap();
        assert_eq!(m.depends_on.len(), 2);
        assert_eq!(m.depends_on[1].service.as_deref(), Some("billing"));
        assert_eq!(m.environments, vec!["staging", "prod"]);
        assert_eq!(m.risk, Risk::High);
        assert_eq!(m.transactional, Some(false));
        let bad = parse_meta("-- risk: extreme\n-- depends_on: x.y\n").unwrap_err();
        assert_eq!(bad.len(), 2, "{bad:?}");
    }
}
