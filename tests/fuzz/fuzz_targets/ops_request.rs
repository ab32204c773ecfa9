//! The operations API's request parser: never panics; what a refusal
//! echoes is bounded (an operation name of at most 64 characters, an id
//! only when it is a string of at most 64, a short error); an accepted
//! changing request has a valid id and a bounded pipeline name.
#![no_main]
use edgeinfer::config::OPERATIONS;
use edgeinfer::ops::request::{parse, valid_id, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line names the operation (the topic's levels after cmd/),
    // the rest is the payload.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let op = String::from_utf8_lossy(&data[..split]);
    let payload = data.get(split + 1..).unwrap_or(&[]);
    let allow: Vec<String> = OPERATIONS.iter().map(|s| s.to_string()).collect();
    let policy = Policy { enabled: true, allow: &allow };
    match parse(&op, payload, &policy) {
        Ok(r) => {
            assert!(OPERATIONS.contains(&r.op));
            if r.changing() {
                assert!(r.id.as_deref().is_some_and(valid_id));
            }
            if let Some(p) = r.pipeline() {
                assert!(p.chars().count() <= 128);
            }
        }
        Err(e) => {
            assert!(e.op.chars().count() <= 64);
            assert!(e.error.len() < 1024, "{}", e.error);
            assert!(e.id.as_str().is_none_or(|s| s.chars().count() <= 64));
        }
    }
});
