//! Scoring the demo's (and the tests') detections against the objects
//! known to be in each frame.

use crate::bundled::KnownObject;

/// How detections compare with the objects known to be in a frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Matched {
    /// Known objects that a detection of the same label overlaps with IoU ≥ 0.5.
    pub found: usize,
    /// Detections that matched no known object.
    pub extra: usize,
}

/// Matches each known object to the unused detection (label, box) of its
/// label that overlaps it most, counting it found at IoU ≥ 0.5.
pub fn match_known(known: &[KnownObject], detections: &[(&str, [f32; 4])]) -> Matched {
    let mut used = vec![false; detections.len()];
    let mut found = 0;
    for object in known {
        let best = detections
            .iter()
            .enumerate()
            .filter(|(i, d)| !used[*i] && d.0 == object.label)
            .map(|(i, d)| (i, crate::pipeline::frame::iou(&d.1, &object.bbox)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, _)) = best.filter(|b| b.1 >= 0.5) {
            used[i] = true;
            found += 1;
        }
    }
    Matched {
        found,
        extra: used.iter().filter(|u| !**u).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_objects_match_by_label_and_overlap_once_each() {
        let known = |label: &str, bbox| KnownObject {
            label: label.into(),
            bbox,
        };
        let objects = [
            known("cat", [0.0, 0.0, 10.0, 10.0]),
            known("cup", [20.0, 20.0, 30.0, 30.0]),
        ];
        let m = match_known(
            &objects,
            &[
                ("cat", [1.0, 0.0, 11.0, 10.0]),   // found (IoU 0.82)
                ("cat", [0.0, 0.0, 10.0, 10.0]),   // the better match: taken instead
                ("dog", [20.0, 20.0, 30.0, 30.0]), // right place, wrong label
                ("cup", [25.0, 25.0, 35.0, 35.0]), // right label, IoU 0.14
            ],
        );
        assert_eq!(m, Matched { found: 1, extra: 3 });
    }
}
