//! The `regmirror` command line: parses flags, loads the configuration and
//! runs the server. The only place that uses `anyhow`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use regmirror::config::{self, Flags};

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
    Serve {
        /// Configuration file (TOML); without it the embedded defaults apply.
        #[arg(long, short, env = "REGMIRROR_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 0.0.0.0:5000 [config: listen].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Cache directory [config: data_dir].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Upstream registry URL, e.g. https://registry-1.docker.io [config: upstream.url].
        #[arg(long, value_name = "URL", value_parser = parse_url)]
        upstream: Option<url::Url>,
        /// Never contact the upstream; serve only what is cached [config: offline].
        #[arg(long)]
        offline: bool,
    },
    /// Evict now what the cache policy selects and remove stale temp files.
    ///
    /// Safe while a mirror serves the same data dir: it then removes only temp
    /// files untouched for an hour, and the mirror notices the evictions.
    Gc(CacheArgs),
    /// List cached repositories and tags with digest, size and last pull.
    Ls(CacheArgs),
    /// Show what the cache takes on disk against its budget.
    Du(CacheArgs),
}

/// Where the cache is, for the cache commands.
#[derive(clap::Args)]
struct CacheArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, short, env = "REGMIRROR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cache directory [config: data_dir].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl CacheArgs {
    fn load(&self) -> anyhow::Result<config::Config> {
        let flags = Flags {
            data_dir: self.data_dir.clone(),
            ..Flags::default()
        };
        Ok(config::load(
            self.config.as_deref(),
            std::env::vars(),
            &flags,
        )?)
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            upstream,
            offline,
        } => {
            let flags = Flags {
                listen,
                data_dir,
                upstream,
                offline,
            };
            let config = config::load(config.as_deref(), std::env::vars(), &flags)?;
            serve(config)
        }
        Command::Gc(args) => {
            let config = args.load()?;
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
                bytes(report.eviction.freed()),
                bytes(report.eviction.usage_before),
                bytes(report.eviction.usage_after),
                bytes(config.cache.max_size.0),
            );
            Ok(())
        }
        Command::Ls(args) => {
            let config = args.load()?;
            let rows = block_on(regmirror::admin::list(&config.data_dir))?;
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
                    bytes(r.size)
                );
            }
            Ok(())
        }
        Command::Du(args) => {
            let config = args.load()?;
            let u = block_on(regmirror::admin::usage(&config))?;
            let total = u.blob_bytes + u.manifest_bytes + u.temp_bytes;
            println!(
                "blobs      {:>8} items {:>12}",
                u.blobs,
                bytes(u.blob_bytes)
            );
            println!(
                "manifests  {:>8} items {:>12}",
                u.manifests,
                bytes(u.manifest_bytes)
            );
            println!("downloads  {:>20}", bytes(u.temp_bytes));
            println!(
                "total      {:>20} of {} ({:.1}%)",
                bytes(total),
                bytes(u.max_size),
                100.0 * total as f64 / u.max_size.max(1) as f64
            );
            Ok(())
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    Ok(runtime.block_on(f)?)
}

/// Bytes in binary units, for people.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn serve(config: config::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        regmirror::server::run(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
