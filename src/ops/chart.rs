//! The status page's small charts, drawn by the mirror as inline SVG (no
//! script, nothing loaded): the history's counter samples are cut into the
//! intervals of a window ([`bars`]), then drawn ([`saved_svg`], bytes served
//! from the cache against bytes fetched upstream; [`ratio_svg`], the hit
//! ratio). Pure functions of their arguments.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::metrics::Sample;

/// The span a chart covers, cut into `bars` intervals.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// For ids and captions: `hour`, `day`.
    pub name: &'static str,
    pub span: Duration,
    pub bars: usize,
}

/// The last hour, a bar a minute.
pub const HOUR: Window = Window {
    name: "hour",
    span: Duration::from_secs(3600),
    bars: 60,
};

/// The last day, a bar per quarter of an hour.
pub const DAY: Window = Window {
    name: "day",
    span: Duration::from_secs(86400),
    bars: 96,
};

/// What the counters did in one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bar {
    pub hits: u64,
    pub lookups: u64,
    /// Bytes sent to clients from the cache (bandwidth saved).
    pub saved: u64,
    /// Bytes fetched from upstreams.
    pub fetched: u64,
}

impl Bar {
    fn add(&mut self, o: &Bar) {
        self.hits += o.hits;
        self.lookups += o.lookups;
        self.saved += o.saved;
        self.fetched += o.fetched;
    }
}

/// Chart size (the SVG's user units are pixels).
const WIDTH: f64 = 240.0;
const HEIGHT: f64 = 48.0;
const SAVED_COLOUR: &str = "#3a7";
const FETCHED_COLOUR: &str = "#bbb";
const RATIO_COLOUR: &str = "#37c";

/// The window's intervals ending at `now`, oldest first: what the counters
/// did between consecutive samples, each change counted in the interval of
/// the later sample; `None` for an interval no sample ends in (before the
/// process started, or while it was not sampled).
pub fn bars(samples: &[Sample], now: SystemTime, w: &Window) -> Vec<Option<Bar>> {
    let mut out = vec![None; w.bars];
    let width = w.span.as_secs_f64() / w.bars as f64;
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let age = now.duration_since(b.at).unwrap_or(Duration::ZERO);
        if age >= w.span {
            continue;
        }
        // Whole intervals back from now; floating point only for the cut.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let back = (age.as_secs_f64() / width) as usize;
        let Some(i) = w.bars.checked_sub(back + 1) else {
            continue;
        };
        let delta = Bar {
            hits: b.hits.saturating_sub(a.hits),
            lookups: b.lookups.saturating_sub(a.lookups),
            saved: b.bytes_from_cache.saturating_sub(a.bytes_from_cache),
            fetched: b.upstream_bytes.saturating_sub(a.upstream_bytes),
        };
        out[i].get_or_insert_with(Bar::default).add(&delta);
    }
    out
}

/// The sum of the intervals.
pub fn total(bars: &[Option<Bar>]) -> Bar {
    let mut t = Bar::default();
    for b in bars.iter().flatten() {
        t.add(b);
    }
    t
}

fn open_svg(id: &str, label: &str) -> String {
    let label = label
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('"', "&quot;");
    format!(
        "<svg id=\"{id}\" class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         role=\"img\" aria-label=\"{label}\"><title>{label}</title>\
         <line x1=\"0\" y1=\"{HEIGHT}\" x2=\"{WIDTH}\" y2=\"{HEIGHT}\" stroke=\"#ccc\"/>"
    )
}

/// Bytes served from the cache (green, from the bottom) and fetched upstream
/// (grey, above), per interval, scaled to the busiest one.
pub fn saved_svg(id: &str, label: &str, bars: &[Option<Bar>]) -> String {
    let mut svg = open_svg(id, label);
    let most = bars
        .iter()
        .flatten()
        .map(|b| b.saved.saturating_add(b.fetched))
        .max()
        .unwrap_or(0);
    let step = WIDTH / bars.len().max(1) as f64;
    if most > 0 {
        for (i, b) in bars.iter().enumerate() {
            let Some(b) = b else { continue };
            let x = i as f64 * step;
            let saved = HEIGHT * b.saved as f64 / most as f64;
            let fetched = HEIGHT * b.fetched as f64 / most as f64;
            for (h, top, colour) in [
                (saved, HEIGHT - saved, SAVED_COLOUR),
                (fetched, HEIGHT - saved - fetched, FETCHED_COLOUR),
            ] {
                if h > 0.0 {
                    let _ = write!(
                        svg,
                        "<rect x=\"{x:.1}\" y=\"{top:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{colour}\"/>",
                        w = (step - 0.5).max(0.5),
                    );
                }
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The hit ratio of each interval with lookups, a line from 0 % (bottom) to
/// 100 % (top), broken where an interval had none; a lone point is a dot.
pub fn ratio_svg(id: &str, label: &str, bars: &[Option<Bar>]) -> String {
    let mut svg = open_svg(id, label);
    let _ = write!(
        svg,
        "<line x1=\"0\" y1=\"{mid}\" x2=\"{WIDTH}\" y2=\"{mid}\" stroke=\"#eee\" stroke-dasharray=\"2 2\"/>",
        mid = HEIGHT / 2.0
    );
    let step = WIDTH / bars.len().max(1) as f64;
    let point = |i: usize, b: &Bar| {
        let ratio = b.hits as f64 / b.lookups as f64;
        (
            i as f64 * step + step / 2.0,
            HEIGHT - ratio.clamp(0.0, 1.0) * (HEIGHT - 2.0) - 1.0,
        )
    };
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut run = Vec::new();
    for (i, b) in bars.iter().enumerate() {
        match b {
            Some(b) if b.lookups > 0 => run.push(point(i, b)),
            _ => {
                if !run.is_empty() {
                    runs.push(std::mem::take(&mut run));
                }
            }
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    for run in runs {
        if let [(x, y)] = run[..] {
            let _ = write!(
                svg,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"1.5\" fill=\"{RATIO_COLOUR}\"/>"
            );
        } else {
            let points: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                svg,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{RATIO_COLOUR}\" stroke-width=\"1.5\"/>",
                points.join(" ")
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_000_000);

    fn at(secs: u64, hits: u64, lookups: u64, saved: u64, fetched: u64) -> Sample {
        Sample {
            at: SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs),
            hits,
            lookups,
            bytes_from_cache: saved,
            upstream_bytes: fetched,
        }
    }

    #[test]
    fn changes_land_in_the_interval_of_the_later_sample() {
        let now = SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(3600);
        let samples = [
            at(0, 0, 0, 0, 0),
            at(60, 1, 2, 100, 50),
            at(120, 1, 2, 100, 50),
            at(3590, 4, 6, 400, 60),
        ];
        let b = bars(&samples, now, &HOUR);
        assert_eq!(b.len(), 60);
        // 3540 s ago: the 59th interval back; 3480 s ago: the 58th.
        assert_eq!(
            b[0],
            Some(Bar {
                hits: 1,
                lookups: 2,
                saved: 100,
                fetched: 50
            })
        );
        assert_eq!(b[1], Some(Bar::default()), "sampled, nothing happened");
        assert!(b[2..59].iter().all(Option::is_none), "{b:?}");
        assert_eq!(b[59].map(|x| x.saved), Some(300));
        assert_eq!(
            total(&b),
            Bar {
                hits: 4,
                lookups: 6,
                saved: 400,
                fetched: 60
            }
        );
        // A day: the same changes, in two quarters of an hour.
        let d = bars(&samples, now, &DAY);
        assert_eq!(d.len(), 96);
        assert_eq!(d.iter().flatten().count(), 2);
        assert_eq!(total(&d), total(&b));
    }

    #[test]
    fn samples_older_than_the_window_or_alone_draw_nothing() {
        let now = SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(7200);
        let old = [at(0, 0, 0, 0, 0), at(60, 5, 5, 5, 5)];
        assert!(bars(&old, now, &HOUR).iter().all(Option::is_none));
        assert!(bars(&old[..1], now, &HOUR).iter().all(Option::is_none));
        assert_eq!(bars(&old, now, &DAY).iter().flatten().count(), 1);
        assert!(bars(&[], now, &DAY).iter().all(Option::is_none));
    }

    #[test]
    fn saved_bars_are_scaled_to_the_busiest_interval() {
        let mut b = vec![None; 4];
        b[1] = Some(Bar {
            saved: 30,
            fetched: 10,
            ..Bar::default()
        });
        b[3] = Some(Bar {
            saved: 10,
            ..Bar::default()
        });
        let svg = saved_svg("s", "saved & more", &b);
        assert!(svg.starts_with("<svg id=\"s\""), "{svg}");
        assert!(svg.contains("<title>saved &amp; more</title>"), "{svg}");
        assert!(svg.ends_with("</svg>"));
        // The busiest: 3/4 green from the bottom, 1/4 grey on top.
        assert!(
            svg.contains(
                "<rect x=\"60.0\" y=\"12.0\" width=\"59.5\" height=\"36.0\" fill=\"#3a7\"/>"
            ),
            "{svg}"
        );
        assert!(
            svg.contains(
                "<rect x=\"60.0\" y=\"0.0\" width=\"59.5\" height=\"12.0\" fill=\"#bbb\"/>"
            ),
            "{svg}"
        );
        assert!(
            svg.contains("<rect x=\"180.0\" y=\"36.0\" width=\"59.5\" height=\"12.0\""),
            "{svg}"
        );
        assert_eq!(
            svg.matches("<rect").count(),
            3,
            "no bar where nothing was sampled"
        );
        let empty = saved_svg("e", "nothing", &[None, Some(Bar::default())]);
        assert!(!empty.contains("<rect"), "{empty}");
        assert!(empty.contains("<line"), "a baseline even when empty");
    }

    #[test]
    fn the_ratio_line_breaks_where_nothing_was_looked_up() {
        let r = |hits, lookups| {
            Some(Bar {
                hits,
                lookups,
                ..Bar::default()
            })
        };
        let b = vec![r(1, 1), r(0, 2), None, r(1, 2), r(0, 0), r(1, 4)];
        let svg = ratio_svg("r", "hit ratio", &b);
        assert!(
            svg.contains("<polyline points=\"20.0,1.0 60.0,47.0\""),
            "100 % at the top, 0 % at the bottom: {svg}"
        );
        assert!(svg.contains("<circle cx=\"140.0\" cy=\"24.0\""), "{svg}");
        assert!(svg.contains("<circle cx=\"220.0\" cy=\"35.5\""), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
    }
}
