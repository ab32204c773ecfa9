//! Sensor payloads (JSON or raw little-endian f32) and the per-source
//! sliding window that turns samples into model inputs.

pub mod worker;

use serde::Deserialize;

pub use crate::flow::InputError;

/// Decoded samples: `values` holds `values.len() / channels` samples, each
/// `channels` values, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    pub ts: Option<u64>,
    pub values: Vec<f32>,
}

#[derive(Deserialize)]
struct JsonPayload {
    /// Read by [`timestamp`]: any JSON value, so that a bad one is named.
    ts: Option<serde_json::Value>,
    // Option<f64> so that `null` (a device's "no reading") is reported as a
    // missing value, not as malformed JSON.
    values: Option<Vec<Option<f64>>>,
    samples: Option<Vec<Vec<Option<f64>>>>,
}

pub fn decode_json(payload: &[u8], channels: usize) -> Result<Samples, InputError> {
    if payload.is_empty() {
        return Err(InputError::Empty);
    }
    // JSON is UTF-8; serde_json does not check the strings it skips.
    let text = std::str::from_utf8(payload)
        .map_err(|e| InputError::MalformedJson(format!("not UTF-8: {e}")))?;
    let p: JsonPayload =
        serde_json::from_str(text).map_err(|e| InputError::MalformedJson(e.to_string()))?;
    let mut values = Vec::new();
    let mut push = |sample: usize, row: &[Option<f64>]| {
        if row.len() != channels {
            return Err(InputError::WrongChannelCount {
                sample,
                expected: channels,
                got: row.len(),
            });
        }
        for (channel, v) in row.iter().enumerate() {
            let v = v.map(|v| v as f32).filter(|v| v.is_finite());
            values.push(v.ok_or(InputError::NonFinite { sample, channel })?);
        }
        Ok(())
    };
    match (p.values, p.samples) {
        (Some(row), None) => push(0, &row)?,
        (None, Some(rows)) if !rows.is_empty() => {
            for (i, row) in rows.iter().enumerate() {
                push(i, row)?;
            }
        }
        _ => return Err(InputError::NoSamples),
    }
    Ok(Samples {
        ts: timestamp(p.ts)?,
        values,
    })
}

/// `ts` in a JSON payload: absent or null (the daemon's clock is used), or
/// a number of milliseconds from 0 up; a fraction is cut off (a device's
/// `time.time() * 1000`). Anything else (a string, a negative number) is
/// rejected with the message, not ignored: a result must never carry a
/// time the device did not mean.
fn timestamp(ts: Option<serde_json::Value>) -> Result<Option<u64>, InputError> {
    use serde_json::Value;
    match ts {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(ms) = n.as_u64() {
                return Ok(Some(ms));
            }
            match n.as_f64() {
                Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
                _ => Err(InputError::BadTs(n.to_string())),
            }
        }
        Some(other) => {
            let mut text = other.to_string();
            if text.len() > 40 {
                let mut end = 40;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push('…');
            }
            Err(InputError::BadTs(text))
        }
    }
}

pub fn decode_f32le(payload: &[u8], channels: usize) -> Result<Samples, InputError> {
    if payload.is_empty() {
        return Err(InputError::Empty);
    }
    if !payload.len().is_multiple_of(4 * channels) {
        return Err(InputError::BadLength {
            len: payload.len(),
            channels,
        });
    }
    let mut values = Vec::with_capacity(payload.len() / 4);
    for (i, chunk) in payload.chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if !v.is_finite() {
            return Err(InputError::NonFinite {
                sample: i / channels,
                channel: i % channels,
            });
        }
        values.push(v);
    }
    Ok(Samples { ts: None, values })
}

/// A fixed-capacity sliding window over one source's samples. Its storage is
/// allocated once (`size * channels` values) and never grows.
#[derive(Debug, Clone)]
pub struct SensorWindow {
    channels: usize,
    size: usize,
    stride: usize,
    ring: Box<[f32]>,
    /// Next sample slot to write.
    head: usize,
    filled: usize,
    since_emit: usize,
    emitted: bool,
}

impl SensorWindow {
    pub fn new(size: usize, stride: usize, channels: usize) -> SensorWindow {
        assert!(size > 0 && stride > 0 && channels > 0);
        SensorWindow {
            channels,
            size,
            stride,
            ring: vec![0.0; size * channels].into_boxed_slice(),
            head: 0,
            filled: 0,
            since_emit: 0,
            emitted: false,
        }
    }

    /// Adds one sample (`channels` values). Returns true when a window is
    /// due: the first time the window is full, then every `stride` samples.
    pub fn push(&mut self, sample: &[f32]) -> bool {
        debug_assert_eq!(sample.len(), self.channels);
        let at = self.head * self.channels;
        self.ring[at..at + self.channels].copy_from_slice(sample);
        self.head = (self.head + 1) % self.size;
        self.filled = (self.filled + 1).min(self.size);
        self.since_emit += 1;
        // The first window is due when the ring fills, whatever the stride.
        if self.filled == self.size && (!self.emitted || self.since_emit >= self.stride) {
            self.emitted = true;
            self.since_emit = 0;
            return true;
        }
        false
    }

    /// Copies the window, oldest sample first, into `out` (cleared first).
    pub fn copy_into(&self, out: &mut Vec<f32>) {
        out.clear();
        let split = self.head * self.channels;
        out.extend_from_slice(&self.ring[split..]);
        out.extend_from_slice(&self.ring[..split]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_is_an_optional_count_of_milliseconds() {
        let ts = |json: &str| decode_json(json.as_bytes(), 1).map(|s| s.ts);
        assert_eq!(ts(r#"{"values": [1]}"#), Ok(None));
        assert_eq!(ts(r#"{"ts": null, "values": [1]}"#), Ok(None));
        assert_eq!(
            ts(r#"{"ts": 1764331200123, "values": [1]}"#),
            Ok(Some(1764331200123))
        );
        assert_eq!(
            ts(r#"{"ts": 1764331200123.7, "values": [1]}"#),
            Ok(Some(1764331200123))
        );
        for bad in [r#""2026-12-01T10:00:00Z""#, "-5", "true", "[1]", "1e300"] {
            let e = ts(&format!(r#"{{"ts": {bad}, "values": [1]}}"#)).unwrap_err();
            assert_eq!(e.kind(), "bad_ts", "{bad}: {e}");
        }
    }

    #[test]
    fn json_single_and_batch() {
        let s = decode_json(br#"{"ts": 5, "values": [0.5, -1, 2]}"#, 3).unwrap();
        assert_eq!(
            s,
            Samples {
                ts: Some(5),
                values: vec![0.5, -1.0, 2.0]
            }
        );
        let s = decode_json(br#"{"samples": [[1,2],[3,4]], "extra": "ignored"}"#, 2).unwrap();
        assert_eq!(s.values, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn json_rejections_have_distinct_kinds() {
        let kind = |p: &[u8]| decode_json(p, 3).unwrap_err().kind();
        assert_eq!(kind(b""), "empty");
        assert_eq!(kind(b"{\"values\": [1,2"), "malformed_json");
        assert_eq!(kind(b"[1,2,3]"), "malformed_json");
        assert_eq!(kind(b"{\"ts\": 1}"), "no_samples");
        assert_eq!(kind(b"{\"samples\": []}"), "no_samples");
        assert_eq!(kind(b"{\"values\": [1,2]}"), "wrong_channel_count");
        assert_eq!(
            kind(b"{\"samples\": [[1,2,3],[1,2]]}"),
            "wrong_channel_count"
        );
        assert_eq!(kind(b"{\"values\": [1,null,3]}"), "non_finite");
        assert_eq!(kind(b"{\"values\": [1,1e39,3]}"), "non_finite"); // finite f64, infinite f32
    }

    #[test]
    fn f32le_decodes_and_rejects() {
        let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            decode_f32le(&bytes, 2).unwrap().values,
            vec![1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(
            decode_f32le(&bytes[..6], 2).unwrap_err().kind(),
            "bad_length"
        );
        assert_eq!(decode_f32le(&bytes, 3).unwrap_err().kind(), "bad_length");
        let nan: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            decode_f32le(&nan, 2).unwrap_err(),
            InputError::NonFinite {
                sample: 0,
                channel: 1
            }
        );
    }

    /// Naive reference: the window after sample `n` is samples `n-size+1..=n`.
    #[test]
    fn window_matches_naive_slices() {
        for (size, stride) in [(4, 1), (4, 2), (4, 4), (4, 6), (1, 1), (5, 3)] {
            let mut w = SensorWindow::new(size, stride, 2);
            let mut out = Vec::new();
            let mut emitted = Vec::new();
            for n in 0..20usize {
                if w.push(&[n as f32, -(n as f32)]) {
                    w.copy_into(&mut out);
                    let expected: Vec<f32> = (n + 1 - size..=n)
                        .flat_map(|k| [k as f32, -(k as f32)])
                        .collect();
                    assert_eq!(out, expected, "size {size} stride {stride} at {n}");
                    emitted.push(n);
                }
            }
            // First at size-1, then every `stride` samples.
            let expected: Vec<usize> = (size - 1..20).step_by(stride).collect();
            assert_eq!(emitted, expected, "size {size} stride {stride}");
        }
    }
}
