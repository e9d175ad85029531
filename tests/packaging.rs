//! Packaging: the systemd unit in `deploy/` passes `systemd-analyze verify`
//! and keeps its hardening (`systemd-analyze security`), and `cargo deb`
//! builds a package whose contents `dpkg-deb` shows: the binary (which
//! runs), the unit, the example configuration as a conffile (which
//! `--check-config` accepts), the spool directory and the user.
//!
//! The package is made from the debug binary this test run built, stripped
//! (a release build would take minutes): `cargo deb --no-build` with
//! `CARGO_TARGET_DIR` pointing at a directory holding it as
//! `release/ringmta`. Without cargo-deb the package test says so and
//! passes; `.ci/run` installs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::peer_program;

/// How long any one tool here may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` to its end, killed after [`TOOL_TIMEOUT`]; output goes to
/// files so that nothing blocks on a full pipe.
fn run(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

fn ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The unit with its program paths pointing at this build's binary, the
/// only change from `deploy/ringmta.service` (verify checks that what
/// ExecStart names is executable).
fn unit_for_this_build(dir: &Path, unit: &str) -> PathBuf {
    let text = unit.replace("/usr/bin/ringmta", env!("CARGO_BIN_EXE_ringmta"));
    assert_ne!(text, unit, "the unit does not run /usr/bin/ringmta");
    let path = dir.join("ringmta.service");
    std::fs::write(&path, text).unwrap();
    path
}

/// `systemd-analyze verify` prints nothing for a good unit (an unknown
/// option or a bad value is only a warning, so any output fails), and the
/// hardening keeps the exposure score at 2.0 ("OK") or below.
fn check_unit(unit_text: &str) {
    let Some(analyze) = peer_program("systemd-analyze", "systemd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path(), unit_text);
    let out = run(Command::new(&analyze).arg("verify").arg(&unit));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
    let out = run(Command::new(&analyze)
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&unit));
    assert!(
        out.status.success(),
        "exposure above 2.0:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(root().join("deploy/ringmta.service")).unwrap();
    for line in [
        "User=ringmta",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/spool/ringmta",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/bin/ringmta --config /etc/ringmta/ringmta.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line:?} in the unit");
    }
    assert!(unit.lines().any(|l| l.starts_with("LimitMEMLOCK=")));
    check_unit(&unit);
}

/// The check is not vacuous: a unit with a typo fails it.
#[test]
fn systemd_unit_check_rejects_a_bad_unit() {
    let Some(_) = peer_program("systemd-analyze", "systemd") else {
        return;
    };
    let unit = std::fs::read_to_string(root().join("deploy/ringmta.service")).unwrap();
    let bad = unit.replace("ProtectSystem=strict", "ProtectSystem=strictly");
    let result = std::panic::catch_unwind(|| check_unit(&bad));
    assert!(result.is_err(), "a bad ProtectSystem= value passed");
    let weak = unit
        .lines()
        .filter(|l| !l.starts_with("Protect") && !l.starts_with("Private"))
        .collect::<Vec<_>>()
        .join("\n");
    let result = std::panic::catch_unwind(|| check_unit(&weak));
    assert!(
        result.is_err(),
        "a unit without its Protect*/Private* options passed"
    );
}

fn has_cargo_deb(cargo: &str) -> bool {
    Command::new(cargo)
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn deb_package_has_binary_unit_config_and_spool() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !has_cargo_deb(&cargo) {
        eprintln!(
            "SKIPPED: cargo-deb is not installed (`cargo install cargo-deb --locked`; .ci/run does)"
        );
        return;
    }
    let Some(dpkg_deb) = peer_program("dpkg-deb", "dpkg") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    let binary = target.join("release/ringmta");
    std::fs::copy(env!("CARGO_BIN_EXE_ringmta"), &binary).unwrap();
    ok(Command::new("strip").arg(&binary));
    let out_dir = work.path().join("out");
    ok(Command::new(&cargo)
        .current_dir(root())
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "deb",
            "--no-build",
            "--no-strip",
            "--no-separate-debug-symbols",
            "--fast",
            "-o",
        ])
        .arg(&out_dir));
    let deb = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in the output directory");

    let contents = ok(Command::new(&dpkg_deb).arg("--contents").arg(&deb));
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(path))
            .unwrap_or_else(|| panic!("no {path} in the package:\n{contents}"))
            .to_owned()
    };
    let bin = entry("./usr/bin/ringmta");
    assert!(
        bin.starts_with("-rwxr-xr-x 0/0 ") || bin.starts_with("-rwxr-xr-x root/root "),
        "{bin}"
    );
    assert!(entry("./usr/lib/systemd/system/ringmta.service").starts_with("-rw-r--r--"));
    assert!(entry("./etc/ringmta/ringmta.toml").starts_with("-rw-r--r--"));
    entry("./usr/lib/tmpfiles.d/ringmta.conf");

    let control = work.path().join("control");
    ok(Command::new(&dpkg_deb)
        .arg("--control")
        .arg(&deb)
        .arg(&control));
    let read = |name: &str| std::fs::read_to_string(control.join(name)).unwrap_or_default();
    assert_eq!(read("conffiles").trim(), "/etc/ringmta/ringmta.toml");
    let fields = ok(Command::new(&dpkg_deb).arg("--field").arg(&deb));
    assert!(fields.contains("Package: ringmta"), "{fields}");
    assert!(fields.contains("Section: mail"), "{fields}");
    let depends = fields
        .lines()
        .find(|l| l.starts_with("Depends:"))
        .unwrap_or("");
    assert!(depends.contains("adduser"), "{fields}");
    let postinst = read("postinst");
    assert!(
        postinst.contains("adduser --system") && postinst.contains(" ringmta"),
        "postinst does not create the user:\n{postinst}"
    );
    assert!(
        postinst.contains("install -d -o ringmta -g ringmta -m 0750 /var/spool/ringmta"),
        "postinst does not make the spool:\n{postinst}"
    );
    assert!(
        postinst.contains("deb-systemd-helper enable ringmta.service"),
        "postinst does not enable the unit:\n{postinst}"
    );

    // What the package installs is what deploy/ holds, and it works.
    let files = work.path().join("files");
    ok(Command::new(&dpkg_deb)
        .arg("--extract")
        .arg(&deb)
        .arg(&files));
    let unit =
        std::fs::read_to_string(files.join("usr/lib/systemd/system/ringmta.service")).unwrap();
    assert_eq!(
        unit,
        std::fs::read_to_string(root().join("deploy/ringmta.service")).unwrap()
    );
    let tmpfiles = std::fs::read_to_string(files.join("usr/lib/tmpfiles.d/ringmta.conf")).unwrap();
    assert!(
        tmpfiles
            .lines()
            .any(|l| l == "d /var/spool/ringmta 0750 ringmta ringmta -"),
        "{tmpfiles}"
    );
    let installed = files.join("usr/bin/ringmta");
    let version = ok(Command::new(&installed).arg("--version"));
    assert!(version.starts_with("ringmta "), "{version}");
    let checked = ok(Command::new(&installed)
        .arg("--config")
        .arg(files.join("etc/ringmta/ringmta.toml"))
        .arg("--check-config"));
    assert!(
        checked.contains("spool-dir = \"/var/spool/ringmta\""),
        "{checked}"
    );
}
