//! The image operations of the PP-OCR pipeline, as OpenCV computes them
//! (rapidocr calls OpenCV): bilinear resize (`INTER_LINEAR`: half-pixel
//! centres, two taps, no antialiasing, 11-bit fixed-point weights) and the
//! bicubic perspective warp that cuts a text line out of the page
//! (`warpPerspective`, `INTER_CUBIC`, `BORDER_REPLICATE`: coordinates on a
//! 1/32 pixel grid, 15-bit fixed-point weights). Recognition reads text
//! from pixels that went through these, and the line widths they produce
//! decide the recogniser's input width, which changes its output: a port
//! that resized differently would read differently.

/// A 3-channel 8-bit image, channels in B, G, R order (what the PP-OCR
/// models take), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Bgr {
    pub w: usize,
    pub h: usize,
    pub data: Vec<u8>,
}

impl Bgr {
    pub fn new(w: usize, h: usize) -> Bgr {
        Bgr { w, h, data: vec![0; w * h * 3] }
    }

    /// An RGB image, channels swapped.
    pub fn from_rgb(img: &image::RgbImage) -> Bgr {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = Vec::with_capacity(w * h * 3);
        for p in img.as_raw().chunks_exact(3) {
            data.extend_from_slice(&[p[2], p[1], p[0]]);
        }
        Bgr { w, h, data }
    }

    #[inline]
    pub fn px(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.w + x) * 3;
        &self.data[i..i + 3]
    }

    /// Rotated by 90° counter-clockwise (`np.rot90`): `out[i][j] = in[j][w-1-i]`.
    pub fn rot90(&self) -> Bgr {
        let mut out = Bgr::new(self.h, self.w);
        for i in 0..out.h {
            for j in 0..out.w {
                let o = (i * out.w + j) * 3;
                out.data[o..o + 3].copy_from_slice(self.px(self.w - 1 - i, j));
            }
        }
        out
    }

    /// Rotated by 180°.
    pub fn rot180(&self) -> Bgr {
        let mut data = Vec::with_capacity(self.data.len());
        for p in self.data.chunks_exact(3).rev() {
            data.extend_from_slice(p);
        }
        Bgr { w: self.w, h: self.h, data }
    }

    /// `top` and `bottom` rows of black added (rapidocr's letterbox of very
    /// flat images).
    pub fn pad_vertical(&self, top: usize, bottom: usize) -> Bgr {
        let mut out = Bgr::new(self.w, self.h + top + bottom);
        let start = top * self.w * 3;
        out.data[start..start + self.data.len()].copy_from_slice(&self.data);
        out
    }

    /// Writes `(px / 255 - 0.5) / 0.5` per channel, planar (CHW), into a
    /// `[3, height, width]` tensor slot whose rows are `width` wide (the
    /// image goes in its left part; the rest stays as it is).
    pub fn normalize_into(&self, out: &mut [f32], width: usize, height: usize) {
        debug_assert!(self.w <= width && self.h <= height && out.len() >= 3 * width * height);
        for y in 0..self.h {
            for x in 0..self.w {
                let p = self.px(x, y);
                for c in 0..3 {
                    out[c * width * height + y * width + x] = (f32::from(p[c]) / 255.0 - 0.5) / 0.5;
                }
            }
        }
    }
}

const RESIZE_BITS: i32 = 11;
const RESIZE_SCALE: f32 = (1 << RESIZE_BITS) as f32;

/// One axis of a bilinear resize: for each output index, the first source
/// index and the two 11-bit weights.
fn linear_taps(src: usize, dst: usize) -> Vec<(usize, [i32; 2])> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i64;
            let mut frac = f - s as f32;
            if s < 0 {
                s = 0;
                frac = 0.0;
            }
            if s >= src as i64 - 1 {
                s = src as i64 - 1;
                frac = 0.0;
            }
            let a0 = ((1.0 - frac) * RESIZE_SCALE).round_ties_even() as i32;
            let a1 = (frac * RESIZE_SCALE).round_ties_even() as i32;
            (s as usize, [a0, a1])
        })
        .collect()
}

/// `cv2.resize(img, (w, h))` with the default `INTER_LINEAR`.
pub fn resize_linear(src: &Bgr, w: usize, h: usize) -> Bgr {
    if (w, h) == (src.w, src.h) {
        return src.clone();
    }
    let xs = linear_taps(src.w, w);
    let ys = linear_taps(src.h, h);
    // Horizontal pass of every source row that is used, then vertical.
    let hrow = |y: usize| -> Vec<i32> {
        let row = &src.data[y * src.w * 3..(y + 1) * src.w * 3];
        let mut out = Vec::with_capacity(w * 3);
        for &(sx, [a0, a1]) in &xs {
            let sx1 = (sx + 1).min(src.w - 1);
            for c in 0..3 {
                out.push(i32::from(row[sx * 3 + c]) * a0 + i32::from(row[sx1 * 3 + c]) * a1);
            }
        }
        out
    };
    let mut out = Bgr::new(w, h);
    let mut cache: Option<(usize, Vec<i32>, Vec<i32>)> = None;
    for (dy, &(sy, [b0, b1])) in ys.iter().enumerate() {
        let sy1 = (sy + 1).min(src.h - 1);
        let (r0, r1) = match cache.take() {
            Some((y, r0, r1)) if y == sy => (r0, r1),
            Some((y, _, r1)) if y + 1 == sy => (r1, hrow(sy1)),
            _ => (hrow(sy), hrow(sy1)),
        };
        let o = &mut out.data[dy * w * 3..(dy + 1) * w * 3];
        for i in 0..w * 3 {
            // OpenCV's SIMD rounding of the vertical pass.
            let v = (((b0 * (r0[i] >> 4)) >> 16) + ((b1 * (r1[i] >> 4)) >> 16) + 2) >> 2;
            o[i] = v.clamp(0, 255) as u8;
        }
        cache = Some((sy, r0, r1));
    }
    out
}

/// The homography taking the four `src` points to the four `dst` points
/// (`cv2.getPerspectiveTransform`), row-major 3×3.
pub fn perspective_transform(src: [[f32; 2]; 4], dst: [[f32; 2]; 4]) -> Option<[f64; 9]> {
    let mut a = [[0f64; 9]; 8];
    for i in 0..4 {
        let (x, y) = (f64::from(src[i][0]), f64::from(src[i][1]));
        let (u, v) = (f64::from(dst[i][0]), f64::from(dst[i][1]));
        a[i] = [x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u, u];
        a[i + 4] = [0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v, v];
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..8 {
        let pivot = (col..8).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        for row in 0..8 {
            if row != col {
                let f = a[row][col] / a[col][col];
                if f != 0.0 {
                    let pivot_row = a[col];
                    for (v, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                        *v -= f * p;
                    }
                }
            }
        }
    }
    let mut m = [0f64; 9];
    for (i, row) in a.iter().enumerate() {
        m[i] = row[8] / row[i];
    }
    m[8] = 1.0;
    Some(m)
}

fn invert3(m: &[f64; 9]) -> Option<[f64; 9]> {
    let det =
        m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) + m[2] * (m[3] * m[7] - m[4] * m[6]);
    if det.abs() < 1e-15 {
        return None;
    }
    let d = 1.0 / det;
    Some([
        (m[4] * m[8] - m[5] * m[7]) * d,
        (m[2] * m[7] - m[1] * m[8]) * d,
        (m[1] * m[5] - m[2] * m[4]) * d,
        (m[5] * m[6] - m[3] * m[8]) * d,
        (m[0] * m[8] - m[2] * m[6]) * d,
        (m[2] * m[3] - m[0] * m[5]) * d,
        (m[3] * m[7] - m[4] * m[6]) * d,
        (m[1] * m[6] - m[0] * m[7]) * d,
        (m[0] * m[4] - m[1] * m[3]) * d,
    ])
}

const TAB: i32 = 32;
const REMAP_BITS: i32 = 15;

/// OpenCV's bicubic weights (a = -0.75) for a fractional offset.
fn cubic(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// The 32×32 table of 4×4 fixed-point bicubic weights (`initInterTab2D`),
/// each summing to exactly 2^15.
fn cubic_table() -> Vec<[i32; 16]> {
    let one: Vec<[f32; 4]> = (0..TAB).map(|i| cubic(i as f32 / TAB as f32)).collect();
    let mut table = Vec::with_capacity((TAB * TAB) as usize);
    for fy in 0..TAB as usize {
        for fx in 0..TAB as usize {
            let mut t = [0i32; 16];
            let mut sum = 0;
            for k1 in 0..4 {
                for k2 in 0..4 {
                    let v = one[fy][k1] * one[fx][k2];
                    t[k1 * 4 + k2] = (v * (1 << REMAP_BITS) as f32).round_ties_even() as i32;
                    sum += t[k1 * 4 + k2];
                }
            }
            let diff = sum - (1 << REMAP_BITS);
            if diff != 0 {
                let (mut lo, mut hi) = (2 * 4 + 2, 2 * 4 + 2);
                for k1 in 2..4 {
                    for k2 in 2..4 {
                        let k = k1 * 4 + k2;
                        if t[k] < t[lo] {
                            lo = k;
                        } else if t[k] > t[hi] {
                            hi = k;
                        }
                    }
                }
                if diff < 0 {
                    t[hi] -= diff;
                } else {
                    t[lo] -= diff;
                }
            }
            table.push(t);
        }
    }
    table
}

fn table() -> &'static [[i32; 16]] {
    static T: std::sync::OnceLock<Vec<[i32; 16]>> = std::sync::OnceLock::new();
    T.get_or_init(cubic_table)
}

/// `cv2.warpPerspective(src, m, (w, h), flags=INTER_CUBIC,
/// borderMode=BORDER_REPLICATE)`: `m` maps source to destination points.
pub fn warp_perspective_cubic(src: &Bgr, m: &[f64; 9], w: usize, h: usize) -> Option<Bgr> {
    let inv = invert3(m)?;
    let tab = table();
    let mut out = Bgr::new(w, h);
    let (sw, sh) = (src.w as i64, src.h as i64);
    for y in 0..h {
        let (yf, xf0) = (y as f64, 0.0f64);
        let x0 = inv[1] * yf + inv[2];
        let y0 = inv[4] * yf + inv[5];
        let w0 = inv[7] * yf + inv[8];
        let _ = xf0;
        for x in 0..w {
            let xd = x as f64;
            let wv = w0 + inv[6] * xd;
            let wv = if wv != 0.0 { f64::from(TAB) / wv } else { 0.0 };
            let fx = ((x0 + inv[0] * xd) * wv).clamp(f64::from(i32::MIN), f64::from(i32::MAX));
            let fy = ((y0 + inv[3] * xd) * wv).clamp(f64::from(i32::MIN), f64::from(i32::MAX));
            let (ix, iy) = (fx.round_ties_even() as i64, fy.round_ties_even() as i64);
            let (sx, sy) = ((ix >> 5) - 1, (iy >> 5) - 1);
            let weights = &tab[((iy & 31) * 32 + (ix & 31)) as usize];
            let mut acc = [0i32; 3];
            for k1 in 0..4i64 {
                let yy = (sy + k1).clamp(0, sh - 1) as usize;
                for k2 in 0..4i64 {
                    let xx = (sx + k2).clamp(0, sw - 1) as usize;
                    let wgt = weights[(k1 * 4 + k2) as usize];
                    let p = src.px(xx, yy);
                    for (a, &v) in acc.iter_mut().zip(p) {
                        *a += i32::from(v) * wgt;
                    }
                }
            }
            let o = (y * w + x) * 3;
            for (d, a) in out.data[o..o + 3].iter_mut().zip(acc) {
                *d = ((a + (1 << (REMAP_BITS - 1))) >> REMAP_BITS).clamp(0, 255) as u8;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Bgr {
        let mut img = Bgr::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let o = (y * w + x) * 3;
                img.data[o] = (x * 7 % 256) as u8;
                img.data[o + 1] = (y * 5 % 256) as u8;
                img.data[o + 2] = ((x + y) * 3 % 256) as u8;
            }
        }
        img
    }

    #[test]
    fn bilinear_resize_keeps_flat_colours_and_halves_a_checker_pair() {
        let mut flat = Bgr::new(10, 7);
        flat.data.iter_mut().for_each(|v| *v = 200);
        assert!(resize_linear(&flat, 23, 4).data.iter().all(|&v| v == 200));
        // Two columns 0 and 255 upscaled ×2: inner pixels blend 3:1.
        let mut two = Bgr::new(2, 1);
        two.data[3..].copy_from_slice(&[255, 255, 255]);
        let up = resize_linear(&two, 4, 1);
        let b: Vec<u8> = up.data.chunks(3).map(|p| p[0]).collect();
        assert_eq!(b, vec![0, 64, 191, 255]);
        // Same size: a copy.
        let r = ramp(9, 5);
        assert_eq!(resize_linear(&r, 9, 5), r);
    }

    #[test]
    fn an_integer_translation_warps_to_the_exact_pixels() {
        let img = ramp(40, 30);
        let src = [[5.0, 4.0], [25.0, 4.0], [25.0, 14.0], [5.0, 14.0]];
        let dst = [[0.0, 0.0], [20.0, 0.0], [20.0, 10.0], [0.0, 10.0]];
        let m = perspective_transform(src, dst).unwrap();
        let crop = warp_perspective_cubic(&img, &m, 20, 10).unwrap();
        for y in 0..10 {
            for x in 0..20 {
                assert_eq!(crop.px(x, y), img.px(x + 5, y + 4), "at {x},{y}");
            }
        }
    }

    #[test]
    fn the_cubic_table_sums_to_one() {
        assert!(table().iter().all(|t| t.iter().sum::<i32>() == 1 << REMAP_BITS));
        assert_eq!(table()[0][5], 1 << REMAP_BITS, "no offset: the centre tap alone");
    }

    #[test]
    fn rotations_match_numpy() {
        let img = ramp(3, 2);
        let r = img.rot90();
        assert_eq!((r.w, r.h), (2, 3));
        // np.rot90: out[i][j] = in[j][w-1-i]
        assert_eq!(r.px(0, 0), img.px(2, 0));
        assert_eq!(r.px(1, 2), img.px(0, 1));
        assert_eq!(img.rot180().rot180(), img);
        assert_eq!(img.rot180().px(0, 0), img.px(2, 1));
    }
}
