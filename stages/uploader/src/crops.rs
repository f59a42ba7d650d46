//! Region crops (`uploader.crops`): each region's box cut out of the page
//! image, rounded outwards to whole pixels and clipped to the page.

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::ImageEncoder;

/// The PNG of each box of the page image `png` (`None` for a box with no
/// pixel inside the page).
pub fn cut(png: &[u8], boxes: &[[f32; 4]]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let page = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .map_err(|e| format!("page image is not a valid PNG: {e}"))?
        .to_rgb8();
    let (w, h) = (page.width(), page.height());
    boxes
        .iter()
        .map(|b| {
            let clip = |v: f32, max: u32| if v.is_finite() { v.clamp(0.0, max as f32) } else { 0.0 };
            let (x0, y0) = (clip(b[0], w).floor() as u32, clip(b[1], h).floor() as u32);
            let (x1, y1) = (clip(b[2], w).ceil() as u32, clip(b[3], h).ceil() as u32);
            if x1 <= x0 || y1 <= y0 {
                return Ok(None);
            }
            let crop = image::imageops::crop_imm(&page, x0, y0, x1 - x0, y1 - y0).to_image();
            let mut out = Vec::new();
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
                .write_image(crop.as_raw(), crop.width(), crop.height(), image::ExtendedColorType::Rgb8)
                .map_err(|e| format!("PNG encoding of a crop failed: {e}"))?;
            Ok(Some(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_cut_outwards_and_clipped_to_the_page() {
        let mut page = image::RgbImage::new(40, 30);
        page.put_pixel(10, 5, image::Rgb([255, 0, 0]));
        let mut png = Vec::new();
        PngEncoder::new(&mut png).write_image(page.as_raw(), 40, 30, image::ExtendedColorType::Rgb8).unwrap();
        let out = cut(&png, &[[10.2, 5.7, 20.1, 8.0], [35.0, 25.0, 99.0, 99.0], [50.0, 50.0, 60.0, 60.0]]).unwrap();
        let first = image::load_from_memory(out[0].as_ref().unwrap()).unwrap().to_rgb8();
        assert_eq!(first.dimensions(), (11, 3));
        assert_eq!(first.get_pixel(0, 0), &image::Rgb([255, 0, 0]));
        let clipped = image::load_from_memory(out[1].as_ref().unwrap()).unwrap();
        assert_eq!((clipped.width(), clipped.height()), (5, 5));
        assert!(out[2].is_none(), "a box outside the page has no crop");
        assert!(cut(b"not a png", &[[0.0, 0.0, 1.0, 1.0]]).is_err());
    }
}
