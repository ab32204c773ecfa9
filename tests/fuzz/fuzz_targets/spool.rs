//! A spool segment file with arbitrary contents (a torn write, a bad
//! sector, garbage): opening and draining it never panics, and the spool
//! still takes and returns new records afterwards.
#![no_main]
use edgeinfer::health::OutboxStats;
use edgeinfer::mqtt::spool::{Spool, SpoolLimits};
use edgeinfer::mqtt::{Outgoing, QoS};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("edgeinfer-fuzz-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("00000000000000000001.seg"), data).unwrap();
    let limits = SpoolLimits {
        max_bytes: 1 << 20,
        ttl_ms: 0,
    };
    let mut spool = Spool::open(&dir, limits, Arc::new(OutboxStats::default())).unwrap();
    let mut n = 0;
    while let Some(r) = spool.next(0) {
        spool.ack(r.seq);
        n += 1;
        assert!(n <= data.len(), "more records than bytes");
    }
    let msg = Outgoing {
        topic: "t".into(),
        payload: b"p".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    spool.append(&msg, 0).unwrap();
    assert_eq!(spool.next(0).map(|r| r.msg), Some(msg));
});
