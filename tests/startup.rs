//! Start-up failures that must be clear and clean: io_uring that cannot be
//! set up (locked-memory limit) and bad flags.

use std::process::Command;

fn ringmta() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringmta"))
}

/// glommio refuses to build a reactor under 512 KiB of RLIMIT_MEMLOCK; the
/// server must say what to do about it and exit 1, not panic.
#[test]
fn io_uring_setup_failure_is_explained() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        panic!("prlimit (util-linux) is needed for this test");
    }
    let spool = tempfile::tempdir().unwrap();
    let out = Command::new("prlimit")
        .args(["--memlock=65536:65536", "--"])
        .arg(env!("CARGO_BIN_EXE_ringmta"))
        .args(["--smtp", "127.0.0.1:0", "--shards", "1"])
        .args(["--submission", "none", "--smtps", "none", "--spool-dir"])
        .arg(spool.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("cannot set up io_uring for shard 0"),
        "{stderr}"
    );
    assert!(stderr.contains("RLIMIT_MEMLOCK"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_flags_are_refused() {
    for args in [
        &["--shards", "0"][..],
        &["--max-message-size", "lots"],
        &["--command-timeout", "3 weeks"],
        &["--local-domain", "bad domain"],
        &["--bare-newline", "maybe"],
    ] {
        let spool = tempfile::tempdir().unwrap();
        let out = ringmta()
            .args([
                "--smtp",
                "127.0.0.1:0",
                "--submission",
                "none",
                "--smtps",
                "none",
            ])
            .arg("--spool-dir")
            .arg(spool.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}

#[test]
fn help_explains_every_flag() {
    let out = ringmta().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--smtp",
        "--hostname",
        "--spool-dir",
        "--local-domain",
        "--max-message-size",
        "--max-recipients",
        "--shards",
        "--pin",
        "--io-memory",
        "--command-timeout",
        "--data-timeout",
        "--max-conns-per-ip",
        "--shutdown-grace",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    assert!(help.contains("RINGMTA_SMTP"), "env vars are documented");
}
