//! The files in `deploy/`, checked as far as a machine without a Docker engine, without systemd
//! as PID 1 and without a Kubernetes cluster allows. Each file parses and agrees with the others
//! on ports, paths, user and names; the image's entrypoint, the compose service, the Kubernetes
//! pod and the systemd unit each start the real binary with their own command line and
//! configuration, container paths mapped to temp dirs, and it answers `/v2/` and stops cleanly
//! on SIGTERM. Tools that work offline judge the rest: `systemd-analyze verify` and `security`,
//! hadolint, `docker-compose config`, kubernetes-validate (its package ships the Kubernetes
//! schemas) and `kubectl kustomize`. A missing tool skips its check with a note on stderr;
//! scripts/test.sh installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod clients;
mod compose;
mod docker;
mod kubernetes;
mod mirror;
mod systemd;

use std::path::{Path, PathBuf};
use std::process::Command;

use regmirror::config::{self, Config, Flags};
use serde::Deserialize as _;
use serde_json::Value;

const DATA_DIR: &str = "/var/lib/regmirror";
const CONFIG: &str = "/etc/regmirror/mirror.toml";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every document of a YAML file, as JSON values.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one YAML document expected");
    docs.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

fn u64_at(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no list at {pointer} in {v}"))
}

/// `name` on PATH, or `None` after a note that its check is skipped.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "deploy: `{name}` is not installed, its check is skipped (scripts/test.sh installs it)"
        );
    }
    found
}

/// Runs `cmd` and asserts that it succeeded; returns its stdout and stderr.
fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// `config::load` on `text` written to a file, with `env` as the environment.
fn load_config(text: &str, env: &[(String, String)]) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.toml");
    std::fs::write(&path, text).unwrap();
    config::load(Some(&path), env.to_vec(), &Flags::default())
        .unwrap_or_else(|e| panic!("the configuration does not load: {e}\n{text}"))
}
