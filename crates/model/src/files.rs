//! Private files (keys, pass phrases, an app's state): written whole or not
//! at all, readable by their owner only, and never through a symlink.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

/// Write `contents` to `path`, mode 0600, atomically: readers see the old
/// file or the whole new one. The temporary file has a fresh name and is
/// created exclusively (a planted file or symlink of that name makes the
/// attempt fail rather than be followed), and the rename replaces a symlink
/// at `path` itself instead of writing where it points.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let (tmp, mut file) = create_temporary(path)?;
    let written = (|| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn create_temporary(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{stamp}.{n}.tmp", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n % 1000 != 999 => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Create `dir` and any missing parents with mode 0700: only their owner
/// may list or enter them. A directory that exists already keeps its mode
/// (it may be shared, like `/tmp`).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Make an existing file 0600 (a file some other program created with
/// default modes, such as SQLite's database files). Missing is fine.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_file() => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a regular file",
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let _ = path;
    Ok(())
}

#[cfg(unix)]
fn eloop() -> i32 {
    libc::ELOOP
}

#[cfg(not(unix))]
fn eloop() -> i32 {
    -1
}

/// How strictly [`read_private`] checks a file's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// A file this program wrote (0600): refused if anyone else may read or
    /// write it, or if it is a symlink.
    Own,
    /// A secret an operator mounted (a Kubernetes Secret is 0644 unless its
    /// `defaultMode` says otherwise, and may be a symlink): refused only if
    /// anyone else may write it.
    Mounted,
}

/// Read a private file, checking its mode first (see [`Strictness`]). The
/// error says what is wrong and how to fix it.
pub fn read_private(path: &Path, strictness: Strictness) -> std::io::Result<Vec<u8>> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    if strictness == Strictness::Own {
        // O_NOFOLLOW: a symlink in place of the file is refused.
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
    }
    let mut file = options.open(path).map_err(|e| {
        if cfg!(unix) && e.raw_os_error() == Some(eloop()) {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "is a symlink; refused")
        } else {
            e
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata()?.permissions().mode() & 0o777;
        let loose = match strictness {
            Strictness::Own => 0o077,
            Strictness::Mounted => 0o022,
        };
        if mode & loose != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("mode {mode:04o} lets others read or change it; run chmod 600 on it"),
            ));
        }
    }
    let mut contents = vec![];
    std::io::Read::read_to_end(&mut file, &mut contents)?;
    Ok(contents)
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn private_files_are_0600_whole_and_never_written_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("chipsite-model-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("secret");
        // An existing file with a loose mode ends up 0600.
        std::fs::write(&target, b"old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&target, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A symlink at the path is replaced, not followed.
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, b"untouched").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        write_private(&link, b"private").unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"untouched");
        assert!(!std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&link).unwrap(), b"private");
        // A symlink planted where a predictable temporary name would be is
        // not written through.
        let planted = dir.join("secret2.tmp");
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        write_private(&dir.join("secret2"), b"private").unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"untouched");
        std::fs::remove_file(&planted).unwrap();
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_files_with_loose_modes_or_symlinks_are_refused_on_read() {
        let dir = std::env::temp_dir().join(format!("chipsite-model-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        private_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let secret = dir.join("secret");
        write_private(&secret, b"s3cret").unwrap();
        assert_eq!(read_private(&secret, Strictness::Own).unwrap(), b"s3cret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private(&secret, Strictness::Own).unwrap_err();
        assert!(e.to_string().contains("mode 0644"), "{e}");
        // A mounted secret may be readable by others, never writable.
        assert_eq!(read_private(&secret, Strictness::Mounted).unwrap(), b"s3cret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(read_private(&secret, Strictness::Mounted).is_err());
        // A symlink in place of one of our own files is refused.
        make_private(&secret).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let e = read_private(&link, Strictness::Own).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert!(read_private(&link, Strictness::Mounted).is_ok());
        assert!(make_private(&link).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
