//! Ultralytics YOLOv8 detection head, as exported to ONNX without NMS: one
//! tensor `[1, 4 + C, N]`, rows `cx, cy, w, h` then one score per class
//! (already sigmoid, no objectness). Best class per anchor above the
//! threshold, then per-class hard NMS, at most [`MAX_DETECTIONS`] — the
//! steps of Ultralytics' `non_max_suppression`.

use crate::nms::{per_class_nms, Candidate};
use crate::picodet::TensorView;

/// Candidates NMS considers, best first (Ultralytics' `max_nms`).
const MAX_CANDIDATES: usize = 30_000;
/// Detections kept per image (Ultralytics' `max_det`).
pub const MAX_DETECTIONS: usize = 300;

/// Raw detections in input-image pixels: `(class, score, [x0, y0, x1, y1])`.
pub fn decode(
    out: &TensorView<'_>,
    num_classes: usize,
    score_threshold: f32,
    iou: f32,
) -> Result<Vec<(usize, f32, [f32; 4])>, String> {
    let rank = out.shape.len();
    if rank < 2 {
        return Err(format!("yolov8: output rank {rank}, expected [1, 4 + classes, anchors]"));
    }
    let rows = out.shape[rank - 2] as usize;
    let n = out.shape[rank - 1] as usize;
    if rows != 4 + num_classes {
        return Err(format!(
            "yolov8: output has {rows} rows per anchor, expected 4 + {num_classes} classes = {}",
            4 + num_classes
        ));
    }
    if out.data.len() != rows * n {
        return Err(format!("yolov8: output holds {} values, expected {rows} × {n}", out.data.len()));
    }
    let d = out.data;
    let mut per_class: Vec<Vec<Candidate>> = vec![Vec::new(); num_classes];
    for i in 0..n {
        let (mut best, mut score) = (0, f32::MIN);
        for c in 0..num_classes {
            let s = d[(4 + c) * n + i];
            if s > score {
                (best, score) = (c, s);
            }
        }
        if score <= score_threshold {
            continue;
        }
        let (cx, cy, w, h) = (d[i], d[n + i], d[2 * n + i], d[3 * n + i]);
        per_class[best].push(Candidate { bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0], score });
    }
    Ok(per_class_nms(per_class.into_iter().enumerate(), iou, MAX_CANDIDATES, MAX_DETECTIONS))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two overlapping anchors of one class and one of another: the weaker
    /// overlap is suppressed, centre/size become corners.
    #[test]
    fn decodes_and_suppresses() {
        let (classes, n) = (2usize, 4usize);
        let mut d = vec![0f32; (4 + classes) * n];
        let mut set = |i: usize, b: [f32; 4], scores: [f32; 2]| {
            for k in 0..4 {
                d[k * n + i] = b[k];
            }
            for c in 0..2 {
                d[(4 + c) * n + i] = scores[c];
            }
        };
        set(0, [50.0, 50.0, 20.0, 40.0], [0.9, 0.1]);
        set(1, [51.0, 50.0, 20.0, 40.0], [0.8, 0.1]); // overlaps 0: suppressed
        set(2, [10.0, 10.0, 4.0, 4.0], [0.1, 0.6]);
        set(3, [90.0, 90.0, 4.0, 4.0], [0.2, 0.1]); // below threshold
        let shape = [1i64, 6, 4];
        let dets = decode(&TensorView { shape: &shape, data: &d }, classes, 0.25, 0.45).unwrap();
        assert_eq!(dets, vec![(0, 0.9, [40.0, 30.0, 60.0, 70.0]), (1, 0.6, [8.0, 8.0, 12.0, 12.0])]);
    }

    #[test]
    fn wrong_class_count_says_so() {
        let shape = [1i64, 15, 2];
        let err = decode(&TensorView { shape: &shape, data: &[0.0; 30] }, 10, 0.25, 0.45).unwrap_err();
        assert!(err.contains("expected 4 + 10 classes = 14"), "{err}");
    }
}
