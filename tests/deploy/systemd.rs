//! deploy/regmirror.service: its hardening, `systemd-analyze verify` and `security`, and its
//! ExecStart started and stopped as systemd would.

use std::process::Command;
use std::time::Duration;

use crate::mirror::{assert_serves_v2, Mirror, Mounts};
use crate::{read, repo, run_ok, tool, CONFIG, DATA_DIR};

/// `(key, value)` of the `[Service]` section.
fn unit_service() -> Vec<(String, String)> {
    let text = read("deploy/regmirror.service");
    let mut section = "";
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    out
}

/// ExecStart's arguments, without the program.
fn exec_start() -> Vec<String> {
    let keys = unit_service();
    let exec = &keys
        .iter()
        .find(|(k, _)| k == "ExecStart")
        .expect("ExecStart")
        .1;
    exec.split_whitespace().skip(1).map(str::to_owned).collect()
}

/// `/etc/regmirror/mirror.toml` as the unit's comment says: the repository's mirror.toml.
fn installed(data: &std::path::Path) -> Mounts {
    Mounts::new(vec![
        (CONFIG.into(), repo("mirror.toml")),
        (DATA_DIR.into(), data.to_owned()),
    ])
}

#[test]
fn systemd_unit_is_hardened() {
    let keys = unit_service();
    let values = |key: &str| {
        keys.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "regmirror"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert!(
            values(key).contains(&want),
            "{key}={want} expected, found {:?}",
            values(key)
        );
    }
    let stop: u64 = values("TimeoutStopSec")[0]
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop >= 15,
        "TimeoutStopSec={stop}: the mirror drains for 10 s, then writes its index"
    );
    let start = values("ExecStart")[0]
        .split_whitespace()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(start[..2], ["/usr/local/bin/regmirror", "serve"]);
    assert!(
        start.windows(2).any(|w| w == ["--data-dir", DATA_DIR]),
        "the StateDirectory= is the data dir: {start:?}"
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    // A copy whose ExecStart names a binary that exists here.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("regmirror.service");
    let text = read("deploy/regmirror.service")
        .replace("/usr/local/bin/regmirror", env!("CARGO_BIN_EXE_regmirror"));
    std::fs::write(&unit, text).unwrap();
    let (_, stderr) = run_ok(Command::new(&analyze).arg("verify").arg(&unit));
    // verify exits 0 on an unknown or misspelt key, only warning about it.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("regmirror.service"))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warns:\n{}",
        about_unit.join("\n")
    );
    // Exposure 2.0 ("OK") at most, on systemd's scale of 0 to 10 (the threshold is in tenths).
    run_ok(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(&unit),
    );
}

#[tokio::test]
async fn systemd_exec_start_serves_and_stops_within_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut mirror = Mirror::start(&exec_start(), &installed(dir.path()), &[]);
    assert_serves_v2(&format!("http://{}", mirror.addr), None).await;
    let exit = mirror.terminate(Duration::from_secs(15)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "SIGTERM: {exit:?}; log:\n{}",
        mirror.log()
    );
}

/// `systemctl reload` sends SIGHUP whatever the configuration; without [tls] the mirror must
/// log it and keep serving (SIGHUP's default action would end it).
#[tokio::test]
async fn systemd_reload_without_tls_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut mirror = Mirror::start(&exec_start(), &installed(dir.path()), &[]);
    mirror.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        mirror.is_running(),
        "SIGHUP ended the mirror; log:\n{}",
        mirror.log()
    );
    assert_serves_v2(&format!("http://{}", mirror.addr), None).await;
}
