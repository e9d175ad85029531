//! Helpers shared by the integration tests: running the built
//! `ringmta-loadgen` binary and reading its `--json` report.

#![allow(dead_code)] // each test binary uses a different subset

use serde_json::Value;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub const LOADGEN: &str = env!("CARGO_BIN_EXE_ringmta-loadgen");

/// A finished loadgen run.
pub struct Run {
    pub output: Output,
    /// The `--json` report; `Value::Null` when none was written.
    pub json: Value,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// `json[a][b]...` as an integer, panicking with context if absent.
    pub fn num(&self, path: &[&str]) -> u64 {
        let mut v = &self.json;
        for key in path {
            v = &v[*key];
        }
        v.as_u64().unwrap_or_else(|| {
            panic!(
                "no integer at {path:?} in the JSON report; stdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            )
        })
    }
}

/// Runs loadgen with `args` plus `--json <tmp>` and `--quiet`.
pub fn loadgen(args: &[&str]) -> Run {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let json_path: PathBuf = std::env::temp_dir().join(format!(
        "loadgen-test-{}-{}.json",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&json_path);
    let output = Command::new(LOADGEN)
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .arg("--quiet")
        .env_remove("LOADGEN_TARGET")
        .env_remove("LOADGEN_AUTH")
        .output()
        .expect("running ringmta-loadgen");
    let json = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&json_path);
    Run { output, json }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener.local_addr().expect("local address").port()
}
