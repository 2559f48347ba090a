//! OTLP test support: a Python virtual environment (cached under `target/`) holding
//! the `rotel` collector and the official `opentelemetry-proto` package, both from
//! PyPI; a rotel process; the decoding receiver (`receiver.py`); and reading back what
//! the receiver decoded.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The PyPI packages the tests install, pinned.
pub const PACKAGES: [&str; 2] = ["rotel==0.0.1a15", "opentelemetry-proto==1.45.2"];

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The venv's python, creating the venv and installing [`PACKAGES`] on first use
/// (under a file lock: tests run in parallel processes).
pub fn python() -> PathBuf {
    let dir = target_dir();
    std::fs::create_dir_all(&dir).expect("create target/");
    let venv = dir.join("otlp-venv");
    let lock = std::fs::File::create(dir.join("otlp-venv.lock")).expect("create the venv lock");
    rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive)
        .expect("lock the venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(format!("ready-{}", PACKAGES.join("-")));
    if !stamp.exists() {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "creating the test venv (python3 -m venv)",
        );
        run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(PACKAGES),
            "pip install of the OTLP test packages",
        );
        std::fs::write(&stamp, b"").expect("mark the venv ready");
    }
    python
}

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running rotel collector (OTLP/HTTP in, a blackhole exporter out).
pub struct Rotel {
    child: Child,
    /// Its OTLP/HTTP port.
    pub port: u16,
}

impl Rotel {
    /// Starts the `rotel-agent` binary the `rotel` package ships.
    pub fn start(python: &Path, dir: &Path) -> Self {
        let out = Command::new(python)
            .args([
                "-c",
                "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
            ])
            .output()
            .expect("ask python where rotel is");
        let agent = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            Path::new(&agent).exists(),
            "rotel-agent not found ({agent:?})"
        );
        let (port, grpc) = (free_port(), free_port());
        let child = Command::new(&agent)
            .arg("start")
            .arg("--otlp-http-endpoint")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--otlp-grpc-endpoint")
            .arg(format!("127.0.0.1:{grpc}"))
            .args(["--exporter", "blackhole", "--pid-file"])
            .arg(dir.join("rotel.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("rotel.log")).expect("rotel log"))
            .spawn()
            .expect("start rotel");
        wait_listening(port, "rotel");
        Self { child, port }
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The decoding receiver (`receiver.py`).
pub struct Receiver {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its port.
    pub port: u16,
    /// Where it writes one JSON object per request.
    pub out: PathBuf,
}

impl Receiver {
    /// Starts the receiver; `forward`: a collector to pass every body to; `fail`:
    /// requests to answer 503 with `Retry-After: retry_after` first.
    pub fn start(
        python: &Path,
        dir: &Path,
        forward: Option<u16>,
        fail: u32,
        retry_after: u32,
    ) -> Self {
        let out = dir.join("received.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_support/receiver.py");
        let mut cmd = Command::new(python);
        cmd.arg(script)
            .arg("--out")
            .arg(&out)
            .args(["--fail", &fail.to_string()])
            .args(["--retry-after", &retry_after.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(port) = forward {
            cmd.args(["--forward", &format!("http://127.0.0.1:{port}")]);
        }
        let mut child = cmd.spawn().expect("start receiver.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the receiver's port");
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver.py said {line:?}, expected `listening <port>`"));
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            port,
            out,
        }
    }

    /// The endpoint to give metricsd.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request decoded so far, oldest first.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line from receiver.py"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
