//! A spool record on disk: its layout (see the module's doc), writing it,
//! and reading it back with its checks.

use super::*;

pub(super) const MAGIC: u32 = 0xED1F_5A01;

pub(super) const HEADER: usize = 20;

pub(super) const MAX_TOPIC: usize = u16::MAX as usize;

pub(super) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

pub(super) fn encode(seq: u64, msg: &Outgoing, expires_ms: u64) -> Vec<u8> {
    let body_len = 12 + msg.topic.len() + msg.payload.len();
    let mut rec = Vec::with_capacity(HEADER + body_len);
    rec.extend_from_slice(&MAGIC.to_le_bytes());
    rec.extend_from_slice(&(body_len as u32).to_le_bytes());
    rec.extend_from_slice(&[0; 4]); // crc, below
    rec.extend_from_slice(&seq.to_le_bytes());
    rec.extend_from_slice(&expires_ms.to_le_bytes());
    rec.push(msg.qos as u8);
    rec.push(msg.retain as u8);
    rec.extend_from_slice(&(msg.topic.len() as u16).to_le_bytes());
    rec.extend_from_slice(msg.topic.as_bytes());
    rec.extend_from_slice(&msg.payload);
    let crc = crc32fast::hash(&rec[12..]);
    rec[8..12].copy_from_slice(&crc.to_le_bytes());
    rec
}

/// A record decoded from `buf` (which starts at a record), or why not.
pub(super) enum Decoded {
    Record {
        seq: u64,
        expires_ms: u64,
        msg: Outgoing,
        len: u64,
    },
    /// Not a valid record here.
    Bad,
    /// Too few bytes to tell (end of a segment being written).
    Short,
}

pub(super) fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER {
        return Decoded::Short;
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(0) != MAGIC {
        return Decoded::Bad;
    }
    let body_len = u32_at(4) as usize;
    if body_len < 12 {
        return Decoded::Bad;
    }
    let Some(body) = buf.get(HEADER..HEADER + body_len) else {
        return Decoded::Short;
    };
    if crc32fast::hash(&buf[12..HEADER + body_len]) != u32_at(8) {
        return Decoded::Bad;
    }
    let seq = u64::from_le_bytes(buf[12..20].try_into().expect("8 bytes"));
    let expires_ms = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
    let qos = match body[8] {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Decoded::Bad,
    };
    let topic_len = u16::from_le_bytes([body[10], body[11]]) as usize;
    let Some(topic) = body
        .get(12..12 + topic_len)
        .and_then(|t| std::str::from_utf8(t).ok())
    else {
        return Decoded::Bad;
    };
    Decoded::Record {
        seq,
        expires_ms,
        msg: Outgoing {
            topic: topic.to_owned(),
            payload: body[12 + topic_len..].to_vec(),
            qos,
            retain: body[9] != 0,
        },
        len: (HEADER + body_len) as u64,
    }
}
