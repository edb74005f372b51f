//! OpenMetrics 1.0 for the `/metrics` listener: content negotiation on the
//! scraper's `Accept` header, and the conversion of the Prometheus text format
//! (0.0.4) that `metrics-exporter-prometheus` renders into OpenMetrics text with
//! exemplars on histogram buckets. Pure: no I/O, no globals.
//!
//! Why by hand: exemplars only exist in OpenMetrics, and
//! `metrics-exporter-prometheus` (0.18) renders the 0.0.4 text format (or
//! protobuf) without exemplars; its upstream exemplar/OpenMetrics pull request
//! (metrics-rs/metrics#320) was closed unmerged. The crates that do support
//! exemplars (`prometheus-client`) are not `metrics` facade recorders, so using
//! one would mean re-instrumenting every call site. The 0.0.4 output of the
//! exporter is regular (one HELP/TYPE per family, samples grouped per family,
//! blank lines between families), so a line-based rewrite is small.

use std::collections::HashSet;
use std::fmt::Write as _;

/// The media type answered when the scraper asks for OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The media type of the Prometheus text format, the default.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// One exemplar: the trace of an observation that fell into a bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar {
    /// The W3C trace id (16 bytes, written as 32 lowercase hex digits).
    pub trace_id: [u8; 16],
    /// The observed value (seconds, for latencies).
    pub value: f64,
    /// When it was observed, in Unix seconds.
    pub timestamp: f64,
}

/// Whether an `Accept` header prefers OpenMetrics over the Prometheus text
/// format: an `application/openmetrics-text` range with a quality above zero
/// and at least that of the best range the text format matches (`text/plain`,
/// `text/*`, `*/*`). Prometheus asks with
/// `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`
/// (2.x) or with OpenMetrics at `q=0.5` and text lower (3.x); curl's `*/*` and
/// a missing header get the text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let (mut om, mut text) = (0.0_f32, 0.0_f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0_f32;
        for param in parts {
            if let Some((k, v)) = param.split_once('=')
                && k.trim().eq_ignore_ascii_case("q")
            {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= text
}

/// Rewrites the Prometheus text format rendered by `metrics-exporter-prometheus`
/// as OpenMetrics 1.0 text:
/// - a counter family is named without `_total` in `# HELP`/`# TYPE` while its
///   samples keep it (OpenMetrics requires the suffix on samples and forbids it
///   on the family); a counter whose name lacks `_total` becomes `unknown`, so
///   the series Prometheus stores keep the same names in both formats;
/// - `"` in help text is escaped (OpenMetrics escapes it, 0.0.4 does not);
/// - `inf`/`-inf` sample values are written `+Inf`/`-Inf`;
/// - `_bucket` lines get the exemplar `exemplar(family, labels, le)` returns
///   (`labels` without `le`, values as escaped in the text);
/// - blank lines are dropped and `# EOF` ends the output.
///
/// Other lines pass through unchanged, so sample names, label values and `le`
/// strings are exactly those of the text format.
pub fn to_openmetrics(
    text: &str,
    exemplar: impl Fn(&str, &[(&str, &str)], f64) -> Option<Exemplar>,
) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4 + 8);
    let counters: HashSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    // The family being written: its name as rendered, and whether it is a
    // histogram (only histogram buckets carry exemplars).
    let mut histogram: Option<&str> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            write_metadata(&mut out, rest, &counters, &mut histogram);
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some((series, value)) => (series, value),
            None => (line, ""),
        };
        out.push_str(series);
        out.push(' ');
        out.push_str(match value {
            "inf" => "+Inf",
            "-inf" => "-Inf",
            v => v,
        });
        if let Some(family) = histogram
            && let Some(labels) = series.strip_prefix(family).and_then(|s| s.strip_prefix("_bucket{"))
            && let Some(labels) = labels.strip_suffix('}')
            && let Some(found) = bucket_exemplar(family, labels, &exemplar)
        {
            write_exemplar(&mut out, &found);
        }
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// Writes a `# HELP`/`# TYPE` (or other comment) line in OpenMetrics form.
/// `rest` is the line after `# `; `counters` names the counter families.
fn write_metadata<'a>(
    out: &mut String,
    rest: &'a str,
    counters: &HashSet<&str>,
    histogram: &mut Option<&'a str>,
) {
    let mut parts = rest.splitn(3, ' ');
    let (kind, name, tail) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
    let counter = counters.contains(name).then(|| name.strip_suffix("_total")).flatten();
    match (kind, tail) {
        ("TYPE", Some(typ)) => {
            *histogram = (typ == "histogram").then_some(name);
            match (typ, counter) {
                ("counter", Some(family)) => {
                    let _ = writeln!(out, "# TYPE {family} counter");
                }
                ("counter", None) => {
                    let _ = writeln!(out, "# TYPE {name} unknown");
                }
                _ => {
                    let _ = writeln!(out, "# TYPE {name} {typ}");
                }
            }
        }
        ("HELP", tail) => {
            out.push_str("# HELP ");
            out.push_str(counter.unwrap_or(name));
            out.push(' ');
            escape_help(out, tail.unwrap_or(""));
            out.push('\n');
        }
        // Nothing else is rendered by the exporter; OpenMetrics has no free
        // comments, so anything unknown is dropped rather than made invalid.
        _ => {}
    }
}

/// Copies 0.0.4 help text (which escapes `\` and newlines) escaping `"` too.
fn escape_help(out: &mut String, help: &str) {
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push('\\');
                out.push(chars.next().unwrap_or('\\'));
            }
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Looks up the exemplar of a `_bucket` line whose label block (without
/// braces) is `labels`.
fn bucket_exemplar(
    family: &str,
    labels: &str,
    exemplar: &impl Fn(&str, &[(&str, &str)], f64) -> Option<Exemplar>,
) -> Option<Exemplar> {
    let mut pairs = parse_labels(labels)?;
    let at = pairs.iter().position(|(k, _)| *k == "le")?;
    let (_, le) = pairs.remove(at);
    let le = match le {
        "+Inf" => f64::INFINITY,
        le => le.parse().ok()?,
    };
    exemplar(family, &pairs, le)
}

/// Splits `a="x",b="y\"z"` into `[("a", "x"), ("b", "y\"z")]` (values as
/// escaped). `None` when the block is not well formed.
fn parse_labels(block: &str) -> Option<Vec<(&str, &str)>> {
    let mut pairs = Vec::new();
    let mut rest = block;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end?;
        pairs.push((name, &after[..end]));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some(pairs)
}

/// ` # {trace_id="…"} <value> <timestamp>`.
fn write_exemplar(out: &mut String, e: &Exemplar) {
    out.push_str(" # {trace_id=\"");
    for b in e.trace_id {
        let _ = write!(out, "{b:02x}");
    }
    let _ = write!(out, "\"}} {} {:.3}", e.value, e.timestamp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_negotiation_follows_the_accept_header() {
        for (accept, want) in [
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain"), false),
            (Some("text/plain;version=0.0.4"), false),
            (Some("application/json"), false),
            (Some("application/openmetrics-text"), true),
            (Some("application/openmetrics-text; version=1.0.0"), true),
            // Prometheus 2.x.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;\
                     q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                true,
            ),
            // Prometheus 3.x.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;\
                     version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.1",
                ),
                true,
            ),
            // Scrapers that only want the text format.
            (Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"), false),
            (Some("application/openmetrics-text;q=0"), false),
            (Some("Application/OpenMetrics-Text ; Q=0.8, */*;q=0.1"), true),
        ] {
            assert_eq!(wants_openmetrics(accept), want, "{accept:?}");
        }
    }

    const TEXT: &str = r#"# HELP roost_http_requests_total HTTP requests by XRPC method (or "other") and status.
# TYPE roost_http_requests_total counter
roost_http_requests_total{method="other",status="200"} 5
roost_http_requests_total{method="com.atproto.repo.createRecord",status="200"} 2

# TYPE odd_counter counter
odd_counter 1

# HELP roost_blobs Stored blobs \\ per tier.
# TYPE roost_blobs gauge
roost_blobs{tier="disk"} 0
roost_blobs{tier="odd \"tier\""} inf

# HELP roost_http_request_duration_seconds HTTP request latency by XRPC method.
# TYPE roost_http_request_duration_seconds histogram
roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="0.05"} 0
roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="0.1"} 2
roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="+Inf"} 2
roost_http_request_duration_seconds_sum{method="com.atproto.repo.createRecord"} 0.14
roost_http_request_duration_seconds_count{method="com.atproto.repo.createRecord"} 2

# TYPE lat summary
lat{quantile="0.5"} 1
lat_sum 1
lat_count 1

"#;

    #[test]
    fn openmetrics_conversion_renames_counters_adds_exemplars_and_ends_with_eof() {
        let exemplar = |family: &str, labels: &[(&str, &str)], le: f64| {
            (family == "roost_http_request_duration_seconds"
                && labels == [("method", "com.atproto.repo.createRecord")]
                && le == 0.1)
                .then_some(Exemplar {
                    trace_id: [
                        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                        0x47, 0x36,
                    ],
                    value: 0.067,
                    timestamp: 1_700_000_000.123,
                })
        };
        let want = r#"# HELP roost_http_requests HTTP requests by XRPC method (or \"other\") and status.
# TYPE roost_http_requests counter
roost_http_requests_total{method="other",status="200"} 5
roost_http_requests_total{method="com.atproto.repo.createRecord",status="200"} 2
# TYPE odd_counter unknown
odd_counter 1
# HELP roost_blobs Stored blobs \\ per tier.
# TYPE roost_blobs gauge
roost_blobs{tier="disk"} 0
roost_blobs{tier="odd \"tier\""} +Inf
# HELP roost_http_request_duration_seconds HTTP request latency by XRPC method.
# TYPE roost_http_request_duration_seconds histogram
roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="0.05"} 0
roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="0.1"} 2 # {trace_id="4bf92f3577b34da6a3ce929d0e0e4736"} 0.067 1700000000.123
roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="+Inf"} 2
roost_http_request_duration_seconds_sum{method="com.atproto.repo.createRecord"} 0.14
roost_http_request_duration_seconds_count{method="com.atproto.repo.createRecord"} 2
# TYPE lat summary
lat{quantile="0.5"} 1
lat_sum 1
lat_count 1
# EOF
"#;
        assert_eq!(to_openmetrics(TEXT, exemplar), want);
    }

    #[test]
    fn openmetrics_exemplar_on_the_inf_bucket_and_none_without_exemplars() {
        let at_inf = |_: &str, _: &[(&str, &str)], le: f64| {
            le.is_infinite().then_some(Exemplar { trace_id: [0xab; 16], value: 12.5, timestamp: 2.0 })
        };
        let out = to_openmetrics(TEXT, at_inf);
        assert!(
            out.contains(&format!("le=\"+Inf\"}} 2 # {{trace_id=\"{}\"}} 12.5 2.000\n", "ab".repeat(16))),
            "{out}"
        );
        assert_eq!(out.matches(" # {").count(), 1, "{out}");
        let none = to_openmetrics(TEXT, |_, _, _| None);
        assert!(!none.contains(" # {") && none.ends_with("lat_count 1\n# EOF\n"), "{none}");
        assert_eq!(to_openmetrics("", |_, _, _| None), "# EOF\n");
    }

    #[test]
    fn openmetrics_label_blocks_parse_with_escapes() {
        assert_eq!(
            parse_labels(r#"a="x",b="y\"z,",le="1""#),
            Some(vec![("a", "x"), ("b", r#"y\"z,"#), ("le", "1")])
        );
        assert_eq!(parse_labels(""), Some(vec![]));
        assert_eq!(parse_labels(r#"a="x"#), None);
    }
}
