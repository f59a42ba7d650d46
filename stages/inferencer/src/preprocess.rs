//! Page image → model input tensor (NCHW float32), as the manifest says.

use image::RgbImage;

use crate::manifest::{ChannelOrder, Input};

/// Resizes like OpenCV's default `INTER_LINEAR` (the reference's resize:
/// plain bilinear from the two nearest source pixels, no antialiasing,
/// rounded to 8 bits), reorders channels and normalises
/// `(x * scale - mean) / std` into a `[1, 3, H, W]` buffer.
pub fn to_tensor(img: &RgbImage, input: &Input) -> Vec<f32> {
    let (w, h) = (input.width as usize, input.height as usize);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane];
    let order: [usize; 3] = match input.channel_order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let mul: [f32; 3] = std::array::from_fn(|c| input.scale / input.std[c]);
    let add: [f32; 3] = std::array::from_fn(|c| -input.mean[c] / input.std[c]);
    let xs = taps(img.width() as usize, w);
    let ys = taps(img.height() as usize, h);
    let src = img.as_raw();
    let stride = img.width() as usize * 3;
    for (dy, &(y0, y1, fy)) in ys.iter().enumerate() {
        let (r0, r1) = (&src[y0 * stride..], &src[y1 * stride..]);
        for (dx, &(x0, x1, fx)) in xs.iter().enumerate() {
            let i = dy * w + dx;
            for c in 0..3 {
                let ch = order[c];
                let top = r0[x0 * 3 + ch] as f32 * (1.0 - fx) + r0[x1 * 3 + ch] as f32 * fx;
                let bottom = r1[x0 * 3 + ch] as f32 * (1.0 - fx) + r1[x1 * 3 + ch] as f32 * fx;
                let v = (top * (1.0 - fy) + bottom * fy).round();
                out[c * plane + i] = v * mul[c] + add[c];
            }
        }
    }
    out
}

/// For each destination index: the two source indices and the weight of
/// the second, with half-pixel centres (`src = (dst + 0.5) * scale - 0.5`).
fn taps(src_len: usize, dst_len: usize) -> Vec<(usize, usize, f32)> {
    let scale = src_len as f64 / dst_len as f64;
    (0..dst_len)
        .map(|d| {
            let s = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i = (s.floor() as usize).min(src_len - 1);
            let j = (i + 1).min(src_len - 1);
            (i, j, (s - i as f64) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_match_opencv_half_pixel_mapping() {
        // Downscale by 2: destination 0 sits between source 0 and 1.
        assert_eq!(taps(4, 2), vec![(0, 1, 0.5), (2, 3, 0.5)]);
        // Same size: identity.
        assert_eq!(taps(3, 3), vec![(0, 1, 0.0), (1, 2, 0.0), (2, 2, 0.0)]);
    }
}
