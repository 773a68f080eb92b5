//! Sizes in configuration files: `"20GiB"`, `"500 MB"` or a number of bytes.

use serde::Deserialize;

/// A size in bytes, written `"20GiB"`, `"500 MB"` or as a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a number with an optional unit: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad =
            || format!("invalid size {s:?}; write e.g. \"20GiB\", \"500MB\" or a number of bytes");
        let value: f64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1000,
            "kib" => 1 << 10,
            "mb" | "m" => 1000 * 1000,
            "mib" => 1 << 20,
            "gb" | "g" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "tb" | "t" => 1000 * 1000 * 1000 * 1000,
            "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Space the cache leaves free on its filesystem (nginx's `min_free`):
/// a size (`"2GiB"`) or a percentage of the filesystem (`"5%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    Bytes(u64),
    /// Hundredths of a percent of the filesystem's size (`"2.5%"` is 250).
    PerTenThousand(u16),
}

impl MinFree {
    /// Parses `"5%"` (0 to 100, two decimals at most) or a size.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let Some(pct) = t.strip_suffix('%') else {
            return ByteSize::parse(t).map(|b| MinFree::Bytes(b.0));
        };
        let bad = || format!("invalid min_free {s:?}; write e.g. \"5%\" or \"2GiB\"");
        let pct = pct.trim();
        if pct.is_empty() || !pct.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(bad());
        }
        let value: f64 = pct.parse().map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&value) {
            return Err(bad());
        }
        Ok(MinFree::PerTenThousand((value * 100.0).round() as u16))
    }

    /// The bytes to leave free on a filesystem of `fs_size` bytes.
    pub fn bytes(self, fs_size: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::PerTenThousand(p) => (u128::from(fs_size) * u128::from(p) / 10_000) as u64,
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{b} bytes"),
            MinFree::PerTenThousand(p) => write!(f, "{}.{:02}%", p / 100, p % 100),
        }
    }
}

impl<'de> Deserialize<'de> for MinFree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(MinFree::Bytes(n)),
            Raw::Text(s) => MinFree::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_free_is_a_percentage_or_a_size() {
        assert_eq!(MinFree::parse("5%"), Ok(MinFree::PerTenThousand(500)));
        assert_eq!(MinFree::parse(" 2.5 %"), Ok(MinFree::PerTenThousand(250)));
        assert_eq!(MinFree::parse("0%"), Ok(MinFree::PerTenThousand(0)));
        assert_eq!(MinFree::parse("2GiB"), Ok(MinFree::Bytes(2 << 30)));
        assert_eq!(MinFree::parse("0"), Ok(MinFree::Bytes(0)));
        for bad in ["101%", "-1%", "%", "five%", "1e2%", "lots"] {
            assert!(MinFree::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(MinFree::PerTenThousand(500).bytes(300_000_000), 15_000_000);
        assert_eq!(MinFree::PerTenThousand(10_000).bytes(u64::MAX), u64::MAX);
        assert_eq!(MinFree::Bytes(7).bytes(1), 7);
        assert_eq!(MinFree::PerTenThousand(250).to_string(), "2.50%");
    }
}
