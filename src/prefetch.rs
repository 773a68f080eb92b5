//! `regmirror prefetch`: fills the cache by pulling through a mirror over
//! HTTP, so it takes exactly the code paths of a client's pull. The mirror is
//! the one serving the data dir, or one started in-process on it for the
//! occasion. Reports bytes fetched and bytes already cached per image.

use std::io::IsTerminal;
use std::time::Duration;

use futures_util::StreamExt;
use http::header;
use serde::Deserialize;

use crate::config::{Config, Secret};
use crate::imageref::ImageRef;
use crate::manifest::ACCEPT_ALL;
use crate::reference::Digest;
use crate::server::X_CACHE;

/// Which platforms of a multi-arch image to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platforms {
    All,
    /// `os/architecture[/variant]`.
    One(String),
}

/// What prefetching one image did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageReport {
    pub blobs: usize,
    /// Bytes the mirror fetched from the upstream for this image.
    pub fetched: u64,
    /// Bytes it already had.
    pub cached: u64,
}

/// Where to pull through, and as whom.
pub struct Target {
    /// `http://127.0.0.1:5000`, no trailing slash.
    pub base: String,
    pub client: reqwest::Client,
    /// User and password for a mirror with `[auth]`.
    pub basic: Option<(String, Secret)>,
    /// The mirror's default upstream name (`docker.io`).
    pub default_registry: String,
}

/// A mirror to pull through for one command: the one given, the one serving
/// the data dir, or one started here on the data dir (stopped by `close`).
pub struct Session {
    pub target: Target,
    local: Option<LocalMirror>,
}

/// A mirror started for one command: how to stop it, and its task.
type LocalMirror = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), crate::server::ServeError>>,
);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Session {
    /// `basic` is the user and password for a mirror with `[auth]`.
    pub async fn open(
        config: &Config,
        mirror: Option<String>,
        basic: Option<(String, Secret)>,
    ) -> Result<Self, BoxError> {
        let running = crate::cache::store::disk::DiskStore::open(&config.data_dir)?
            .try_lock()?
            .is_none();
        let mut local = None;
        let base = match mirror {
            Some(m) => m.trim_end_matches('/').to_owned(),
            None if running => {
                let scheme = if config.tls.cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                let mut addr = config.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("{scheme}://{addr}")
            }
            None => {
                // No mirror serves the data dir: run one here, on loopback.
                let mut own = config.clone();
                own.tls = Default::default();
                own.auth = Default::default();
                own.metrics = Default::default();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(crate::server::run(listener, own, async {
                    let _ = rx.await;
                }));
                local = Some((tx, task));
                format!("http://{addr}")
            }
        };
        Ok(Self {
            target: Target {
                base,
                client: reqwest::Client::builder().build()?,
                basic,
                default_registry: config.upstream.name.clone(),
            },
            local,
        })
    }

    /// Whether the mirror pulled through was started here (its
    /// configuration is the command's) rather than found running.
    pub fn started_here(&self) -> bool {
        self.local.is_some()
    }

    /// Stops the mirror started here, which flushes its index.
    pub async fn close(self) -> Result<(), BoxError> {
        if let Some((tx, task)) = self.local {
            let _ = tx.send(());
            task.await??;
        }
        Ok(())
    }
}

/// The environment variable `prefetch` takes the mirror password from.
pub const PASSWORD_ENV: &str = "REGMIRROR_PREFETCH_PASSWORD";

/// Where the password of `prefetch --user` came from, besides the user.
#[derive(Debug)]
pub enum PasswordSource {
    /// The contents of `--password-file` (one trailing newline dropped).
    File(String),
    /// [`PASSWORD_ENV`].
    Env(String),
    None,
}

/// The user and password for `--user`, and a warning when the password was
/// given on the command line, where every user of the machine sees it
/// (`ps`, `/proc/*/cmdline`). `USER:PASSWORD` still works, but only alone.
pub fn credentials(
    user: &str,
    password: PasswordSource,
) -> Result<((String, Secret), Option<String>), String> {
    let inline_warning = format!(
        "--user USER:PASSWORD shows the password in the process list; \
         give --user USER with --password-file FILE or {PASSWORD_ENV}"
    );
    match (user.split_once(':'), password) {
        (Some(_), PasswordSource::File(_)) => Err(
            "--user USER:PASSWORD and --password-file both give a password; give it once".into(),
        ),
        (Some((u, p)), _) => Ok(((u.to_owned(), Secret::new(p)), Some(inline_warning))),
        (None, PasswordSource::File(text)) => {
            let p = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            Ok(((user.to_owned(), Secret::new(p)), None))
        }
        (None, PasswordSource::Env(p)) => Ok(((user.to_owned(), Secret::new(p)), None)),
        (None, PasswordSource::None) => Err(format!(
            "--user {user}: no password; give --password-file FILE or set {PASSWORD_ENV}"
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    #[serde(default)]
    manifests: Vec<Child>,
    config: Option<Blob>,
    #[serde(default)]
    layers: Vec<Blob>,
}

#[derive(Deserialize)]
struct Child {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Blob {
    digest: String,
}

impl Platform {
    fn matches(&self, wanted: &str) -> bool {
        let mut parts = wanted.split('/');
        let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
        Some(self.os.as_str()) == os
            && Some(self.architecture.as_str()) == arch
            && (variant.is_none() || variant == self.variant.as_deref())
    }
}

/// What a manifest leads to: the children of an index that the platforms
/// choose, or the config and layers of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Children(Vec<Digest>),
    Blobs(Vec<Digest>),
}

/// Reads a manifest's JSON for what to fetch next (`platforms` choose an
/// index's children: one matching any of them is taken). Pure; shared by
/// `prefetch` and the scheduled warm-up.
pub fn plan(bytes: &[u8], platforms: &[Platforms]) -> Result<Plan, String> {
    let shape: Shape =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
    let digests = |list: Vec<&str>| -> Result<Vec<Digest>, String> {
        list.into_iter()
            .map(|d| Digest::parse(d).map_err(|e| e.to_string()))
            .collect()
    };
    if shape.manifests.is_empty() {
        let blobs = shape.config.iter().chain(&shape.layers);
        return digests(blobs.map(|b| b.digest.as_str()).collect()).map(Plan::Blobs);
    }
    let chosen: Vec<&str> = shape
        .manifests
        .iter()
        .filter(|c| {
            platforms.iter().any(|p| match p {
                Platforms::All => true,
                Platforms::One(p) => c.platform.as_ref().is_some_and(|pl| pl.matches(p)),
            })
        })
        .map(|c| c.digest.as_str())
        .collect();
    if chosen.is_empty() {
        return Err(match platforms {
            [one] => format!("no manifest for platform {one:?}"),
            all => format!("no manifest for the platforms {all:?}"),
        });
    }
    digests(chosen).map(Plan::Children)
}

impl Target {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .client
            .get(format!("{}{path}", self.base))
            .header(header::ACCEPT, ACCEPT_ALL);
        match &self.basic {
            Some((u, p)) => req.basic_auth(u, Some(p.expose())),
            None => req,
        }
    }

    async fn fetch(&self, path: &str) -> Result<reqwest::Response, String> {
        let resp = self
            .get(path)
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("GET {path}: {status} {}", body.trim()));
        }
        Ok(resp)
    }

    /// Pulls one image through the mirror, reading and discarding the bytes.
    pub async fn prefetch(
        &self,
        image: &ImageRef,
        platforms: &Platforms,
    ) -> Result<ImageReport, String> {
        let base = image.path(&self.default_registry);
        let top = self
            .fetch(&format!("{base}/manifests/{}", image.reference))
            .await?
            .bytes()
            .await
            .map_err(|e| format!("{image}: {e}"))?;
        let mut blobs = Vec::new();
        match plan(&top, std::slice::from_ref(platforms)).map_err(|e| format!("{image}: {e}"))? {
            Plan::Blobs(b) => blobs = b,
            Plan::Children(children) => {
                for digest in children {
                    let bytes = self
                        .fetch(&format!("{base}/manifests/{digest}"))
                        .await?
                        .bytes()
                        .await
                        .map_err(|e| format!("{image}: {e}"))?;
                    match plan(&bytes, &[]).map_err(|e| format!("{image}: {digest}: {e}"))? {
                        Plan::Blobs(b) => blobs.extend(b),
                        Plan::Children(_) => {
                            return Err(format!("{image}: {digest} is an index inside an index"))
                        }
                    }
                }
            }
        }
        let mut report = ImageReport::default();
        for digest in blobs {
            let (bytes, hit) = self
                .drain(&format!("{base}/blobs/{digest}"), &digest)
                .await?;
            report.blobs += 1;
            if hit {
                report.cached += bytes;
            } else {
                report.fetched += bytes;
            }
        }
        Ok(report)
    }

    /// Reads a blob to its end: (bytes, whether the mirror had it).
    async fn drain(&self, path: &str, digest: &Digest) -> Result<(u64, bool), String> {
        let resp = self.fetch(path).await?;
        let hit = resp
            .headers()
            .get(X_CACHE)
            .is_some_and(|v| v.as_bytes() == b"hit");
        let bar = progress_bar(resp.content_length(), digest);
        let mut stream = resp.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("{digest}: the mirror cut the body: {e}"))?;
            n += chunk.len() as u64;
            if let Some(b) = &bar {
                b.set_position(n);
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok((n, hit))
    }
}

/// A progress bar on a terminal; nothing otherwise (the caller prints lines).
fn progress_bar(len: Option<u64>, digest: &Digest) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len.unwrap_or(0));
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(digest.hex().chars().take(12).collect::<String>());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_an_images_blobs_or_the_children_the_platforms_choose() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let image = format!(
            r#"{{"config": {{"digest": "{}"}}, "layers": [{{"digest": "{}"}}]}}"#,
            d('a'),
            d('b')
        );
        let one = [Platforms::One("linux/amd64".into())];
        let blobs = Plan::Blobs(vec![
            Digest::parse(&d('a')).unwrap(),
            Digest::parse(&d('b')).unwrap(),
        ]);
        assert_eq!(plan(image.as_bytes(), &one), Ok(blobs));
        let index = format!(
            r#"{{"manifests": [
                {{"digest": "{}", "platform": {{"os": "linux", "architecture": "amd64"}}}},
                {{"digest": "{}", "platform": {{"os": "linux", "architecture": "arm64", "variant": "v8"}}}}
            ]}}"#,
            d('c'),
            d('e')
        );
        let child = |c| Digest::parse(&d(c)).unwrap();
        assert_eq!(
            plan(index.as_bytes(), &one),
            Ok(Plan::Children(vec![child('c')]))
        );
        let arm = [Platforms::One("linux/arm64/v8".into())];
        assert_eq!(
            plan(index.as_bytes(), &arm),
            Ok(Plan::Children(vec![child('e')]))
        );
        let both = [one[0].clone(), Platforms::One("linux/arm64".into())];
        assert_eq!(
            plan(index.as_bytes(), &both),
            Ok(Plan::Children(vec![child('c'), child('e')]))
        );
        assert_eq!(
            plan(index.as_bytes(), &[Platforms::All]),
            Ok(Plan::Children(vec![child('c'), child('e')]))
        );
        let none = plan(index.as_bytes(), &[Platforms::One("windows/amd64".into())]).unwrap_err();
        assert!(none.contains("no manifest for platform"), "{none}");
        assert!(plan(b"not json", &one).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn the_password_comes_from_a_file_or_the_environment() {
        let ((u, p), warn) =
            credentials("moby", PasswordSource::File("gordon\r\n".into())).unwrap();
        assert_eq!((u.as_str(), p.expose(), warn), ("moby", "gordon", None));
        let ((_, p), warn) = credentials("moby", PasswordSource::Env("g:1\n".into())).unwrap();
        assert_eq!((p.expose(), warn), ("g:1\n", None));
        let e = credentials("moby", PasswordSource::None).unwrap_err();
        assert!(
            e.contains("--password-file") && e.contains(PASSWORD_ENV),
            "{e}"
        );
        // The old form still works, with a warning that does not repeat the password.
        let ((u, p), warn) = credentials("moby:gordon", PasswordSource::None).unwrap();
        assert_eq!((u.as_str(), p.expose()), ("moby", "gordon"));
        let warn = warn.unwrap();
        assert!(
            warn.contains("process list") && !warn.contains("gordon"),
            "{warn}"
        );
        assert!(credentials("moby:gordon", PasswordSource::File("x".into())).is_err());
    }
}
