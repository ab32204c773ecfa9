//! The spool: results and errors waiting for the broker, in order, on disk
//! (or in memory when no directory is configured).
//!
//! Layout: a directory of append-only segment files named by the sequence
//! number of their first record, plus a `commit` file holding the highest
//! sequence number the broker has acknowledged (everything up to it was
//! delivered). A record is
//!
//! ```text
//! magic u32 | body length u32 | crc32(seq ‖ body) u32 | seq u64 | body
//! body = expires_ms u64 | qos u8 | retain u8 | topic length u16 | topic | payload
//! ```
//!
//! all little-endian. A record that is cut short or fails its checksum (a
//! torn write after power loss, a bad sector) is skipped: the reader looks
//! for the next magic number that starts a valid record, counts the skip and
//! carries on. After a restart the writer always starts a new segment, so a
//! torn tail is never appended to.
//!
//! Delivery is at least once: the commit point only moves past records the
//! broker acknowledged, it is persisted on [`Spool::sync`], and everything
//! after it is sent again after a reconnect or a restart (duplicates are
//! possible, losses are not — except by the documented policies: the byte
//! cap drops the oldest segment, the TTL drops expired records; both counted).

use super::Outgoing;
use crate::health::OutboxStats;
use rumqttc::QoS;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

mod record;
mod sync;

use record::*;
pub use sync::SyncJob;
use sync::*;

/// Size and age limits of a spool.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    /// Total bytes of all segments; past it the oldest segment is dropped.
    pub max_bytes: u64,
    /// Records older than this are dropped unsent (0: never).
    pub ttl_ms: u64,
}

impl SpoolLimits {
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(16 << 10, 8 << 20)
    }
}

enum Store {
    File { file: File, path: PathBuf },
    Mem(Vec<u8>),
}

struct Segment {
    first_seq: u64,
    store: Store,
    len: u64,
    /// Records written to (or found in) this segment.
    records: u64,
}

impl Segment {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.store {
            Store::File { file, .. } => file.read_exact_at(buf, offset),
            Store::Mem(v) => {
                let start = offset as usize;
                let src = v
                    .get(start..start + buf.len())
                    .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

/// Position of a record: segment (by its first sequence number) and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    segment: u64,
    offset: u64,
}

struct Inflight {
    seq: u64,
    start: Pos,
    end: Pos,
    acked: bool,
}

/// A record read back from the spool.
#[derive(Debug, PartialEq)]
pub struct Spooled {
    pub seq: u64,
    pub msg: Outgoing,
}

pub struct Spool {
    dir: Option<PathBuf>,
    _lock: Option<File>,
    limits: SpoolLimits,
    segments: VecDeque<Segment>,
    next_seq: u64,
    /// Next record to send.
    cursor: Pos,
    /// Everything before this was acknowledged.
    commit: Pos,
    commit_seq: u64,
    persisted_commit: u64,
    /// Segments written since the last sync that are no longer the last
    /// one (a rotation): their data still needs an fsync.
    unsynced: Vec<File>,
    /// Delivered or dropped segment files, removed by the next sync.
    to_remove: Vec<PathBuf>,
    /// Records handed out and not yet committed, in order.
    inflight: VecDeque<Inflight>,
    bytes: u64,
    dirty: bool,
    stats: Arc<OutboxStats>,
}

impl Spool {
    /// A spool kept in memory only (lost on restart).
    pub fn in_memory(limits: SpoolLimits, stats: Arc<OutboxStats>) -> Spool {
        Spool {
            dir: None,
            _lock: None,
            limits,
            segments: VecDeque::new(),
            next_seq: 1,
            cursor: Pos {
                segment: 1,
                offset: 0,
            },
            commit: Pos {
                segment: 1,
                offset: 0,
            },
            commit_seq: 0,
            persisted_commit: 0,
            unsynced: Vec::new(),
            to_remove: Vec::new(),
            inflight: VecDeque::new(),
            bytes: 0,
            dirty: false,
            stats,
        }
    }

    /// Opens (or creates) the spool in `dir`, recovering what a previous run
    /// left: records after the commit point are sent again; torn or corrupt
    /// records are skipped and counted. Fails if another process holds it.
    pub fn open(dir: &Path, limits: SpoolLimits, stats: Arc<OutboxStats>) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let lock = File::create(dir.join("lock"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another edgeinfer", dir.display()),
            )
        })?;
        let commit_seq = match std::fs::read_to_string(dir.join("commit")) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let first = name.strip_suffix(".seg")?.parse::<u64>().ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort();
        let mut spool = Spool::in_memory(limits, stats);
        spool.dir = Some(dir.to_owned());
        spool._lock = Some(lock);
        spool.commit_seq = commit_seq;
        spool.persisted_commit = commit_seq;
        let mut max_seq = commit_seq;
        let mut first_unacked: Option<Pos> = None;
        for (first_seq, path) in names {
            let data = std::fs::read(&path)?;
            let (mut records, mut last_seq, mut unacked) = (0, 0, None);
            let mut offset = 0usize;
            while offset < data.len() {
                match decode(&data[offset..]) {
                    Decoded::Record { seq, len, .. } => {
                        records += 1;
                        last_seq = seq;
                        if seq > commit_seq && unacked.is_none() {
                            unacked = Some(offset as u64);
                        }
                        offset += len as usize;
                    }
                    Decoded::Bad | Decoded::Short => match resync(&data, offset + 1) {
                        Some(next) => offset = next,
                        None => break,
                    },
                }
            }
            if records == 0 || last_seq <= commit_seq {
                // Fully delivered (or nothing readable): not needed any more.
                std::fs::remove_file(&path)?;
                continue;
            }
            max_seq = max_seq.max(last_seq);
            if first_unacked.is_none() {
                first_unacked = unacked.map(|offset| Pos {
                    segment: first_seq,
                    offset,
                });
            }
            let file = OpenOptions::new().read(true).append(true).open(&path)?;
            spool.bytes += data.len() as u64;
            spool.segments.push_back(Segment {
                first_seq,
                store: Store::File { file, path },
                len: data.len() as u64,
                records,
            });
        }
        spool.next_seq = max_seq + 1;
        let start = first_unacked.unwrap_or(Pos {
            segment: spool.next_seq,
            offset: 0,
        });
        spool.cursor = start;
        spool.commit = start;
        // Count what is waiting (records after the commit point).
        let mut waiting = 0;
        while spool.read_next(false).is_some() {
            waiting += 1;
        }
        spool.cursor = start;
        spool
            .stats
            .queued_messages
            .store(waiting, Ordering::Relaxed);
        spool.update_bytes();
        // New records go to a new segment: never append after a torn tail.
        spool.start_segment()?;
        Ok(spool)
    }

    fn start_segment(&mut self) -> io::Result<()> {
        if self.dirty {
            // The segment being left still has unsynced records.
            if let Some(Segment {
                store: Store::File { file, .. },
                ..
            }) = self.segments.back()
            {
                self.unsynced.push(file.try_clone()?);
            }
        }
        let first_seq = self.next_seq;
        let store = match &self.dir {
            Some(dir) => {
                let path = dir.join(segment_name(first_seq));
                let file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                Store::File { file, path }
            }
            None => Store::Mem(Vec::new()),
        };
        self.segments.push_back(Segment {
            first_seq,
            store,
            len: 0,
            records: 0,
        });
        Ok(())
    }

    fn index(&self, segment: u64) -> Option<usize> {
        self.segments.iter().position(|s| s.first_seq == segment)
    }

    /// Appends a message. Past the byte cap the oldest segment is dropped
    /// (its undelivered records counted in `dropped`).
    pub fn append(&mut self, msg: &Outgoing, now_ms: u64) -> io::Result<()> {
        if msg.topic.len() > MAX_TOPIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "topic too long",
            ));
        }
        let expires = if self.limits.ttl_ms == 0 {
            u64::MAX
        } else {
            now_ms.saturating_add(self.limits.ttl_ms)
        };
        let rec = encode(self.next_seq, msg, expires);
        if rec.len() as u64 > self.limits.max_bytes {
            self.stats.dropped.inc();
            return Ok(());
        }
        let needs_new = self
            .segments
            .back()
            .is_none_or(|s| s.len > 0 && s.len + rec.len() as u64 > self.limits.segment_bytes());
        if needs_new {
            self.start_segment()?;
        }
        while self.bytes + rec.len() as u64 > self.limits.max_bytes && self.segments.len() > 1 {
            self.drop_oldest()?;
        }
        let seg = self.segments.back_mut().expect("a segment exists");
        match &mut seg.store {
            Store::File { file, .. } => {
                if let Err(e) = file.write_all(&rec) {
                    // A partial record may be on disk: later records go to a
                    // new segment, and the reader skips the torn one.
                    let _ = self.start_segment();
                    return Err(e);
                }
            }
            Store::Mem(v) => v.extend_from_slice(&rec),
        }
        seg.len += rec.len() as u64;
        seg.records += 1;
        self.bytes += rec.len() as u64;
        self.next_seq += 1;
        self.dirty = true;
        self.stats.queued_messages.fetch_add(1, Ordering::Relaxed);
        self.update_bytes();
        Ok(())
    }

    fn drop_oldest(&mut self) -> io::Result<()> {
        let seg = self.segments.pop_front().expect("caller checked");
        self.bytes -= seg.len;
        // Records of it still waiting: all of them, unless delivery had
        // already started inside it.
        let mut lost = seg.records;
        if self.commit.segment == seg.first_seq {
            lost = self.count_from(&seg, self.commit.offset);
        } else if self.commit.segment > seg.first_seq {
            lost = 0;
        }
        self.stats.dropped.add(lost);
        sub(&self.stats.queued_messages, lost);
        let next = self
            .segments
            .front()
            .map(|s| s.first_seq)
            .unwrap_or(self.next_seq);
        let start = Pos {
            segment: next,
            offset: 0,
        };
        if self.commit.segment <= seg.first_seq {
            self.commit = start;
        }
        if self.cursor.segment <= seg.first_seq {
            self.cursor = start;
        }
        // Records of the dropped segment still in flight are forgotten: their
        // acknowledgements, if they come, are ignored.
        self.inflight.retain(|i| i.end.segment != seg.first_seq);
        self.commit_seq = self
            .commit_seq
            .max(next.saturating_sub(1))
            .min(self.next_seq - 1);
        if let Store::File { path, .. } = seg.store {
            self.to_remove.push(path);
        }
        tracing::warn!(dropped = lost, "Outbox full: dropped its oldest segment");
        Ok(())
    }

    fn count_from(&self, seg: &Segment, mut offset: u64) -> u64 {
        let mut n = 0;
        let mut header = [0u8; HEADER];
        while offset + HEADER as u64 <= seg.len && seg.read_at(&mut header, offset).is_ok() {
            let len = u32::from_le_bytes(header[4..8].try_into().expect("4")) as u64;
            if u32::from_le_bytes(header[0..4].try_into().expect("4")) != MAGIC {
                break;
            }
            n += 1;
            offset += HEADER as u64 + len;
        }
        n
    }

    /// The next record to send, or `None` when everything was handed out.
    /// Expired records are dropped (counted) on the way.
    pub fn next(&mut self, now_ms: u64) -> Option<Spooled> {
        loop {
            let (seq, expires_ms, msg) = self.read_next(true)?;
            if expires_ms < now_ms {
                self.stats.expired.inc();
                self.ack(seq);
                continue;
            }
            return Some(Spooled { seq, msg });
        }
    }

    /// Reads the record at the cursor and moves past it; with `track`, the
    /// record is remembered as in flight.
    fn read_next(&mut self, track: bool) -> Option<(u64, u64, Outgoing)> {
        loop {
            let i = self.index(self.cursor.segment).or_else(|| {
                // The cursor's segment is gone: the next one that exists.
                let i = self
                    .segments
                    .iter()
                    .position(|s| s.first_seq > self.cursor.segment)?;
                self.cursor = Pos {
                    segment: self.segments[i].first_seq,
                    offset: 0,
                };
                Some(i)
            })?;
            let seg = &self.segments[i];
            if self.cursor.offset >= seg.len {
                let next = self.segments.get(i + 1)?.first_seq;
                self.cursor = Pos {
                    segment: next,
                    offset: 0,
                };
                continue;
            }
            let avail = (seg.len - self.cursor.offset) as usize;
            let mut header = [0u8; HEADER];
            let body_len =
                if avail >= HEADER && seg.read_at(&mut header, self.cursor.offset).is_ok() {
                    u32::from_le_bytes(header[4..8].try_into().expect("4")) as usize
                } else {
                    0
                };
            let want = (HEADER + body_len).min(avail);
            let mut buf = vec![0u8; want];
            let decoded = match seg.read_at(&mut buf, self.cursor.offset) {
                Ok(()) => decode(&buf),
                Err(_) => Decoded::Bad,
            };
            match decoded {
                Decoded::Record {
                    seq,
                    expires_ms,
                    msg,
                    len,
                } => {
                    let start = self.cursor;
                    self.cursor.offset += len;
                    if track {
                        self.inflight.push_back(Inflight {
                            seq,
                            start,
                            end: self.cursor,
                            acked: false,
                        });
                    }
                    return Some((seq, expires_ms, msg));
                }
                Decoded::Bad | Decoded::Short => {
                    // Skip to the next record that decodes, or the segment's end.
                    let mut rest = vec![0u8; avail];
                    let skip_to = seg
                        .read_at(&mut rest, self.cursor.offset)
                        .ok()
                        .and_then(|()| resync(&rest, 1))
                        .map(|n| self.cursor.offset + n as u64)
                        .unwrap_or(seg.len);
                    if track {
                        self.stats.corrupt.inc();
                        tracing::warn!(
                            segment = self.cursor.segment,
                            offset = self.cursor.offset,
                            skipped_bytes = skip_to - self.cursor.offset,
                            "Outbox: skipped a torn or corrupt record"
                        );
                    }
                    self.cursor.offset = skip_to;
                }
            }
        }
    }

    /// Marks a handed-out record delivered; the commit point moves past
    /// every delivered record at the front.
    pub fn ack(&mut self, seq: u64) {
        if let Some(i) = self.inflight.iter_mut().find(|i| i.seq == seq) {
            i.acked = true;
        }
        let mut advanced = false;
        while self.inflight.front().is_some_and(|i| i.acked) {
            let i = self.inflight.pop_front().expect("checked");
            self.commit = i.end;
            self.commit_seq = i.seq;
            sub(&self.stats.queued_messages, 1);
            advanced = true;
        }
        if advanced {
            // Segments wholly before the commit point are delivered.
            while self.segments.len() > 1
                && self
                    .segments
                    .front()
                    .is_some_and(|s| s.first_seq < self.commit.segment)
            {
                let seg = self.segments.pop_front().expect("checked");
                self.bytes -= seg.len;
                if let Store::File { path, .. } = seg.store {
                    self.to_remove.push(path);
                }
            }
            self.update_bytes();
        }
    }

    /// Forgets what was handed out: it is sent again (after a reconnect).
    pub fn rewind(&mut self) {
        self.inflight.clear();
        self.cursor = self.commit;
    }

    /// Lowers the byte cap of an in-memory spool to at most `bytes`.
    pub fn limit_memory(&mut self, bytes: u64) {
        if self.dir.is_none() {
            self.limits.max_bytes = self.limits.max_bytes.min(bytes.max(64 << 10));
        }
    }

    /// Takes back the record the last [`Spool::next`] handed out (it could
    /// not be sent): the next call returns it again.
    pub fn rewind_one(&mut self) {
        if let Some(i) = self.inflight.pop_back() {
            self.cursor = i.start;
        }
    }

    /// Whether a record is waiting to be handed out.
    pub fn has_unsent(&self) -> bool {
        match self.index(self.cursor.segment) {
            Some(i) => {
                self.cursor.offset < self.segments[i].len
                    || self.segments.iter().skip(i + 1).any(|s| s.len > 0)
            }
            None => self
                .segments
                .iter()
                .any(|s| s.first_seq > self.cursor.segment && s.len > 0),
        }
    }

    /// The oldest record handed out and not acknowledged yet.
    pub fn oldest_unacked(&self) -> Option<u64> {
        self.inflight.iter().find(|i| !i.acked).map(|i| i.seq)
    }

    /// Records handed out and not acknowledged yet.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn update_bytes(&self) {
        let before_commit =
            if self.segments.front().map(|s| s.first_seq) == Some(self.commit.segment) {
                self.commit.offset
            } else {
                0
            };
        self.stats
            .queued_bytes
            .store(self.bytes.saturating_sub(before_commit), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize) -> Outgoing {
        Outgoing {
            topic: format!("r/{i}"),
            payload: format!("{{\"i\":{i}}}").into_bytes(),
            qos: QoS::AtLeastOnce,
            retain: false,
        }
    }

    fn limits() -> SpoolLimits {
        SpoolLimits {
            max_bytes: 1 << 20,
            ttl_ms: 0,
        }
    }

    fn drain(s: &mut Spool) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(r) = s.next(0) {
            out.push(r.msg.topic.clone());
            s.ack(r.seq);
        }
        out
    }

    #[test]
    fn delivered_segments_go_with_the_sync_not_with_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let segments = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".seg")
                })
                .count()
        };
        let small = SpoolLimits {
            max_bytes: 128 << 10,
            ttl_ms: 0,
        };
        let mut s = Spool::open(dir.path(), small, Arc::default()).unwrap();
        let big = |i: usize| Outgoing {
            payload: vec![b'x'; 4000],
            ..msg(i)
        };
        // 16 KiB segments: 20 records of 4 KB fill five or more.
        for i in 0..20 {
            s.append(&big(i), 0).unwrap();
        }
        let written = segments();
        assert!(written >= 5, "{written} segments");
        // The job takes the rotated segments' data along, not just the last.
        let job = s.sync_job().unwrap();
        assert_eq!(job.files.len(), written);
        job.run().unwrap();
        assert_eq!(drain(&mut s).len(), 20);
        assert_eq!(segments(), written, "acknowledging touches no file");
        s.sync().unwrap();
        assert_eq!(segments(), 1, "the sync removed the delivered segments");
        assert!(s.sync_job().is_none(), "nothing left to do");
    }

    #[test]
    fn survives_a_restart_and_resends_only_what_was_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(OutboxStats::default());
        {
            let mut s = Spool::open(dir.path(), limits(), Arc::clone(&stats)).unwrap();
            for i in 0..10 {
                s.append(&msg(i), 0).unwrap();
            }
            for _ in 0..4 {
                let r = s.next(0).unwrap();
                s.ack(r.seq);
            }
            let _unacked = s.next(0).unwrap();
            s.sync().unwrap();
        }
        let stats = Arc::new(OutboxStats::default());
        let mut s = Spool::open(dir.path(), limits(), Arc::clone(&stats)).unwrap();
        assert_eq!(stats.queued_messages.load(Ordering::Relaxed), 6);
        let expected: Vec<String> = (4..10).map(|i| format!("r/{i}")).collect();
        assert_eq!(drain(&mut s), expected);
        assert_eq!(stats.queued_messages.load(Ordering::Relaxed), 0);
        // New records after a restart continue the sequence.
        s.append(&msg(10), 0).unwrap();
        assert_eq!(s.next(0).unwrap().seq, 11);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_spool() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(OutboxStats::default());
        let _held = Spool::open(dir.path(), limits(), Arc::clone(&stats)).unwrap();
        let err = Spool::open(dir.path(), limits(), stats).err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn torn_and_corrupt_records_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(OutboxStats::default());
        {
            let mut s = Spool::open(dir.path(), limits(), Arc::clone(&stats)).unwrap();
            for i in 0..6 {
                s.append(&msg(i), 0).unwrap();
            }
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let mut data = std::fs::read(&seg).unwrap();
        let rec = data.len() / 6;
        // Flip a payload byte of record 1, and tear the last record in half.
        data[rec + HEADER + 14] ^= 0xff;
        data.truncate(data.len() - rec / 2);
        std::fs::write(&seg, &data).unwrap();

        let stats = Arc::new(OutboxStats::default());
        let mut s = Spool::open(dir.path(), limits(), Arc::clone(&stats)).unwrap();
        assert_eq!(drain(&mut s), vec!["r/0", "r/2", "r/3", "r/4"]);
        assert_eq!(
            stats.corrupt.get(),
            2,
            "the flipped record and the torn tail"
        );
        // Writing goes on in a fresh segment after the torn one.
        s.append(&msg(9), 0).unwrap();
        assert_eq!(drain(&mut s), vec!["r/9"]);
    }

    #[test]
    fn garbage_files_never_panic_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 0..20u64 {
            let mut data: Vec<u8> = (0..rng.usize(0..400)).map(|_| rng.u8(..)).collect();
            // Some files hold the magic number followed by nonsense.
            if n % 2 == 0 {
                data.splice(0..0, MAGIC.to_le_bytes());
            }
            std::fs::write(dir.path().join(segment_name(n * 100 + 1)), data).unwrap();
        }
        let stats = Arc::new(OutboxStats::default());
        let mut s = Spool::open(dir.path(), limits(), stats).unwrap();
        assert!(drain(&mut s).is_empty());
        s.append(&msg(1), 0).unwrap();
        assert_eq!(drain(&mut s), vec!["r/1"]);
    }

    #[test]
    fn full_spool_drops_the_oldest_segment_and_counts_it() {
        let stats = Arc::new(OutboxStats::default());
        let lim = SpoolLimits {
            max_bytes: 64 << 10,
            ttl_ms: 0,
        };
        let mut s = Spool::in_memory(lim, Arc::clone(&stats));
        let big = |i: usize| Outgoing {
            payload: vec![b'x'; 1000],
            ..msg(i)
        };
        for i in 0..200 {
            s.append(&big(i), 0).unwrap();
        }
        let dropped = stats.dropped.get();
        assert!(dropped > 0);
        let left = drain(&mut s);
        assert_eq!(
            left.len() as u64 + dropped,
            200,
            "every record is sent or counted"
        );
        // The newest survive, in order.
        assert_eq!(left.last().unwrap(), "r/199");
        let first: usize = left[0][2..].parse().unwrap();
        let expected: Vec<String> = (first..200).map(|i| format!("r/{i}")).collect();
        assert_eq!(left, expected);
        assert!(stats.queued_bytes.load(Ordering::Relaxed) <= lim.max_bytes);
    }

    #[test]
    fn expired_records_are_dropped_unsent() {
        let stats = Arc::new(OutboxStats::default());
        let lim = SpoolLimits {
            max_bytes: 1 << 20,
            ttl_ms: 1000,
        };
        let mut s = Spool::in_memory(lim, Arc::clone(&stats));
        s.append(&msg(0), 0).unwrap();
        s.append(&msg(1), 5000).unwrap();
        assert_eq!(s.next(5500).unwrap().msg.topic, "r/1");
        assert_eq!(stats.expired.get(), 1);
    }

    #[test]
    fn rewind_resends_everything_not_acknowledged_in_order() {
        let stats = Arc::new(OutboxStats::default());
        let mut s = Spool::in_memory(limits(), Arc::clone(&stats));
        for i in 0..5 {
            s.append(&msg(i), 0).unwrap();
        }
        let a = s.next(0).unwrap();
        let b = s.next(0).unwrap();
        let c = s.next(0).unwrap();
        s.ack(b.seq); // out of order: the commit point stays before a
        s.ack(a.seq);
        let _ = c;
        s.rewind();
        assert_eq!(drain(&mut s), vec!["r/2", "r/3", "r/4"]);
        assert!(!s.has_unsent());
        assert_eq!(s.in_flight(), 0);
    }
}
