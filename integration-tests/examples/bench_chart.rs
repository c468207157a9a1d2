//! Draws docs/bench/throughput.svg from docs/bench/throughput.csv (written by the `report`
//! bench): calls per second against concurrent tasks on one handle, for hmetcd's etcd and
//! in-memory backends and raw etcd-client.
//!
//! `cargo run -p integration-tests --example bench_chart [-- CSV SVG]`

use std::error::Error;
use std::path::PathBuf;

use plotters::prelude::*;

/// Each backend, its colour, and where its value labels go (a factor on the y value), so that
/// the labels of the two etcd lines, which lie close together, do not overlap.
const BACKENDS: [(&str, RGBColor, f64); 4] = [
    ("hmetcd-etcd", RGBColor(0x1f, 0x77, 0xb4), 1.35),
    ("hmetcd-etcd coalesce=off", RGBColor(0x7f, 0x7f, 0x7f), 0.85),
    ("etcd-client", RGBColor(0xd6, 0x27, 0x28), 0.62),
    ("hmetcd-mem", RGBColor(0x2c, 0xa0, 0x2c), 1.35),
];

struct Row {
    backend: String,
    op: String,
    tasks: f64,
    rate: f64,
}

fn main() -> Result<(), Box<dyn Error>> {
    let bench_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bench"));
    let mut args = std::env::args_os().skip(1);
    let csv = args
        .next()
        .map_or_else(|| bench_dir.join("throughput.csv"), PathBuf::from);
    let svg = args
        .next()
        .map_or_else(|| bench_dir.join("throughput.svg"), PathBuf::from);
    let text = std::fs::read_to_string(&csv).map_err(|err| {
        format!(
            "reading {}: {err} (run the report bench first)",
            csv.display()
        )
    })?;
    let rows = parse(&text)?;
    draw(&rows, &svg)?;
    eprintln!("wrote {}", svg.display());
    Ok(())
}

fn parse(text: &str) -> Result<Vec<Row>, Box<dyn Error>> {
    let mut rows = Vec::new();
    for line in text.lines().skip(1).filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        let [backend, op, tasks, rate] = fields[..] else {
            return Err(format!("not backend,op,tasks,ops_per_sec: {line:?}").into());
        };
        rows.push(Row {
            backend: backend.to_owned(),
            op: op.to_owned(),
            tasks: tasks.parse()?,
            rate: rate.parse()?,
        });
    }
    Ok(rows)
}

fn draw(rows: &[Row], svg: &PathBuf) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(svg, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let ops = ["get", "store"];
    let panels = root.split_evenly((1, ops.len()));
    let highest = rows.iter().map(|row| row.rate).fold(1.0, f64::max);
    let lowest = rows.iter().map(|row| row.rate).fold(highest, f64::min);
    for (panel, op) in panels.iter().zip(ops) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{op}: calls/s against tasks on one handle"),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            // x is log2 of the number of tasks, so that 1, 16 and 64 spread evenly.
            .build_cartesian_2d(-0.5f64..6.8f64, (lowest / 2.0..highest * 3.0).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("concurrent tasks on one handle (log scale)")
            .y_desc("calls per second (log)")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
            .y_label_formatter(&|y| short(*y))
            .draw()?;
        for (backend, color, label_at) in BACKENDS {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|row| row.backend == backend && row.op == op)
                .map(|row| (row.tasks.log2(), row.rate))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(backend)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 4, color.filled())),
            )?;
            chart.draw_series(points.iter().map(|&(x, y)| {
                Text::new(
                    short(y),
                    (x + 0.1, y * label_at),
                    ("sans-serif", 12).into_font().color(&color),
                )
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// A rate the way the chart writes it: 9.5k, 4.7M.
fn short(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.1}M", rate / 1e6)
    } else {
        format!("{:.1}k", rate / 1e3)
    }
}
