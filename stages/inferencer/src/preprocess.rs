//! Page image → model input tensor (NCHW float32), as the manifest says.

use image::imageops::FilterType;
use image::RgbImage;

use crate::manifest::{ChannelOrder, Input};

/// Resizes (bilinear, like OpenCV's default), reorders channels and
/// normalises `(x * scale - mean) / std` into a `[1, 3, H, W]` buffer.
pub fn to_tensor(img: &RgbImage, input: &Input) -> Vec<f32> {
    let (w, h) = (input.width, input.height);
    let resized;
    let src = if img.width() == w && img.height() == h {
        img
    } else {
        resized = image::imageops::resize(img, w, h, FilterType::Triangle);
        &resized
    };
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    let order: [usize; 3] = match input.channel_order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let mul: [f32; 3] = std::array::from_fn(|c| input.scale / input.std[c]);
    let add: [f32; 3] = std::array::from_fn(|c| -input.mean[c] / input.std[c]);
    for (i, px) in src.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px.0[order[c]] as f32 * mul[c] + add[c];
        }
    }
    out
}
