//! The `--html` report: one self-contained page (inline CSS and SVG, no
//! scripts, no network resources) with the run's tables, throughput and
//! latency percentiles per second, and latency-by-percentile curves.
//!
//! Owns chart drawing: a small SVG line-chart renderer with linear or
//! logarithmic axes.

use crate::report::Report;
use crate::stats::{ErrorKind, Percentiles, Step, TimelineRow};
use std::fmt::Write as _;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;

/// Renders the whole page.
pub fn render(report: &Report<'_>) -> String {
    let t = &report.outcome.totals;
    let rows = &report.outcome.timeline;
    let mut page = String::new();
    page.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>ringmta-loadgen report</title>\n<style>\
         body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1000px}\
         table{border-collapse:collapse;margin:1em 0}\
         td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:right}\
         td:first-child,th:first-child{text-align:left}\
         .bad{color:#b00;font-weight:bold} svg{display:block;margin:1em 0}\
         code{background:#f4f4f4;padding:0 .3em}\
         </style></head><body>\n",
    );
    let _ = writeln!(page, "<h1>ringmta-loadgen report</h1>");
    let _ = writeln!(
        page,
        "<p>Target <code>{}</code> &mdash; {}<br>Workload: {}<br>Elapsed {:.3} s{}</p>",
        esc(&report.config.target.to_string()),
        esc(&report.mode()),
        esc(&report.workload()),
        report.outcome.elapsed.as_secs_f64(),
        if report.outcome.interrupted {
            " (interrupted by Ctrl-C)"
        } else {
            ""
        }
    );

    // Counts.
    page.push_str(
        "<h2>Totals</h2>\n<table><tr><th></th><th>total</th><th>per second</th><th></th></tr>\n",
    );
    let rate = |n: u64| format!("{:.1}", report.per_second(n));
    let count_rows = [
        (
            "sessions",
            t.sessions(),
            rate(t.sessions()),
            format!("ok {}, failed {}", t.sessions_ok, t.sessions_failed),
        ),
        (
            "messages accepted",
            t.messages_accepted,
            rate(t.messages_accepted),
            format!(
                "rejected {}, aborted {}; pipelined {}, BDAT {}",
                t.messages_rejected, t.messages_aborted, t.messages_pipelined, t.messages_bdat
            ),
        ),
        (
            "recipients accepted",
            t.recipients_accepted,
            String::new(),
            format!("rejected {}", t.recipients_rejected),
        ),
        (
            "message bytes",
            t.message_bytes,
            format!("{:.2} MB/s", report.per_second(t.message_bytes) / 1e6),
            String::new(),
        ),
    ];
    for (name, total, per_s, note) in count_rows {
        let _ = writeln!(
            page,
            "<tr><td>{name}</td><td>{total}</td><td>{per_s}</td><td>{}</td></tr>",
            esc(&note)
        );
    }
    page.push_str("</table>\n<table><tr><th>replies</th><th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th></tr>\n");
    let _ = writeln!(
        page,
        "<tr><td>count</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        t.replies[0], t.replies[1], t.replies[2], t.replies[3]
    );

    // Errors.
    let _ = writeln!(
        page,
        "<h2>Errors: <span class=\"{}\">{}</span></h2>",
        if t.error_count() > 0 { "bad" } else { "" },
        t.error_count()
    );
    page.push_str("<table><tr><th>kind</th><th>count</th></tr>\n");
    for kind in ErrorKind::ALL {
        let n = t.errors[kind as usize];
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td{}>{n}</td></tr>",
            kind.name(),
            if n > 0 { " class=\"bad\"" } else { "" }
        );
    }
    page.push_str("</table>\n");
    if !t.error_samples.is_empty() {
        page.push_str("<p>First errors seen:</p><ul>\n");
        for s in &t.error_samples {
            let _ = writeln!(page, "<li><code>{}</code></li>", esc(s));
        }
        page.push_str("</ul>\n");
    }

    // Latency table.
    page.push_str(
        "<h2>Latency (ms)</h2>\n<table><tr><th>step</th><th>count</th><th>min</th><th>mean</th>\
         <th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>\n",
    );
    for step in Step::ALL {
        let p = Percentiles::of(t.step(step));
        if p.count == 0 {
            continue;
        }
        let ms = |us: f64| format!("{:.3}", us / 1000.0);
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(step.label()),
            p.count,
            ms(p.min as f64),
            ms(p.mean),
            ms(p.p50 as f64),
            ms(p.p90 as f64),
            ms(p.p99 as f64),
            ms(p.p999 as f64),
            ms(p.max as f64)
        );
    }
    page.push_str(
        "</table>\n<p>End-of-data is the time from the last byte of a message \
         (<code>.</code> or <code>BDAT ... LAST</code>) to the server's final reply: the time \
         the server takes to make the message durable. In open loop, session latency counts \
         from the scheduled start, so queueing is not hidden.</p>\n",
    );

    // Charts.
    page.push_str("<h2>Over time</h2>\n");
    page.push_str(&throughput_chart(rows));
    page.push_str(&latency_chart(
        "End-of-data (durability) latency per second",
        rows,
        |r| &r.end_of_data_us,
    ));
    page.push_str(&latency_chart("Session latency per second", rows, |r| {
        &r.session_us
    }));
    page.push_str("<h2>Latency by percentile</h2>\n");
    page.push_str(&percentile_chart(report));
    page.push_str("</body></html>\n");
    page
}

fn throughput_chart(rows: &[TimelineRow]) -> String {
    // Rates per second of run time; a last partial second shorter than half
    // a second is too short to give a meaningful rate and is left out.
    let pts = |f: fn(&TimelineRow) -> u64| {
        rows.iter()
            .filter(|r| r.span_s >= 0.5)
            .map(|r| (f64::from(r.second), f(r) as f64 / r.span_s))
            .collect::<Vec<_>>()
    };
    let series = [
        Series {
            name: "messages/s",
            color: "#1f77b4",
            points: pts(|r| r.messages),
        },
        Series {
            name: "sessions/s",
            color: "#2ca02c",
            points: pts(|r| r.sessions),
        },
        Series {
            name: "errors/s",
            color: "#d62728",
            points: pts(|r| r.errors),
        },
    ];
    chart(
        "Throughput per second",
        &Axis::Linear {
            label: "seconds since start",
        },
        &Axis::Linear {
            label: "per second",
        },
        &series,
    )
}

fn latency_chart(
    title: &str,
    rows: &[TimelineRow],
    pick: fn(&TimelineRow) -> &Percentiles,
) -> String {
    let pts = |f: fn(&Percentiles) -> u64| {
        rows.iter()
            .filter(|r| pick(r).count > 0)
            .map(|r| (f64::from(r.second), f(pick(r)) as f64))
            .collect::<Vec<_>>()
    };
    let series = [
        Series {
            name: "p50",
            color: "#2ca02c",
            points: pts(|p| p.p50),
        },
        Series {
            name: "p90",
            color: "#1f77b4",
            points: pts(|p| p.p90),
        },
        Series {
            name: "p99",
            color: "#ff7f0e",
            points: pts(|p| p.p99),
        },
        Series {
            name: "max",
            color: "#d62728",
            points: pts(|p| p.max),
        },
    ];
    chart(
        title,
        &Axis::Linear {
            label: "seconds since start",
        },
        &Axis::LogMicros,
        &series,
    )
}

fn percentile_chart(report: &Report<'_>) -> String {
    let t = &report.outcome.totals;
    let curve = |step: Step| {
        let h = t.step(step);
        if h.is_empty() {
            return Vec::new();
        }
        // x counts "nines": 0 = p0, 1 = p90, 2 = p99, ... up to p99.999.
        (0..=50)
            .map(|i| {
                let x = f64::from(i) / 10.0;
                let q = 1.0 - 10f64.powf(-x);
                (x, h.value_at_quantile(q) as f64)
            })
            .collect()
    };
    let series = [
        Series {
            name: "end-of-data",
            color: "#1f77b4",
            points: curve(Step::EndOfData),
        },
        Series {
            name: "message",
            color: "#ff7f0e",
            points: curve(Step::Message),
        },
        Series {
            name: "session",
            color: "#2ca02c",
            points: curve(Step::Session),
        },
        Series {
            name: "connect",
            color: "#9467bd",
            points: curve(Step::Connect),
        },
    ];
    chart(
        "Whole-run latency by percentile",
        &Axis::Nines,
        &Axis::LogMicros,
        &series,
    )
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

enum Axis<'a> {
    /// Linear from 0, "nice" ticks.
    Linear { label: &'a str },
    /// Logarithmic microseconds, labelled in µs/ms/s.
    LogMicros,
    /// Percentiles as nines: 0 -> 0%, 1 -> 90%, 2 -> 99%, ...
    Nines,
}

impl Axis<'_> {
    /// The plotted range and its tick positions and labels.
    fn scale(&self, values: impl Iterator<Item = f64> + Clone) -> (f64, f64, Vec<(f64, String)>) {
        match self {
            Axis::Linear { .. } => {
                let max = values.fold(0.0f64, f64::max);
                let step = nice_step(max);
                let top = (max / step).ceil().max(1.0) * step;
                let ticks = (0..)
                    .map(|i| f64::from(i) * step)
                    .take_while(|v| *v <= top + step / 2.0)
                    .map(|v| (v, trim_number(v)))
                    .collect();
                (0.0, top, ticks)
            }
            Axis::LogMicros => {
                let positive = values.filter(|v| *v > 0.0);
                let min = positive.clone().fold(f64::INFINITY, f64::min);
                let max = positive.fold(0.0f64, f64::max);
                let (lo, hi) = if max <= 0.0 {
                    (0.0, 1.0)
                } else {
                    (
                        min.log10().floor(),
                        max.log10().ceil().max(min.log10().floor() + 1.0),
                    )
                };
                let ticks = (lo as i32..=hi as i32)
                    .map(|e| (f64::from(e), micros_label(10f64.powi(e))))
                    .collect();
                (lo, hi, ticks)
            }
            Axis::Nines => {
                let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];
                let ticks = labels
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i as f64, (*l).to_string()))
                    .collect();
                (0.0, 5.0, ticks)
            }
        }
    }

    fn position(&self, v: f64) -> f64 {
        match self {
            Axis::LogMicros => v.max(1.0).log10(),
            _ => v,
        }
    }

    fn label(&self) -> &str {
        match self {
            Axis::Linear { label } => label,
            Axis::LogMicros => "latency (log scale)",
            Axis::Nines => "percentile",
        }
    }
}

/// Draws one chart as an inline SVG element.
fn chart(title: &str, x: &Axis<'_>, y: &Axis<'_>, series: &[Series<'_>]) -> String {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1, xticks) = x.scale(xs);
    let (y0, y1, yticks) = y.scale(ys);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let span = |a: f64, b: f64| if b > a { b - a } else { 1.0 };
    let px = |v: f64| LEFT + (v - x0) / span(x0, x1) * plot_w;
    let py = |v: f64| TOP + plot_h - (v - y0) / span(y0, y1) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-size=\"12\" role=\"img\" aria-label=\"{t}\">\
         <text x=\"{LEFT}\" y=\"18\" font-weight=\"bold\" font-size=\"14\">{t}</text>",
        t = esc(title)
    );
    for (v, label) in &yticks {
        let y = py(*v);
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            esc(label)
        );
    }
    for (v, label) in &xticks {
        let xp = px(*v);
        let _ = writeln!(
            svg,
            "<line x1=\"{xp:.1}\" x2=\"{xp:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"#f0f0f0\"/>\
             <text x=\"{xp:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + plot_h,
            TOP + plot_h + 16.0,
            esc(label)
        );
    }
    let _ = writeln!(
        svg,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#999\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        esc(x.label())
    );
    let _ = writeln!(
        svg,
        "<text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        esc(y.label())
    );
    let mut any = false;
    for (i, s) in series.iter().enumerate() {
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{lx:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"2\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LEFT + plot_w + 30.0,
            LEFT + plot_w + 36.0,
            ly + 4.0,
            esc(s.name),
            lx = LEFT + plot_w + 12.0,
            c = s.color
        );
        if s.points.is_empty() {
            continue;
        }
        any = true;
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(xv, yv)| format!("{:.1},{:.1}", px(x.position(xv)), py(y.position(yv))))
            .collect();
        if path.len() == 1 {
            let _ = writeln!(
                svg,
                "<circle cx=\"{}\" r=\"3\" fill=\"{}\"/>",
                path[0].replacen(',', "\" cy=\"", 1),
                s.color
            );
        } else {
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
                s.color,
                path.join(" ")
            );
        }
    }
    if !any {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#999\">no data</text>",
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A 1-2-5 step giving about five ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    (nice * mag).max(1.0)
}

fn trim_number(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim_number(v / 1e6))
    } else if v >= 1e4 {
        format!("{}k", trim_number(v / 1e3))
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn micros_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", trim_number(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", trim_number(us / 1e3))
    } else {
        format!("{} µs", trim_number(us))
    }
}

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn ticks() {
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(100.0), 20.0);
        assert_eq!(nice_step(7000.0), 2000.0);
        assert_eq!(micros_label(1000.0), "1 ms");
        assert_eq!(micros_label(10.0), "10 µs");
        assert_eq!(micros_label(1e7), "10 s");
        assert_eq!(trim_number(20000.0), "20k");
    }

    #[test]
    fn charts_are_well_formed_with_and_without_data() {
        let empty = chart(
            "t",
            &Axis::Linear { label: "x" },
            &Axis::LogMicros,
            &[Series {
                name: "a",
                color: "#000",
                points: Vec::new(),
            }],
        );
        assert!(empty.contains("no data") && empty.ends_with("</svg>\n"));
        let one = chart(
            "t",
            &Axis::Linear { label: "x" },
            &Axis::Linear { label: "y" },
            &[Series {
                name: "a",
                color: "#000",
                points: vec![(0.0, 5.0)],
            }],
        );
        assert!(one.contains("<circle cx=\""));
        let many = chart(
            "t",
            &Axis::Nines,
            &Axis::LogMicros,
            &[Series {
                name: "a",
                color: "#000",
                points: vec![(0.0, 50.0), (1.0, 500.0), (5.0, 5000.0)],
            }],
        );
        assert!(many.contains("<polyline"));
        assert!(!many.contains("NaN") && !many.contains("inf"));
    }
}
