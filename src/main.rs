//! The `regmirror` command line: parses flags, loads the configuration and
//! runs the server. The only place that uses `anyhow`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use regmirror::config::{self, Flags};
use regmirror::imageref::ImageRef;
use regmirror::prefetch::{PasswordSource, Platforms, Session};
use regmirror::units::human_bytes;

/// A pull-through caching mirror for container registries.
///
/// Point dockerd (`registry-mirrors`), containerd (`hosts.toml`) or podman
/// (`registries.conf`) at it; it fetches from the upstream registry once,
/// verifies every byte, and serves later pulls from its cache.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API.
    ///
    /// Configuration comes from the embedded defaults (see mirror.toml), the
    /// file given with --config, REGMIRROR_* environment variables
    /// (cache.tag_ttl -> REGMIRROR_CACHE_TAG_TTL) and these flags, each
    /// overriding the one before. Log verbosity follows RUST_LOG (default info).
    #[command(
        after_help = "Example:\n  regmirror serve --config /etc/regmirror/mirror.toml --listen 0.0.0.0:5000"
    )]
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:5000 [config: listen].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Evict now what the cache policy selects, remove stale temp files, and
    /// collect hosted content nothing references.
    ///
    /// Safe while a mirror serves the same data dir: it then removes only temp
    /// files untouched for an hour, the mirror notices the evictions, and the
    /// mirror is asked to collect its hosted content itself (at its next
    /// upkeep, within 10 s; it logs what it removes). It never contacts an
    /// upstream: --offline changes nothing, --upstream is ignored (with a
    /// warning).
    #[command(after_help = "Example:\n  regmirror gc --config /etc/regmirror/mirror.toml")]
    Gc(CommonArgs),
    /// List cached repositories and tags with digest, size and last pull.
    ///
    /// Reads the cache only (never an upstream): --offline changes nothing,
    /// --upstream is ignored (with a warning).
    #[command(after_help = "Example:\n  regmirror ls --data-dir /var/lib/regmirror")]
    Ls(CommonArgs),
    /// Show what the cache takes on disk against its budget.
    ///
    /// Reads the cache only (never an upstream): --offline changes nothing,
    /// --upstream is ignored (with a warning).
    #[command(after_help = "Example:\n  regmirror du --config /etc/regmirror/mirror.toml")]
    Du(CommonArgs),
    /// Fill the cache with images before they are needed.
    ///
    /// Pulls each image through the mirror serving the data dir (or through
    /// one started here on it when none runs), the same way a client pulls.
    /// --upstream and --offline apply to the mirror started here: --upstream
    /// is where it fetches from, and with --offline it fetches nothing, so
    /// prefetch then checks that the images are all cached. A mirror already
    /// running (or given with --mirror) fetches from its own upstream: the
    /// two are then ignored, with a warning.
    #[command(
        after_help = "Example:\n  regmirror prefetch --data-dir /var/lib/regmirror --upstream https://registry-1.docker.io \\\n    alpine:3.19 ghcr.io/org/app:1.2 --platform linux/arm64"
    )]
    Prefetch {
        /// Images: alpine:3.19, docker.io/library/alpine:3.19, ghcr.io/org/app@sha256:...
        images: Vec<String>,
        /// A file with one image per line (# comments allowed).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// The platform to fetch from multi-arch images.
        #[arg(long, default_value = "linux/amd64", conflicts_with = "all_platforms")]
        platform: String,
        /// Fetch every platform of multi-arch images.
        #[arg(long)]
        all_platforms: bool,
        /// A running mirror to pull through (default: the one of the config).
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// User for a mirror with [auth]. The password comes from
        /// --password-file or the REGMIRROR_PREFETCH_PASSWORD environment
        /// variable; USER:PASSWORD still works but shows the password to
        /// every user of the machine (ps), so it warns.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// A file holding the password for --user (one trailing newline is dropped).
        #[arg(long, value_name = "FILE", requires = "user")]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Write cached images to an OCI image layout archive (for skopeo's
    /// oci-archive: transport, or `regmirror import` at an air-gapped site).
    ///
    /// Reads the cache only (never an upstream): --offline changes nothing,
    /// --upstream is ignored (with a warning).
    #[command(
        after_help = "Example:\n  regmirror export --data-dir /var/lib/regmirror -o images.tar alpine:3.19 ghcr.io/org/app:1.2"
    )]
    Export {
        images: Vec<String>,
        /// The archive to write.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Load an archive written by `regmirror export` into the cache of a
    /// stopped mirror; a damaged archive is refused whole.
    ///
    /// So is one that asks too much: an index.json or a manifest over 4 MiB,
    /// a manifest media type other than an OCI image manifest or index or a
    /// Docker schema 2 manifest or manifest list, or an image
    /// (<registry>/<repo>:<tag>) of a registry that is not a configured
    /// upstream: a bundle sets tags only for the registries the mirror
    /// mirrors (add an [[upstreams]] entry to import another's). It never
    /// contacts an upstream: --offline changes nothing, --upstream is ignored
    /// (with a warning).
    #[command(
        after_help = "Example:\n  regmirror import --config /etc/regmirror/mirror.toml images.tar"
    )]
    Import {
        bundle: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// The options every command takes: where the configuration and the cache
/// are, and the upstream (for the commands that contact one).
#[derive(clap::Args)]
struct CommonArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, short, env = "REGMIRROR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cache directory [config: data_dir].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Upstream registry URL, e.g. https://registry-1.docker.io [config: upstream.url].
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    upstream: Option<url::Url>,
    /// Never contact the upstream; serve only what is cached [config: offline].
    #[arg(long)]
    offline: bool,
}

impl CommonArgs {
    /// The configuration with these flags (and `listen`) on top.
    fn load_with(&self, listen: Option<SocketAddr>) -> anyhow::Result<config::Config> {
        let flags = Flags {
            listen,
            data_dir: self.data_dir.clone(),
            upstream: self.upstream.clone(),
            offline: self.offline,
        };
        Ok(config::load(
            self.config.as_deref(),
            std::env::vars(),
            &flags,
        )?)
    }

    /// The configuration, for a command that reads the cache only: an
    /// `--upstream` is said to have no effect rather than refused.
    fn load(&self, command: &str) -> anyhow::Result<config::Config> {
        if self.upstream.is_some() {
            eprintln!(
                "warning: `regmirror {command}` never contacts an upstream; --upstream has no effect"
            );
        }
        self.load_with(None)
    }
}

fn parse_url(s: &str) -> Result<url::Url, String> {
    config::parse_upstream_url(s)
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each error's message already names what failed; no backtrace.
            eprintln!("regmirror: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The server logs every request; the other commands only what goes wrong.
    let default_level = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    // Lines go to a writer thread that writes whatever has queued up at once
    // and flushes when the queue is empty: the request path does no write(2).
    // Nothing is dropped (a full queue pushes back); the guard flushes the
    // rest when `run` returns.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stderr(),
        ));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve { listen, common } => serve(common.load_with(listen)?),
        Command::Gc(args) => {
            let config = args.load("gc")?;
            let report = block_on(regmirror::admin::gc(&config))?;
            if report.mirror_running {
                println!(
                    "a mirror is serving {}; it will notice the evictions",
                    config.data_dir.display()
                );
            }
            println!(
                "removed {} temp files; evicted {} items, {} freed; {} -> {} on disk (budget {})",
                report.temp_files_removed,
                report.eviction.evicted.len(),
                human_bytes(report.eviction.freed()),
                human_bytes(report.eviction.usage_before),
                human_bytes(report.eviction.usage_after),
                human_bytes(config.cache.max_size.0),
            );
            match report.hosted {
                regmirror::admin::HostedGc::Nothing => {}
                regmirror::admin::HostedGc::Collected {
                    report,
                    uploads_expired,
                } => println!(
                    "hosted: removed {} manifests and {} blobs nothing references, {} freed; \
                     {} kept; removed {} expired uploads",
                    report.manifests,
                    report.blobs,
                    human_bytes(report.bytes),
                    report.kept,
                    uploads_expired,
                ),
                regmirror::admin::HostedGc::Requested => println!(
                    "hosted: the running mirror collects its hosted content itself (its pushes \
                     commit under a lock only it holds); asked it to at its next upkeep, within \
                     10 s: its log says what it removed"
                ),
            }
            if let Some(shared) =
                block_on(regmirror::admin::shared::gc(&config, report.mirror_running))?
            {
                println!(
                    "bucket: aborted {} abandoned uploads; evicted {} items, {} freed{}",
                    shared.uploads_aborted,
                    shared.evicted,
                    human_bytes(shared.evicted_bytes),
                    if shared.reconciled {
                        "; index reconciled with a scan"
                    } else {
                        ""
                    },
                );
            }
            Ok(())
        }
        Command::Ls(args) => {
            let config = args.load("ls")?;
            // A cluster's tags are the cluster's (Redis), not one disk's.
            let rows = match block_on(regmirror::admin::shared::list(&config))? {
                Some(rows) => rows,
                None => block_on(regmirror::admin::list(&config.data_dir))?,
            };
            println!(
                "{:<40} {:<20} {:<20} {:>10}  LAST PULL",
                "REPOSITORY", "TAG", "DIGEST", "SIZE"
            );
            for r in rows {
                let last = r.last_pull.map_or_else(
                    || "-".to_owned(),
                    |t| humantime::format_rfc3339_seconds(t).to_string(),
                );
                let digest: String = r.digest.to_string().chars().take(19).collect();
                println!(
                    "{:<40} {:<20} {:<20} {:>10}  {last}",
                    r.repo,
                    r.tag,
                    digest,
                    human_bytes(r.size)
                );
            }
            Ok(())
        }
        Command::Prefetch {
            images,
            from_file,
            platform,
            all_platforms,
            mirror,
            user,
            password_file,
            common,
        } => {
            let basic = match user {
                Some(user) => Some(prefetch_credentials(&user, password_file.as_deref())?),
                None => None,
            };
            let config = common.load_with(None)?;
            let images = image_list(&images, from_file.as_deref())?;
            let platforms = if all_platforms {
                Platforms::All
            } else {
                Platforms::One(platform)
            };
            let flags = common.upstream.is_some() || common.offline;
            prefetch(config, images, platforms, mirror, basic, flags)
        }
        Command::Export {
            images,
            output,
            common,
        } => {
            let config = common.load("export")?;
            let images = image_list(&images, None)?;
            let warnings = block_on(regmirror::bundle::export(&config, &images, &output))?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!("wrote {} images to {}", images.len(), output.display());
            Ok(())
        }
        Command::Import { bundle, common } => {
            let config = common.load("import")?;
            let report = block_on(regmirror::bundle::import(&config, &bundle))?;
            for image in &report.images {
                println!("imported {image}");
            }
            println!("{} blobs, {}", report.blobs, human_bytes(report.bytes));
            Ok(())
        }
        Command::Du(args) => {
            let config = args.load("du")?;
            let u = block_on(regmirror::admin::usage(&config))?;
            print_tally("", &u.items);
            println!("downloads  {:>20}", human_bytes(u.temp_bytes));
            print_total("", u.items.bytes() + u.temp_bytes, Some(u.max_size));
            if let Some(b) = block_on(regmirror::admin::shared::usage(&config))? {
                println!("bucket     {}", b.description);
                print_tally("  ", &b.items);
                println!("  uploads    {:>8} not completed", b.pending_uploads);
                print_total("  ", b.items.bytes(), b.max_size);
            }
            Ok(())
        }
    }
}

/// `du`'s lines of items by kind.
fn print_tally(indent: &str, t: &regmirror::admin::Tally) {
    println!(
        "{indent}blobs      {:>8} items {:>12}",
        t.blobs,
        human_bytes(t.blob_bytes)
    );
    println!(
        "{indent}manifests  {:>8} items {:>12}",
        t.manifests,
        human_bytes(t.manifest_bytes)
    );
}

/// `du`'s total line, against the budget when there is one.
fn print_total(indent: &str, total: u64, max: Option<u64>) {
    match max {
        Some(max) => println!(
            "{indent}total      {:>20} of {} ({:.1}%)",
            human_bytes(total),
            human_bytes(max),
            100.0 * total as f64 / max.max(1) as f64
        ),
        None => println!(
            "{indent}total      {:>20} (no storage.max_size)",
            human_bytes(total)
        ),
    }
}

/// The images named on the command line and in `--from-file`.
fn image_list(args: &[String], file: Option<&std::path::Path>) -> anyhow::Result<Vec<ImageRef>> {
    let mut names: Vec<String> = args.to_vec();
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        names.extend(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    if names.is_empty() {
        anyhow::bail!("no image given");
    }
    names
        .iter()
        .map(|n| ImageRef::parse(n).map_err(|e| anyhow::anyhow!("{n}: {e}")))
        .collect()
}

/// The user and password of `prefetch --user`: the password from the file,
/// else the environment, else (with a warning) after the user's colon.
fn prefetch_credentials(
    user: &str,
    password_file: Option<&std::path::Path>,
) -> anyhow::Result<(String, config::Secret)> {
    let password = match password_file {
        Some(f) => PasswordSource::File(
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        ),
        None => match std::env::var(regmirror::prefetch::PASSWORD_ENV) {
            Ok(p) => PasswordSource::Env(p),
            Err(_) => PasswordSource::None,
        },
    };
    let (basic, warning) =
        regmirror::prefetch::credentials(user, password).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    Ok(basic)
}

fn prefetch(
    config: config::Config,
    images: Vec<ImageRef>,
    platforms: Platforms,
    mirror: Option<String>,
    basic: Option<(String, config::Secret)>,
    upstream_flags: bool,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let session = Session::open(&config, mirror, basic)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if upstream_flags && !session.started_here() {
            eprintln!(
                "warning: prefetch pulls through the mirror at {}, which fetches from its own \
                 upstream; --upstream and --offline apply only to a mirror prefetch starts itself",
                session.target.base
            );
        }
        let (mut fetched, mut cached, mut failed) = (0u64, 0u64, Vec::new());
        for image in &images {
            match session.target.prefetch(image, &platforms).await {
                Ok(r) => {
                    println!(
                        "{image}: {} blobs, {} fetched, {} already cached",
                        r.blobs,
                        human_bytes(r.fetched),
                        human_bytes(r.cached)
                    );
                    fetched += r.fetched;
                    cached += r.cached;
                }
                Err(e) => {
                    eprintln!("{image}: FAILED: {e}");
                    failed.push(image.to_string());
                }
            }
        }
        println!(
            "{} images: {} fetched from upstream, {} already cached",
            images.len(),
            human_bytes(fetched),
            human_bytes(cached)
        );
        session.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        if !failed.is_empty() {
            anyhow::bail!("prefetch failed for {}", failed.join(", "));
        }
        Ok(())
    })
}

fn block_on<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    Ok(runtime.block_on(f)?)
}

fn serve(config: config::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = regmirror::server::bind(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let shutdown = shutdown_signal().context("installing the SIGTERM and SIGINT handlers")?;
        regmirror::server::run(listener, config, shutdown).await?;
        Ok(())
    })
}

/// Completes on SIGINT or SIGTERM. The handlers are installed by the call,
/// not when the future is first polled: `run` polls it only once it says it
/// listens, and a SIGTERM in between met the default action, so the process
/// died without draining or writing its index (found by the reliability
/// suite's crash loop, which stops a mirror right after it starts).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// A SIGTERM that arrives before the shutdown future is first polled ends
    /// that future once polled, instead of the process.
    #[tokio::test]
    async fn a_sigterm_before_the_first_poll_is_caught() {
        let shutdown = super::shutdown_signal().expect("install the handlers");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let caught = tokio::time::timeout(Duration::from_secs(10), shutdown).await;
        assert!(caught.is_ok(), "the SIGTERM was not seen");
    }
}
