//! The kubelet's atomic writer for configMap, secret, downwardAPI and projected volumes: the
//! payload goes into a fresh timestamped dir `..<timestamp>`, the `..data` symlink is swapped
//! to it by renaming a temporary symlink over it, and the user-visible names are symlinks
//! `key -> ..data/key`. A reader therefore sees the old or the new content, never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path};

/// The symlink naming the current payload dir.
pub const DATA_DIR: &str = "..data";
const DATA_DIR_TMP: &str = "..data_tmp";

/// One file of a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProjection {
    pub data: Vec<u8>,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
}

/// Relative path → file.
pub type Payload = BTreeMap<String, FileProjection>;

/// What went wrong writing a payload.
#[derive(Debug, thiserror::Error)]
pub enum AtomicError {
    /// A payload path is absolute, contains `..`, or is empty.
    #[error("invalid path {0:?}: must be relative and must not contain '..'")]
    InvalidPath(String),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AtomicError + 'a {
    move |source| AtomicError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Checks a payload path as upstream does: relative, no `..` component, not starting with "..".
pub fn validate_path(path: &str) -> Result<(), AtomicError> {
    let bad = || AtomicError::InvalidPath(path.to_string());
    if path.is_empty() || path.starts_with("..") || Path::new(path).is_absolute() {
        return Err(bad());
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => return Err(bad()),
        }
    }
    Ok(())
}

/// Writes `payload` into `dir` atomically. Returns false (and touches nothing) when the
/// current content already equals the payload.
pub fn write(dir: &Path, payload: &Payload) -> Result<bool, AtomicError> {
    for path in payload.keys() {
        validate_path(path)?;
    }
    let data_link = dir.join(DATA_DIR);
    let old_ts = fs::read_link(&data_link).ok();
    let old_files = match &old_ts {
        Some(ts) => read_payload(&dir.join(ts)).ok(),
        None => None,
    };
    if old_files.as_ref() == Some(payload) {
        return Ok(false);
    }

    let ts_name = format!(
        "..{}.{:08x}",
        jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S"),
        rand::random::<u32>()
    );
    let ts_dir = dir.join(&ts_name);
    fs::create_dir(&ts_dir).map_err(io_err("mkdir", &ts_dir))?;
    set_mode(&ts_dir, 0o755)?;
    for (path, file) in payload {
        let target = ts_dir.join(path);
        if let Some(parent) = target.parent() {
            create_dirs(&ts_dir, parent)?;
        }
        fs::write(&target, &file.data).map_err(io_err("write", &target))?;
        set_mode(&target, file.mode)?;
    }

    let tmp_link = dir.join(DATA_DIR_TMP);
    let _ = fs::remove_file(&tmp_link);
    symlink(&ts_name, &tmp_link).map_err(io_err("symlink", &tmp_link))?;
    fs::rename(&tmp_link, &data_link).map_err(io_err("rename", &data_link))?;

    let new_top: BTreeSet<String> = payload.keys().map(|p| top_component(p)).collect();
    for name in &new_top {
        let visible = dir.join(name);
        if fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new(DATA_DIR).join(name), &visible)
                .map_err(io_err("symlink", &visible))?;
        }
    }
    if let Some(old) = &old_files {
        for name in old.keys().map(|p| top_component(p)) {
            if !new_top.contains(&name) {
                let visible = dir.join(&name);
                let _ = fs::remove_file(&visible);
            }
        }
    }
    // Remove every payload dir but the new one (the old one and leftovers of a crash).
    for entry in fs::read_dir(dir).map_err(io_err("readdir", dir))? {
        let entry = entry.map_err(io_err("readdir", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..")
            && name != DATA_DIR
            && name != ts_name
            && entry.file_type().is_ok_and(|t| t.is_dir())
        {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
        }
    }
    Ok(true)
}

fn top_component(path: &str) -> String {
    Path::new(path)
        .components()
        .find_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

fn set_mode(path: &Path, mode: u32) -> Result<(), AtomicError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn create_dirs(base: &Path, dir: &Path) -> Result<(), AtomicError> {
    if dir == base || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(base, parent)?;
    }
    fs::create_dir(dir).map_err(io_err("mkdir", dir))?;
    set_mode(dir, 0o755)
}

/// Reads the regular files under `dir` back into a payload.
fn read_payload(dir: &Path) -> io::Result<Payload> {
    fn walk(base: &Path, dir: &Path, out: &mut Payload) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = fs::symlink_metadata(entry.path())?;
            if meta.is_dir() {
                walk(base, &entry.path(), out)?;
            } else if meta.is_file() {
                let rel = entry
                    .path()
                    .strip_prefix(base)
                    .map_err(io::Error::other)?
                    .to_string_lossy()
                    .into_owned();
                out.insert(
                    rel,
                    FileProjection {
                        data: fs::read(entry.path())?,
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
            }
        }
        Ok(())
    }
    let mut out = Payload::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &str, mode: u32) -> FileProjection {
        FileProjection {
            data: data.as_bytes().to_vec(),
            mode,
        }
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nodelet-atomic-{:x}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rejects_bad_paths() {
        for p in ["", "/etc/passwd", "..", "../x", "a/../../x", "..foo"] {
            assert!(validate_path(p).is_err(), "{p}");
        }
        for p in ["a", "a/b", "a.b/c", "x..y"] {
            assert!(validate_path(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn writes_swaps_and_cleans_up() {
        let dir = tempdir();
        let mut payload = Payload::from([
            ("a".to_string(), file("1", 0o644)),
            ("sub/b".to_string(), file("2", 0o600)),
        ]);
        assert!(write(&dir, &payload).unwrap());
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
        assert_eq!(fs::read_link(dir.join("a")).unwrap(), Path::new("..data/a"));
        let first = fs::read_link(dir.join(DATA_DIR)).unwrap();
        let mode = fs::metadata(dir.join("sub/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Unchanged payload: nothing happens.
        assert!(!write(&dir, &payload).unwrap());
        assert_eq!(fs::read_link(dir.join(DATA_DIR)).unwrap(), first);

        // A changed payload: new dir, old names removed, old dir removed.
        payload.remove("sub/b");
        payload.insert("a".into(), file("3", 0o644));
        payload.insert("c".into(), file("4", 0o644));
        assert!(write(&dir, &payload).unwrap());
        let second = fs::read_link(dir.join(DATA_DIR)).unwrap();
        assert_ne!(first, second);
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "3");
        assert_eq!(fs::read_to_string(dir.join("c")).unwrap(), "4");
        assert!(fs::symlink_metadata(dir.join("sub")).is_err());
        assert!(!dir.join(&first).exists());
        let entries: BTreeSet<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let expected: BTreeSet<String> = ["..data", "a", "c", second.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(entries, expected);

        // A mode change alone is a change.
        payload.insert("c".into(), file("4", 0o400));
        assert!(write(&dir, &payload).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_payload_is_an_empty_volume() {
        let dir = tempdir();
        assert!(write(&dir, &Payload::new()).unwrap());
        assert!(dir.join(DATA_DIR).is_dir());
        assert!(!write(&dir, &Payload::new()).unwrap());
        assert!(write(&dir, &Payload::from([("..x".to_string(), file("", 0o644))])).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
