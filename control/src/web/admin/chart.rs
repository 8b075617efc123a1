//! Small bar charts drawn on the server as inline SVG (no JavaScript): the
//! geometry is computed here, `chart.html` draws it, and askama escapes
//! every text. Each chart has a `<title>`, a `<desc>` that says what it
//! shows in words, and an `aria-label`; each bar's own `<title>` is its
//! value, shown on hover.

use super::numbers::trim_number;

/// The SVG's size in user units (it scales to the page's width).
pub const WIDTH: f64 = 360.0;
pub const HEIGHT: f64 = 170.0;
/// Room for the y labels on the left and the x labels below.
const LEFT: f64 = 34.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 24.0;

/// One bar: its place, and what it stands for.
pub struct Bar {
    pub x: String,
    pub y: String,
    pub width: String,
    pub height: String,
    /// The bucket, e.g. `14:00` or `12-05`.
    pub label: String,
    pub value: String,
}

/// A label under the x axis.
pub struct Tick {
    pub x: String,
    pub text: String,
}

/// A chart ready for `chart.html`.
pub struct Chart {
    /// Unique on the page; the SVG's ids derive from it.
    pub id: String,
    pub title: String,
    pub desc: String,
    /// Only the buckets with a value other than 0 get a bar.
    pub bars: Vec<Bar>,
    pub ticks: Vec<Tick>,
    /// The y axis' top value, in words.
    pub y_max: String,
    /// Shown across the chart when every value is 0.
    pub empty_text: Option<String>,
    // The plot area's edges, for the axis lines.
    pub plot_left: String,
    pub plot_right: String,
    pub plot_top: String,
    pub plot_bottom: String,
    pub width: String,
    pub height: String,
}

/// What to draw: buckets in time order as (label, value), the unit the
/// values are in (`session`/`sessions`, `USD`), a tick label every `tick_every`
/// buckets, and the sentence for a chart with no data.
pub struct Spec<'a> {
    pub id: String,
    pub title: String,
    /// The unit for exactly 1, and for any other value.
    pub unit_one: &'a str,
    pub unit: &'a str,
    pub points: Vec<(String, f64)>,
    pub tick_every: usize,
    pub empty_text: &'a str,
    /// Decimals the values are shown with.
    pub decimals: usize,
}

/// A bar chart of `spec`.
pub fn bars(spec: Spec<'_>) -> Chart {
    let n = spec.points.len().max(1);
    let max = spec.points.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let top = nice_ceiling(max);
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let slot = plot_width / n as f64;
    let gap = (slot * 0.2).min(4.0);
    let px = |v: f64| format!("{v:.1}");
    let words = |v: f64| {
        let unit = if v == 1.0 { spec.unit_one } else { spec.unit };
        format!("{} {unit}", trim_number(v, spec.decimals))
    };

    let bars = spec
        .points
        .iter()
        .enumerate()
        .filter(|(_, (_, v))| *v != 0.0)
        .map(|(i, (label, v))| {
            let height = (v.abs() / top * plot_height).max(1.0);
            Bar {
                x: px(LEFT + i as f64 * slot + gap / 2.0),
                y: px(TOP + plot_height - height),
                width: px(slot - gap),
                height: px(height),
                label: label.clone(),
                value: words(*v),
            }
        })
        .collect();
    let ticks = spec
        .points
        .iter()
        .enumerate()
        .filter(|(i, _)| i % spec.tick_every.max(1) == 0)
        .map(|(i, (label, _))| Tick {
            x: px(LEFT + (i as f64 + 0.5) * slot),
            text: label.clone(),
        })
        .collect();

    let empty = max == 0.0;
    let (first, last) = (
        spec.points.first().map_or("", |(l, _)| l.as_str()),
        spec.points.last().map_or("", |(l, _)| l.as_str()),
    );
    let desc = if empty {
        format!("{}: from {first} to {last}, none.", spec.title)
    } else {
        let (peak_label, peak) =
            spec.points.iter().fold(
                ("", 0.0),
                |best, (l, v)| if *v > best.1 { (l.as_str(), *v) } else { best },
            );
        let total: f64 = spec.points.iter().map(|(_, v)| v).sum();
        format!(
            "{}: from {first} to {last}, {} in all, most at {peak_label} ({}).",
            spec.title,
            words(total),
            words(peak)
        )
    };
    Chart {
        id: spec.id,
        title: spec.title,
        desc,
        bars,
        ticks,
        y_max: trim_number(top, spec.decimals),
        empty_text: empty.then(|| spec.empty_text.to_owned()),
        plot_left: px(LEFT),
        plot_right: px(WIDTH - RIGHT),
        plot_top: px(TOP),
        plot_bottom: px(TOP + plot_height),
        width: px(WIDTH),
        height: px(HEIGHT),
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `v` (1 for nothing),
/// so the axis' top reads as a round number.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|step| step * magnitude)
        .find(|top| *top >= v)
        .unwrap_or(10.0 * magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(points: Vec<(String, f64)>) -> Spec<'static> {
        Spec {
            id: "t".into(),
            title: "Opens".into(),
            unit_one: "session",
            unit: "sessions",
            points,
            tick_every: 6,
            empty_text: "No data in the last 24 h",
            decimals: 0,
        }
    }

    #[test]
    fn the_axis_tops_at_a_round_number() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(12.0), 20.0);
        assert_eq!(nice_ceiling(2100.0), 2500.0);
        assert_eq!(nice_ceiling(10.0), 10.0);
    }

    #[test]
    fn only_buckets_with_a_value_get_a_bar_and_the_tallest_fills_the_plot() {
        let points = (0..24)
            .map(|h| {
                (
                    format!("{h:02}:00"),
                    if h == 5 {
                        4.0
                    } else if h == 7 {
                        2.0
                    } else {
                        0.0
                    },
                )
            })
            .collect();
        let chart = bars(spec(points));
        assert_eq!(chart.bars.len(), 2);
        assert_eq!(chart.bars[0].label, "05:00");
        assert_eq!(chart.bars[0].value, "4 sessions");
        assert_eq!(chart.y_max, "5");
        assert_eq!(chart.ticks.len(), 4);
        assert!(chart.empty_text.is_none());
        assert!(
            chart
                .desc
                .contains("6 sessions in all, most at 05:00 (4 sessions)"),
            "{}",
            chart.desc
        );
    }

    #[test]
    fn a_chart_without_data_says_so() {
        let chart = bars(spec(vec![("00:00".into(), 0.0), ("01:00".into(), 0.0)]));
        assert!(chart.bars.is_empty());
        assert_eq!(
            chart.empty_text.as_deref(),
            Some("No data in the last 24 h")
        );
        assert!(chart.desc.ends_with("none."), "{}", chart.desc);
    }
}
