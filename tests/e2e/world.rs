//! One test's world: a temporary directory, a token issuer, an upstream docker-registry
//! serving the fixture images (with fresh counters), optionally a second, writable
//! docker-registry on empty storage (for tests with several registries), and optionally a
//! cold mirror in front of them. Dropping it stops everything, mirror first.

use std::path::{Path, PathBuf};

use crate::fixture::{fixture, Fixture, Image};
use crate::issuer::{Issuer, KeyPair};
use crate::mirror::{Mirror, Options};
use crate::upstream::Upstream;

pub struct World {
    // Fields drop in this order (after `drop` below): the mirror before the upstream it
    // talks to, files last.
    pub mirror: Option<Mirror>,
    /// See [`World::start_second_upstream`].
    pub second: Option<Upstream>,
    pub upstream: Upstream,
    pub issuer: Issuer,
    pub fixture: &'static Fixture,
    keys: KeyPair,
    tmp: tempfile::TempDir,
}

impl World {
    /// Checks the tools, builds the fixture if needed, starts the issuer and the upstream.
    pub async fn upstream_only(tools: &[&str]) -> World {
        World::start(tools, None).await
    }

    /// Like [`World::upstream_only`], plus a cold regmirror in front of the upstream.
    pub async fn with_mirror(tools: &[&str]) -> World {
        let mut world = World::start(tools, None).await;
        world.start_mirror(&[]).await;
        world
    }

    /// An upstream whose token issuer grants tokens only for `user`/`password`, and a mirror
    /// configured with them through `REGMIRROR_UPSTREAM_USERNAME`/`_PASSWORD`.
    pub async fn with_authenticated_mirror(tools: &[&str], user: &str, password: &str) -> World {
        let mut world = World::start(tools, Some((user, password))).await;
        // The token server is on another port than the registry, as a self-hosted
        // distribution with its own token service is: named, as its operator must name it.
        let realm_host = format!("[\"127.0.0.1:{}\"]", world.issuer.port);
        world
            .start_mirror(&[
                ("REGMIRROR_UPSTREAM_USERNAME", user),
                ("REGMIRROR_UPSTREAM_PASSWORD", password),
                ("REGMIRROR_UPSTREAM_CREDENTIAL_HOSTS", &realm_host),
            ])
            .await;
        world
    }

    async fn start_mirror(&mut self, env: &[(&str, &str)]) {
        self.start_mirror_with(&Options::env(env)).await;
    }

    /// Starts a mirror in front of the upstream as `opts` say, on the data directory of this
    /// world's earlier mirrors, if any.
    pub async fn start_mirror_with(&mut self, opts: &Options) {
        assert!(self.mirror.is_none(), "this world already has a mirror");
        let mirror = Mirror::start_with(&self.dir("mirror"), &self.upstream.url(), opts).await;
        self.mirror = Some(mirror);
    }

    /// Stops the mirror with SIGTERM (asserting a clean exit) and starts a new mirror process
    /// on the same data directory as `opts` say. The new one listens on another port.
    pub async fn restart_mirror(&mut self, opts: &Options) {
        let mut old = self.mirror.take().expect("this world has no mirror");
        old.terminate().await;
        drop(old);
        self.start_mirror_with(opts).await;
    }

    async fn start(tools: &[&str], credentials: Option<(&str, &str)>) -> World {
        let mut needed = vec!["docker-registry", "skopeo", "openssl"];
        needed.extend_from_slice(tools);
        crate::procs::require_tools(&needed);
        // Building the fixture blocks; keep this runtime's other tasks going meanwhile.
        let fixture = tokio::task::spawn_blocking(fixture)
            .await
            .expect("fixture thread");
        // Short paths: dockerd's and containerd's unix sockets live under here.
        let mut tmp = tempfile::Builder::new()
            .prefix("e2e")
            .tempdir_in("/tmp")
            .expect("create temp dir");
        if std::env::var_os("E2E_KEEP").is_some() {
            tmp.disable_cleanup(true);
            eprintln!("[e2e] E2E_KEEP is set: keeping {}", tmp.path().display());
        }
        let keys = KeyPair::generate(tmp.path());
        let issuer = Issuer::start(&keys, credentials).await;
        let upstream = Upstream::start(
            &tmp.path().join("up"),
            &fixture.storage,
            &issuer,
            &keys,
            false,
        )
        .await;
        World {
            mirror: None,
            second: None,
            upstream,
            issuer,
            fixture,
            keys,
            tmp,
        }
    }

    /// Starts a second docker-registry beside `upstream`: writable, on empty storage of its
    /// own, trusting the same token issuer. Tests push their content to it
    /// ([`crate::push::Pusher`]) before starting the mirror.
    pub async fn start_second_upstream(&mut self) -> &Upstream {
        assert!(
            self.second.is_none(),
            "this world already has a second upstream"
        );
        let upstream = Upstream::start(
            &self.dir("up2"),
            &self.dir("up2-storage"),
            &self.issuer,
            &self.keys,
            true,
        )
        .await;
        self.second.insert(upstream)
    }

    pub fn second(&self) -> &Upstream {
        self.second
            .as_ref()
            .expect("this world has no second upstream")
    }

    pub fn mirror(&self) -> &Mirror {
        self.mirror.as_ref().expect("this world has no mirror")
    }

    /// A fresh directory `name` under the test's temporary directory.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("create dir");
        dir
    }

    pub fn image(&self, short: &str) -> &'static Image {
        self.fixture.image(short)
    }

    /// Asserts that the upstream answered a GET for each of `blobs` of `image` exactly
    /// `times` times, naming every blob that was off and showing the logs.
    pub fn assert_blob_gets(&self, image: &Image, blobs: &[String], times: usize, when: &str) {
        let wrong: Vec<String> = blobs
            .iter()
            .map(|b| (b, self.upstream.blob_gets(&image.name, b)))
            .filter(|(_, n)| *n != times)
            .map(|(b, n)| format!("{b}: {n}"))
            .collect();
        assert!(
            wrong.is_empty(),
            "{when}: expected the upstream to serve each blob of {} exactly {times} time(s); \
             these were off:\n  {}\n{}\n(the mirror's log follows)",
            image.name,
            wrong.join("\n  "),
            self.upstream.logs(),
        );
    }
}

impl Drop for World {
    /// After a failure, keeps every `*.log` of the test (mirror, upstream access log, daemons)
    /// under `CARGO_TARGET_TMPDIR/e2e-failures/`, since the temporary directory goes away.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let name = self.tmp.path().file_name().unwrap_or_default().to_owned();
        let dest = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("e2e-failures")
            .join(name);
        copy_logs(self.tmp.path(), &dest);
        eprintln!("[e2e] this test's logs are kept in {}", dest.display());
    }
}

fn copy_logs(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            copy_logs(&path, &to.join(entry.file_name()));
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "log") {
            let _ = std::fs::create_dir_all(to);
            let _ = std::fs::copy(&path, to.join(entry.file_name()));
        }
    }
}
