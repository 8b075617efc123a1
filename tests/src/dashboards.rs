//! The Grafana dashboards in `dashboards/*.json` as the tests see them:
//! every panel's queries with Grafana's variables filled in the way
//! Grafana would, a structural check (data source, ids, metric and label
//! names), and a walk asking a real Prometheus every query.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::exposition::PERSONAL_LABELS;
use crate::prometheus::Prometheus;

/// Where each part's code lives, by the metric prefix naming it.
const PARTS: &[(&str, &str)] = &[
    ("opencloud_control_", "control/src"),
    ("opencloud_gateway_", "gateway/src"),
    ("opencloud_agent_", "agent/src"),
];

/// The repository's root (the e2e crate is `tests/` in it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

pub struct Dashboard {
    pub file: String,
    pub json: Value,
}

/// One query a dashboard makes: a panel target, or a template variable's.
pub struct Query {
    pub panel: String,
    pub expr: String,
    /// A time series panel: Grafana asks `query_range`.
    pub range: bool,
}

impl Dashboard {
    /// Every `dashboards/*.json`, by file name.
    pub fn all() -> Vec<Dashboard> {
        let dir = repo_root().join("dashboards");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no dashboards in {}", dir.display());
        files
            .into_iter()
            .map(|path| Dashboard {
                file: path
                    .file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned(),
                json: serde_json::from_str(
                    &std::fs::read_to_string(&path).expect("a readable dashboard"),
                )
                .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            })
            .collect()
    }

    fn panels(&self) -> &[Value] {
        self.json["panels"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn variables(&self) -> &[Value] {
        self.json["templating"]["list"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Every query, with `variables` substituted.
    pub fn queries(&self, variables: &[(&str, String)]) -> Vec<Query> {
        let mut found: Vec<Query> = self
            .variables()
            .iter()
            .filter(|v| v["type"] == "query")
            .map(|v| Query {
                panel: format!("variable ${}", v["name"].as_str().unwrap_or("?")),
                expr: label_values_as_query(v["query"]["query"].as_str().unwrap_or_default()),
                range: false,
            })
            .collect();
        for panel in self.panels() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                found.push(Query {
                    panel: panel["title"].as_str().unwrap_or("?").to_owned(),
                    expr: substitute(target["expr"].as_str().unwrap_or_default(), variables),
                    range: panel["type"] == "timeseries",
                });
            }
        }
        found
    }

    /// What is wrong with the dashboard's shape, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut problem = |what: String| problems.push(format!("{}: {what}", self.file));
        for key in ["uid", "title"] {
            if self.json[key].as_str().unwrap_or_default().is_empty() {
                problem(format!("no {key}"));
            }
        }
        if !self.variables().iter().any(|v| {
            v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
        }) {
            problem("no `datasource` variable of type datasource (prometheus)".into());
        }
        let mut ids = BTreeSet::new();
        for panel in self.panels() {
            let title = panel["title"].as_str().unwrap_or("?");
            if !ids.insert(panel["id"].to_string()) {
                problem(format!("panel {title:?}: id {} used twice", panel["id"]));
            }
            if matches!(panel["type"].as_str(), Some("row" | "text")) {
                continue;
            }
            if panel["datasource"]["uid"] != "${datasource}" {
                problem(format!(
                    "panel {title:?}: data source is not ${{datasource}}"
                ));
            }
            let targets = panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if targets.is_empty() {
                problem(format!("panel {title:?}: no targets"));
            }
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default();
                if target["datasource"]["uid"] != "${datasource}" {
                    problem(format!(
                        "panel {title:?}: target {expr:?} not on ${{datasource}}"
                    ));
                }
                let names = names_in(&substitute(
                    expr,
                    &grafana_variables(Duration::from_secs(60), Duration::from_secs(2)),
                ));
                let legend = target["legendFormat"].as_str().unwrap_or_default();
                for label in names.labels.iter().chain(&legend_labels(legend)) {
                    if PERSONAL_LABELS.contains(&label.as_str()) {
                        problem(format!(
                            "panel {title:?}: {expr:?} uses label {label:?}, unbounded"
                        ));
                    }
                }
                if names.metrics.is_empty() {
                    problem(format!("panel {title:?}: {expr:?} names no metric"));
                }
                for metric in &names.metrics {
                    if let Err(why) = metric_defined(metric) {
                        problem(format!("panel {title:?}: {expr:?}: {why}"));
                    }
                }
            }
        }
        problems
    }
}

/// An alerting rule of `dashboards/alerts.yml`.
pub struct AlertRule {
    pub alert: String,
    pub expr: String,
}

impl AlertRule {
    /// Every rule of `dashboards/alerts.yml`, read line by line (the file
    /// is ours: `- alert: NAME`, then `expr: …` on one line or as a `|`
    /// block).
    pub fn all() -> Vec<AlertRule> {
        let path = repo_root().join("dashboards").join("alerts.yml");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let lines: Vec<&str> = text.lines().collect();
        let mut rules = Vec::new();
        let mut alert = None;
        for (n, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            if let Some(name) = trimmed.strip_prefix("- alert:") {
                alert = Some(name.trim().to_owned());
            } else if let Some(expr) = trimmed.strip_prefix("expr:") {
                let indent = line.len() - trimmed.len();
                let expr = match expr.trim() {
                    "|" => lines[n + 1..]
                        .iter()
                        .take_while(|l| l.len() - l.trim_start().len() > indent)
                        .map(|l| l.trim())
                        .collect::<Vec<_>>()
                        .join(" "),
                    one_line => one_line.to_owned(),
                };
                rules.push(AlertRule {
                    alert: alert.take().expect("`- alert:` before its expr"),
                    expr,
                });
            }
        }
        assert!(!rules.is_empty(), "no rules in {}", path.display());
        rules
    }

    /// What is wrong with the rule's names (unknown metrics, unbounded labels).
    pub fn problems(&self) -> Vec<String> {
        let names = names_in(&self.expr);
        let mut problems: Vec<String> = names
            .metrics
            .iter()
            .filter_map(|metric| metric_defined(metric).err())
            .collect();
        problems.extend(
            names
                .labels
                .iter()
                .filter(|label| PERSONAL_LABELS.contains(&label.as_str()))
                .map(|label| format!("label {label:?} is unbounded")),
        );
        if names.metrics.is_empty() {
            problems.push("names no metric".into());
        }
        problems
            .into_iter()
            .map(|why| format!("alerts.yml {}: {why}", self.alert))
            .collect()
    }
}

/// Grafana's built-in variables as Grafana fills them for a dashboard
/// showing the last `range` at `step` from a Prometheus scraping every
/// second, with All chosen for `$host`.
pub fn grafana_variables(range: Duration, step: Duration) -> Vec<(&'static str, String)> {
    let scrape = Duration::from_secs(1);
    // Grafana: max($__interval + scrape interval, 4 × scrape interval).
    let rate_interval = (step + scrape).max(4 * scrape);
    vec![
        ("__rate_interval", format!("{}s", rate_interval.as_secs())),
        ("__interval", format!("{}s", step.as_secs())),
        ("__range", format!("{}s", range.as_secs())),
        ("host", ".*".into()),
    ]
}

/// `expr` with `${name}` and `$name` replaced by their values (longest
/// names first, so `$__range` never eats the start of a longer name).
pub fn substitute(expr: &str, variables: &[(&str, String)]) -> String {
    let mut sorted: Vec<&(&str, String)> = variables.iter().collect();
    sorted.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = expr.to_owned();
    for (name, value) in sorted {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

/// A query variable's `label_values(metric, label)` as the query Grafana
/// runs for it: the metric's series.
fn label_values_as_query(definition: &str) -> String {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not label_values(metric, label): {definition:?}"));
    let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
    format!("count by ({}) ({})", label.trim(), metric.trim())
}

/// Metric and label names a PromQL expression uses.
#[derive(Debug, Default, PartialEq)]
pub struct Names {
    pub metrics: Vec<String>,
    pub labels: Vec<String>,
}

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Operators, and aggregations (`sum by (…) (…)` has no `(` after `sum`).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metric and label names in `expr` (variables already substituted):
/// identifiers inside `{…}` and grouping clauses are labels; the others,
/// unless functions (followed by `(`) or keywords, are metrics.
pub fn names_in(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Names::default();
    let (mut in_braces, mut in_brackets) = (false, false);
    let mut depth = 0usize;
    let mut grouping_at: Option<usize> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            '{' => in_braces = true,
            '}' => in_braces = false,
            '[' => in_brackets = true,
            ']' => in_brackets = false,
            '(' => depth += 1,
            ')' => {
                if grouping_at == Some(depth) {
                    grouping_at = None;
                }
                depth = depth.saturating_sub(1);
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number or a duration (1e3, 0.95, 10s).
                while i + 1 < chars.len()
                    && (chars[i + 1].is_ascii_alphanumeric() || chars[i + 1] == '.')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i + 1 < chars.len()
                    && (chars[i + 1].is_ascii_alphanumeric() || matches!(chars[i + 1], '_' | ':'))
                {
                    i += 1;
                }
                let ident: String = chars[start..=i].iter().collect();
                let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
                if in_brackets {
                } else if in_braces || grouping_at.is_some() {
                    names.labels.push(ident);
                } else if GROUPING.contains(&ident.as_str()) {
                    if next == Some(&'(') {
                        grouping_at = Some(depth + 1);
                    }
                } else if next != Some(&'(') && !KEYWORDS.contains(&ident.to_lowercase().as_str()) {
                    names.metrics.push(ident);
                }
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// The `{{label}}`s of a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|rest| rest.split_once("}}"))
        .map(|(label, _)| label.trim().to_owned())
        .collect()
}

/// Whether `metric` follows the naming scheme (`opencloud_<part>_…`) and
/// its part's code records it (histograms: the name without `_bucket`,
/// `_sum` or `_count`).
pub fn metric_defined(metric: &str) -> Result<(), String> {
    let (_, dir) = PARTS
        .iter()
        .find(|(prefix, _)| metric.starts_with(prefix))
        .ok_or_else(|| format!("{metric} is not opencloud_(control|gateway|agent)_…"))?;
    let mut candidates = vec![metric.to_owned()];
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = metric.strip_suffix(suffix) {
            candidates.push(base.to_owned());
        }
    }
    let code = source_text(&repo_root().join(dir));
    if candidates
        .iter()
        .any(|name| code.contains(&format!("\"{name}\"")))
    {
        Ok(())
    } else {
        Err(format!("no code in {dir} records {metric}"))
    }
}

/// Every `.rs` file under `dir`, concatenated.
fn source_text(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            text.push_str(&source_text(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    text
}

/// Asks `prometheus` every query of every dashboard over the last `range`
/// (instant, and `query_range` at `step` for time series); one line per
/// query that fails or has no data, naming the file, panel and query.
pub async fn unanswered(
    prometheus: &Prometheus,
    dashboards: &[Dashboard],
    range: Duration,
    step: Duration,
) -> Vec<String> {
    let variables = grafana_variables(range, step);
    let mut failures = Vec::new();
    for dashboard in dashboards {
        for query in dashboard.queries(&variables) {
            let mut answers = vec![("query", prometheus.query(&query.expr).await)];
            if query.range {
                answers.push((
                    "query_range",
                    prometheus.query_range(&query.expr, range, step).await,
                ));
            }
            for (api, answer) in answers {
                let why = match answer {
                    Ok(result) if !result.is_empty() => continue,
                    Ok(_) => "no data".to_owned(),
                    Err(e) => e.to_string(),
                };
                failures.push(format!(
                    "{} / {:?} / {api} {:?}: {why}",
                    dashboard.file, query.panel, query.expr
                ));
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_told_from_functions_labels_and_durations() {
        let names = names_in(
            r#"histogram_quantile(0.95, sum by (le, class) (rate(opencloud_gateway_request_duration_seconds_bucket{status=~"5.."}[10s]))) / on(instance) group_left up or vector(0)"#,
        );
        assert_eq!(
            names,
            Names {
                metrics: vec![
                    "opencloud_gateway_request_duration_seconds_bucket".into(),
                    "up".into()
                ],
                labels: vec![
                    "le".into(),
                    "class".into(),
                    "status".into(),
                    "instance".into()
                ],
            }
        );
    }

    #[test]
    fn variables_are_filled_longest_name_first() {
        let filled = substitute(
            r#"rate(x{host=~"$host"}[$__rate_interval]) + increase(x[${__range}])"#,
            &grafana_variables(Duration::from_secs(90), Duration::from_secs(2)),
        );
        assert_eq!(filled, r#"rate(x{host=~".*"}[4s]) + increase(x[90s])"#);
    }

    #[test]
    fn alert_rules_are_read_with_their_block_exprs() {
        let rules = AlertRule::all();
        let errors = rules
            .iter()
            .find(|r| r.alert == "OpenCloudGatewayErrors")
            .expect("the gateway errors rule");
        assert!(
            errors.expr.starts_with("sum by (instance)"),
            "{}",
            errors.expr
        );
        assert!(errors.expr.ends_with("> 0.05"), "{}", errors.expr);
        assert!(rules.iter().all(|r| !r.expr.is_empty() && r.expr != "|"));
    }

    #[test]
    fn legend_labels_are_read() {
        assert_eq!(
            legend_labels("host {{host}} {{ reason }}"),
            ["host", "reason"]
        );
    }
}
