//! The Prometheus text exposition format (version 0.0.4), written straight from the figures:
//! a registry crate would put its own counters on the hot path, where ours are plain cells.

use std::fmt::Write;

use super::Timing;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A page of metric families, written in order.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: its help line and type. Samples of it follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {}", kind.name());
    }

    /// One sample of an integer value.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.name_and_labels(name, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// One sample of a real value.
    pub fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.name_and_labels(name, labels, None);
        let _ = writeln!(self.out, " {}", format_f64(value));
    }

    /// A family with one sample and no labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram: cumulative buckets at `bounds` (in the unit recorded),
    /// `+Inf`, sum and count, every value divided by `per_unit` (1e6 from µs to seconds;
    /// dividing keeps bounds such as 0.0001 exact, multiplying by 1e-6 would not).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], timing: &Timing, bounds: &[u64], per_unit: f64) {
        let bucket = format!("{name}_bucket");
        for &bound in bounds {
            let le = format_f64(bound as f64 / per_unit);
            self.name_and_labels(&bucket, labels, Some(&le));
            let _ = writeln!(self.out, " {}", timing.count_at_most(bound));
        }
        self.name_and_labels(&bucket, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", timing.count());
        self.sample_f64(&format!("{name}_sum"), labels, timing.sum() as f64 / per_unit);
        self.sample(&format!("{name}_count"), labels, timing.count());
    }

    pub fn finish(self) -> String {
        self.out
    }

    fn name_and_labels(&mut self, name: &str, labels: &[(&str, &str)], le: Option<&str>) {
        self.out.push_str(name);
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(key);
            self.out.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }
}

fn format_f64(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

/// Latency bucket bounds, µs (exported in seconds): 25 µs to 10 s.
const LATENCY_BOUNDS_US: [u64; 18] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];
const QUANTILES: [(f64, &str); 4] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999")];
/// Microseconds per second: recorded values are µs, exported ones seconds.
pub const MICROS_PER_SECOND: f64 = 1e6;

impl Exposition {
    /// A latency histogram family `name` (seconds) with one series per `(label value, timing)`,
    /// and beside it `<name>_recent_seconds`: quantiles of the last minute or two.
    pub fn latency_family(&mut self, name: &str, help: &str, label: &str, series: &[(&str, Option<(Timing, Timing)>)]) {
        self.family(name, Kind::Histogram, help);
        for (value, timing) in series {
            if let Some((total, _)) = timing {
                self.histogram(name, &[(label, value)], total, &LATENCY_BOUNDS_US, MICROS_PER_SECOND);
            }
        }
        let recent_name = format!("{}_recent_seconds", name.trim_end_matches("_seconds"));
        self.family(&recent_name, Kind::Gauge, &format!("Quantiles of {name} over the last 1-2 minutes."));
        for (value, timing) in series {
            if let Some((_, recent)) = timing.as_ref().filter(|(_, recent)| !recent.is_empty()) {
                for (q, q_label) in QUANTILES {
                    let seconds = recent.quantile(q) as f64 / MICROS_PER_SECOND;
                    self.sample_f64(&recent_name, &[(label, value), ("quantile", q_label)], seconds);
                }
            }
        }
    }
}
