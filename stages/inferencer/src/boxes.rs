//! Models that output final detections (Detectron2 and torchvision exports,
//! "end-to-end" YOLO exports): boxes `[(B,) N, 4]`, scores `[(B,) N]` and
//! class ids `[(B,) N]`, found by output name. Boxes may be corners,
//! corner + size or centre + size, in pixels or fractions of the input.
//! Scores at or below the threshold are dropped and per-class NMS runs (a
//! no-op with `nms_iou = 1`).

use crate::backend::OutTensor;
use crate::manifest::{BoxFormat, Output};
use crate::nms::{per_class_nms, Candidate};

/// Detections kept per image.
const MAX_DETECTIONS: usize = 1000;

fn find<'a>(outputs: &'a [OutTensor], name: &str) -> Result<&'a OutTensor, String> {
    outputs.iter().find(|o| o.name == name).ok_or_else(|| {
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        format!("boxes: no output named {name:?} (the model has {names:?})")
    })
}

/// The rows of batch item `item`: with a leading batch axis (`rank`
/// dimensions), that item's slice; without one, the whole tensor.
fn item_rows(t: &OutTensor, rank: usize, item: usize, width: usize) -> Result<&[f32], String> {
    let rows = match t.shape.len() {
        r if r == rank => t.shape[1] as usize,
        r if r + 1 == rank && item == 0 => t.shape[0] as usize,
        r => {
            return Err(format!(
                "boxes: output {:?} has rank {r}, expected {rank} (or {} without a batch axis)",
                t.name,
                rank - 1
            ))
        }
    };
    let start = item * rows * width;
    t.data
        .get(start..start + rows * width)
        .ok_or_else(|| format!("boxes: output {:?} has no batch item {item}", t.name))
}

/// Raw detections of batch item `item`, in input-image pixels.
pub fn decode(
    outputs: &[OutTensor],
    spec: &Output,
    item: usize,
    input_w: u32,
    input_h: u32,
) -> Result<Vec<(usize, f32, [f32; 4])>, String> {
    let boxes = item_rows(find(outputs, &spec.boxes_output)?, 3, item, 4)?;
    let scores = item_rows(find(outputs, &spec.scores_output)?, 2, item, 1)?;
    let labels = item_rows(find(outputs, &spec.labels_output)?, 2, item, 1)?;
    let n = boxes.len() / 4;
    if scores.len() != n || labels.len() != n {
        return Err(format!("boxes: {n} boxes but {} scores and {} labels", scores.len(), labels.len()));
    }
    let (sx, sy) = if spec.normalized { (input_w as f32, input_h as f32) } else { (1.0, 1.0) };
    let mut per_class: std::collections::BTreeMap<usize, Vec<Candidate>> = Default::default();
    for i in 0..n {
        if scores[i] <= spec.score_threshold {
            continue;
        }
        let label = labels[i];
        if !(label >= 0.0 && label.fract() == 0.0) {
            return Err(format!("boxes: class id {label} is not a non-negative integer"));
        }
        let b = &boxes[i * 4..i * 4 + 4];
        let [x0, y0, x1, y1] = match spec.box_format {
            BoxFormat::Xyxy => [b[0], b[1], b[2], b[3]],
            BoxFormat::Xywh => [b[0], b[1], b[0] + b[2], b[1] + b[3]],
            BoxFormat::Cxcywh => [b[0] - b[2] / 2.0, b[1] - b[3] / 2.0, b[0] + b[2] / 2.0, b[1] + b[3] / 2.0],
        };
        per_class
            .entry(label as usize)
            .or_default()
            .push(Candidate { bbox: [x0 * sx, y0 * sy, x1 * sx, y1 * sy], score: scores[i] });
    }
    Ok(per_class_nms(per_class, spec.nms_iou, MAX_DETECTIONS, MAX_DETECTIONS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Decoder;

    fn spec(format: BoxFormat, normalized: bool) -> Output {
        Output {
            decoder: Decoder::Boxes,
            strides: vec![],
            labels: vec!["a".into(), "b".into()],
            labels_metadata_key: String::new(),
            score_threshold: 0.5,
            nms_iou: 0.5,
            boxes_output: "b".into(),
            scores_output: "s".into(),
            labels_output: "l".into(),
            box_format: format,
            normalized,
        }
    }

    fn t(name: &str, shape: &[i64], data: &[f32]) -> OutTensor {
        OutTensor { name: name.into(), shape: shape.to_vec(), data: data.to_vec() }
    }

    /// torchvision-style outputs without a batch axis, centre/size boxes in
    /// fractions of the input; overlapping same-class boxes are suppressed.
    #[test]
    fn formats_fractions_and_nms() {
        let outputs = [
            t("b", &[3, 4], &[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4, 0.125, 0.125, 0.25, 0.25]),
            t("s", &[3], &[0.9, 0.8, 0.7]),
            t("l", &[3], &[1.0, 1.0, 0.0]),
        ];
        let dets = decode(&outputs, &spec(BoxFormat::Cxcywh, true), 0, 100, 200).unwrap();
        assert_eq!(dets, vec![(1, 0.9, [25.0, 50.0, 75.0, 150.0]), (0, 0.7, [0.0, 0.0, 25.0, 50.0])]);
        let xywh = [t("b", &[1, 1, 4], &[10.0, 20.0, 30.0, 40.0]), t("s", &[1, 1], &[0.6]), t("l", &[1, 1], &[0.0])];
        assert_eq!(
            decode(&xywh, &spec(BoxFormat::Xywh, false), 0, 100, 100).unwrap(),
            vec![(0, 0.6, [10.0, 20.0, 40.0, 60.0])]
        );
    }

    #[test]
    fn bad_outputs_say_why() {
        let outputs = [t("b", &[1, 4], &[0.0; 4]), t("s", &[1], &[0.9]), t("x", &[1], &[0.0])];
        assert!(decode(&outputs, &spec(BoxFormat::Xyxy, false), 0, 1, 1)
            .unwrap_err()
            .contains("no output named \"l\""));
        let outputs = [t("b", &[1, 4], &[0.0; 4]), t("s", &[1], &[0.9]), t("l", &[1], &[-1.0])];
        assert!(decode(&outputs, &spec(BoxFormat::Xyxy, false), 0, 1, 1)
            .unwrap_err()
            .contains("not a non-negative integer"));
    }
}
