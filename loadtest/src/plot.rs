//! A small SVG chart writer for sweep results: latency (log scale) against throughput, one
//! series per server setting, p50 and p99 side by side. Written as text: nothing to install.

use std::fmt::Write as _;

/// One setting's runs: (throughput per second, p50 ms, p99 ms), in the order they ran.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, f64)>,
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 70.0;
const MARGIN_T: f64 = 50.0;
const GAP: f64 = 90.0;

/// Escapes text for SVG content and attributes.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// About `target` round tick values (steps of 1, 2 or 5 × 10^k) covering 0..=max.
pub fn linear_ticks(max: f64, target: usize) -> Vec<f64> {
    if !(max.is_finite() && max > 0.0) {
        return vec![0.0, 1.0];
    }
    let raw = max / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    let count = (max / step).ceil() as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

/// Powers of ten covering lo..=hi (both > 0).
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let lo = lo.max(1e-3).log10().floor() as i32;
    let hi = hi.max(1e-3).log10().ceil() as i32;
    (lo..=hi.max(lo + 1)).map(|e| 10f64.powi(e)).collect()
}

fn number(x: f64) -> String {
    if x >= 1e6 {
        format!("{}M", trim(x / 1e6))
    } else if x >= 1e3 {
        format!("{}k", trim(x / 1e3))
    } else {
        trim(x)
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The whole chart as an SVG document.
pub fn svg(title: &str, x_label: &str, series: &[Series]) -> String {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs.fold(0.0f64, f64::max);
    let ys = series.iter().flat_map(|s| s.points.iter().flat_map(|p| [p.1, p.2])).filter(|y| *y > 0.0);
    let (y_lo, y_hi) = ys.fold((f64::INFINITY, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (y_lo, y_hi) = if y_hi > 0.0 { (y_lo, y_hi) } else { (1.0, 10.0) };
    let x_ticks = linear_ticks(x_max * 1.05, 5);
    let y_ticks = log_ticks(y_lo, y_hi);
    let x_end = *x_ticks.last().unwrap_or(&1.0);
    let (ly0, ly1) = (y_ticks[0].log10(), y_ticks[y_ticks.len() - 1].log10());
    let legend_h = 20.0 * series.len() as f64 + 20.0;
    let width = MARGIN_L + 2.0 * PANEL_W + GAP + 30.0;
    let height = MARGIN_T + PANEL_H + 60.0 + legend_h;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ =
        writeln!(out, r#"<text x="{}" y="24" font-size="15" font-weight="bold">{}</text>"#, MARGIN_L, escape(title));
    for (panel, name) in ["p50", "p99"].iter().enumerate() {
        let left = MARGIN_L + panel as f64 * (PANEL_W + GAP);
        let px = |x: f64| left + PANEL_W * x / x_end;
        let py = |y: f64| MARGIN_T + PANEL_H * (1.0 - (y.max(1e-3).log10() - ly0) / (ly1 - ly0));
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{MARGIN_T}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#333"/>"##
        );
        for &t in &x_ticks {
            let x = px(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{MARGIN_T}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                MARGIN_T + PANEL_H,
                MARGIN_T + PANEL_H + 16.0,
                number(t)
            );
        }
        for &t in &y_ticks {
            let y = py(t);
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + PANEL_W,
                left - 6.0,
                y + 4.0,
                number(t)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + PANEL_W / 2.0,
            MARGIN_T + PANEL_H + 36.0,
            escape(x_label)
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{name} latency, ms (log scale)</text>"#,
            left - 48.0,
            MARGIN_T + PANEL_H / 2.0,
            left - 48.0,
            MARGIN_T + PANEL_H / 2.0
        );
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.0, if panel == 0 { p.1 } else { p.2 }))
                .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0)
                .map(|(x, y)| (px(x), py(y)))
                .collect();
            if points.len() > 1 {
                let path: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = writeln!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"#,
                    path.join(" ")
                );
            }
            for (x, y) in points {
                let _ = writeln!(out, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#);
            }
        }
    }
    let legend_top = MARGIN_T + PANEL_H + 56.0;
    for (i, s) in series.iter().enumerate() {
        let y = legend_top + 20.0 * i as f64;
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<line x1="{MARGIN_L}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            MARGIN_L + 24.0,
            MARGIN_L + 32.0,
            y + 4.0,
            escape(&s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(linear_ticks(9.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let ticks = linear_ticks(1_234_567.0, 5);
        assert!(*ticks.last().unwrap() >= 1_234_567.0);
        assert_eq!(ticks[1], 500_000.0);
        assert_eq!(log_ticks(0.4, 250.0), vec![0.1, 1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(number(2_500_000.0), "2.5M");
        assert_eq!(number(0.1), "0.1");
    }

    #[test]
    fn the_chart_is_one_well_formed_svg_with_a_legend() {
        let series = vec![
            Series { name: "batch_size=1".into(), points: vec![(1e5, 2.0, 9.0), (2e5, 4.0, 30.0)] },
            Series { name: "batch_size=100 & <x>".into(), points: vec![(1e5, 1.0, 5.0)] },
        ];
        let text = svg("sweep", "delivered/s", &series);
        assert!(text.starts_with("<svg ") && text.trim_end().ends_with("</svg>"));
        assert_eq!(text.matches("<svg").count(), 1);
        assert!(text.contains("batch_size=1<") && text.contains("batch_size=100 &amp; &lt;x&gt;"));
        assert!(text.contains("p99 latency, ms") && text.contains("delivered/s"));
        // One polyline per series with more than one point, per panel; one circle per point.
        assert_eq!(text.matches("<polyline").count(), 2);
        assert_eq!(text.matches("<circle").count(), 6);
        // Every opened text element is closed.
        assert_eq!(text.matches("<text").count(), text.matches("</text>").count());
        assert!(!text.contains("NaN") && !text.contains("inf"));
    }

    #[test]
    fn an_empty_sweep_still_draws_axes() {
        let text = svg("nothing", "x", &[]);
        assert!(text.contains("<rect") && text.ends_with("</svg>\n"));
    }
}
