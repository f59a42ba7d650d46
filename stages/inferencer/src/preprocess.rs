//! Page image → model input tensor (NCHW float32), as the manifest says:
//! resize (stretch or letterbox), channel order, `(x * scale - mean) / std`.
//! [`Transform`] maps boxes found in the model input back to the page.

use fast_image_resize as fr;
use image::RgbImage;

use crate::manifest::{ChannelOrder, Input, ResizeMode};

/// Maps model-input coordinates to page-image pixels:
/// `page = (model - offset) / scale`, clipped to the page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    pub scale: [f32; 2],
    pub offset: [f32; 2],
    pub page: [u32; 2],
}

impl Transform {
    pub fn to_page(&self, b: [f32; 4]) -> [f32; 4] {
        let (w, h) = (self.page[0] as f32, self.page[1] as f32);
        let x = |v: f32| ((v - self.offset[0]) / self.scale[0]).clamp(0.0, w);
        let y = |v: f32| ((v - self.offset[1]) / self.scale[1]).clamp(0.0, h);
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }
}

/// Where the page lands inside the model input: size and top-left corner.
fn placement(img_w: u32, img_h: u32, input: &Input) -> (u32, u32, u32, u32) {
    match input.resize {
        ResizeMode::Stretch => (input.width, input.height, 0, 0),
        ResizeMode::Letterbox => {
            // Ultralytics' LetterBox(center=True): scale to fit, round the
            // new size, split the padding with a -0.1 bias on top/left.
            let r = (input.width as f64 / img_w as f64).min(input.height as f64 / img_h as f64);
            let w = ((img_w as f64 * r).round() as u32).clamp(1, input.width);
            let h = ((img_h as f64 * r).round() as u32).clamp(1, input.height);
            let left = ((input.width - w) as f64 / 2.0 - 0.1).round().max(0.0) as u32;
            let top = ((input.height - h) as f64 / 2.0 - 0.1).round().max(0.0) as u32;
            (w, h, left, top)
        }
    }
}

/// Writes the model input for `img` into `out` (`3 × H × W` floats) and
/// returns the mapping back to the page.
pub fn to_tensor_into(img: &RgbImage, input: &Input, out: &mut [f32]) -> Transform {
    let (w, h) = (input.width as usize, input.height as usize);
    let plane = w * h;
    assert_eq!(out.len(), 3 * plane, "tensor buffer size");
    let (rw, rh, left, top) = placement(img.width(), img.height(), input);
    let resized = resize(img, rw, rh);
    let order: [usize; 3] = match input.channel_order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let mul: [f32; 3] = std::array::from_fn(|c| input.scale / input.std[c]);
    let add: [f32; 3] = std::array::from_fn(|c| -input.mean[c] / input.std[c]);
    if (rw as usize, rh as usize) != (w, h) {
        for c in 0..3 {
            out[c * plane..(c + 1) * plane].fill(input.pad_value as f32 * mul[c] + add[c]);
        }
    }
    let (rw, rh, left, top) = (rw as usize, rh as usize, left as usize, top as usize);
    for (c, &ch) in order.iter().enumerate() {
        let dst = &mut out[c * plane..(c + 1) * plane];
        for y in 0..rh {
            let src_row = &resized[y * rw * 3..(y + 1) * rw * 3];
            let dst_row = &mut dst[(y + top) * w + left..(y + top) * w + left + rw];
            for (d, px) in dst_row.iter_mut().zip(src_row.chunks_exact(3)) {
                *d = px[ch] as f32 * mul[c] + add[c];
            }
        }
    }
    Transform {
        scale: [rw as f32 / img.width() as f32, rh as f32 / img.height() as f32],
        offset: [left as f32, top as f32],
        page: [img.width(), img.height()],
    }
}

/// Convenience for one image: a fresh `[1, 3, H, W]` buffer.
pub fn to_tensor(img: &RgbImage, input: &Input) -> (Vec<f32>, Transform) {
    let mut out = vec![0f32; 3 * input.width as usize * input.height as usize];
    let t = to_tensor_into(img, input, &mut out);
    (out, t)
}

/// Bilinear resize without antialiasing (OpenCV's `INTER_LINEAR`, what the
/// reference implementations use), with SIMD (fast_image_resize).
pub fn resize(img: &RgbImage, w: u32, h: u32) -> Vec<u8> {
    if (img.width(), img.height()) == (w, h) {
        return img.as_raw().clone();
    }
    let src = fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), fr::PixelType::U8x3)
        .expect("an RgbImage buffer matches its size");
    let mut dst = fr::images::Image::new(w, h, fr::PixelType::U8x3);
    let opts = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Interpolation(fr::FilterType::Bilinear));
    fr::Resizer::new().resize(&src, &mut dst, &opts).expect("same pixel type on both sides");
    dst.into_vec()
}

/// The scalar reference of [`resize`]: OpenCV's `INTER_LINEAR` mapping
/// (half-pixel centres, two taps per axis, rounded to 8 bits). Kept to
/// measure the SIMD resizer against (see BENCHMARKS.md).
pub fn resize_scalar(img: &RgbImage, w: u32, h: u32) -> Vec<u8> {
    let (w, h) = (w as usize, h as usize);
    let xs = taps(img.width() as usize, w);
    let ys = taps(img.height() as usize, h);
    let src = img.as_raw();
    let stride = img.width() as usize * 3;
    let mut out = vec![0u8; w * h * 3];
    for (dy, &(y0, y1, fy)) in ys.iter().enumerate() {
        let (r0, r1) = (&src[y0 * stride..], &src[y1 * stride..]);
        for (dx, &(x0, x1, fx)) in xs.iter().enumerate() {
            for c in 0..3 {
                let top = r0[x0 * 3 + c] as f32 * (1.0 - fx) + r0[x1 * 3 + c] as f32 * fx;
                let bottom = r1[x0 * 3 + c] as f32 * (1.0 - fx) + r1[x1 * 3 + c] as f32 * fx;
                out[(dy * w + dx) * 3 + c] = (top * (1.0 - fy) + bottom * fy).round() as u8;
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
    use crate::manifest::Manifest;

    #[test]
    fn taps_match_opencv_half_pixel_mapping() {
        // Downscale by 2: destination 0 sits between source 0 and 1.
        assert_eq!(taps(4, 2), vec![(0, 1, 0.5), (2, 3, 0.5)]);
        // Same size: identity.
        assert_eq!(taps(3, 3), vec![(0, 1, 0.0), (1, 2, 0.0), (2, 2, 0.0)]);
    }

    /// The SIMD resizer stays within one 8-bit step of the scalar OpenCV
    /// mapping on a page-like image (text edges, gradients).
    #[test]
    fn simd_resize_matches_the_scalar_reference() {
        let img = RgbImage::from_fn(1241, 1754, |x, y| {
            let v = if (x / 7 + y / 11) % 5 == 0 { 20 } else { 235 };
            image::Rgb([v, ((x * 255) / 1241) as u8, ((y * 255) / 1754) as u8])
        });
        let (a, b) = (resize(&img, 608, 800), resize_scalar(&img, 608, 800));
        let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(worst <= 1, "largest difference {worst}");
    }

    fn input(resize: ResizeMode, w: u32, h: u32) -> Input {
        let mut m = Manifest::load(std::path::Path::new("/nonexistent"), "layout_cdla").unwrap().input;
        m.resize = resize;
        m.width = w;
        m.height = h;
        m.channel_order = ChannelOrder::Rgb;
        m.scale = 1.0;
        m.mean = [0.0; 3];
        m.std = [1.0; 3];
        m.pad_value = 114;
        m
    }

    /// A wide page letterboxed into a square: centred vertically on the
    /// pad colour, and boxes map back to page pixels.
    #[test]
    fn letterbox_centres_and_maps_back() {
        let img = RgbImage::from_pixel(400, 200, image::Rgb([10, 20, 30]));
        let inp = input(ResizeMode::Letterbox, 100, 100);
        let (t, tr) = to_tensor(&img, &inp);
        // 400×200 → 100×50, 25 rows of padding above and below.
        assert_eq!(tr.offset, [0.0, 25.0]);
        assert_eq!(tr.scale, [0.25, 0.25]);
        assert_eq!(t[0], 114.0);
        assert_eq!(t[25 * 100], 10.0);
        assert_eq!(t[100 * 100 + 50 * 100 + 3], 20.0);
        assert_eq!(t[2 * 100 * 100 + 99 * 100], 114.0);
        assert_eq!(tr.to_page([10.0, 35.0, 50.0, 75.0]), [40.0, 40.0, 200.0, 200.0]);
        // Clipped to the page.
        assert_eq!(tr.to_page([-5.0, 0.0, 120.0, 100.0]), [0.0, 0.0, 400.0, 200.0]);
    }

    #[test]
    fn stretch_scales_each_axis() {
        let img = RgbImage::from_pixel(300, 100, image::Rgb([1, 2, 3]));
        let mut inp = input(ResizeMode::Stretch, 60, 50);
        inp.channel_order = ChannelOrder::Bgr;
        let (t, tr) = to_tensor(&img, &inp);
        assert_eq!((t[0], t[3000], t[6000]), (3.0, 2.0, 1.0));
        assert_eq!(tr.to_page([6.0, 5.0, 30.0, 25.0]), [30.0, 10.0, 150.0, 50.0]);
    }
}
