//! `bench/RESULTS.md` sections and the SVG line chart of the routing sweep.
//!
//! Each scenario owns one section of RESULTS.md between `<!-- BEGIN <name> -->` and
//! `<!-- END <name> -->` and rewrites only that, so a scenario run alone leaves the others'
//! numbers (and the hand-written criterion section) in place.

use std::fmt::Write as _;
use std::path::Path;

/// Replaces section `name` of the markdown file at `path` with `content` (appends it if the
/// file has no such section yet).
pub fn update_section(path: &Path, name: &str, content: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, replace_section(&old, name, content))?;
    Ok(())
}

/// The pure part of [`update_section`].
pub fn replace_section(doc: &str, name: &str, content: &str) -> String {
    let begin = format!("<!-- BEGIN {name} -->");
    let end = format!("<!-- END {name} -->");
    let block = format!("{begin}\n{}\n{end}", content.trim_end());
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{block}{}", &doc[..b], &doc[e + end.len()..])
        }
        _ => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{doc}{sep}{block}\n")
        }
    }
}

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points (x, y); y ≤ 0 points are skipped on a log axis.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A self-contained SVG line chart with a log-scale y axis (TTFT spans tens of ms to seconds).
pub fn line_chart_log_y(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 220.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.1 > 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 1.0, 10.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let (ly0, ly1) = (
        y0.log10().floor(),
        y1.log10().ceil().max(y0.log10().floor() + 1.0),
    );
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y.log10() - ly0) / (ly1 - ly0) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        left + pw / 2.0,
        esc(title)
    );
    // Grid and y ticks at each decade (and 2×, 5×).
    let mut d = ly0 as i32;
    while f64::from(d) <= ly1 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(d);
            if v.log10() > ly1 + 1e-9 {
                continue;
            }
            let y = sy(v);
            let stroke = if m == 1.0 { "#ccc" } else { "#eee" };
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{stroke}\"/>",
                left + pw
            );
            let label = if v >= 1000.0 {
                format!("{}k", v / 1000.0)
            } else {
                format!("{v}")
            };
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
                left - 6.0,
                y + 4.0
            );
        }
        d += 1;
    }
    // x ticks at the data's x values.
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let px = sx(x);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{top}\" y2=\"{}\" stroke=\"#eee\"/>\
             <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
            top + ph,
            top + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        left + pw / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate(18,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
            for p in &path {
                let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    s,
                    "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{color}\"/>"
                );
            }
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = left + pw + 14.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A "nice" tick step for a span (1, 2 or 5 × 10^k, about `n` ticks).
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-12);
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// A self-contained SVG line chart with linear axes from zero (time series: RSS, CPU), many
/// points, ticks at round values; `marker` draws a dashed vertical line at that x (warm-up end).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    marker: Option<f64>,
) -> String {
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 220.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x1, mut y1) = (0.0f64, 0.0f64);
    for &(x, y) in pts {
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x1 <= 0.0 {
        x1 = 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let (xs, ys) = (nice_step(x1, 8.0), nice_step(y1 * 1.1, 5.0));
    let x1 = (x1 / xs).ceil() * xs;
    let y1 = (y1 * 1.1 / ys).ceil() * ys;
    let sx = |x: f64| left + x / x1 * pw;
    let sy = |y: f64| top + ph - y / y1 * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        left + pw / 2.0,
        esc(title)
    );
    let mut v = 0.0;
    while v <= y1 + 1e-9 {
        let y = sy(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + pw,
            left - 6.0,
            y + 4.0,
            round_label(v)
        );
        v += ys;
    }
    let mut x = 0.0;
    while x <= x1 + 1e-9 {
        let px = sx(x);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{top}\" y2=\"{}\" stroke=\"#eee\"/>\
             <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            top + ph,
            top + ph + 18.0,
            round_label(x)
        );
        x += xs;
    }
    if let Some(m) = marker.filter(|m| *m > 0.0 && *m <= x1) {
        let px = sx(m);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{top}\" y2=\"{}\" stroke=\"#888\" stroke-dasharray=\"4 4\"/>",
            top + ph
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        left + pw / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate(18,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = se
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                path.join(" ")
            );
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = left + pw + 14.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn round_label(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_or_appended() {
        let doc = "# R\n\nhand-written\n";
        let a = replace_section(doc, "x", "one");
        assert_eq!(
            a,
            "# R\n\nhand-written\n\n<!-- BEGIN x -->\none\n<!-- END x -->\n"
        );
        let b = replace_section(&a, "x", "two\n");
        assert_eq!(b, a.replace("one", "two"));
        let c = replace_section(&b, "y", "why");
        assert!(c.contains("two") && c.ends_with("<!-- END y -->\n"));
    }

    #[test]
    fn chart_is_svg_with_every_series() {
        let svg = line_chart_log_y(
            "t",
            "rate",
            "ms",
            &[
                Series {
                    label: "a<b".into(),
                    points: vec![(1.0, 10.0), (2.0, 2000.0)],
                },
                Series {
                    label: "c".into(),
                    points: vec![(1.0, 0.0), (2.0, 50.0)],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b"));
    }

    #[test]
    fn linear_chart_has_round_ticks_and_a_marker() {
        let svg = line_chart(
            "t",
            "min",
            "MiB",
            &[Series {
                label: "rss".into(),
                points: (0..180)
                    .map(|i| (f64::from(i) / 6.0, 20.0 + f64::from(i % 3)))
                    .collect(),
            }],
            Some(5.0),
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("stroke-dasharray"));
        assert!(svg.contains(">30</text>"), "x ticks reach 30 min");
        assert_eq!(nice_step(30.0, 8.0), 5.0);
    }
}
