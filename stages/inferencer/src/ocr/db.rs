//! From the text detector's probability map to text-line boxes, as
//! PaddleOCR's DB post-processing (in rapidocr 1.4.4) does it: threshold,
//! dilate, one box per connected blob (its minimum-area rectangle), scored
//! by the mean probability inside, grown by `area × ratio / perimeter` on
//! every side, scaled back to the image, put in clockwise order and sorted
//! top to bottom, left to right.
//!
//! One difference from OpenCV's `findContours(RETR_LIST)`: holes inside a
//! blob (a ring of text around an empty middle) give no box of their own.

/// A point `[x, y]`.
pub type Pt = [f32; 2];
/// Four corners, clockwise from the top-left.
pub type Quad = [Pt; 4];

/// DB post-processing settings (the manifest's `[det]`).
#[derive(Debug, Clone, Copy)]
pub struct DbParams {
    pub thresh: f32,
    pub box_thresh: f32,
    pub unclip_ratio: f32,
    pub max_candidates: usize,
}

/// The blobs of a binary map, 8-connected: for each, its pixels' row
/// extents `(y, x_min, x_max)`, in raster order of first pixel.
fn blobs(bitmap: &[bool], w: usize, h: usize) -> Vec<Vec<(usize, usize, usize)>> {
    let mut label = vec![u32::MAX; w * h];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !bitmap[start] || label[start] != u32::MAX {
            continue;
        }
        let id = out.len() as u32;
        let mut rows: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            let e = rows.entry(y).or_insert((x, x));
            e.0 = e.0.min(x);
            e.1 = e.1.max(x);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if bitmap[j] && label[j] == u32::MAX {
                        label[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(rows.into_iter().map(|(y, (a, b))| (y, a, b)).collect());
    }
    out
}

fn cross(o: [f64; 2], a: [f64; 2], b: [f64; 2]) -> f64 {
    (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
}

/// Convex hull (Andrew's monotone chain), counter-clockwise in image axes.
pub fn hull(mut pts: Vec<[f64; 2]>) -> Vec<[f64; 2]> {
    pts.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
    pts.dedup();
    if pts.len() < 3 {
        return pts;
    }
    let mut lower: Vec<[f64; 2]> = Vec::new();
    for &p in &pts {
        while lower.len() >= 2 && cross(lower[lower.len() - 2], lower[lower.len() - 1], p) <= 0.0 {
            lower.pop();
        }
        lower.push(p);
    }
    let mut upper: Vec<[f64; 2]> = Vec::new();
    for &p in pts.iter().rev() {
        while upper.len() >= 2 && cross(upper[upper.len() - 2], upper[upper.len() - 1], p) <= 0.0 {
            upper.pop();
        }
        upper.push(p);
    }
    lower.pop();
    upper.pop();
    lower.extend(upper);
    lower
}

/// The minimum-area rectangle around `pts` (`cv2.minAreaRect` then
/// `cv2.boxPoints`): its four corners and its shorter side.
pub fn min_area_rect(pts: Vec<[f64; 2]>) -> ([Pt; 4], f32) {
    let h = hull(pts);
    if h.len() == 1 {
        let p = [h[0][0] as f32, h[0][1] as f32];
        return ([p; 4], 0.0);
    }
    if h.len() == 2 {
        let (a, b) = ([h[0][0] as f32, h[0][1] as f32], [h[1][0] as f32, h[1][1] as f32]);
        return ([a, b, b, a], 0.0);
    }
    let mut best: Option<(f64, [[f64; 2]; 4], f64)> = None;
    for i in 0..h.len() {
        let (p, q) = (h[i], h[(i + 1) % h.len()]);
        let len = ((q[0] - p[0]).powi(2) + (q[1] - p[1]).powi(2)).sqrt();
        if len == 0.0 {
            continue;
        }
        let u = [(q[0] - p[0]) / len, (q[1] - p[1]) / len];
        let v = [-u[1], u[0]];
        let (mut a0, mut a1, mut b0, mut b1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for r in &h {
            let a = r[0] * u[0] + r[1] * u[1];
            let b = r[0] * v[0] + r[1] * v[1];
            a0 = a0.min(a);
            a1 = a1.max(a);
            b0 = b0.min(b);
            b1 = b1.max(b);
        }
        let area = (a1 - a0) * (b1 - b0);
        if best.as_ref().is_none_or(|(ba, _, _)| area < *ba - 1e-9) {
            let corner = |a: f64, b: f64| [a * u[0] + b * v[0], a * u[1] + b * v[1]];
            best =
                Some((area, [corner(a0, b0), corner(a1, b0), corner(a1, b1), corner(a0, b1)], (a1 - a0).min(b1 - b0)));
        }
    }
    let (_, c, side) = best.expect("a hull of 3+ points has an edge");
    (c.map(|p| [p[0] as f32, p[1] as f32]), side as f32)
}

/// `get_mini_boxes`: the rectangle's corners as top-left, top-right,
/// bottom-right, bottom-left by PaddleOCR's rule, and its shorter side.
fn mini_box(pts: Vec<[f64; 2]>) -> (Quad, f32) {
    let (mut c, side) = min_area_rect(pts);
    c.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let (tl, bl) = if c[1][1] > c[0][1] { (c[0], c[1]) } else { (c[1], c[0]) };
    let (tr, br) = if c[3][1] > c[2][1] { (c[2], c[3]) } else { (c[3], c[2]) };
    ([tl, tr, br, bl], side)
}

/// Mean probability inside the box (`box_score_fast`).
fn box_score(pred: &[f32], w: usize, h: usize, quad: &Quad) -> f32 {
    let clampi = |v: f32, max: usize| (v as i64).clamp(0, max as i64 - 1) as usize;
    let xmin = clampi(quad.iter().map(|p| p[0]).fold(f32::MAX, f32::min).floor(), w);
    let xmax = clampi(quad.iter().map(|p| p[0]).fold(f32::MIN, f32::max).ceil(), w);
    let ymin = clampi(quad.iter().map(|p| p[1]).fold(f32::MAX, f32::min).floor(), h);
    let ymax = clampi(quad.iter().map(|p| p[1]).fold(f32::MIN, f32::max).ceil(), h);
    // The polygon in mask coordinates, truncated to integers as OpenCV takes it.
    let poly: Vec<[f64; 2]> =
        quad.iter().map(|p| [f64::from((p[0] - xmin as f32) as i32), f64::from((p[1] - ymin as f32) as i32)]).collect();
    let area2: f64 = (0..4).map(|i| cross([0.0, 0.0], poly[i], poly[(i + 1) % 4])).sum();
    let sign = if area2 < 0.0 { -1.0 } else { 1.0 };
    let (mut sum, mut n) = (0f64, 0usize);
    for y in ymin..=ymax {
        for x in xmin..=xmax {
            let p = [(x - xmin) as f64, (y - ymin) as f64];
            let inside = (0..4).all(|i| sign * cross(poly[i], poly[(i + 1) % 4], p) >= -1e-9);
            if inside {
                sum += f64::from(pred[y * w + x]);
                n += 1;
            }
        }
    }
    if n == 0 {
        0.0
    } else {
        (sum / n as f64) as f32
    }
}

/// The box grown by `area × ratio / perimeter` on every side (pyclipper's
/// round offset of the integer polygon), then its minimum-area rectangle.
fn unclip(quad: &Quad, ratio: f32) -> (Quad, f32) {
    let p: Vec<[f64; 2]> = quad.iter().map(|p| [f64::from(p[0]), f64::from(p[1])]).collect();
    let area = (0..4).map(|i| cross([0.0, 0.0], p[i], p[(i + 1) % 4])).sum::<f64>().abs() / 2.0;
    let perimeter: f64 = (0..4).map(|i| (p[(i + 1) % 4][0] - p[i][0]).hypot(p[(i + 1) % 4][1] - p[i][1])).sum();
    let d = if perimeter > 0.0 { area * f64::from(ratio) / perimeter } else { 0.0 };
    let mut pts = Vec::with_capacity(4 * 40);
    for v in quad {
        let (x, y) = (f64::from(v[0] as i32), f64::from(v[1] as i32));
        for k in 0..36 {
            let a = f64::from(k) * std::f64::consts::PI / 18.0;
            pts.push([(x + d * a.cos()).round(), (y + d * a.sin()).round()]);
        }
    }
    // The flat sides of the offset sit exactly `d` out, along each edge's normal.
    for i in 0..4 {
        let (a, b) = (p[i], p[(i + 1) % 4]);
        let len = (b[0] - a[0]).hypot(b[1] - a[1]);
        if len > 0.0 {
            for s in [-1.0, 1.0] {
                let n = [s * (b[1] - a[1]) / len * d, -s * (b[0] - a[0]) / len * d];
                for q in [a, b] {
                    let base = [f64::from(q[0] as i32), f64::from(q[1] as i32)];
                    pts.push([(base[0] + n[0]).round(), (base[1] + n[1]).round()]);
                }
            }
        }
    }
    mini_box(pts)
}

/// Text-line boxes found in the probability map `pred` (`w × h`, the
/// detector's input size), in the pixels of the `dst_w × dst_h` image the
/// detector's input was resized from, clockwise from the top-left, sorted
/// in PaddleOCR's reading order.
pub fn boxes(pred: &[f32], w: usize, h: usize, dst_w: usize, dst_h: usize, p: &DbParams) -> Vec<Quad> {
    let over: Vec<bool> = pred.iter().map(|&v| v > p.thresh).collect();
    // Dilation by a 2×2 kernel anchored at its bottom-right.
    let mut bitmap = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            bitmap[y * w + x] = over[y * w + x]
                || (x > 0 && over[y * w + x - 1])
                || (y > 0 && over[(y - 1) * w + x])
                || (x > 0 && y > 0 && over[(y - 1) * w + x - 1]);
        }
    }
    let mut out = Vec::new();
    for rows in blobs(&bitmap, w, h).into_iter().take(p.max_candidates) {
        let pts: Vec<[f64; 2]> =
            rows.iter().flat_map(|&(y, a, b)| [[a as f64, y as f64], [b as f64, y as f64]]).collect();
        let (quad, side) = mini_box(pts);
        if side < 3.0 {
            continue;
        }
        if box_score(pred, w, h, &quad) < p.box_thresh {
            continue;
        }
        let (grown, side) = unclip(&quad, p.unclip_ratio);
        if side < 5.0 {
            continue;
        }
        let scale =
            |v: f32, from: usize, to: usize| (v / from as f32 * to as f32).round_ties_even().clamp(0.0, to as f32);
        let scaled: Quad = grown.map(|q| [scale(q[0], w, dst_w).trunc(), scale(q[1], h, dst_h).trunc()]);
        if let Some(q) = tidy(scaled, dst_w, dst_h) {
            out.push(q);
        }
    }
    sort_reading(&mut out);
    out
}

/// `order_points_clockwise`, clipped to the image, dropped when 3 pixels
/// or less wide or high (`filter_tag_det_res`).
fn tidy(q: Quad, w: usize, h: usize) -> Option<Quad> {
    let mut by_x = q;
    by_x.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let (mut left, mut right) = ([by_x[0], by_x[1]], [by_x[2], by_x[3]]);
    left.sort_by(|a, b| a[1].total_cmp(&b[1]));
    right.sort_by(|a, b| a[1].total_cmp(&b[1]));
    let ordered = [left[0], right[0], right[1], left[1]];
    let clipped = ordered.map(|p| [p[0].clamp(0.0, w as f32 - 1.0).trunc(), p[1].clamp(0.0, h as f32 - 1.0).trunc()]);
    let dist = |a: Pt, b: Pt| (a[0] - b[0]).hypot(a[1] - b[1]) as i32;
    if dist(clipped[0], clipped[1]) <= 3 || dist(clipped[0], clipped[3]) <= 3 {
        return None;
    }
    Some(clipped)
}

/// `sorted_boxes`: by top-left corner, then a line's boxes (top-left within
/// 10 pixels vertically) left to right.
pub fn sort_reading(boxes: &mut [Quad]) {
    boxes.sort_by(|a, b| a[0][1].total_cmp(&b[0][1]).then(a[0][0].total_cmp(&b[0][0])));
    for i in 0..boxes.len().saturating_sub(1) {
        for j in (0..=i).rev() {
            if (boxes[j + 1][0][1] - boxes[j][0][1]).abs() < 10.0 && boxes[j + 1][0][0] < boxes[j][0][0] {
                boxes.swap(j, j + 1);
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_area_rect_of_a_tilted_square() {
        let pts = vec![[5.0, 0.0], [10.0, 5.0], [5.0, 10.0], [0.0, 5.0], [5.0, 5.0]];
        let (c, side) = min_area_rect(pts);
        assert!((side - 50f32.sqrt()).abs() < 1e-4, "{side}");
        for p in [[5.0, 0.0], [10.0, 5.0], [5.0, 10.0], [0.0, 5.0]] {
            assert!(c.iter().any(|q| (q[0] - p[0]).abs() < 1e-4 && (q[1] - p[1]).abs() < 1e-4), "{c:?}");
        }
    }

    #[test]
    fn one_box_per_blob_grown_and_scaled() {
        // A 40×8 blob of probability 0.9 in a 100×50 map, scaled ×2.
        let (w, h) = (100, 50);
        let mut pred = vec![0.0f32; w * h];
        for y in 20..28 {
            for x in 10..50 {
                pred[y * w + x] = 0.9;
            }
        }
        // A weak blob: above `thresh`, below `box_thresh` on average.
        for y in 40..46 {
            for x in 60..90 {
                pred[y * w + x] = 0.35;
            }
        }
        let p = DbParams { thresh: 0.3, box_thresh: 0.5, unclip_ratio: 1.6, max_candidates: 1000 };
        let found = boxes(&pred, w, h, 200, 100, &p);
        assert_eq!(found.len(), 1, "{found:?}");
        let q = found[0];
        // Dilated blob x 10..=50, y 20..=28 (40×8 between centres); d = 320×1.6/96 ≈ 5.3.
        let (x0, x1, y0, y1) = (q[0][0], q[1][0], q[0][1], q[3][1]);
        // Grown: x 4.7..55.3, y 14.7..33.3 in the map, ×2 in the image.
        assert!((4.0..=6.0).contains(&(x0 / 2.0)) && (54.0..=56.0).contains(&(x1 / 2.0)), "{q:?}");
        assert!((14.0..=16.0).contains(&(y0 / 2.0)) && (32.0..=34.0).contains(&(y1 / 2.0)), "{q:?}");
        assert_eq!(q[0][1], q[1][1], "axis-aligned: {q:?}");
    }

    #[test]
    fn reading_sort_puts_a_line_left_to_right() {
        let b = |x: f32, y: f32| [[x, y], [x + 10.0, y], [x + 10.0, y + 5.0], [x, y + 5.0]];
        let mut v = vec![b(100.0, 52.0), b(10.0, 50.0), b(10.0, 80.0), b(50.0, 55.0)];
        sort_reading(&mut v);
        let xs: Vec<(f32, f32)> = v.iter().map(|q| (q[0][0], q[0][1])).collect();
        assert_eq!(xs, vec![(10.0, 50.0), (50.0, 55.0), (100.0, 52.0), (10.0, 80.0)]);
    }
}
