//! Hard non-maximum suppression, as in the reference implementation.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub bbox: [f32; 4],
    pub score: f32,
}

/// Area with the reference's clamp of negative extents to 0.
fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

/// Intersection over union (with the reference's 1e-5 epsilon).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let inter = [a[0].max(b[0]), a[1].max(b[1]), a[2].min(b[2]), a[3].min(b[3])];
    let i = area(&inter);
    i / (area(a) + area(b) - i + 1e-5)
}

/// Keeps the best-scoring boxes among the top `candidates`, dropping any box
/// overlapping a kept one by more than `iou_threshold`; at most `keep`.
pub fn hard_nms(mut cands: Vec<Candidate>, iou_threshold: f32, candidates: usize, keep: usize) -> Vec<Candidate> {
    // Highest score first; stable for equal scores.
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    cands.truncate(candidates);
    let mut kept: Vec<Candidate> = Vec::new();
    for c in cands {
        if kept.len() == keep {
            break;
        }
        if kept.iter().all(|k| iou(&k.bbox, &c.bbox) <= iou_threshold) {
            kept.push(c);
        }
    }
    kept
}

/// Hard NMS class by class (each class's best `candidates`, at most `keep`
/// per class), then the best `keep` overall: `(class, score, box)`.
pub fn per_class_nms(
    per_class: impl IntoIterator<Item = (usize, Vec<Candidate>)>,
    iou_threshold: f32,
    candidates: usize,
    keep: usize,
) -> Vec<(usize, f32, [f32; 4])> {
    let mut out = Vec::new();
    for (class, cands) in per_class {
        for c in hard_nms(cands, iou_threshold, candidates, keep) {
            out.push((class, c.score, c.bbox));
        }
    }
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out.truncate(keep);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suppresses_overlaps_and_keeps_disjoint_boxes() {
        let c = |x: f32, s: f32| Candidate { bbox: [x, 0.0, x + 10.0, 10.0], score: s };
        let kept = hard_nms(vec![c(0.0, 0.8), c(1.0, 0.9), c(50.0, 0.7)], 0.5, 200, 100);
        assert_eq!(kept, vec![c(1.0, 0.9), c(50.0, 0.7)]);
        assert_eq!(hard_nms(vec![c(0.0, 0.8), c(50.0, 0.7)], 0.5, 200, 1).len(), 1);
    }

    #[test]
    fn iou_of_identical_and_disjoint() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert!((iou(&a, &a) - 1.0).abs() < 1e-6);
        assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
    }
}
