//! A tmpfs mounted for the length of a test (the full-disk tests; root only).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the length of a test, unmounted when dropped (even on panic).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`: "8m", or bytes) on `dir`, created if
    /// missing; fails the test with a clear message when not root.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let euid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
            })
            .unwrap_or_else(|| "unknown".into());
        assert_eq!(
            euid, "0",
            "the full-disk tests mount a tmpfs and need root; run them as root, as \
             scripts/test.sh does"
        );
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    /// The filesystem's size and the bytes still free.
    pub fn space(&self) -> (u64, u64) {
        let st = rustix::fs::statvfs(&self.0).expect("statvfs");
        (st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let clean = Command::new("umount").arg(&self.0).status();
        if !clean.is_ok_and(|s| s.success()) {
            // Still busy (a panicking test left the mirror's files open): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}
