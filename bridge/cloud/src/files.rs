//! Files that hold secrets (the admin token, private keys) and the directories they live
//! in, written so that someone who can write to the directory cannot redirect or read
//! them:
//!
//! - a secret goes to a fresh temporary file beside its target, with a random name,
//!   opened with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode 0600 (a symlink or file planted
//!   at any name makes the open fail, it is never followed), is synced, and is renamed
//!   over the target (`rename(2)` replaces a symlink at the target, it does not follow
//!   it);
//! - a data directory is created with mode 0700, or set to it if it exists;
//! - [`private_umask`] makes everything else a process creates (databases, logs)
//!   readable by its owner only.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a file holding a secret.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of a data directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Sets the process umask to 0o077: files and directories the process creates from now
/// on are its owner's only. Call first thing in `main` of a service that keeps secrets.
pub fn private_umask() {
    // SAFETY: umask(2) only changes the process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (and missing parents, with mode 0700) or, if it exists, sets its mode
/// to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    if meta.permissions().mode() & 0o7777 != PRIVATE_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    }
    Ok(())
}

/// A temporary file beside `path` that nobody could have guessed, created (never
/// opened: `O_EXCL`, `O_NOFOLLOW`) with `mode`.
fn fresh_temp(path: &Path, mode: u32) -> io::Result<(PathBuf, fs::File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy();
    let mut last = None;
    for _ in 0..8 {
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => {
                // The mode regardless of the umask.
                f.set_permissions(fs::Permissions::from_mode(mode))?;
                return Ok((tmp, f));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary file")))
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Writes `contents` to a fresh temporary file beside `path`, then either renames it
/// over `path` (`replace`) or links it to `path`, failing if `path` exists.
fn write_via_temp(path: &Path, contents: &[u8], mode: u32, replace: bool) -> io::Result<()> {
    let (tmp, mut f) = fresh_temp(path, mode)?;
    let result = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            if replace {
                fs::rename(&tmp, path)
            } else {
                // link(2) fails if `path` exists, even as a dangling symlink.
                fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp))
            }
        });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(path);
    Ok(())
}

/// Replaces `path` with a file of mode 0600 holding `contents`, atomically (readers see
/// the old file or the new one) and without following any symlink.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_via_temp(path, contents, PRIVATE_FILE_MODE, true)
}

/// Creates `path` with mode 0600 holding `contents`; fails with `AlreadyExists` if
/// anything (a file, a symlink) is there. The file appears whole or not at all.
pub fn create_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_via_temp(path, contents, PRIVATE_FILE_MODE, false)
}

/// [`write_private`] with another mode (a certificate: 0644).
pub fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(path, contents, mode, true)
}

/// [`create_private`] with another mode.
pub fn create_with_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(path, contents, mode, false)
}

/// Reads a secret file, refusing to follow a symlink at `path` (`ELOOP`).
pub fn read_private(path: &Path) -> io::Result<String> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dir(PathBuf);
    impl Dir {
        fn new(label: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "imn-files-{label}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// Symlinks planted at the old fixed temporary path (`admin-token.tmp`), at the
    /// other predictable names (`.admin-token.tmp`, `.admin-token.tmp-PID`) and at the
    /// target itself are not followed: the files they point to stay untouched, and the
    /// secret ends up in a regular file of mode 0600.
    #[test]
    fn a_planted_symlink_is_never_followed() {
        let d = Dir::new("symlink");
        let data = d.0.join("data");
        fs::create_dir(&data).unwrap();
        let outside = d.0.join("outside");
        fs::create_dir(&outside).unwrap();
        let target = data.join("admin-token");
        let planted = [
            target.with_extension("tmp"),
            data.join(".admin-token.tmp"),
            data.join(format!(".admin-token.tmp-{}", std::process::id())),
        ];
        let mut victims = Vec::new();
        for (i, p) in planted.iter().enumerate() {
            let victim = outside.join(format!("victim-{i}"));
            fs::write(&victim, "untouched").unwrap();
            fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
            symlink(&victim, p).unwrap();
            victims.push(victim);
        }
        // A dangling one too: following it would create a file outside.
        let dangling = outside.join("created-through-a-symlink");
        symlink(&dangling, data.join("admin-token.tmp.new")).unwrap();
        // And the target itself.
        let victim = outside.join("victim-target");
        fs::write(&victim, "untouched").unwrap();
        symlink(&victim, &target).unwrap();
        victims.push(victim);

        write_private(&target, b"imnt_secret\n").unwrap();
        write_private(&target, b"imnt_second\n").unwrap();

        for v in &victims {
            assert_eq!(
                fs::read_to_string(v).unwrap(),
                "untouched",
                "{}",
                v.display()
            );
        }
        assert!(!dangling.exists());
        let meta = fs::symlink_metadata(&target).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the target is a regular file now"
        );
        assert_eq!(mode(&target), 0o600);
        assert_eq!(fs::read_to_string(&target).unwrap(), "imnt_second\n");
        // The planted links are still links, and no temporary file is left.
        for p in &planted {
            assert!(fs::symlink_metadata(p).unwrap().file_type().is_symlink());
        }
        let left: Vec<_> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && n.starts_with(".admin-token."))
            .filter(|n| n != ".admin-token.tmp")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // Reading refuses a symlink.
        assert!(read_private(&planted[0]).is_err());
        assert_eq!(read_private(&target).unwrap(), "imnt_second\n");
    }

    #[test]
    fn create_private_never_replaces_and_never_follows() {
        let d = Dir::new("create");
        let key = d.0.join("ca.key");
        let victim = d.0.join("victim");
        symlink(&victim, &key).unwrap();
        let e = create_private(&key, b"k").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(!victim.exists(), "the dangling symlink was followed");
        fs::remove_file(&key).unwrap();
        create_private(&key, b"k").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(
            create_private(&key, b"other").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read(&key).unwrap(), b"k");
        let names: Vec<_> = fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["ca.key"], "no temporary file left");
    }

    #[test]
    fn data_directories_are_0700() {
        let d = Dir::new("dir");
        let new = d.0.join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        let old = d.0.join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
        fs::write(d.0.join("file"), "x").unwrap();
        assert!(private_dir(&d.0.join("file")).is_err());
    }
}
