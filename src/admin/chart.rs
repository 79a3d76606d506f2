//! The executions chart as plain SVG, drawn on the server: runs per minute over the last hour,
//! stacked by status, and the slot lag over the same hour (nothing is fetched from elsewhere).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::html::esc;
use super::status::{bytes, LagSample};
use crate::ops::history::Minute;

const WIDTH: f64 = 720.0;
const RUNS_HEIGHT: f64 = 140.0;
const LAG_HEIGHT: f64 = 70.0;
const LEFT: f64 = 48.0;
const MINUTES: i64 = 60;

/// Fill colours of the statuses, in stacking order.
const COLOURS: [(&str, &str); 6] = [
    ("ok", "#2e7d32"),
    ("modified", "#1565c0"),
    ("blocked", "#6a1b9a"),
    ("timeout", "#ef6c00"),
    ("error", "#c62828"),
    ("dead", "#37474f"),
];

/// Both charts for the hour ending at `now` (Unix seconds).
pub fn render(minutes: &[Minute], lag: &[LagSample], now: i64) -> String {
    let first = (now / 60 - (MINUTES - 1)) * 60;
    let mut per: BTreeMap<i64, Vec<(&str, i64)>> = BTreeMap::new();
    let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
    for m in minutes.iter().filter(|m| m.minute >= first) {
        per.entry(m.minute).or_default().push((&m.status, m.runs));
        *totals.entry(m.status.as_str()).or_default() += m.runs;
    }
    let max = per
        .values()
        .map(|v| v.iter().map(|(_, n)| n).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let summary = if totals.is_empty() {
        "No runs in the last hour.".to_string()
    } else {
        let parts: Vec<String> = totals.iter().map(|(s, n)| format!("{s} {n}")).collect();
        format!(
            "Runs in the last hour: {}; the busiest minute had {max}.",
            parts.join(", ")
        )
    };
    let plot = WIDTH - LEFT - 8.0;
    let bar = plot / MINUTES as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {h}\" role=\"img\" aria-labelledby=\"chart-runs-title chart-runs-desc\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title id=\"chart-runs-title\">Runs per minute by status, last hour</title><desc id=\"chart-runs-desc\">{}</desc>",
        esc(&summary),
        h = RUNS_HEIGHT + 34.0
    );
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"12\" class=\"axis\" text-anchor=\"end\">{max}</text><text x=\"{}\" y=\"{RUNS_HEIGHT}\" class=\"axis\" text-anchor=\"end\">0</text>\
         <line x1=\"{LEFT}\" y1=\"{RUNS_HEIGHT}\" x2=\"{}\" y2=\"{RUNS_HEIGHT}\" stroke=\"#999\"/>",
        LEFT - 4.0,
        LEFT - 4.0,
        WIDTH - 8.0
    );
    for (i, minute) in (0..MINUTES).map(|i| (i, first + i * 60)) {
        let Some(counts) = per.get(&minute) else {
            continue;
        };
        let x = LEFT + i as f64 * bar;
        let mut y = RUNS_HEIGHT;
        for (status, colour) in COLOURS {
            let n: i64 = counts
                .iter()
                .filter(|(s, _)| *s == status)
                .map(|(_, n)| n)
                .sum();
            if n == 0 {
                continue;
            }
            let h = (n as f64 / max as f64) * (RUNS_HEIGHT - 14.0);
            y -= h;
            let _ = write!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{colour}\"><title>{n} {status}</title></rect>",
                (bar - 1.0).max(1.0)
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{LEFT}\" y=\"{y}\" class=\"axis\">−60 min</text><text x=\"{}\" y=\"{y}\" class=\"axis\" text-anchor=\"end\">now</text>",
        WIDTH - 8.0,
        y = RUNS_HEIGHT + 14.0
    );
    let mut lx = LEFT;
    for (status, colour) in COLOURS {
        let _ = write!(
            s,
            "<rect x=\"{lx}\" y=\"{y}\" width=\"10\" height=\"10\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\" class=\"axis\">{status}</text>",
            lx + 14.0,
            RUNS_HEIGHT + 33.0,
            y = RUNS_HEIGHT + 24.0
        );
        lx += 90.0;
    }
    s.push_str("</svg>");
    s.push_str(&lag_chart(lag, now));
    s
}

fn lag_chart(lag: &[LagSample], now: i64) -> String {
    let first = now - MINUTES * 60;
    let points: Vec<&LagSample> = lag.iter().filter(|l| l.at >= first).collect();
    let max = points.iter().map(|l| l.bytes).max().unwrap_or(0).max(1);
    let last = points.last().map(|l| bytes(l.bytes)).unwrap_or("–".into());
    let desc = if points.is_empty() {
        "No slot lag samples yet.".to_string()
    } else {
        format!(
            "Slot lag over the last hour: now {last}, at most {}.",
            bytes(max)
        )
    };
    let plot = WIDTH - LEFT - 8.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {h}\" role=\"img\" aria-labelledby=\"chart-lag-title chart-lag-desc\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title id=\"chart-lag-title\">Slot lag, last hour</title><desc id=\"chart-lag-desc\">{}</desc>\
         <text x=\"{}\" y=\"12\" class=\"axis\" text-anchor=\"end\">{}</text>\
         <line x1=\"{LEFT}\" y1=\"{LAG_HEIGHT}\" x2=\"{}\" y2=\"{LAG_HEIGHT}\" stroke=\"#999\"/>",
        esc(&desc),
        LEFT - 4.0,
        esc(&bytes(max)),
        WIDTH - 8.0,
        h = LAG_HEIGHT + 18.0
    );
    if !points.is_empty() {
        let coords: Vec<String> = points
            .iter()
            .map(|l| {
                let x = LEFT + ((l.at - first) as f64 / (MINUTES * 60) as f64) * plot;
                let y = LAG_HEIGHT - (l.bytes as f64 / max as f64) * (LAG_HEIGHT - 14.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#1565c0\" stroke-width=\"2\"/>",
            coords.join(" ")
        );
    }
    let _ = write!(
        s,
        "<text x=\"{LEFT}\" y=\"{y}\" class=\"axis\">−60 min</text><text x=\"{}\" y=\"{y}\" class=\"axis\" text-anchor=\"end\">now</text></svg>",
        WIDTH - 8.0,
        y = LAG_HEIGHT + 14.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_stack_by_status_and_say_what_they_show() {
        let now = 1_800_000_000;
        let m = now / 60 * 60;
        let minutes = vec![
            Minute {
                minute: m,
                status: "ok".into(),
                runs: 3,
            },
            Minute {
                minute: m,
                status: "error".into(),
                runs: 1,
            },
            Minute {
                minute: m - 7200,
                status: "ok".into(),
                runs: 99,
            },
        ];
        let svg = render(
            &minutes,
            &[LagSample {
                at: now - 10,
                bytes: 2048,
                seconds: 0.5,
            }],
            now,
        );
        assert!(
            svg.contains("Runs in the last hour: error 1, ok 3"),
            "{svg}"
        );
        assert!(svg.contains("<title>3 ok</title>") && svg.contains("<title>1 error</title>"));
        assert!(!svg.contains("99 ok"), "older than an hour: left out");
        assert!(svg.contains("now 2.0 KiB"), "{svg}");
        assert!(render(&[], &[], now).contains("No runs in the last hour."));
    }
}
