//! Figures for papers and slides: SVG and PNG drawn with plotters from the same analysis data the
//! window plots, with CSV of exactly the plotted points and JSON of the data and its provenance.
//! Every file is written atomically.

pub mod figures;

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot draw the figure '{title}': {msg}")]
    Draw { title: String, msg: String },
    #[error("cannot write {}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    Line,
    /// Line and a marker at each point.
    LinePoints,
    Points,
    /// A thin grey reference line (equal W-Robust, chance).
    Reference,
    /// A bar from 0 to y at each x (integer x such as filter or class indices; several bar
    /// series share the 0.8 around each x, side by side).
    Bars,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Series {
    pub name: String,
    pub style: Style,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            style: Style::Line,
            points,
        }
    }
}

/// One plot: what it shows, its data, and where the data came from.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// File stem, e.g. `weights-block0.conv`.
    pub name: String,
    pub title: String,
    /// Axis labels with units.
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Fixed axis ranges, or `None` to fit the data.
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Model files and hashes, dataset, attack settings, program version.
    pub provenance: serde_json::Value,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(230, 120, 40),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { 0.04 * (hi - lo) } else { 0.5 };
    (lo - pad, hi + pad)
}

impl Figure {
    /// `series,x,y`, one row per plotted point.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("series,x,y\n");
        for ser in &self.series {
            let name = ser.name.replace('"', "'");
            for (x, y) in &ser.points {
                s.push_str(&format!("\"{name}\",{x},{y}\n"));
            }
        }
        s
    }

    /// The figure's data and provenance.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("figures serialise")
    }

    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let pts = || {
            self.series
                .iter()
                .filter(|s| s.style != Style::Reference)
                .flat_map(|s| s.points.iter())
        };
        let bars = self.series.iter().any(|s| s.style == Style::Bars);
        // Bars stand on 0 and are 0.8 wide.
        let (xs, ys) = if bars {
            (
                span(pts().flat_map(|p| [p.0 - 0.4, p.0 + 0.4])),
                span(pts().map(|p| p.1).chain([0.0])),
            )
        } else {
            (span(pts().map(|p| p.0)), span(pts().map(|p| p.1)))
        };
        (self.x_range.unwrap_or(xs), self.y_range.unwrap_or(ys))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, scale: f64) -> Result<(), String> {
        let px = |v: f64| (v * scale).round() as u32;
        let font = |size: f64| ("sans-serif", size * scale).into_font();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let ((x0, x1), (y0, y1)) = self.ranges();
        // A caption wider than the figure is cut; the full title is in the JSON.
        let title: String = if self.title.chars().count() > 72 {
            self.title.chars().take(70).chain("…".chars()).collect()
        } else {
            self.title.clone()
        };
        let mut chart = ChartBuilder::on(root)
            .caption(&title, font(18.0))
            .margin(px(12.0))
            .x_label_area_size(px(44.0))
            .y_label_area_size(px(64.0))
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(font(12.0))
            .axis_desc_style(font(14.0))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        let mut labelled = false;
        let mut k = 0;
        // Several bar series stand side by side in the 0.8 around each x.
        let bar_series = self.series.iter().filter(|s| s.style == Style::Bars).count().max(1);
        let bar_width = 0.8 / bar_series as f64;
        let mut bar_k = 0;
        for s in &self.series {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            let (colour, width) = match s.style {
                Style::Reference => (RGBColor(170, 170, 170), 1.0),
                _ => {
                    k += 1;
                    (COLOURS[(k - 1) % COLOURS.len()], 2.0)
                }
            };
            let stroke = colour.stroke_width(px(width).max(1));
            if matches!(s.style, Style::Line | Style::LinePoints | Style::Reference) {
                let ann = chart
                    .draw_series(LineSeries::new(pts.clone(), stroke))
                    .map_err(|e| e.to_string())?;
                if s.style != Style::Reference {
                    let w = px(18.0) as i32;
                    ann.label(&s.name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + w, y)], stroke));
                    labelled = true;
                }
            }
            if s.style == Style::Bars {
                let left = -0.4 + bar_width * bar_k as f64;
                bar_k += 1;
                let ann =
                    chart
                        .draw_series(pts.iter().map(|&(x, y)| {
                            Rectangle::new([(x + left, 0.0), (x + left + bar_width, y)], colour.filled())
                        }))
                        .map_err(|e| e.to_string())?;
                let w = px(10.0) as i32;
                ann.label(&s.name)
                    .legend(move |(x, y)| Rectangle::new([(x, y - w / 2), (x + w, y + w / 2)], colour.filled()));
                labelled = true;
            }
            if matches!(s.style, Style::Points | Style::LinePoints) {
                let r = px(3.5);
                let ann = chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, r, colour.filled())))
                    .map_err(|e| e.to_string())?;
                if s.style == Style::Points {
                    ann.label(&s.name)
                        .legend(move |(x, y)| Circle::new((x + 10, y), r, colour.filled()));
                    labelled = true;
                }
            }
        }
        if labelled {
            chart
                .configure_series_labels()
                .label_font(font(12.0))
                .legend_area_size(px(30.0))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())
    }

    fn fail(&self, msg: String) -> ExportError {
        ExportError::Draw {
            title: self.title.clone(),
            msg,
        }
    }

    /// A vector drawing of `width` x `height` points.
    pub fn to_svg(&self, width: u32, height: u32) -> Result<String, ExportError> {
        register_font();
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, (width, height)).into_drawing_area();
            self.draw(&root, 1.0).map_err(|m| self.fail(m))?;
        }
        Ok(s)
    }

    /// A PNG of `width * scale` x `height * scale` pixels.
    pub fn to_png(&self, width: u32, height: u32, scale: f64) -> Result<Vec<u8>, ExportError> {
        register_font();
        let (w, h) = (
            (f64::from(width) * scale).round() as u32,
            (f64::from(height) * scale).round() as u32,
        );
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            self.draw(&root, scale).map_err(|m| self.fail(m))?;
        }
        let img = image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| self.fail("bitmap size".into()))?;
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png)
            .map_err(|e| self.fail(e.to_string()))?;
        Ok(png.into_inner())
    }

    /// Writes `<dir>/<name>.svg`, `.png` (at `scale`), `.csv` and `.json`; returns the paths.
    pub fn write_all(&self, dir: &Path, scale: f64) -> Result<Vec<PathBuf>, ExportError> {
        let stem = sanitise(&self.name);
        let files = [
            (format!("{stem}.svg"), self.to_svg(720, 480)?.into_bytes()),
            (format!("{stem}.png"), self.to_png(720, 480, scale)?),
            (format!("{stem}.csv"), self.to_csv().into_bytes()),
            (format!("{stem}.json"), self.to_json().into_bytes()),
        ];
        files
            .into_iter()
            .map(|(name, bytes)| write(&dir.join(name), &bytes))
            .collect()
    }
}

/// A file name from a figure name: letters, digits, `-`, `_` and `.` kept.
pub fn sanitise(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Writes atomically, creating the folder.
pub fn write(path: &Path, bytes: &[u8]) -> Result<PathBuf, ExportError> {
    let fail = |source| ExportError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    crate::fsutil::write_atomic(path, bytes).map_err(fail)?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig() -> Figure {
        Figure {
            name: "test figure".into(),
            title: "A test".into(),
            x_label: "eps".into(),
            y_label: "accuracy".into(),
            series: vec![
                Series {
                    name: "standard".into(),
                    style: Style::LinePoints,
                    points: vec![(0.0, 0.9), (0.1, 0.2)],
                },
                Series {
                    name: "robust, \"quoted\"".into(),
                    style: Style::Line,
                    points: vec![(0.0, 0.8), (0.1, 0.5)],
                },
            ],
            x_range: None,
            y_range: Some((0.0, 1.0)),
            provenance: serde_json::json!({"model": "x"}),
        }
    }

    #[test]
    fn csv_has_every_point() {
        let csv = fig().to_csv();
        assert_eq!(csv.lines().count(), 5);
        assert!(csv.contains("\"standard\",0.1,0.2"));
    }

    #[test]
    fn svg_and_png_draw() {
        let svg = fig().to_svg(400, 300).unwrap();
        assert!(svg.starts_with("<svg"));
        let png = fig().to_png(400, 300, 2.0).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (800, 600));
    }
}
