//! The HTML page of `codex-ml report`: a table of the runs and how they ended, their differing
//! config values side by side, and one chart per metric with every run that recorded it
//! overlaid in the run's colour.
//!
//! The page is a single file that needs nothing else: the style sheet is inline, the charts are
//! inline SVG, there is no script, and nothing is fetched. Every text that comes from a run
//! (directory names, config values, errors) is escaped.

use std::fmt::Write as _;

use super::chart::{self, Curve};
use super::{differing_config, RunView};

/// The charts every report has, in order, whether or not the runs recorded them: `(record,
/// title, y-axis)`. The other metrics follow, `sys/*` first.
const FIRST: [(&str, &str, &str); 4] = [
    ("train/loss", "training loss", "loss"),
    ("val/loss", "validation loss", "loss"),
    ("train/lr", "learning rate", "learning rate"),
    ("train/tokens_per_s", "throughput", "tokens/s"),
];

const STYLE: &str = "
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 800px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.value { font-family: monospace; word-break: break-all; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }
.finished { color: #1a7f37; } .failed { color: #cf222e; } .interrupted { color: #9a6700; }
.running, .unknown { color: #57606a; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption, .note { color: #57606a; font-size: 0.9em; }
";

/// The report of `runs` (at least one), as an HTML document.
pub fn html(runs: &[RunView]) -> Result<String, String> {
    let mut out = String::new();
    let w = &mut out;
    let _ = write!(
        w,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>codex-ml report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&runs
            .iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(", "))
    );
    let _ = writeln!(w, "<h1>codex-ml report</h1>");

    let _ = writeln!(
        w,
        "<h2>Runs</h2>\n<table class=\"runs\">\n\
         <tr><th>run</th><th>status</th><th>detail</th><th>directory</th></tr>"
    );
    for (i, run) in runs.iter().enumerate() {
        let _ = writeln!(
            w,
            "<tr data-run=\"{label}\"><td><span class=\"swatch\" style=\"background:{colour}\">\
             </span>{label}</td><td class=\"status {status}\">{status}</td><td>{detail}</td>\
             <td class=\"value\">{dir}</td></tr>",
            label = esc(&run.label),
            colour = chart::colour_hex(i),
            status = esc(&run.status),
            detail = esc(&run.detail),
            dir = esc(&run.dir.display().to_string()),
        );
    }
    let _ = writeln!(w, "</table>");
    let notes: Vec<String> = runs
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("{}: {n}", r.label)))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(w, "<ul class=\"notes\">");
        for note in &notes {
            let _ = writeln!(w, "<li class=\"note\">{}</li>", esc(note));
        }
        let _ = writeln!(w, "</ul>");
    }

    config_table(w, runs);

    let _ = writeln!(w, "<h2>Curves</h2>");
    for (metric, title, y_label) in chart_list(runs) {
        figure(w, runs, &metric, &title, &y_label)?;
    }
    let _ = writeln!(
        w,
        "<p class=\"note\">Written by codex-ml {}.</p>\n</body>\n</html>",
        env!("CARGO_PKG_VERSION")
    );
    Ok(out)
}

/// `(record, title, y-axis)` of every chart, in page order.
fn chart_list(runs: &[RunView]) -> Vec<(String, String, String)> {
    let mut list: Vec<(String, String, String)> = FIRST
        .iter()
        .map(|(m, t, y)| (m.to_string(), t.to_string(), y.to_string()))
        .collect();
    let mut rest: Vec<&String> = runs
        .iter()
        .flat_map(|r| r.metrics.keys())
        .filter(|m| !FIRST.iter().any(|(f, _, _)| f == m))
        .collect();
    rest.sort_by_key(|m| (!m.starts_with("sys/"), m.as_str()));
    rest.dedup();
    list.extend(rest.into_iter().map(|m| (m.clone(), m.clone(), m.clone())));
    list
}

fn config_table(w: &mut String, runs: &[RunView]) {
    let _ = writeln!(w, "<h2>Config values that differ</h2>");
    if runs.len() < 2 {
        let _ = writeln!(w, "<p class=\"note\">One run: nothing to compare.</p>");
        return;
    }
    let rows = differing_config(runs);
    if rows.is_empty() {
        let _ = writeln!(w, "<p class=\"note\">The runs' configs are the same.</p>");
        return;
    }
    let _ = write!(w, "<table class=\"config\">\n<tr><th>field</th>");
    for run in runs {
        let _ = write!(w, "<th>{}</th>", esc(&run.label));
    }
    let _ = writeln!(w, "</tr>");
    for (key, values) in rows {
        let _ = write!(w, "<tr><td class=\"value\">{}</td>", esc(&key));
        for value in values {
            match value {
                Some(v) => {
                    let _ = write!(w, "<td class=\"value\">{}</td>", esc(&v));
                }
                None => {
                    let _ = write!(w, "<td class=\"note\">(not set)</td>");
                }
            }
        }
        let _ = writeln!(w, "</tr>");
    }
    let _ = writeln!(w, "</table>");
}

/// One chart: the runs that recorded `metric`, each in its colour; a caption names the runs
/// that did not.
fn figure(
    w: &mut String,
    runs: &[RunView],
    metric: &str,
    title: &str,
    y_label: &str,
) -> Result<(), String> {
    let curves: Vec<Curve<'_>> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let points = r.metrics.get(metric).filter(|p| !p.is_empty())?;
            Some(Curve {
                label: &r.label,
                colour: i,
                points,
            })
        })
        .collect();
    let missing: Vec<&str> = runs
        .iter()
        .filter(|r| r.metrics.get(metric).is_none_or(|p| p.is_empty()))
        .map(|r| r.label.as_str())
        .collect();
    let _ = writeln!(
        w,
        "<figure class=\"chart\" data-metric=\"{}\" data-curves=\"{}\">",
        esc(metric),
        curves.len()
    );
    if curves.is_empty() {
        let _ = writeln!(
            w,
            "<figcaption>{}: no run recorded <code>{}</code>.</figcaption>",
            esc(title),
            esc(metric)
        );
    } else {
        w.push_str(&chart::svg(title, y_label, &curves)?);
        w.push('\n');
        if !missing.is_empty() {
            let _ = writeln!(
                w,
                "<figcaption>No <code>{}</code> records in {}.</figcaption>",
                esc(metric),
                esc(&missing.join(", "))
            );
        }
    }
    let _ = writeln!(w, "</figure>");
    Ok(())
}

/// `text` safe inside HTML elements and double-quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;

    fn run(label: &str, metrics: &[(&str, &[(u64, f64)])]) -> RunView {
        RunView {
            dir: PathBuf::from(format!("runs/{label}")),
            label: label.to_owned(),
            status: "finished".to_owned(),
            detail: String::new(),
            config: BTreeMap::new(),
            metrics: metrics
                .iter()
                .map(|(m, p)| (m.to_string(), p.to_vec()))
                .collect(),
            notes: vec![],
        }
    }

    #[test]
    fn every_metric_gets_a_chart_with_the_runs_that_recorded_it() {
        let a = run(
            "x/<a>",
            &[
                ("train/loss", &[(1, 3.0), (2, 2.0)]),
                ("sys/rss_mib", &[(1, 90.0)]),
            ],
        );
        let b = run(
            "x/b",
            &[("train/loss", &[(1, 3.1)]), ("val/loss", &[(2, 2.9)])],
        );
        let page = html(&[a, b]).unwrap();
        let curves = |metric: &str| {
            let at = page
                .find(&format!("data-metric=\"{metric}\""))
                .unwrap_or_else(|| panic!("no chart of {metric}"));
            page[at..].split("data-curves=\"").nth(1).unwrap()[..1].to_owned()
        };
        assert_eq!(curves("train/loss"), "2");
        assert_eq!(curves("val/loss"), "1");
        assert_eq!(curves("train/lr"), "0");
        assert_eq!(curves("sys/rss_mib"), "1");
        assert!(page.contains("No <code>val/loss</code> records in x/&lt;a&gt;."));
        assert!(!page.contains("<a>"), "run names are escaped");
        assert!(page.find("sys/rss_mib").unwrap() > page.find("train/tokens_per_s").unwrap());
    }
}
