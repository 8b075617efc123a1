//! Prometheus's text exposition format read back: each family's TYPE and
//! every sample with its labels, enough to check what a part exposes
//! (tests/tests/metrics.rs). Strict: a line it cannot read is an error, so
//! a malformed scrape fails the test instead of hiding samples.

use std::collections::BTreeMap;

/// Label names that would carry a person, a session, a project, an order,
/// a token or an address: no metric may have them and no dashboard query
/// may group or filter by them (each value would be a series of its own).
pub const PERSONAL_LABELS: [&str; 11] = [
    "user",
    "user_id",
    "email",
    "sid",
    "session",
    "project",
    "project_id",
    "order",
    "order_id",
    "token",
    "ip",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → its TYPE (`counter`, `gauge`, `histogram`, …).
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parsed = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            let fail = |why: &str| format!("line {}: {why}: {line}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        return Err(fail("a TYPE line needs a name and a type"));
                    };
                    parsed.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            parsed.samples.push(sample(line).map_err(|why| fail(&why))?);
        }
        Ok(parsed)
    }

    /// The family a sample belongs to: its own name, or for a histogram's or
    /// summary's `_bucket`, `_sum` and `_count` the name without the suffix.
    pub fn family_of<'a>(&self, sample: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if matches!(
                    self.types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                ) {
                    return base;
                }
            }
        }
        sample
    }

    /// The value of the sample `name` with exactly `labels` (in any order).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
    }

    /// The samples of family `name` (a histogram's buckets, sums and counts too).
    pub fn family<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| self.family_of(&s.name) == name)
    }
}

/// `name{label="value",…} value [timestamp]`.
fn sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' ', '\t'])
        .ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("a sample needs a name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // A label name up to `=`, or the closing brace.
            let start = match chars.peek() {
                Some((_, '}')) => {
                    let (i, _) = chars.next().ok_or("cut off")?;
                    rest = &inner[i + 1..];
                    break;
                }
                Some((i, _)) => *i,
                None => return Err("labels not closed".into()),
            };
            let eq = inner[start..].find('=').ok_or("a label without `=`")? + start;
            let key = inner[start..eq].trim().to_owned();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key}'s value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        _ => return Err(format!("a bad escape in label {key}")),
                    },
                    Some('"') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("label {key}'s value is not closed")),
                }
            }
            labels.push((key, value));
            if chars.peek().map(|(_, c)| *c) == Some(',') {
                chars.next();
            }
        }
    }
    let mut words = rest.split_whitespace();
    let value = words.next().ok_or("a sample needs a value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("`{v}` is not a number"))?,
    };
    if words.nth(1).is_some() {
        return Err("more than a value and a timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_families_samples_and_quoted_labels() {
        let text = "# HELP x_seconds help text\n\
                    # TYPE x_seconds histogram\n\
                    x_seconds_bucket{route=\"/a/{sid}\",le=\"0.5\"} 3\n\
                    x_seconds_bucket{route=\"/a/{sid}\",le=\"+Inf\"} 4\n\
                    x_seconds_sum{route=\"/a/{sid}\"} 1.25\n\
                    x_seconds_count{route=\"/a/{sid}\"} 4\n\
                    \n\
                    # TYPE y_total counter\n\
                    y_total{reason=\"header, \\\"too\\\" large\",a=\"\\\\\"} 0 1700000000\n\
                    z 7e-1\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.types["x_seconds"], "histogram");
        assert_eq!(e.types["y_total"], "counter");
        assert_eq!(e.samples.len(), 6);
        assert_eq!(e.family_of("x_seconds_count"), "x_seconds");
        assert_eq!(e.family_of("y_total"), "y_total");
        assert_eq!(e.family("x_seconds").count(), 4);
        assert_eq!(
            e.value(
                "y_total",
                &[("a", "\\"), ("reason", "header, \"too\" large")]
            ),
            Some(0.0)
        );
        assert_eq!(
            e.value("x_seconds_bucket", &[("route", "/a/{sid}"), ("le", "+Inf")]),
            Some(4.0)
        );
        assert_eq!(e.value("z", &[]), Some(0.7));
        assert_eq!(e.value("y_total", &[]), None, "labels must match exactly");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in ["x{a=\"1\" 1", "x{a=1} 1", "x", "x one", "x{a=\"1\"} 1 2 3"] {
            assert!(Exposition::parse(bad).is_err(), "{bad}");
        }
    }
}
