//! The soak's timeline as a PNG a person would rather look at than read: connections ended per
//! second (served in green, the rest in red) with each wrong connection marked beneath, the
//! long-lived connections open, and each part's resident memory, with every fault a vertical
//! line named at the top. Drawn into an RGB buffer (lines, boxes and a 5x7 pixel font), encoded
//! with the `png` crate.

use super::Report;

const W: usize = 1200;
const H: usize = 860;
const LEFT: usize = 90;
const RIGHT: usize = 30;

type Rgb = [u8; 3];
const BLACK: Rgb = [30, 30, 30];
const GREY: Rgb = [200, 200, 200];
const GREEN: Rgb = [40, 160, 60];
const RED: Rgb = [210, 40, 40];
const BLUE: Rgb = [40, 90, 200];
const ORANGE: Rgb = [240, 140, 0];
const PARTS: [Rgb; 6] = [
    [120, 60, 170],
    [0, 150, 160],
    [200, 90, 140],
    [110, 110, 20],
    [60, 60, 60],
    [20, 120, 220],
];

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            pixels: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x < 0 || y < 0 || x >= W as i64 || y >= H as i64 {
            return;
        }
        let i = (y as usize * W + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&c);
    }

    fn rect(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: Rgb) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x as i64, y as i64, c);
            }
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// `text` in the 5x7 font at (x, y), `scale` pixels a dot; unknown characters are blanks.
    fn text(&mut self, x: usize, y: usize, text: &str, c: Rgb, scale: usize) {
        for (i, ch) in text.chars().enumerate() {
            let Some(rows) = glyph(ch.to_ascii_uppercase()) else {
                continue;
            };
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (x + (i * 6 + col) * scale, y + r * scale);
                        self.rect(px, py, px + scale, py + scale, c);
                    }
                }
            }
        }
    }
}

/// One panel: a box from `top` to `bottom` with `max` at its top; maps (seconds, value).
struct Panel {
    top: usize,
    bottom: usize,
    seconds: f64,
    max: f64,
}

impl Panel {
    fn x(&self, at: f64) -> i64 {
        let span = (W - LEFT - RIGHT) as f64;
        (LEFT as f64 + span * (at / self.seconds).clamp(0.0, 1.0)) as i64
    }

    fn y(&self, v: f64) -> i64 {
        let span = (self.bottom - self.top) as f64;
        (self.bottom as f64 - span * (v / self.max).clamp(0.0, 1.0)) as i64
    }

    fn frame(&self, canvas: &mut Canvas, title: &str, unit: &str) {
        canvas.rect(LEFT, self.top, W - RIGHT, self.top + 1, GREY);
        canvas.rect(LEFT, self.bottom, W - RIGHT, self.bottom + 1, BLACK);
        canvas.rect(LEFT, self.top, LEFT + 1, self.bottom, BLACK);
        canvas.text(LEFT + 6, self.top + 6, title, BLACK, 2);
        canvas.text(8, self.top, &format!("{:.0}", self.max), BLACK, 2);
        canvas.text(8, self.top + 20, unit, BLACK, 1);
        canvas.text(8, self.bottom - 14, "0", BLACK, 2);
    }

    fn series(&self, canvas: &mut Canvas, points: &[(f64, f64)], c: Rgb) {
        for pair in points.windows(2) {
            let a = (self.x(pair[0].0), self.y(pair[0].1));
            let b = (self.x(pair[1].0), self.y(pair[1].1));
            canvas.line(a, b, c);
        }
    }
}

/// The report's timeline as PNG bytes.
pub fn render(report: &Report) -> Vec<u8> {
    let mut canvas = Canvas::new();
    let seconds = report.timeline.last().map_or(1.0, |p| p.at).max(1.0);

    // Per second between samples: served and the rest.
    let mut served = Vec::new();
    let mut other = Vec::new();
    for pair in report.timeline.windows(2) {
        let dt = (pair[1].at - pair[0].at).max(1e-3);
        let ended = pair[1].ended.saturating_sub(pair[0].ended) as f64 / dt;
        let ok = pair[1].served.saturating_sub(pair[0].served) as f64 / dt;
        served.push((pair[1].at, ok));
        other.push((pair[1].at, (ended - ok).max(0.0)));
    }
    let peak = served
        .iter()
        .chain(&other)
        .map(|(_, v)| *v)
        .fold(1.0, f64::max);
    let long: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .map(|p| (p.at, p.long_open as f64))
        .collect();
    let long_max = long.iter().map(|(_, v)| *v).fold(1.0, f64::max);
    let names: Vec<String> = report
        .timeline
        .first()
        .map(|p| p.rss_kib.keys().cloned().collect())
        .unwrap_or_default();
    let rss_max = report
        .timeline
        .iter()
        .flat_map(|p| p.rss_kib.values())
        .map(|k| *k as f64 / 1024.0)
        .fold(1.0, f64::max);
    let rate = Panel {
        top: 60,
        bottom: 330,
        seconds,
        max: (peak * 1.15).ceil(),
    };
    let open = Panel {
        top: 370,
        bottom: 540,
        seconds,
        max: (long_max * 1.2).ceil(),
    };
    let memory = Panel {
        top: 580,
        bottom: 790,
        seconds,
        max: (rss_max * 1.2).ceil(),
    };

    // Faults first, under everything: a shaded span through every panel, named at the top.
    for (i, (at, name, took)) in report.faults.iter().enumerate() {
        for panel in [&rate, &open, &memory] {
            let (x0, x1) = (panel.x(*at), panel.x(at + took).max(panel.x(*at) + 1));
            for x in x0..=x1 {
                for y in (panel.top..panel.bottom).step_by(6) {
                    canvas.set(x, y as i64, ORANGE);
                }
            }
        }
        let x = rate.x(*at).max(LEFT as i64) as usize;
        canvas.text(x + 3, 42 + (i % 2) * 9, name, ORANGE, 1);
    }

    let title = format!(
        "SOAK: {} CONNECTIONS, {} WRONG, {} LEAKS, {} FAULTS",
        report.connections,
        report.wrong_total(),
        report.leaks.len(),
        report.faults.len()
    );
    let title_colour = if report.passed() { GREEN } else { RED };
    canvas.text(LEFT, 8, &title, title_colour, 3);

    rate.frame(
        &mut canvas,
        "CONNECTIONS PER SECOND: SERVED (GREEN), NOT (RED)",
        "/S",
    );
    rate.series(&mut canvas, &served, GREEN);
    rate.series(&mut canvas, &other, RED);
    for at in &report.wrong_times {
        let x = rate.x(*at).max(0) as usize;
        canvas.rect(x, rate.bottom + 3, x + 2, rate.bottom + 13, RED);
    }

    open.frame(&mut canvas, "LONG-LIVED CONNECTIONS OPEN", "");
    open.series(&mut canvas, &long, BLUE);

    memory.frame(&mut canvas, "RESIDENT MEMORY PER PART", "MIB");
    for (i, name) in names.iter().enumerate() {
        let colour = PARTS[i % PARTS.len()];
        let points: Vec<(f64, f64)> = report
            .timeline
            .iter()
            .filter_map(|p| p.rss_kib.get(name).map(|k| (p.at, *k as f64 / 1024.0)))
            .collect();
        memory.series(&mut canvas, &points, colour);
        let (lx, ly) = (LEFT + 10 + (i % 3) * 360, memory.bottom + 22 + (i / 3) * 14);
        canvas.rect(lx, ly + 2, lx + 14, ly + 6, colour);
        canvas.text(lx + 20, ly, name, BLACK, 1);
    }
    canvas.text(
        LEFT,
        H - 14,
        &format!("SECONDS 0 TO {seconds:.0}; FAULTS IN ORANGE; WRONG CONNECTIONS AS RED TICKS"),
        BLACK,
        1,
    );
    encode(&canvas)
}

fn encode(canvas: &Canvas) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, W as u32, H as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Writing into memory cannot fail but for a bug in the encoder: then no picture.
        let written = encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(&canvas.pixels));
        if written.is_err() {
            return Vec::new();
        }
    }
    out
}

/// The 5x7 dots of `c` (each row's 5 low bits, left to right), for the characters labels use.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        'A' => [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'B' => [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e],
        'C' => [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e],
        'D' => [0x1e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1e],
        'E' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f],
        'F' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10],
        'G' => [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f],
        'H' => [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'I' => [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f],
        'M' => [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'P' => [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10],
        'Q' => [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d],
        'R' => [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11],
        'S' => [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e],
        'T' => [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a],
        'X' => [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f],
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        '.' => [0, 0, 0, 0, 0, 0x0c, 0x0c],
        ',' => [0, 0, 0, 0, 0x0c, 0x04, 0x08],
        ':' => [0, 0x0c, 0x0c, 0, 0x0c, 0x0c, 0],
        ';' => [0, 0x0c, 0x0c, 0, 0x0c, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1f, 0, 0, 0],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        ' ' => [0; 7],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_becomes_a_png_of_the_timeline() {
        let mut report = super::super::tests::report();
        for i in 0..20u64 {
            report.timeline.push(super::super::TimelinePoint {
                at: i as f64,
                ended: i * 100,
                served: i * 90,
                long_open: 5,
                rss_kib: [("node-a proxy".to_owned(), 20_000 + i * 10)].into(),
            });
        }
        report.wrong_times = vec![3.5];
        let png = render(&report);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(png.as_slice());
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        // Something is drawn in each colour of meaning.
        let has = |c: Rgb| pixels.chunks(3).any(|p| p == c);
        for c in [GREEN, RED, BLUE, ORANGE, BLACK] {
            assert!(has(c), "no pixel of {c:?}");
        }
        // Every character a label uses has a glyph.
        for ch in "SOAK: CONNECTIONS PER SECOND/S (GREEN), MIB 0123456789 NODE-A PROXY".chars() {
            assert!(glyph(ch.to_ascii_uppercase()).is_some(), "{ch:?}");
        }
    }
}
