//! Line charts of metric records as SVG, drawn with `plotters`' SVG backend: the one renderer
//! behind a run's `loss.svg` and the charts of `codex-ml report`.
//!
//! Each curve is one `<polyline>` in its own colour, with dots at its points when it has few
//! of them (a validation curve of three evaluations, a run of one step); the legend swatches
//! are filled rectangles and the axes are black, so the coloured polylines of a chart are its
//! curves, one each. Text is left to the viewer's sans-serif font: the backend writes `<text>`
//! elements and no font is embedded.

use plotters::prelude::*;

/// Colours of curves, in order: distinguishable, and none of them black (the axes).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Width and height of a chart, in SVG pixels.
pub(crate) const SIZE: (u32, u32) = (760, 380);

/// Curves with fewer points than this get a dot at each point.
const DOTS_BELOW: usize = 30;

/// One curve: its legend label, its colour's index, and its `(step, value)` points in step order.
pub(crate) struct Curve<'a> {
    pub(crate) label: &'a str,
    pub(crate) colour: usize,
    pub(crate) points: &'a [(u64, f64)],
}

/// The `#rrggbb` of colour `index`, as the SVG writes it.
pub(crate) fn colour_hex(index: usize) -> String {
    let RGBColor(r, g, b) = PALETTE[index % PALETTE.len()];
    format!("#{r:02X}{g:02X}{b:02X}")
}

/// A chart titled `title` of `curves` over the step axis, as an `<svg>` document. Curves with no
/// points are left out; at least one must have some.
pub(crate) fn svg(title: &str, y_label: &str, curves: &[Curve<'_>]) -> Result<String, String> {
    let curves: Vec<&Curve<'_>> = curves.iter().filter(|c| !c.points.is_empty()).collect();
    let points = || curves.iter().flat_map(|c| c.points.iter());
    let (Some(x_min), Some(x_max)) = (points().map(|p| p.0).min(), points().map(|p| p.0).max())
    else {
        return Err(format!("`{title}` has no points to draw"));
    };
    let y_min = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = points().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (x_lo, x_hi) = widen(x_min as f64, x_max as f64);
    let (y_lo, y_hi) = widen(y_min, y_max);

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| format!("drawing `{title}`: {e}");
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| short(*y))
            .max_light_lines(0)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(e)?;
        for curve in &curves {
            let colour = PALETTE[curve.colour % PALETTE.len()];
            let style = colour.stroke_width(2);
            let dots = if curve.points.len() < DOTS_BELOW {
                3
            } else {
                0
            };
            chart
                .draw_series(
                    LineSeries::new(curve.points.iter().map(|&(s, v)| (s as f64, v)), style)
                        .point_size(dots),
                )
                .map_err(e)?
                .label(curve.label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(out)
}

/// A range around `lo..hi` with a margin, never empty.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    }
}

/// A tick label short enough for the axis: `3e-4`, `2.31`, `12000`.
fn short(y: f64) -> String {
    let a = y.abs();
    if a != 0.0 && !(1e-2..1e6).contains(&a) {
        format!("{y:.1e}")
    } else if a >= 100.0 {
        format!("{y:.0}")
    } else {
        format!("{y:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polylines_of(svg: &str, colour: usize) -> usize {
        let stroke = format!("stroke=\"{}\"", colour_hex(colour));
        svg.split("<polyline")
            .skip(1)
            .filter(|p| p.split('>').next().unwrap_or("").contains(&stroke))
            .count()
    }

    #[test]
    fn each_curve_is_one_polyline_of_its_colour() {
        let a = [(1, 3.0), (2, 2.5), (3, 2.0)];
        let b = [(2, 2.8)];
        let svg = svg(
            "loss",
            "loss",
            &[
                Curve {
                    label: "train/loss",
                    colour: 0,
                    points: &a,
                },
                Curve {
                    label: "val/<loss>",
                    colour: 1,
                    points: &b,
                },
                Curve {
                    label: "empty",
                    colour: 2,
                    points: &[],
                },
            ],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert_eq!(polylines_of(&svg, 0), 1);
        assert_eq!(polylines_of(&svg, 1), 1);
        assert_eq!(polylines_of(&svg, 2), 0);
        assert!(svg.contains("val/&lt;loss&gt;"), "labels are escaped");
        assert!(!svg.contains("empty"), "curves without points are left out");
    }

    #[test]
    fn a_chart_needs_a_point() {
        assert!(svg(
            "x",
            "x",
            &[Curve {
                label: "a",
                colour: 0,
                points: &[]
            }]
        )
        .is_err());
    }

    #[test]
    fn tick_labels_stay_short() {
        assert_eq!(short(0.0003), "3.0e-4");
        assert_eq!(short(2.31), "2.31");
        assert_eq!(short(12000.0), "12000");
        assert_eq!(short(0.0), "0");
    }
}
