pub use cairn_format::testdata::noise;
use std::path::Path;
use std::process::{Command, Output};

pub fn cairn() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.env_remove("CAIRN_LOG");
    c
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(args: &[&str]) -> Run {
    let out: Output = cairn().args(args).output().expect("cairn runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs and expects success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let r = run(args);
    assert_eq!(
        r.code, 0,
        "cairn {args:?} failed:\n{}\n{}",
        r.stdout, r.stderr
    );
    r.stdout
}

pub fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("valid JSON")
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A sparse image with some data regions.
pub fn make_image(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    let n = data.len();
    for (i, region) in [(0usize, n / 8), (n / 2, n / 16), (n - n / 32, n / 32)]
        .iter()
        .enumerate()
    {
        let bytes = noise(seed + i as u64, region.1);
        data[region.0..region.0 + region.1].copy_from_slice(&bytes);
    }
    std::fs::write(path, &data).unwrap();
    data
}
