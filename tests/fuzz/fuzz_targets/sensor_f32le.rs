//! Raw f32le payloads: never panic; accepted ones hold whole finite samples.
#![no_main]
use edgeinfer::pipeline::sensor::decode_f32le;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let channels = 1 + (data.first().copied().unwrap_or(0) % 8) as usize;
    if let Ok(s) = decode_f32le(data, channels) {
        assert_eq!(s.values.len() * 4, data.len());
        assert!(s.values.iter().all(|v| v.is_finite()));
    }
});
