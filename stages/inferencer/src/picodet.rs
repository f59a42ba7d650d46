//! PP-PicoDet output decoding: per stride, class scores `[1, N, C]` (already
//! sigmoid) and box distributions `[1, N, 4 × (reg_max + 1)]`; a softmax over
//! the bins gives distances from the anchor centre, times the stride. Then
//! top-k per stride, per-class hard NMS and scaling back to the page — the
//! same steps, thresholds and limits as the reference implementation.

use crate::nms::{hard_nms, Candidate};

/// Candidates kept per stride before NMS.
const NMS_TOP_K: usize = 1000;
/// NMS considers at most this many candidates per class…
const CANDIDATES_PER_CLASS: usize = 200;
/// …and keeps at most this many.
const KEEP_TOP_K: usize = 100;

/// One output tensor: shape and data.
pub struct TensorView<'a> {
    pub shape: &'a [i64],
    pub data: &'a [f32],
}

/// Raw detections in input-image pixels: `(class, score, [x0, y0, x1, y1])`.
pub fn decode(
    outputs: &[TensorView<'_>],
    strides: &[u32],
    input_w: u32,
    input_h: u32,
    score_threshold: f32,
    iou: f32,
) -> Result<Vec<(usize, f32, [f32; 4])>, String> {
    let levels = strides.len();
    if outputs.len() != 2 * levels {
        return Err(format!(
            "picodet: expected {} outputs (scores then boxes for {levels} strides), got {}",
            2 * levels,
            outputs.len()
        ));
    }
    let num_classes = *outputs[0].shape.last().ok_or("picodet: score tensor without shape")? as usize;
    let mut boxes: Vec<[f32; 4]> = Vec::new();
    let mut scores: Vec<&[f32]> = Vec::new();
    for (level, &stride) in strides.iter().enumerate() {
        let (sc, bx) = (&outputs[level], &outputs[level + levels]);
        let bins4 = *bx.shape.last().ok_or("picodet: box tensor without shape")? as usize;
        if !bins4.is_multiple_of(4) {
            return Err(format!("picodet: box tensor last dim {bins4} is not a multiple of 4"));
        }
        let bins = bins4 / 4;
        let fm_w = (input_w as f32 / stride as f32).ceil() as usize;
        let fm_h = (input_h as f32 / stride as f32).ceil() as usize;
        let n = fm_w * fm_h;
        if sc.data.len() != n * num_classes || bx.data.len() != n * bins4 {
            return Err(format!(
                "picodet: stride {stride} expects {n} anchors, got score len {} and box len {}",
                sc.data.len(),
                bx.data.len()
            ));
        }
        // Top-k anchors by best class score.
        let mut order: Vec<(usize, f32)> = (0..n)
            .map(|i| {
                let row = &sc.data[i * num_classes..(i + 1) * num_classes];
                (i, row.iter().copied().fold(f32::MIN, f32::max))
            })
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        order.truncate(NMS_TOP_K);
        for (i, _) in order {
            let cx = ((i % fm_w) as f32 + 0.5) * stride as f32;
            let cy = ((i / fm_w) as f32 + 0.5) * stride as f32;
            let dist = &bx.data[i * bins4..(i + 1) * bins4];
            let d: [f32; 4] =
                std::array::from_fn(|side| expected_bin(&dist[side * bins..(side + 1) * bins]) * stride as f32);
            boxes.push([cx - d[0], cy - d[1], cx + d[2], cy + d[3]]);
            scores.push(&sc.data[i * num_classes..(i + 1) * num_classes]);
        }
    }
    let mut out = Vec::new();
    for class in 0..num_classes {
        let cands: Vec<Candidate> = boxes
            .iter()
            .zip(&scores)
            .filter(|(_, s)| s[class] > score_threshold)
            .map(|(b, s)| Candidate { bbox: *b, score: s[class] })
            .collect();
        for c in hard_nms(cands, iou, CANDIDATES_PER_CLASS, KEEP_TOP_K) {
            out.push((class, c.score, c.bbox));
        }
    }
    Ok(out)
}

/// Softmax over the bins, then the expected bin index.
fn expected_bin(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let mut sum = 0.0;
    let mut weighted = 0.0;
    for (k, &l) in logits.iter().enumerate() {
        let e = (l - max).exp();
        sum += e;
        weighted += e * k as f32;
    }
    weighted / sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_bin_of_a_peak_is_its_index() {
        let mut logits = vec![-50.0; 8];
        logits[3] = 50.0;
        assert!((expected_bin(&logits) - 3.0).abs() < 1e-4);
        assert!((expected_bin(&[0.0; 8]) - 3.5).abs() < 1e-6);
    }

    /// A synthetic 2-stride output with one confident anchor decodes to the
    /// box its distances describe.
    #[test]
    fn decodes_a_known_anchor() {
        let (w, h, classes, bins) = (32u32, 32u32, 2usize, 8usize);
        let strides = [8u32, 16];
        let mut tensors: Vec<(Vec<i64>, Vec<f32>)> = Vec::new();
        for s in strides {
            let n = ((w / s) * (h / s)) as usize;
            tensors.push((vec![1, n as i64, classes as i64], vec![0.0; n * classes]));
        }
        for s in strides {
            let n = ((w / s) * (h / s)) as usize;
            tensors.push((vec![1, n as i64, 4 * bins as i64], vec![0.0; n * 4 * bins]));
        }
        // Anchor 5 of stride 8 (fm 4×4: x=1, y=1 → centre 12,12), class 1.
        tensors[0].1[5 * classes + 1] = 0.9;
        let peak = |k: usize| -> Vec<f32> { (0..bins).map(|i| if i == k { 60.0 } else { -60.0 }).collect() };
        let dist: Vec<f32> = [peak(1), peak(1), peak(2), peak(3)].concat();
        tensors[2].1[5 * 4 * bins..6 * 4 * bins].copy_from_slice(&dist);
        let views: Vec<TensorView> = tensors.iter().map(|(s, d)| TensorView { shape: s, data: d }).collect();
        let dets = decode(&views, &strides, w, h, 0.5, 0.5).unwrap();
        assert_eq!(dets.len(), 1);
        let (class, score, b) = dets[0];
        assert_eq!(class, 1);
        assert!((score - 0.9).abs() < 1e-6);
        let want = [12.0 - 8.0, 12.0 - 8.0, 12.0 + 16.0, 12.0 + 24.0];
        for k in 0..4 {
            assert!((b[k] - want[k]).abs() < 1e-3, "{b:?} vs {want:?}");
        }
    }
}
