//! Warm-up on a schedule inside `serve` (`[[warm]]`): the images configured
//! are checked with the upstream soon after the start and then every
//! `every` (jittered), and what moved is pulled into the cache through the
//! registry's own fill path ([`Registry::warm`]), so the first client after
//! a release gets a hit.
//!
//! Owns the schedule: one task runs the images one after another (so an
//! image is never warmed twice at once), pauses an upstream that fails or
//! rate-limits (exponential backoff, `Retry-After` honoured: one probe per
//! pause, no storm), and on replicas warms only while it holds the
//! Coordinator's `warm` lock (one replica at a time). The decisions are the
//! pure functions at the top; the status it reports goes to [`Metrics`].
//! It does not fetch anything itself, nor decide what a pull stores.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::cluster::coordinator::Lease;
use crate::config::{Config, WarmConfig};
use crate::error::Error;
use crate::imageref::ImageRef;
use crate::metrics::Metrics;
use crate::prefetch::Platforms;
use crate::registry::{Registry, Warmed};
use crate::units::human_bytes;

/// The first warm-up of an image starts within this of the start.
pub const FIRST_WITHIN: Duration = Duration::from_secs(2);
/// The first pause after a failure is at most this (or `every`, if shorter).
pub const BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// Pauses double up to this (or `every`, if longer).
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// A `Retry-After` is honoured up to this.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(6 * 3600);
/// Each wait is spread by up to this share either way, so replicas and
/// images started together drift apart.
const JITTER: f64 = 0.1;
/// How long the replicas' `warm` lock lasts; renewed after each image.
const LOCK_TTL: Duration = Duration::from_secs(300);
/// The lock's name in the Coordinator.
const LOCK: &str = "warm";

/// When an image's first warm-up starts: `u` (uniform in `[0, 1)`) of the
/// way into [`FIRST_WITHIN`], or into `every` if shorter.
pub fn first_delay(every: Duration, u: f64) -> Duration {
    FIRST_WITHIN.min(every).mul_f64(u.clamp(0.0, 1.0))
}

/// `d` spread by `u` (uniform in `[0, 1)`) within ±[`JITTER`].
pub fn jittered(d: Duration, u: f64) -> Duration {
    d.mul_f64(1.0 - JITTER + 2.0 * JITTER * u.clamp(0.0, 1.0))
}

/// How long an upstream pauses after `failures` (≥ 1) outages in a row:
/// from `every` or [`BACKOFF_FIRST`] (the shorter), doubling, up to `every`
/// or [`BACKOFF_MAX`] (the longer); never less than what `Retry-After` asked
/// (up to [`RETRY_AFTER_MAX`]).
pub fn backoff(every: Duration, failures: u32, retry_after: Option<Duration>) -> Duration {
    let first = every.min(BACKOFF_FIRST);
    let cap = every.max(BACKOFF_MAX);
    let doublings = failures.saturating_sub(1).min(30);
    let wait = first.saturating_mul(1u32 << doublings).min(cap);
    match retry_after {
        Some(r) => wait.max(r.min(RETRY_AFTER_MAX)),
        None => wait,
    }
}

/// A `Retry-After` in seconds (an HTTP date is left to the backoff).
pub fn retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Whether a failure says the upstream (or the mirror's capacity) is the
/// trouble, not the image: then the upstream pauses.
fn pauses(e: &Error) -> bool {
    e.is_upstream_outage() || matches!(e, Error::Busy(_) | Error::SharedUnavailable(_))
}

/// One image as the status page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageStatus {
    /// The image as configured (or the list file that could not be read).
    pub image: String,
    pub last_run: Option<SystemTime>,
    pub next_run: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    /// What the last successful run did.
    pub last: Option<Warmed>,
    /// Why the last run failed (cleared by a success).
    pub error: Option<String>,
}

/// One image on the schedule.
struct Job {
    image: ImageRef,
    platforms: Vec<Platforms>,
    every: Duration,
    next: Instant,
    status: ImageStatus,
}

/// What the schedule knows of one upstream's failures.
#[derive(Default)]
struct Pause {
    failures: u32,
    until: Option<Instant>,
}

/// Starts the warm-up task when `[[warm]]` names anything.
pub fn spawn(config: &Config, registry: &Arc<Registry>) -> Option<tokio::task::JoinHandle<()>> {
    if config.warm.is_empty() {
        return None;
    }
    let schedule = Schedule {
        entries: config.warm.clone(),
        default_registry: config.upstream.name.clone(),
        registry: registry.clone(),
        metrics: registry.metrics.clone(),
        jobs: Vec::new(),
        pauses: HashMap::new(),
        file_errors: Vec::new(),
    };
    Some(tokio::spawn(schedule.run()))
}

struct Schedule {
    entries: Vec<WarmConfig>,
    default_registry: String,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    jobs: Vec<Job>,
    pauses: HashMap<String, Pause>,
    /// List files that could not be read or parsed, with why.
    file_errors: Vec<ImageStatus>,
}

impl Schedule {
    async fn run(mut self) {
        loop {
            self.refresh().await;
            self.publish();
            let wake = self
                .jobs
                .iter()
                .map(|j| j.next)
                .min()
                .unwrap_or_else(|| Instant::now() + self.shortest_every());
            tokio::time::sleep_until(wake).await;
            self.round().await;
        }
    }

    fn shortest_every(&self) -> Duration {
        self.entries
            .iter()
            .map(|e| e.every)
            .min()
            .unwrap_or(BACKOFF_MAX)
    }

    /// Warms the images that are due, one after another.
    async fn round(&mut self) {
        let lock = match self.registry.coordinator() {
            None => None,
            Some((coordinator, holder)) => match coordinator.lock(LOCK, &holder, LOCK_TTL).await {
                Ok(Some(lease)) => Some((coordinator, lease)),
                Ok(None) => {
                    // Another replica warms: what it pulls is shared.
                    let now = Instant::now();
                    for job in self.jobs.iter_mut().filter(|j| j.next <= now) {
                        job.next = now + jittered(job.every, rand::random());
                        job.status.next_run = Some(wall(job.next));
                    }
                    tracing::debug!("another replica holds the warm-up lock");
                    return;
                }
                Err(e) => {
                    // Correctness never depends on Redis: warm on our own.
                    tracing::debug!(error = %e, "no warm-up lock; warming anyway");
                    None
                }
            },
        };
        let mut i = 0;
        while i < self.jobs.len() {
            if self.jobs[i].next <= Instant::now() {
                self.warm_one(i).await;
                self.publish();
                if let Some((coordinator, lease)) = &lock {
                    if !matches!(coordinator.renew(lease, LOCK_TTL).await, Ok(true)) {
                        tracing::info!("lost the warm-up lock; another replica goes on");
                        return;
                    }
                }
            }
            i += 1;
        }
        if let Some((coordinator, lease)) = lock {
            let lease: Lease = lease;
            let _ = coordinator.release(&lease).await;
        }
    }

    async fn warm_one(&mut self, i: usize) {
        let upstream = self.jobs[i]
            .image
            .registry
            .clone()
            .unwrap_or_else(|| self.default_registry.clone());
        let now = Instant::now();
        let pause = self.pauses.entry(upstream.clone()).or_default();
        let job = &mut self.jobs[i];
        if let Some(until) = pause.until.filter(|u| *u > now) {
            // Another image's check found the upstream failing: wait with it.
            job.next = until + jittered(Duration::from_millis(200), rand::random());
            job.status.next_run = Some(wall(job.next));
            return;
        }
        job.status.last_run = Some(SystemTime::now());
        let result = self.registry.warm(&job.image, &job.platforms).await;
        let done = Instant::now();
        match result {
            Ok(w) => {
                pause.failures = 0;
                pause.until = None;
                if w.fetched_items > 0 {
                    tracing::info!(image = %job.status.image, digest = ?w.digest.as_ref().map(ToString::to_string), items = w.fetched_items, bytes = w.fetched_bytes, "warm-up fetched");
                }
                self.metrics
                    .warm_run(&job.status.image, true, w.fetched_bytes);
                job.status.last_success = job.status.last_run;
                job.status.last = Some(w);
                job.status.error = None;
                job.next = done + jittered(job.every, rand::random());
            }
            Err(e) => {
                self.metrics.warm_run(&job.status.image, false, 0);
                job.status.error = Some(e.to_string());
                if pauses(&e) {
                    pause.failures += 1;
                    let asked = match &e {
                        Error::TooManyRequests { retry_after: r } => {
                            r.as_deref().and_then(retry_after)
                        }
                        _ => None,
                    };
                    let wait = jittered(backoff(job.every, pause.failures, asked), rand::random());
                    pause.until = Some(done + wait);
                    job.next = done + wait;
                    tracing::warn!(image = %job.status.image, upstream = %upstream, error = %e, pause = ?wait, "warm-up paused: the upstream is failing");
                } else {
                    tracing::warn!(image = %job.status.image, error = %e, "warm-up failed");
                    job.next = done + jittered(job.every, rand::random());
                }
            }
        }
        job.status.next_run = Some(wall(job.next));
        let paused = self
            .pauses
            .values()
            .any(|p| p.until.is_some_and(|u| u > Instant::now()));
        self.metrics.warm_paused(paused);
    }

    /// Rebuilds the image list from the entries and their list files,
    /// keeping the state of images already on it. An image listed twice is
    /// warmed once, on the shorter `every`.
    async fn refresh(&mut self) {
        let mut wanted: Vec<(ImageRef, Vec<Platforms>, Duration)> = Vec::new();
        self.file_errors.clear();
        for entry in &self.entries {
            let platforms = platforms(&entry.platforms);
            let mut names = entry.images.clone();
            if let Some(file) = &entry.file {
                match read_list(file).await {
                    Ok(more) => names.extend(more),
                    Err(why) => self.file_errors.push(ImageStatus {
                        image: file.display().to_string(),
                        last_run: Some(SystemTime::now()),
                        error: Some(why),
                        ..ImageStatus::default()
                    }),
                }
            }
            for name in names {
                let Ok(image) = ImageRef::parse(&name) else {
                    self.file_errors.push(ImageStatus {
                        image: name.clone(),
                        error: Some("not an image reference".into()),
                        ..ImageStatus::default()
                    });
                    continue;
                };
                match wanted.iter_mut().find(|(i, _, _)| *i == image) {
                    Some(w) => w.2 = w.2.min(entry.every),
                    None => wanted.push((image, platforms.clone(), entry.every)),
                }
            }
        }
        let now = Instant::now();
        let mut old: Vec<Job> = std::mem::take(&mut self.jobs);
        for (image, platforms, every) in wanted {
            let job = match old.iter().position(|j| j.image == image) {
                Some(at) => {
                    let mut j = old.swap_remove(at);
                    j.platforms = platforms;
                    j.every = every;
                    j
                }
                None => {
                    let next = now + first_delay(every, rand::random());
                    Job {
                        status: ImageStatus {
                            image: image.to_string(),
                            next_run: Some(wall(next)),
                            ..ImageStatus::default()
                        },
                        image,
                        platforms,
                        every,
                        next,
                    }
                }
            };
            self.jobs.push(job);
        }
    }

    fn publish(&self) {
        let mut statuses: Vec<ImageStatus> = self.jobs.iter().map(|j| j.status.clone()).collect();
        statuses.extend(self.file_errors.iter().cloned());
        self.metrics.warm_statuses(statuses);
    }
}

/// The platforms of an entry as `prefetch` takes them.
fn platforms(configured: &[String]) -> Vec<Platforms> {
    if configured.is_empty() {
        return vec![Platforms::One("linux/amd64".into())];
    }
    configured
        .iter()
        .map(|p| match p.as_str() {
            "all" => Platforms::All,
            p => Platforms::One(p.to_owned()),
        })
        .collect()
}

/// The images of a list file: one a line, `#` comments, blank lines skipped.
async fn read_list(file: &Path) -> Result<Vec<String>, String> {
    let text = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The wall-clock time of an instant, for the status page.
fn wall(at: Instant) -> SystemTime {
    let now = Instant::now();
    match at.checked_duration_since(now) {
        Some(ahead) => SystemTime::now() + ahead,
        None => SystemTime::now() - now.duration_since(at),
    }
}

/// The status page's section: each image, its last and next run, what it
/// fetched and what failed. Empty without `[[warm]]`.
pub fn status_section(images: &[ImageStatus], now: SystemTime) -> String {
    if images.is_empty() {
        return String::new();
    }
    let when = |t: Option<SystemTime>| match t {
        None => "–".to_owned(),
        Some(t) => match now.duration_since(t) {
            Ok(d) => format!("{} ago", humantime::format_duration(secs(d))),
            Err(e) => format!("in {}", humantime::format_duration(secs(e.duration()))),
        },
    };
    let rows: String = images
        .iter()
        .map(|s| {
            let fetched = match &s.last {
                None => "–".to_owned(),
                Some(w) if w.fetched_items == 0 => format!("nothing new ({} items)", w.items),
                Some(w) => format!(
                    "{} of {} items, {}",
                    w.fetched_items,
                    w.items,
                    human_bytes(w.fetched_bytes)
                ),
            };
            let (class, failed) = match &s.error {
                None => ("ok", "–".to_owned()),
                Some(e) => ("bad", esc(e)),
            };
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{fetched}</td><td class={class}>{failed}</td></tr>",
                esc(&s.image),
                when(s.last_run),
                when(s.next_run),
            )
        })
        .collect();
    format!(
        "<h2>Warm-up</h2>\n<table id=warm><tr><th>image</th><th>last run</th><th>next run</th>\
         <th>fetched</th><th>failed</th></tr>{rows}</table>\n"
    )
}

fn secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn the_first_run_is_within_seconds_and_never_after_a_short_period() {
        assert_eq!(first_delay(30 * MIN, 0.0), Duration::ZERO);
        assert!(first_delay(30 * MIN, 0.999) < FIRST_WITHIN);
        assert!(first_delay(Duration::from_secs(1), 0.999) < Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_a_tenth_either_way() {
        let every = 30 * MIN;
        let secs = |u: f64| jittered(every, u).as_secs_f64();
        assert!((secs(0.5) - 1800.0).abs() < 0.001);
        assert!((secs(0.0) - 1620.0).abs() < 0.001);
        assert!(secs(0.999_999) <= 1980.0 && secs(0.999_999) > 1979.0);
    }

    #[test]
    fn backoff_doubles_from_the_shorter_start_to_the_longer_cap() {
        let every = 30 * MIN;
        let waits: Vec<u64> = (1..=9).map(|n| backoff(every, n, None).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        // A short period starts from itself.
        let one = Duration::from_secs(1);
        assert_eq!(backoff(one, 1, None), one);
        assert_eq!(backoff(one, 4, None), 8 * one);
        assert_eq!(backoff(one, 100, None), BACKOFF_MAX);
        // A long period is never shortened by the cap.
        assert_eq!(backoff(24 * 60 * MIN, 100, None), 24 * 60 * MIN);
    }

    #[test]
    fn retry_after_is_honoured_within_reason() {
        let every = 30 * MIN;
        assert_eq!(backoff(every, 1, Some(10 * MIN)), 10 * MIN);
        assert_eq!(
            backoff(every, 1, Some(Duration::from_secs(5))),
            BACKOFF_FIRST
        );
        assert_eq!(backoff(every, 1, Some(1000 * MIN)), RETRY_AFTER_MAX);
        assert_eq!(retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn failures_of_the_upstream_pause_and_others_do_not() {
        assert!(pauses(&Error::TooManyRequests { retry_after: None }));
        assert!(pauses(&Error::UpstreamUnreachable("x".into())));
        assert!(pauses(&Error::UpstreamFailed("503".into())));
        assert!(!pauses(&Error::ManifestUnknown("gone".into())));
        assert!(!pauses(&Error::Denied("not mirrored".into())));
    }

    #[test]
    fn the_section_shows_each_image_and_escapes_errors() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(status_section(&[], now), "");
        let html = status_section(
            &[
                ImageStatus {
                    image: "library/alpine:3".into(),
                    last_run: Some(now - MIN),
                    next_run: Some(now + 29 * MIN),
                    last_success: Some(now - MIN),
                    last: Some(Warmed {
                        items: 3,
                        fetched_items: 2,
                        fetched_bytes: 2048,
                        ..Warmed::default()
                    }),
                    error: None,
                },
                ImageStatus {
                    image: "ghcr.io/org/app:latest".into(),
                    error: Some("upstream failed: <503>".into()),
                    ..ImageStatus::default()
                },
            ],
            now,
        );
        assert!(html.contains("id=warm"), "{html}");
        assert!(
            html.contains(
                "library/alpine:3</td><td>1m ago</td><td>in 29m</td><td>2 of 3 items, 2.0 KiB"
            ),
            "{html}"
        );
        assert!(
            html.contains("&lt;503&gt;") && !html.contains("<503>"),
            "{html}"
        );
    }
}
