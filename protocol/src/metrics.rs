//! What every part's metrics share (docs/metrics.md lists them all): names
//! are `opencloud_<part>_…`, each part reports the build it runs, and
//! counters whose labels take fixed values are registered at zero when the
//! process starts, so `rate()` and alerts have a series before the first
//! event. Only the `metrics` facade: each part installs its own recorder.

/// The part a process is; the second word of each of its metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Control,
    Gateway,
    Agent,
}

impl Part {
    fn build_info_name(self) -> &'static str {
        match self {
            Part::Control => "opencloud_control_build_info",
            Part::Gateway => "opencloud_gateway_build_info",
            Part::Agent => "opencloud_agent_build_info",
        }
    }
}

/// Sets `opencloud_<part>_build_info{version} 1`; called once, right after
/// the part installs its recorder, with its own `CARGO_PKG_VERSION`.
pub fn record_build_info(part: Part, version: &'static str) {
    metrics::gauge!(part.build_info_name(), "version" => version).set(1.0);
}

/// A label whose values are fixed. `ALL` is the one list both the
/// registration at zero and the increments use.
pub trait LabelValue: Copy + 'static {
    const ALL: &'static [Self];
    fn label(self) -> &'static str;

    /// Every value's label, in `ALL`'s order.
    fn labels() -> Vec<&'static str> {
        Self::ALL.iter().map(|v| v.label()).collect()
    }
}

/// Registers the counter `name` at zero for every combination of the
/// labels' values (`[("provider", &["stripe"]), ("outcome", &[…])]`); a
/// counter without labels takes `&[]`. Counts already made are kept.
pub fn register_at_zero(name: &'static str, labels: &[(&'static str, &[&'static str])]) {
    let mut combinations: Vec<Vec<metrics::Label>> = vec![Vec::new()];
    for (key, values) in labels {
        combinations = combinations
            .into_iter()
            .flat_map(|known| {
                values.iter().map(move |value| {
                    let mut more = known.clone();
                    more.push(metrics::Label::new(*key, *value));
                    more
                })
            })
            .collect();
    }
    for combination in combinations {
        metrics::counter!(name, combination).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[derive(Debug, Clone, Copy)]
    enum Outcome {
        Paid,
        Failed,
    }

    impl LabelValue for Outcome {
        const ALL: &'static [Self] = &[Outcome::Paid, Outcome::Failed];
        fn label(self) -> &'static str {
            match self {
                Outcome::Paid => "paid",
                Outcome::Failed => "failed",
            }
        }
    }

    #[test]
    fn registers_every_combination_at_zero_and_keeps_counts() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("t_total", "provider" => "a", "outcome" => "paid").increment(2);
            register_at_zero(
                "t_total",
                &[("provider", &["a", "b"]), ("outcome", &Outcome::labels())],
            );
            register_at_zero("plain_total", &[]);
            record_build_info(Part::Gateway, "1.2.3");
        });
        let text = handle.render();
        for line in [
            "t_total{provider=\"a\",outcome=\"paid\"} 2",
            "t_total{provider=\"a\",outcome=\"failed\"} 0",
            "t_total{provider=\"b\",outcome=\"paid\"} 0",
            "t_total{provider=\"b\",outcome=\"failed\"} 0",
            "plain_total 0",
            "opencloud_gateway_build_info{version=\"1.2.3\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert_eq!(
            text.lines().filter(|l| l.starts_with("t_total{")).count(),
            4
        );
    }
}
