//! Which files a `Text` source names: its paths and globs, less its `exclude` entries, less
//! what git and ripgrep would skip.
//!
//! A glob is split at its first component with a wildcard: the literal part before it is the
//! directory the walk starts from, the rest is matched against paths below it. Starting
//! there keeps a walk small (`src/*.rs` reads one directory) and follows ripgrep's rule for
//! explicitly given directories: the start itself is never skipped, so a glob that names an
//! ignored or hidden directory outright (`data/**/*.txt` with `data/` in `.gitignore`) still
//! reads it, while `**/*.txt` does not. The walk is ripgrep's own (the `ignore` crate):
//! `.gitignore` inside a git repository, `.ignore`, `.git/info/exclude` and git's global
//! excludes file, read from the start directory's parents too.
//!
//! Paths are made canonical, so a file named by two entries (`../src/a.rs` and `src/*.rs`)
//! is recognised as one. The order of files is a pure function of the entries and the file
//! tree: entries in order, each glob's files sorted by path.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};

use super::error::DataError;

/// Whether a `paths` or `exclude` entry is a glob rather than a plain path.
pub(crate) fn is_glob(entry: &str) -> bool {
    entry.contains(['*', '?', '[', '{'])
}

/// Whether `entry` is a well-formed glob (a plain path always is); the parser's message if
/// not. For checking a config before any file is read.
pub fn check_glob(entry: &str) -> Result<(), String> {
    match split(entry) {
        (_, Some(rest)) => compile(&rest).map(drop),
        (_, None) => Ok(()),
    }
}

/// The files `paths` names less those `exclude` names, with the globs that matched none.
#[derive(Debug, Default)]
pub(crate) struct Selected {
    /// Canonical paths, in order, each once.
    pub(crate) files: Vec<PathBuf>,
    /// Globs that matched no file, as written (relative entries joined to the base).
    pub(crate) unmatched: Vec<String>,
}

/// Select the files of one `Text` source. Relative entries start at `base_dir`; `gitignore`
/// is `data.gitignore`.
pub(crate) fn text_files(
    paths: &[String],
    exclude: &[String],
    base_dir: &Path,
    gitignore: bool,
) -> Result<Selected, DataError> {
    let excludes = Arc::new(Excludes::new(exclude, base_dir)?);
    let mut selected = Selected::default();
    let mut seen = HashSet::new();
    for entry in paths {
        let files = if is_glob(entry) {
            let glob = Glob::new(entry, base_dir)?;
            let files = glob.files(gitignore, &excludes)?;
            if files.is_empty() {
                selected.unmatched.push(glob.shown);
            }
            files
        } else {
            let path = base_dir.join(entry);
            if !path.is_file() {
                return Err(DataError::MissingFile { path });
            }
            let path = fs::canonicalize(&path).map_err(|e| DataError::io(&path, e))?;
            if excludes.excludes(&path) {
                tracing::debug!(
                    "{}: named in `paths` and in `exclude`: left out",
                    path.display()
                );
                Vec::new()
            } else {
                vec![path]
            }
        };
        for path in files {
            if seen.insert(path.clone()) {
                selected.files.push(path);
            }
        }
    }
    Ok(selected)
}

/// Split an entry into its literal leading components and, when it is a glob, the pattern
/// from the first component with a wildcard on (`/` separated).
fn split(entry: &str) -> (PathBuf, Option<String>) {
    let mut literal = PathBuf::new();
    let mut rest: Vec<String> = Vec::new();
    for component in Path::new(entry).components() {
        let text = component.as_os_str().to_string_lossy();
        let wild =
            matches!(component, Component::Normal(_)) && (is_glob(&text) || text.contains('\\'));
        if rest.is_empty() && !wild {
            literal.push(component);
        } else {
            rest.push(text.into_owned());
        }
    }
    let rest = (!rest.is_empty()).then(|| rest.join("/"));
    (literal, rest)
}

/// A glob as the matcher sees it: `*` stays within a directory, `**` crosses them.
fn compile(pattern: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| e.kind().to_string())
}

/// One glob of `paths`, ready to walk.
struct Glob {
    /// The entry as the user reads it, for messages.
    shown: String,
    /// Where the walk starts: the literal leading directories.
    root: PathBuf,
    /// The rest of the pattern, matched against paths relative to `root`.
    matcher: GlobMatcher,
    /// How deep the pattern can reach below `root`; `None` with `**`.
    depth: Option<usize>,
    /// The pattern itself names hidden entries (a component starting with `.`).
    names_hidden: bool,
}

impl Glob {
    fn new(entry: &str, base_dir: &Path) -> Result<Glob, DataError> {
        let shown = base_dir.join(entry).display().to_string();
        let (literal, rest) = split(entry);
        let rest = rest.unwrap_or_default();
        let matcher = compile(&rest).map_err(|message| DataError::BadGlob {
            pattern: shown.clone(),
            message,
        })?;
        let components: Vec<&str> = rest.split('/').collect();
        Ok(Glob {
            shown,
            root: base_dir.join(literal),
            matcher,
            depth: (!components.iter().any(|c| c.contains("**"))).then_some(components.len()),
            names_hidden: components.iter().any(|c| c.starts_with('.')),
        })
    }

    /// The files the glob matches, sorted; empty when its directory does not exist.
    fn files(&self, gitignore: bool, excludes: &Arc<Excludes>) -> Result<Vec<PathBuf>, DataError> {
        let root = match fs::canonicalize(&self.root) {
            Ok(root) if root.is_dir() => root,
            Ok(_) => return Ok(Vec::new()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DataError::io(&self.root, e)),
        };
        let mut walk = ignore::WalkBuilder::new(&root);
        let excludes = Arc::clone(excludes);
        walk.standard_filters(gitignore)
            .hidden(!self.names_hidden)
            .require_git(true)
            .follow_links(false)
            .max_depth(self.depth)
            .filter_entry(move |entry| !excludes.excludes(entry.path()));
        let mut files = Vec::new();
        for entry in walk.build() {
            let entry = match entry {
                Ok(entry) => entry,
                // An unreadable directory is reported and passed over, as ripgrep does.
                Err(e) => {
                    tracing::warn!("{}: {e}", self.shown);
                    continue;
                }
            };
            if let Some(e) = entry.error() {
                // A bad line in an ignore file: that line is disregarded.
                tracing::warn!("{e}");
            }
            let is_file = match entry.file_type() {
                Some(t) if t.is_file() => true,
                // A link to a file is read; a link to a directory is not followed.
                Some(t) if t.is_symlink() => entry.path().is_file(),
                _ => false,
            };
            if !is_file {
                continue;
            }
            let matched = entry
                .path()
                .strip_prefix(&root)
                .is_ok_and(|rel| self.matcher.is_match(rel));
            if matched {
                files.push(entry.into_path());
            }
        }
        files.sort();
        Ok(files)
    }
}

/// The `exclude` entries of a source.
#[derive(Debug)]
struct Excludes(Vec<Exclude>);

/// One `exclude` entry: a directory or file, and below it an optional pattern.
#[derive(Debug)]
struct Exclude {
    /// The literal leading part, canonical when it exists.
    prefix: PathBuf,
    /// The rest of a glob; `None` for a plain path, which excludes itself and what is in it.
    matcher: Option<GlobMatcher>,
}

impl Excludes {
    fn new(entries: &[String], base_dir: &Path) -> Result<Excludes, DataError> {
        let mut excludes = Vec::with_capacity(entries.len());
        for entry in entries {
            let (literal, rest) = split(entry);
            let matcher = match rest {
                Some(rest) => Some(compile(&rest).map_err(|message| DataError::BadGlob {
                    pattern: base_dir.join(entry).display().to_string(),
                    message,
                })?),
                None => None,
            };
            let prefix = base_dir.join(literal);
            // A prefix that does not exist excludes nothing; it is kept only to match nothing.
            let prefix = fs::canonicalize(&prefix).unwrap_or(prefix);
            excludes.push(Exclude { prefix, matcher });
        }
        Ok(Excludes(excludes))
    }

    /// Whether `path` (canonical) is excluded: it, or a directory it is in, matches an entry.
    fn excludes(&self, path: &Path) -> bool {
        self.0.iter().any(|exclude| {
            let Ok(rel) = path.strip_prefix(&exclude.prefix) else {
                return false;
            };
            match &exclude.matcher {
                None => true,
                Some(matcher) => rel
                    .ancestors()
                    .filter(|a| !a.as_os_str().is_empty())
                    .any(|a| matcher.is_match(a)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_split_at_their_first_wildcard() {
        let check = |entry: &str, literal: &str, rest: Option<&str>| {
            assert_eq!(
                split(entry),
                (PathBuf::from(literal), rest.map(str::to_owned)),
                "{entry}"
            );
        };
        check("src/**/*.rs", "src", Some("**/*.rs"));
        check("/abs/../x/*.rs", "/abs/../x", Some("*.rs"));
        check("*.{rs,py}", "", Some("*.{rs,py}"));
        check("a/b[0-9]/c", "a", Some("b[0-9]/c"));
        check("a/b.rs", "a/b.rs", None);
        check("./a//b/*", "./a/b", Some("*"));
    }

    #[test]
    fn glob_syntax_is_checked() {
        assert_eq!(check_glob("src/**/*.rs"), Ok(()));
        assert_eq!(check_glob("plain/path.rs"), Ok(()));
        assert!(check_glob("src/[a.rs").is_err());
        assert!(check_glob("src/{a,b.rs").is_err());
    }
}
