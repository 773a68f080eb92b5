//! The monitoring files in `deploy/` against a real mirror: `promtool check rules` passes on
//! `deploy/prometheus/alerts.yml` and `promtool test rules` on its unit tests
//! (`alerts_test.yml`, synthetic series); every metric name its rules and the Grafana dashboard
//! (`deploy/grafana/regmirror.json`) use is in the mirror's `/metrics` (so a renamed metric
//! fails here); and Debian's `prometheus`, scraping a mirror in front of the fake upstream with
//! those rules, has `RegmirrorUpstreamDown` pending or firing while the upstream is stopped and
//! clients make the mirror ask it, and drops it once the upstream is back.
//!
//! The rules' `for:` durations are minutes, as production wants; Prometheus here loads a copy
//! with every `for:` rewritten to 1 s ([`fast_rules`]), everything else unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::front::Front;
use common::observe::RatelimitProxy;
use common::{random_bytes, start_mirror, FakeUpstream};
use serde::Deserialize as _;
use serde_json::Value;

const RULES: &str = "deploy/prometheus/alerts.yml";
/// promtool's unit tests of the rules on synthetic series.
const RULE_TESTS: &str = "deploy/prometheus/alerts_test.yml";
const DASHBOARD: &str = "deploy/grafana/regmirror.json";
const REPO: &str = "team/app";

/// Names from the warm-up branch (scheduled warm-up), which the rules and the dashboard use:
/// they exist in `/metrics` only once that branch is merged.
const WARM_UP: [&str; 3] = [
    "regmirror_warm_runs_total",
    "regmirror_warm_last_success_timestamp_seconds",
    "regmirror_warm_fetched_bytes_total",
];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn tool(name: &str) -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed (Debian's prometheus package; scripts/test.sh installs it)"
        )
    })
}

/// Every rule's `expr` in the rule file, with its alert name.
fn rule_exprs(text: &str) -> Vec<(String, String)> {
    let doc = Value::deserialize(serde_norway::Deserializer::from_str(text)).expect("rules YAML");
    let mut out = Vec::new();
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("expr");
            out.push((name.to_owned(), expr.to_owned()));
        }
    }
    out
}

/// Every PromQL query of the dashboard: its panels' targets and its variables' queries.
fn dashboard_queries(dash: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("target expr").to_owned());
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// The metric names a PromQL expression names: identifiers outside label matchers and
/// strings that start with `regmirror_`, and Prometheus' own `up`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let (mut depth, mut quoted) = (0usize, false);
    let mut word = String::new();
    let mut flush = |word: &mut String, in_labels: bool| {
        if !in_labels && (word.starts_with("regmirror_") || word == "up") {
            names.insert(word.clone());
        }
        word.clear();
    };
    for c in expr.chars() {
        if quoted {
            quoted = c != '"';
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        flush(&mut word, depth > 0);
        match c {
            '"' => quoted = true,
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    flush(&mut word, depth > 0);
    names
}

/// The sample names an exposition offers: every sample's, and for each `# TYPE` line those
/// of its type (a labelled family with no sample yet has only its TYPE line).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The rule file with every `for:` shortened to 1 s.
fn fast_rules(text: &str) -> String {
    text.lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}for: 1s")
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `promtool check rules` on the rules and on the copy with short `for:`; `promtool test
/// rules` on their unit tests (upstream down and back, pull budget, disk and cache, a
/// verification failure, a failing warm-up).
#[test]
fn promtool_passes_the_rules_and_their_fast_copy() {
    let promtool = tool("promtool");
    let dir = tempfile::tempdir().unwrap();
    let fast = dir.path().join("alerts.yml");
    std::fs::write(&fast, fast_rules(&read(RULES))).unwrap();
    for file in [repo(RULES), fast] {
        let out = Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool check rules {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo(RULE_TESTS))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool test rules {RULE_TESTS}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = read(RULES);
    let fors = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.trim_start().starts_with("for:"))
            .map(|l| l.trim().to_owned())
            .collect()
    };
    let (slow, fast) = (fors(&rules), fors(&fast_rules(&rules)));
    assert!(slow.len() >= 10, "{slow:?}");
    assert!(
        slow.iter().all(|f| f != "for: 1s"),
        "production durations: {slow:?}"
    );
    assert_eq!(fast, vec!["for: 1s"; slow.len()], "every for: rewritten");
}

#[test]
fn names_are_parsed_out_of_promql() {
    let names = metric_names(
        r#"sum by (le) (rate(regmirror_a_bucket{instance=~"$instance",x="regmirror_no"}[5m])) / on(instance) regmirror_b > 0 and up{job="regmirror"} == 0"#,
    );
    let want: BTreeSet<String> = ["regmirror_a_bucket", "regmirror_b", "up"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(names, want);
    let exposed = exposed_names(
        "# TYPE regmirror_c counter\n# TYPE regmirror_h histogram\nregmirror_g{a=\"1\"} 2\n# EOF\n",
    );
    for n in ["regmirror_c_total", "regmirror_h_bucket", "regmirror_g"] {
        assert!(exposed.contains(n), "{n} in {exposed:?}");
    }
}

/// A self-signed certificate for 127.0.0.1 in `dir`: (certificate, key).
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("mirror.crt"), dir.join("mirror.key"));
    let out = Command::new(tool("openssl"))
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// Every metric the rules and the dashboard name is exposed by a mirror that has seen each
/// thing they watch at least once: TLS, a pull through an upstream that reports
/// `ratelimit-remaining`, an upstream that stopped answering (prometheus-client writes a
/// labelled family only once it has a series). The warm-up's three names come with the
/// warm-up branch: until it is merged, this fails naming exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_use_is_exposed() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "v1", vec![random_bytes(10_000, 1)]);
    let proxy = RatelimitProxy::start(&fake.url()).await;
    proxy.set_remaining(Some("99;w=21600"));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let ops = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (c, k) = (cert.clone(), key.clone());
    let m = Front::start(&proxy.url(), move |config| {
        config.upstream.timeout = Duration::from_secs(1);
        config.tls.cert = Some(c);
        config.tls.key = Some(k);
        config.metrics.listen = Some(ops);
        // The warm-up's families appear once it has run.
        config.warm = vec![regmirror::config::WarmConfig {
            images: vec![format!("{REPO}:v1")],
            file: None,
            every: Duration::from_secs(3600),
            platforms: Vec::new(),
        }];
    })
    .await;
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    for path in [
        format!("/v2/{REPO}/manifests/v1"),
        format!("/v2/{REPO}/blobs/{}", img.layer_digests[0]),
    ] {
        let r = client.get(m.https(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().await.unwrap();
    }
    // An upstream that does not answer (through the proxy, a stopped fake would be a 502).
    fake.set(|f| f.hang = Some("/manifests/v2".into()));
    let r = client
        .get(m.https(&format!("/v2/{REPO}/manifests/v2")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = reqwest::get(format!("http://{ops}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("regmirror_warm_last_success_timestamp_seconds{")
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let exposed = exposed_names(&text);

    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for (alert, expr) in rule_exprs(&read(RULES)) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{alert} names no metric: {expr}");
        used.extend(names.into_iter().map(|n| (n, format!("rule {alert}"))));
    }
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    let queries = dashboard_queries(&dash);
    assert!(queries.len() > 20, "{} queries", queries.len());
    for q in queries {
        let names = metric_names(&q);
        assert!(!names.is_empty(), "a dashboard query names no metric: {q}");
        used.extend(names.into_iter().map(|n| (n, "the dashboard".to_owned())));
    }
    for warm in WARM_UP {
        assert!(
            used.iter().any(|(n, _)| n == warm),
            "{warm} is not used by the rules or the dashboard"
        );
    }
    let missing: Vec<String> = used
        .iter()
        .filter(|(n, _)| n != "up" && !exposed.contains(n))
        .map(|(n, by)| format!("{n} (used by {by})"))
        .collect();
    assert!(
        missing.is_empty(),
        "not in the mirror's /metrics:\n  {}\n(the regmirror_warm_* names come with the warm-up \
         branch)\n{text}",
        missing.join("\n  ")
    );
}

/// The dashboard is a Grafana JSON model with a Prometheus data source variable that every
/// panel and target uses.
#[test]
fn the_dashboard_uses_its_datasource_variable() {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let uid = format!("${{{}}}", ds["name"].as_str().unwrap());
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"],
            uid.as_str(),
            "{}",
            panel["title"]
        );
        for t in panel["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], uid.as_str(), "{}", panel["title"]);
        }
    }
}

/// A Prometheus of Debian's package on a free port, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second in job `regmirror`, evaluating `rules` every
    /// second.
    async fn start(target: &str, rules: &str) -> Prometheus {
        let bin = tool("prometheus");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: regmirror\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/-/ready", p.url)).send().await {
                if r.status().is_success() {
                    return p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str) -> Value {
        let r = reqwest::get(format!("{}/api/v1/{path}", self.url))
            .await
            .expect("prometheus API");
        let v: Value =
            serde_json::from_slice(&r.bytes().await.expect("prometheus API body")).expect("JSON");
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// The state (`pending`, `firing`) of the active alert `name`, if any.
    async fn alert(&self, name: &str) -> Option<String> {
        let data = self.api("alerts").await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap().to_owned())
    }
}

/// Polls `cond` (every 250 ms, at most `limit`), returning how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what} not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_fires_upstream_down_while_the_upstream_is_stopped_and_clears_it() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "v1", vec![random_bytes(10_000, 2)]);
    let m = start_mirror(&fake.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(100);
    })
    .await;
    m.get_ok(&format!("/v2/{REPO}/manifests/v1")).await;
    m.blob(REPO, &img.layer_digests[0]).await;
    let target = m.url.trim_start_matches("http://").to_owned();
    let prom = Prometheus::start(&target, &fast_rules(&read(RULES))).await;

    // Scraped, every rule evaluates without error, and nothing fires for a healthy mirror.
    within(Duration::from_secs(20), "the mirror scraped", || async {
        let t = prom.api("targets").await;
        t["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["health"] == "up")
    })
    .await;
    within(Duration::from_secs(20), "every rule evaluated", || async {
        let rules = prom.api("rules").await;
        let all: Vec<Value> = rules["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        for r in &all {
            assert_ne!(
                r["health"], "err",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
        }
        !all.is_empty() && all.iter().all(|r| r["health"] == "ok")
    })
    .await;
    assert_eq!(prom.alert("RegmirrorUpstreamDown").await, None);
    let firing: Vec<Value> = prom.api("alerts").await["alerts"]
        .as_array()
        .unwrap()
        .clone();
    assert!(firing.is_empty(), "alerts on a healthy mirror: {firing:?}");

    // The upstream stops; clients keep asking for the tag (its TTL is 100 ms), so the mirror
    // asks the upstream and fails (serving the cached tag meanwhile).
    fake.stop();
    let tag = format!("/v2/{REPO}/manifests/v1");
    let fired = within(Duration::from_secs(30), "RegmirrorUpstreamDown", || async {
        let r = m.get(&tag).await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "the cached tag is served while the upstream is down"
        );
        let state = prom.alert("RegmirrorUpstreamDown").await;
        state.as_deref() == Some("firing")
    })
    .await;
    eprintln!("RegmirrorUpstreamDown firing {fired:?} after the upstream stopped");
    let alerts = prom.api("alerts").await;
    let down = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "RegmirrorUpstreamDown")
        .unwrap()
        .clone();
    assert_eq!(down["labels"]["upstream"], "docker.io", "{down}");
    assert_eq!(down["labels"]["severity"], "critical", "{down}");
    assert_eq!(down["labels"]["instance"], target.as_str(), "{down}");

    // Back: the next requests reach it, and the alert goes.
    fake.reset_counts();
    fake.restart().await;
    let cleared = within(
        Duration::from_secs(30),
        "RegmirrorUpstreamDown cleared",
        || async {
            let _ = m.get(&tag).await;
            prom.alert("RegmirrorUpstreamDown").await.is_none()
        },
    )
    .await;
    eprintln!("RegmirrorUpstreamDown cleared {cleared:?} after the upstream came back");
    assert!(
        fake.count("HEAD", &tag) + fake.count("GET", &tag) >= 1,
        "the mirror reached the upstream again"
    );
}
