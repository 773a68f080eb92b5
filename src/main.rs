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
    },
}

fn parse_url(s: &str) -> Result<url::Url, String> {
    config::parse_upstream_url(s)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
        } => {
            let flags = Flags {
                listen,
                data_dir,
                upstream,
            };
            let config = config::load(config.as_deref(), std::env::vars(), &flags)?;
            serve(config)
        }
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
