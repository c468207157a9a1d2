//! Draws docs/bench/throughput.svg from docs/bench/throughput.csv (written by the `report`
//! bench): calls per second against concurrent tasks on one handle, for hmetcd's etcd and
//! in-memory backends and raw etcd-client.
//!
//! `cargo run -p integration-tests --example bench_chart [-- CSV SVG]`

use std::error::Error;
use std::path::PathBuf;

use plotters::prelude::*;

const BACKENDS: [(&str, RGBColor); 3] = [
    ("hmetcd-etcd", RGBColor(0x1f, 0x77, 0xb4)),
    ("etcd-client", RGBColor(0xd6, 0x27, 0x28)),
    ("hmetcd-mem", RGBColor(0x2c, 0xa0, 0x2c)),
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
            .build_cartesian_2d(
                (0.8f64..80f64).log_scale(),
                (lowest / 2.0..highest * 2.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("concurrent tasks")
            .y_desc("calls per second (log)")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 1e6 {
                    format!("{:.1}M", y / 1e6)
                } else {
                    format!("{:.0}k", y / 1e3)
                }
            })
            .draw()?;
        for (backend, color) in BACKENDS {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|row| row.backend == backend && row.op == op)
                .map(|row| (row.tasks, row.rate))
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
                    format!("{:.1}k", y / 1e3),
                    (x * 1.08, y * 1.12),
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
