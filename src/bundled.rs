//! The models and sample streams that ship inside the binary, so `demo`
//! (and `models` without a config) work from any directory.

use std::path::{Path, PathBuf};

/// (file name, contents) of every bundled model file.
pub const MODEL_FILES: &[(&str, &[u8])] = &[
    ("activity.toml", include_bytes!("../models/activity.toml")),
    ("activity.onnx", include_bytes!("../models/activity.onnx")),
    ("motion.toml", include_bytes!("../models/motion.toml")),
    ("motion.onnx", include_bytes!("../models/motion.onnx")),
    ("objects.toml", include_bytes!("../models/objects.toml")),
    ("objects.onnx", include_bytes!("../models/objects.onnx")),
];

/// Real held-back BasicMotions recordings, one per activity (see models/make_models.py).
pub const ACTIVITY_STREAM: &str = include_str!("../models/samples/activity_stream.json");

/// The demo camera's frames and their known objects (`camera.json`): four
/// scikit-image photos and composites on backgrounds the detector never saw.
pub const CAMERA_INDEX: &str = include_str!("../models/samples/camera.json");

/// `camera.json`: the demo frames and the boxes of the objects in them.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CameraIndex {
    pub frames: Vec<CameraFrame>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct CameraFrame {
    /// File name in `models/samples/camera/` (and in [`CAMERA_FRAMES`]).
    pub file: String,
    pub objects: Vec<KnownObject>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct KnownObject {
    pub label: String,
    /// x0, y0, x1, y1 in the frame's pixels.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

impl CameraIndex {
    pub fn bundled() -> CameraIndex {
        serde_json::from_str(CAMERA_INDEX).expect("the bundled camera.json parses")
    }
}

macro_rules! frames {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../models/samples/camera/", $name)))),*]
    };
}

/// (file name, JPEG) of every demo camera frame named in `CAMERA_INDEX`.
pub const CAMERA_FRAMES: &[(&str, &[u8])] = frames!(
    "astronaut.jpg",
    "chelsea.jpg",
    "coffee.jpg",
    "rocket.jpg",
    "scene_0.jpg",
    "scene_1.jpg",
    "scene_2.jpg",
    "scene_3.jpg",
    "scene_4.jpg",
    "scene_5.jpg",
    "scene_6.jpg",
    "scene_7.jpg",
);

/// Manifests of the bundled models, by name.
pub const MANIFESTS: &[&str] = &["activity.toml", "motion.toml", "objects.toml"];

/// Writes the bundled models into `dir` and returns their manifest paths.
pub fn unpack(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in MODEL_FILES {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(MANIFESTS.iter().map(|m| dir.join(m)).collect())
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!(
            "edgeinfer-{tag}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_camera_index_and_the_embedded_frames_agree() {
        assert_eq!(CameraIndex::bundled().frames.len(), CAMERA_FRAMES.len());
    }
}
