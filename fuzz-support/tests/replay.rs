//! Replays every input kept in `fuzz/regressions/<target>/` (minimised crashes, kept
//! forever, and a few seeds) through the target's function, on stable Rust.

use std::path::{Path, PathBuf};

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_kept_input_passes_its_target() {
    let root = regressions();
    for (name, target) in telemetry_fuzz::TARGETS {
        let inputs = files(&root.join(name));
        assert!(!inputs.is_empty(), "no inputs kept for {name}");
        for path in inputs {
            let data = std::fs::read(&path).expect("readable");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} fails on {}", path.display());
        }
    }
}

#[test]
fn every_regressions_folder_names_a_target() {
    for entry in std::fs::read_dir(regressions()).expect("fuzz/regressions exists") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            telemetry_fuzz::TARGETS.iter().any(|(n, _)| *n == name),
            "{} is not a fuzz target's folder",
            path.display()
        );
    }
}
