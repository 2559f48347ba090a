//! Packs the guest's initramfs: `/init`, the other guest binaries under `/bin`, the
//! manifest, the directories the init mounts on, and `/dev/console` (so the kernel can
//! give the init a console before devtmpfs is mounted).

use std::io;

use crate::cpio::Writer;
use crate::guest_config::GuestFile;
use crate::manifest;

/// Directories created in the image (parents first).
const DIRS: &[&str] = &[
    "bin",
    "dev",
    "etc",
    "etc/qemu-harness",
    "proc",
    "sys",
    "tmp",
    "run",
];

/// Whether the image creates the absolute directory `dir` (e.g. `/etc`).
#[must_use]
pub fn creates_dir(dir: &str) -> bool {
    DIRS.contains(&dir.trim_start_matches('/'))
}

/// Packs an uncompressed newc initramfs.
///
/// `init` becomes `/init`; each `(name, bytes)` of `binaries` becomes `/bin/<name>`;
/// `manifest` is written to [`manifest::GUEST_PATH`]; each of `files` to its path.
pub fn pack(
    init: &[u8],
    binaries: &[(&str, &[u8])],
    manifest: &str,
    files: &[GuestFile],
) -> io::Result<Vec<u8>> {
    let mut archive = Writer::new(Vec::new());
    for dir in DIRS {
        archive.dir(dir, 0o755)?;
    }
    archive.char_device("dev/console", 0o600, 5, 1)?;
    archive.file("init", 0o755, init)?;
    for (name, bytes) in binaries {
        archive.file(&format!("bin/{name}"), 0o755, bytes)?;
    }
    let manifest_path = manifest::GUEST_PATH.trim_start_matches('/');
    archive.file(manifest_path, 0o644, manifest.as_bytes())?;
    for file in files {
        archive.file(
            file.path.trim_start_matches('/'),
            0o644,
            file.contents.as_bytes(),
        )?;
    }
    archive.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_dir_is_created_before_the_manifest() {
        let parent = manifest::GUEST_PATH
            .trim_start_matches('/')
            .rsplit_once('/')
            .map(|(dir, _)| dir);
        assert!(parent.is_some_and(|p| DIRS.contains(&p)));
        let file = GuestFile {
            path: "/etc/tool.toml",
            contents: "a = 1\n",
        };
        let bytes = pack(b"init", &[("tool", b"tool")], "plan = \"x\"\n", &[file]).expect("packs");
        let text = String::from_utf8_lossy(&bytes);
        for name in [
            "init",
            "bin/tool",
            "dev/console",
            "etc/qemu-harness/manifest.toml",
            "etc/tool.toml",
        ] {
            assert!(text.contains(&format!("{name}\0")), "{name} missing");
        }
    }
}
