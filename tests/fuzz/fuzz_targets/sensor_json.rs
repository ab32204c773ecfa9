//! JSON sensor payloads: never panic; what is accepted is well formed.
#![no_main]
use edgeinfer::pipeline::sensor::{decode_json, SensorWindow};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let channels = 1 + (data.first().copied().unwrap_or(0) % 8) as usize;
    if let Ok(s) = decode_json(data, channels) {
        assert_eq!(s.values.len() % channels, 0);
        assert!(s.values.iter().all(|v| v.is_finite()));
        let mut w = SensorWindow::new(4, 3, channels);
        let mut out = Vec::new();
        for sample in s.values.chunks_exact(channels) {
            if w.push(sample) {
                w.copy_into(&mut out);
                assert_eq!(out.len(), 4 * channels);
            }
        }
    }
});
