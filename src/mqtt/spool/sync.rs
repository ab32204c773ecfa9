//! Making the spool durable: an fsync of the segments written since the
//! last one and of the commit point, off the async runtime ([`SyncJob`]).

use super::*;

/// Disk work of one sync, done outside the outbox's lock (see
/// [`Spool::sync_job`]). Only the publisher runs these, one at a time.
pub struct SyncJob {
    pub(super) dir: PathBuf,
    pub(super) files: Vec<File>,
    pub(super) commit: Option<u64>,
    pub(super) remove: Vec<PathBuf>,
}

impl SyncJob {
    pub fn run(self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        if let Some(seq) = self.commit {
            let tmp = self.dir.join("commit.tmp");
            let mut f = File::create(&tmp)?;
            writeln!(f, "{seq}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.dir.join("commit"))?;
        }
        // After the commit point is durable: these hold only delivered
        // (or deliberately dropped) records.
        for path in &self.remove {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "Outbox: cannot remove a delivered segment");
            }
        }
        Ok(())
    }
}

pub(super) fn sub(counter: &std::sync::atomic::AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// The offset of the next valid record in `data` at or after `from`.
pub(super) fn resync(data: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    let mut i = from;
    while i + HEADER <= data.len() {
        let found = data[i..].windows(4).position(|w| w == magic)? + i;
        if let Decoded::Record { .. } = decode(&data[found..]) {
            return Some(found);
        }
        i = found + 1;
    }
    None
}

impl Spool {
    /// Makes appended records and the commit point durable, and removes
    /// delivered segments: [`Spool::sync_job`] and [`SyncJob::run`] at once.
    pub fn sync(&mut self) -> io::Result<()> {
        match self.sync_job() {
            Some(job) => job.run().inspect_err(|_| self.sync_failed()),
            None => Ok(()),
        }
    }

    /// The disk work a sync needs — fsync of the segments written since the
    /// last one, the commit file (written aside and renamed), removal of
    /// delivered segments — taken out of the spool so that it can run
    /// without the outbox's lock. `None` in memory or when nothing changed.
    pub fn sync_job(&mut self) -> Option<SyncJob> {
        let dir = self.dir.clone()?;
        let mut files = std::mem::take(&mut self.unsynced);
        if self.dirty {
            if let Some(Segment {
                store: Store::File { file, .. },
                ..
            }) = self.segments.back()
            {
                match file.try_clone() {
                    Ok(f) => files.push(f),
                    Err(e) => tracing::error!(error = %e, "Outbox: cannot sync the segment"),
                }
            }
            self.dirty = false;
        }
        let commit = (self.commit_seq != self.persisted_commit).then(|| {
            self.persisted_commit = self.commit_seq;
            self.commit_seq
        });
        let remove = std::mem::take(&mut self.to_remove);
        if files.is_empty() && commit.is_none() && remove.is_empty() {
            return None;
        }
        Some(SyncJob {
            dir,
            files,
            commit,
            remove,
        })
    }

    /// A [`SyncJob`] failed: the next one writes everything again.
    pub fn sync_failed(&mut self) {
        self.dirty = true;
        self.persisted_commit = u64::MAX;
    }
}
