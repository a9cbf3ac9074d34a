//! Scratch files, made with the `tempfile` crate: unique names (no two
//! tests, and no two runs, share one), created with restrictive
//! permissions, and removed on drop even when the test fails.

use std::path::{Path, PathBuf};

use tempfile::{NamedTempFile, TempDir};

/// A scratch directory of the test's own, removed with everything in it on
/// drop. For files whose names matter (error messages that name the file,
/// a PKI's `ca.pem`, a redis-server's `--dir`).
pub struct ScratchDir {
    dir: TempDir,
}

impl ScratchDir {
    /// A new directory named `cachefence-<label>-<random>` in the system's
    /// temporary directory.
    pub fn new(label: &str) -> ScratchDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cachefence-{label}-"))
            .tempdir()
            .expect("creating a scratch directory");
        ScratchDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path of `name` in this directory (whether it exists or not).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The same as a string (tests put paths into TOML and flags).
    pub fn file_str(&self, name: &str) -> String {
        self.file(name).to_str().expect("a UTF-8 temp path").to_string()
    }

    /// Writes `contents` to `name` in this directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.file(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

/// A config file of the test's own (`cachefence-<label>-<random>.toml`),
/// removed on drop; [`ConfigFile::write`] rewrites it (for reloads).
pub struct ConfigFile {
    file: NamedTempFile,
}

impl ConfigFile {
    pub fn new(label: &str, text: &str) -> ConfigFile {
        let file = tempfile::Builder::new()
            .prefix(&format!("cachefence-{label}-"))
            .suffix(".toml")
            .tempfile()
            .expect("creating a test config file");
        let config = ConfigFile { file };
        config.write(text);
        config
    }

    /// Replaces the file's contents with `text`.
    pub fn write(&self, text: &str) {
        std::fs::write(self.file.path(), text).expect("writing the test config");
    }

    /// What the file holds now.
    pub fn read(&self) -> String {
        std::fs::read_to_string(self.file.path()).expect("reading the test config")
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The path as a string, for `--config <path>`.
    pub fn path_str(&self) -> &str {
        self.file.path().to_str().expect("a UTF-8 temp path")
    }
}
