//! `[[warm]]`: images the mirror keeps warm on its own, on a schedule (see
//! `crate::warm`). Only the settings and their check; no scheduling here.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::humantime_serde_compat;
use crate::imageref::ImageRef;

/// The shortest `every` accepted: a warm-up is a HEAD per image (and a pull
/// when it moved); more often than this would be a poll, not a schedule.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// A `[[warm]]` entry: these images, checked every `every`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// Image references as `regmirror prefetch` takes them
    /// (`library/alpine:3`, `ghcr.io/org/app:latest`, `…@sha256:…`).
    #[serde(default)]
    pub images: Vec<String>,
    /// A file of more images, one per line (`#` comments), read at each
    /// round so it can change without a restart.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often each tag is checked (a HEAD); what moved is pulled.
    #[serde(with = "humantime_serde_compat", default = "default_every")]
    pub every: Duration,
    /// The platforms of multi-arch images to pull (`linux/amd64`,
    /// `linux/arm64/v8`), or `["all"]`. Empty: `linux/amd64`, as `prefetch`.
    #[serde(default)]
    pub platforms: Vec<String>,
}

fn default_every() -> Duration {
    Duration::from_secs(30 * 60)
}

impl WarmConfig {
    /// Refuses an entry that names nothing, an image that does not parse,
    /// a platform not `os/arch[/variant]` or an `every` below [`MIN_EVERY`].
    pub(crate) fn check(&self, i: usize) -> Result<(), String> {
        if self.images.is_empty() && self.file.is_none() {
            return Err(format!(
                "key warm[{i}]: give images = [...] or file = \"...\" (or both)"
            ));
        }
        for (j, image) in self.images.iter().enumerate() {
            ImageRef::parse(image).map_err(|e| {
                format!("key warm[{i}].images[{j}]: {image:?} is not an image reference ({e})")
            })?;
        }
        if self.every < MIN_EVERY {
            return Err(format!(
                "key warm[{i}].every: {:?} is below the minimum of 1s",
                self.every
            ));
        }
        for p in &self.platforms {
            let parts = p.split('/').count();
            if p != "all" && (!(2..=3).contains(&parts) || p.split('/').any(str::is_empty)) {
                return Err(format!(
                    "key warm[{i}].platforms: {p:?} is not os/arch[/variant] or \"all\""
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(images: &[&str]) -> WarmConfig {
        WarmConfig {
            images: images.iter().map(|s| s.to_string()).collect(),
            file: None,
            every: default_every(),
            platforms: Vec::new(),
        }
    }

    #[test]
    fn entries_are_checked() {
        assert_eq!(
            entry(&["library/alpine:3", "ghcr.io/org/app:latest"]).check(0),
            Ok(())
        );
        let e = entry(&[]).check(2).unwrap_err();
        assert!(e.contains("warm[2]") && e.contains("file"), "{e}");
        let e = entry(&["Alpine"]).check(0).unwrap_err();
        assert!(
            e.contains("warm[0].images[0]") && e.contains("Alpine"),
            "{e}"
        );
        let mut short = entry(&["alpine"]);
        short.every = Duration::from_millis(10);
        assert!(short.check(0).unwrap_err().contains("warm[0].every"));
        let mut plat = entry(&["alpine"]);
        plat.platforms = vec!["linux/arm64/v8".into(), "all".into()];
        assert_eq!(plat.check(0), Ok(()));
        plat.platforms = vec!["amd64".into()];
        assert!(plat.check(0).unwrap_err().contains("platforms"));
        let file = WarmConfig {
            file: Some(PathBuf::from("/etc/regmirror/warm.txt")),
            ..entry(&[])
        };
        assert_eq!(file.check(0), Ok(()));
    }
}
