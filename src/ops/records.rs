//! The operations' records, and the ids they were acted on under.
//!
//! Each changing operation's last state is `ops/{id}.json` in the state
//! directory (written atomically before it is published). The last
//! [`KEPT_RECORDS`] are kept; older ones are pruned — their files removed
//! and their retained topics cleared — but their ids go on in
//! `ops/ledger`, one line each (`{unix ms} {op} {id}`), so that an id acted
//! on is never acted on again within the window: the last
//! [`LEDGER_IDS`] pruned ids (on top of the kept records), across
//! restarts; a start forgets those older than [`LEDGER_DAYS`] days.
//! That covers what a broker redelivers (a QoS 1 request it holds for a
//! session) and a fleet manager that retries. In memory an id costs a
//! 64-bit digest and the operation's index.

use super::{Record, State};
use crate::config::OPERATIONS;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Records kept in the state directory (and retained on the broker).
pub const KEPT_RECORDS: usize = 100;
/// Records beyond [`KEPT_RECORDS`] before a prune runs (one fsync of the
/// ledger for this many).
const PRUNE_BATCH: usize = 16;
/// Ids remembered beyond the kept records.
pub const LEDGER_IDS: usize = 20_000;
/// Days an id is remembered.
pub const LEDGER_DAYS: u64 = 30;
const LEDGER: &str = "ledger";

/// What an id was used for before.
#[derive(Debug, Clone, PartialEq)]
pub struct Earlier {
    pub op: &'static str,
    /// Its record, when it is still kept.
    pub record: Option<Record>,
}

#[derive(Default)]
struct Index {
    /// Digest of an id → index of its operation in [`OPERATIONS`].
    ids: HashMap<u64, u8>,
    /// Ledger entries, oldest first: (digest, unix ms).
    ledger: VecDeque<(u64, u64)>,
    /// Ids with a record file, oldest first.
    kept: VecDeque<String>,
    /// Lines in the ledger file (it is rewritten when twice the window).
    ledger_lines: usize,
}

pub struct Records {
    dir: Option<PathBuf>,
    index: Mutex<Index>,
}

fn digest(id: &str) -> u64 {
    let d = Sha256::digest(id.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn op_index(op: &str) -> u8 {
    OPERATIONS.iter().position(|o| *o == op).unwrap_or(0) as u8
}

/// Every record in `dir`, oldest first.
pub fn read_records(dir: &Path) -> Vec<Record> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut records: Vec<Record> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    records.sort_by_key(|r| r.accepted_ms);
    records
}

/// Writes a record (atomically, fsynced).
pub fn save_record(dir: &Path, r: &Record) {
    let path = dir.join(format!("{}.json", r.id));
    let bytes = serde_json::to_vec(r).expect("record serializes");
    if let Err(e) = super::store::write_atomic(&path, &bytes) {
        tracing::error!(op = %r.id, error = %e, "Cannot persist the operation's state");
    }
}

impl Records {
    /// Reads the kept records and the ledger (`dir`: the state
    /// directory's `ops/`; none: memory only, nothing survives a restart).
    pub fn open(dir: Option<&Path>) -> (Records, Vec<Record>) {
        let mut index = Index::default();
        let records = dir.map(read_records).unwrap_or_default();
        if let Some(dir) = dir {
            let cutoff = crate::flow::unix_ms().saturating_sub(LEDGER_DAYS * 86_400_000);
            let mut lines = 0;
            if let Ok(f) = std::fs::File::open(dir.join(LEDGER)) {
                for line in std::io::BufReader::new(f).lines() {
                    let Ok(line) = line else { break };
                    lines += 1;
                    let mut parts = line.splitn(3, ' ');
                    let (Some(at), Some(op), Some(id)) = (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let Ok(at) = at.parse::<u64>() else { continue };
                    if at >= cutoff {
                        index.remember_old(digest(id), op_index(op), at);
                    }
                }
            }
            index.ledger_lines = lines;
        }
        for r in &records {
            index.ids.insert(digest(&r.id), op_index(&r.op));
            index.kept.push_back(r.id.clone());
        }
        let records_kept = Records {
            dir: dir.map(Path::to_owned),
            index: Mutex::new(index),
        };
        let stale = {
            let index = records_kept.lock();
            index.ledger_lines > index.ledger.len()
        };
        if stale {
            records_kept.rewrite_ledger();
        }
        (records_kept, records)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `id` was used for, if it was.
    pub fn earlier(&self, id: &str) -> Option<Earlier> {
        let op = *self.lock().ids.get(&digest(id))?;
        Some(Earlier {
            op: OPERATIONS.get(op as usize).copied().unwrap_or("?"),
            record: self.stored(id),
        })
    }

    /// Marks `id` as taken for `op` (in memory: a request queued but not
    /// begun is not acted on, and a crash before it begins forgets it).
    pub fn take(&self, id: &str, op: &str) {
        self.lock().ids.insert(digest(id), op_index(op));
    }

    /// Forgets an id that was taken but never begun (refused as busy).
    pub fn release(&self, id: &str) {
        self.lock().ids.remove(&digest(id));
    }

    pub fn stored(&self, id: &str) -> Option<Record> {
        let dir = self.dir.as_ref()?;
        let bytes = std::fs::read(dir.join(format!("{id}.json"))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Persists a record (blocking: call off the async runtime).
    pub fn save(&self, r: &Record) {
        if let Some(dir) = &self.dir {
            save_record(dir, r);
        }
        let mut index = self.lock();
        if !index.kept.iter().rev().any(|k| *k == r.id) {
            index.kept.push_back(r.id.clone());
        }
    }

    /// Prunes finished records beyond [`KEPT_RECORDS`] once a batch has
    /// gathered: their ids go to the ledger (fsynced), then their files go.
    /// Returns the ids whose retained topics are to be cleared.
    pub fn prune(&self, force: bool) -> Vec<String> {
        let victims: Vec<String> = {
            let index = self.lock();
            let excess = index.kept.len().saturating_sub(KEPT_RECORDS);
            if excess == 0 || (excess < PRUNE_BATCH && !force) {
                return Vec::new();
            }
            index.kept.iter().take(excess).cloned().collect()
        };
        // A record still executing (a model on probation) stays.
        let victims: Vec<Record> = victims
            .iter()
            .map(|id| {
                self.stored(id).unwrap_or_else(|| Record {
                    id: id.clone(),
                    op: String::new(),
                    state: State::Failed,
                    stage: None,
                    pipeline: None,
                    reason: None,
                    figures: Default::default(),
                    accepted_ms: 0,
                    updated_ms: 0,
                })
            })
            .filter(|r| r.state.finished())
            .collect();
        if victims.is_empty() {
            return Vec::new();
        }
        let now = crate::flow::unix_ms();
        if let Some(dir) = &self.dir {
            let mut lines = String::new();
            for r in &victims {
                lines.push_str(&format!("{now} {} {}\n", op_name(&r.op), r.id));
            }
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(LEDGER))
                .and_then(|mut f| {
                    f.write_all(lines.as_bytes())?;
                    f.sync_data()
                });
            if let Err(e) = appended {
                // Without the ledger line the record stays: the id is not
                // forgotten.
                tracing::error!(error = %e, "Cannot append to the operations ledger; records kept");
                return Vec::new();
            }
            for r in &victims {
                let _ = std::fs::remove_file(dir.join(format!("{}.json", r.id)));
            }
        }
        let rewrite = {
            let mut index = self.lock();
            for r in &victims {
                index.kept.retain(|k| *k != r.id);
                let d = digest(&r.id);
                let op = index.ids.get(&d).copied().unwrap_or(op_index(&r.op));
                index.remember_old(d, op, now);
            }
            index.ledger_lines += victims.len();
            index.ledger_lines > 2 * LEDGER_IDS
        };
        if rewrite {
            self.rewrite_ledger();
        }
        victims.into_iter().map(|r| r.id).collect()
    }

    /// Rewrites the ledger with the window only. The file keeps ids, the
    /// index only digests: lines are kept by digest.
    fn rewrite_ledger(&self) {
        let Some(dir) = &self.dir else { return };
        let path = dir.join(LEDGER);
        let Ok(f) = std::fs::File::open(&path) else {
            return;
        };
        let keep: std::collections::HashSet<u64> =
            self.lock().ledger.iter().map(|(d, _)| *d).collect();
        let mut out = String::new();
        let mut n = 0;
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            if let Some(id) = line.splitn(3, ' ').nth(2) {
                if keep.contains(&digest(id)) {
                    out.push_str(&line);
                    out.push('\n');
                    n += 1;
                }
            }
        }
        match super::store::write_atomic(&path, out.as_bytes()) {
            Ok(()) => self.lock().ledger_lines = n,
            Err(e) => tracing::error!(error = %e, "Cannot rewrite the operations ledger"),
        }
    }
}

fn op_name(op: &str) -> &str {
    if op.is_empty() || op.contains(char::is_whitespace) {
        "?"
    } else {
        op
    }
}

impl Index {
    /// A ledger entry; the oldest go beyond [`LEDGER_IDS`].
    fn remember_old(&mut self, d: u64, op: u8, at: u64) {
        self.ids.insert(d, op);
        self.ledger.push_back((d, at));
        while self.ledger.len() > LEDGER_IDS {
            if let Some((old, _)) = self.ledger.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: State, at: u64) -> Record {
        Record {
            id: id.into(),
            op: "pipeline/enable".into(),
            state,
            stage: None,
            pipeline: Some("p".into()),
            reason: None,
            figures: Default::default(),
            accepted_ms: at,
            updated_ms: at,
        }
    }

    #[test]
    fn a_pruned_id_is_remembered_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (records, _) = Records::open(Some(dir.path()));
        let n = KEPT_RECORDS + PRUNE_BATCH + 5;
        for i in 0..n {
            let id = format!("op-{i}");
            records.take(&id, "pipeline/enable");
            records.save(&record(&id, State::Successful, i as u64));
        }
        let cleared = records.prune(false);
        assert_eq!(cleared.len(), n - KEPT_RECORDS);
        assert_eq!(cleared[0], "op-0");
        assert!(!dir.path().join("op-0.json").exists());
        assert_eq!(records.earlier("op-0").unwrap().op, "pipeline/enable");
        assert!(records.earlier("op-0").unwrap().record.is_none());
        assert!(records.earlier("never").is_none());

        // After a restart: pruned ids from the ledger, kept ones from files.
        drop(records);
        let (records, kept) = Records::open(Some(dir.path()));
        assert_eq!(kept.len(), KEPT_RECORDS);
        assert!(records.earlier("op-0").is_some());
        assert!(records
            .earlier(&format!("op-{}", n - 1))
            .unwrap()
            .record
            .is_some());
        assert!(records.earlier("op-unknown").is_none());
    }

    #[test]
    fn unfinished_records_are_not_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let (records, _) = Records::open(Some(dir.path()));
        records.save(&record("watching", State::Executing, 0));
        for i in 1..=(KEPT_RECORDS + PRUNE_BATCH) {
            records.save(&record(&format!("op-{i}"), State::Successful, i as u64));
        }
        let cleared = records.prune(false);
        assert!(!cleared.contains(&"watching".to_string()), "{cleared:?}");
        assert!(dir.path().join("watching.json").exists());
    }

    #[test]
    fn the_ledger_forgets_beyond_its_window() {
        let mut index = Index::default();
        for i in 0..(LEDGER_IDS as u64 + 10) {
            index.remember_old(i, 1, i);
        }
        assert_eq!(index.ledger.len(), LEDGER_IDS);
        assert!(!index.ids.contains_key(&0));
        assert!(index.ids.contains_key(&(LEDGER_IDS as u64 + 9)));
    }
}
