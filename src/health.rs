//! Counters, latency histories and system readings, and the health message
//! built from them.

use heapless::HistoryBuf;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets, Prometheus
/// style; the last bucket, +Inf, is implicit.
pub const LATENCY_BUCKETS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The most recent latencies (fixed capacity, no allocation after start),
/// from which p50/p99 are read, and a histogram of all of them since start
/// (for /metrics).
pub struct Latencies {
    recent: Mutex<HistoryBuf<f32, 1024>>,
    /// Per bucket of [`LATENCY_BUCKETS_S`], then +Inf; not cumulative.
    buckets: [AtomicU64; 17],
    sum_ns: AtomicU64,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            recent: Mutex::new(HistoryBuf::new()),
            buckets: Default::default(),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A histogram: sum (s), count, and the count in each bucket by its upper
/// bound (+Inf last; not cumulative: the exposition cumulates).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub sum_s: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl std::fmt::Debug for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Latencies")
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Latencies {
    pub fn record(&self, ms: f64) {
        if let Ok(mut h) = self.recent.lock() {
            h.write(ms as f32);
        }
        let s = ms / 1e3;
        let at = LATENCY_BUCKETS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS_S.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((ms.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Every latency recorded since start, as a histogram.
    pub fn histogram(&self) -> Histogram {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_S
            .iter()
            .chain(std::iter::once(&f64::INFINITY))
            .zip(&self.buckets)
            .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed)))
            .collect();
        // Recorded concurrently, the count may differ from the buckets'
        // sum for a moment: the sum is the count, so a scrape is consistent.
        Histogram {
            sum_s: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }

    pub fn percentiles(&self) -> Percentiles {
        let mut v: Vec<f32> = match self.recent.lock() {
            Ok(h) => h.as_slice().to_vec(),
            Err(_) => return Percentiles::default(),
        };
        v.sort_by(f32::total_cmp);
        let round = |x: f32| (x as f64 * 1000.0).round() / 1000.0;
        Percentiles {
            p50: round(percentile(&v, 0.50)),
            p99: round(percentile(&v, 0.99)),
        }
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub received: Counter,
    /// Inputs that decoded and were windowed.
    pub processed: Counter,
    /// Inputs dropped because the pipeline's queue was full.
    pub dropped: Counter,
    /// Inputs rejected (bad payload) or failed inferences.
    pub errors: Counter,
    pub results: Counter,
    /// Source windows evicted to stay within `limits.max_sources`.
    pub evicted: Counter,
    /// Camera frames replaced by a newer frame of the same camera before
    /// they were processed (latest frame wins).
    pub replaced: Counter,
    /// Messages in the pipeline's queues right now.
    pub queued: AtomicU64,
    pub latency: Latencies,
    /// Set when the pipeline could not start (its model failed to load).
    pub failed: Mutex<Option<String>>,
    /// `pipeline/disable`: input is acknowledged and counted, not processed.
    pub disabled: AtomicBool,
    pub ignored: Counter,
}

#[derive(Debug, Default)]
pub struct ModelStats {
    pub inference: Latencies,
    /// Inferences answered, and those that failed (engine error, non-finite
    /// output): a new model's probation compares its rate with these.
    pub served: Counter,
    pub failures: Counter,
    /// Where the model runs and why (set when it loads).
    pub placement: Mutex<Option<crate::model::EngineReport>>,
}

#[derive(Debug, Default)]
pub struct BrokerStats {
    pub connected: AtomicBool,
    pub reconnects: Counter,
    /// Publishes handed to the broker and not acknowledged yet.
    pub in_flight: AtomicU64,
    /// Incoming packets too large to read within the memory budget (each
    /// one cost the connection).
    pub oversize_packets: Counter,
    /// The largest packet the client reads (0 until connected).
    pub max_incoming_bytes: AtomicU64,
}

#[derive(Debug, Default)]
pub struct OutboxStats {
    pub queued_messages: AtomicU64,
    pub queued_bytes: AtomicU64,
    /// Dropped by the byte cap (oldest first), or a full in-memory queue.
    pub dropped: Counter,
    /// Dropped unsent because they outlived the TTL.
    pub expired: Counter,
    /// Torn or corrupt records skipped in the spool.
    pub corrupt: Counter,
    /// Refused before queueing: topic too long or too deep, packet too large.
    pub unpublishable: Counter,
    /// Dropped after the broker ended several connections with them unacknowledged.
    pub quarantined: Counter,
    /// Whether the spool is on disk (survives a restart).
    pub persistent: AtomicBool,
}

/// The operations API's requests (health: `operations`).
#[derive(Debug, Default)]
pub struct OpsStats {
    /// Requests taken off the broker.
    pub requests: Counter,
    /// Changing operations answered `busy`: their queue was full.
    pub busy: Counter,
    /// Requests the poll loop could not hand over (the intake's lane was
    /// full): counted and logged, not answered.
    pub overflowed: Counter,
    /// Changing operations waiting for their turn.
    pub queued: AtomicU64,
    /// Bytes of requests handed over by the poll loop, not yet taken.
    pub lane_bytes: AtomicU64,
}

/// All the shared counters of one daemon run.
#[derive(Default)]
pub struct Telemetry {
    pipelines: Mutex<Vec<(String, Arc<PipelineStats>)>>,
    models: Mutex<BTreeMap<String, Arc<ModelStats>>>,
    /// ONNX Runtime's status, set by the daemon once the models are loaded.
    pub onnxruntime: Mutex<crate::model::RuntimeStatus>,
    pub broker: Arc<BrokerStats>,
    pub outbox: Arc<OutboxStats>,
    pub ops: Arc<OpsStats>,
    /// Bytes of input waiting in all pipeline queues, against its share of
    /// the memory budget.
    pub input_budget: Arc<Budget>,
    /// The memory budget in bytes: `limits.memory_mb`, or less under a
    /// tighter cgroup limit (0 until the daemon has started).
    pub memory_budget: AtomicU64,
    /// Bytes one camera frame's decoding and fitting may take (0: no limit).
    pub frame_budget: Arc<AtomicU64>,
    /// The cgroup's memory limit in bytes (0: none found).
    pub cgroup_limit: AtomicU64,
}

/// A byte budget shared by several queues: taking fails past the cap.
#[derive(Debug)]
pub struct Budget {
    cap: AtomicU64,
    used: AtomicU64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            cap: AtomicU64::new(u64::MAX),
            used: AtomicU64::new(0),
        }
    }
}

impl Budget {
    pub fn set_cap(&self, cap: u64) {
        self.cap.store(cap, Ordering::Relaxed);
    }
    /// Takes `n` bytes if they fit under the cap.
    pub fn try_take(&self, n: u64) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                (u.saturating_add(n) <= cap).then_some(u + n)
            })
            .is_ok()
    }
    pub fn give(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl Telemetry {
    pub fn pipeline(&self, name: &str) -> Arc<PipelineStats> {
        let mut p = self.pipelines.lock().expect("telemetry lock");
        if let Some((_, s)) = p.iter().find(|(n, _)| n == name) {
            return Arc::clone(s);
        }
        let s = Arc::new(PipelineStats::default());
        p.push((name.to_owned(), Arc::clone(&s)));
        s
    }

    /// Every pipeline's counters, in start order.
    pub fn pipeline_stats(&self) -> Vec<(String, Arc<PipelineStats>)> {
        self.pipelines.lock().expect("telemetry lock").clone()
    }

    /// Every model's counters, by name.
    pub fn model_stats(&self) -> Vec<(String, Arc<ModelStats>)> {
        self.models
            .lock()
            .expect("telemetry lock")
            .iter()
            .map(|(n, m)| (n.clone(), Arc::clone(m)))
            .collect()
    }

    pub fn model(&self, name: &str) -> Arc<ModelStats> {
        Arc::clone(
            self.models
                .lock()
                .expect("telemetry lock")
                .entry(name.to_owned())
                .or_default(),
        )
    }

    pub fn snapshot(&self, device: &str, sys: &mut SystemSampler) -> HealthMessage {
        let pipelines = self
            .pipelines
            .lock()
            .expect("telemetry lock")
            .iter()
            .map(|(name, s)| {
                let failed = s.failed.lock().ok().and_then(|f| f.clone());
                (
                    name.clone(),
                    PipelineHealth {
                        state: if failed.is_some() {
                            "failed"
                        } else if s.disabled.load(Ordering::Relaxed) {
                            "disabled"
                        } else {
                            "running"
                        },
                        error: failed,
                        received: s.received.get(),
                        processed: s.processed.get(),
                        dropped: s.dropped.get(),
                        errors: s.errors.get(),
                        results: s.results.get(),
                        evicted_sources: s.evicted.get(),
                        replaced: s.replaced.get(),
                        ignored: s.ignored.get(),
                        queue_depth: s.queued.load(Ordering::Relaxed),
                        latency_ms: s.latency.percentiles(),
                    },
                )
            })
            .collect();
        let models = self
            .models
            .lock()
            .expect("telemetry lock")
            .iter()
            .map(|(name, m)| {
                (name.clone(), {
                    let placement = m.placement.lock().expect("telemetry lock").clone();
                    ModelHealth {
                        backend: placement
                            .as_ref()
                            .map_or_else(String::new, |p| p.runs_on.clone()),
                        inference_ms: m.inference.percentiles(),
                        engine: placement,
                    }
                })
            })
            .collect();
        HealthMessage {
            device: device.to_owned(),
            ts: crate::flow::unix_ms(),
            uptime_s: sys.started.elapsed().as_secs(),
            cpu_percent: sys.cpu_percent(),
            load_avg: read_loadavg(),
            memory: MemoryHealth {
                rss_bytes: rss_bytes().unwrap_or(0),
                system_available_bytes: mem_available(),
                budget_bytes: self.memory_budget.load(Ordering::Relaxed),
                cgroup_limit_bytes: self.cgroup_limit.load(Ordering::Relaxed),
                frame_budget_bytes: self.frame_budget.load(Ordering::Relaxed),
                queued_input_bytes: self.input_budget.used(),
            },
            temperature_c: read_temperatures(&sys.thermal_dir),
            pipelines,
            models,
            onnxruntime: self.onnxruntime.lock().expect("telemetry lock").clone(),
            broker: BrokerHealth {
                connected: self.broker.connected.load(Ordering::Relaxed),
                reconnects: self.broker.reconnects.get(),
                in_flight: self.broker.in_flight.load(Ordering::Relaxed),
                oversize_packets: self.broker.oversize_packets.get(),
                max_incoming_bytes: self.broker.max_incoming_bytes.load(Ordering::Relaxed),
            },
            outbox: OutboxHealth {
                queued_messages: self.outbox.queued_messages.load(Ordering::Relaxed),
                queued_bytes: self.outbox.queued_bytes.load(Ordering::Relaxed),
                dropped: self.outbox.dropped.get(),
                expired: self.outbox.expired.get(),
                corrupt_skipped: self.outbox.corrupt.get(),
                unpublishable: self.outbox.unpublishable.get(),
                quarantined: self.outbox.quarantined.get(),
                persistent: self.outbox.persistent.load(Ordering::Relaxed),
            },
            operations: OpsHealth {
                requests: self.ops.requests.get(),
                busy: self.ops.busy.get(),
                overflowed: self.ops.overflowed.get(),
                queued: self.ops.queued.load(Ordering::Relaxed),
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HealthMessage {
    pub device: String,
    pub ts: u64,
    pub uptime_s: u64,
    pub cpu_percent: f64,
    pub load_avg: [f64; 3],
    pub memory: MemoryHealth,
    /// Thermal zone type (or name) → degrees Celsius; empty where none exist.
    pub temperature_c: BTreeMap<String, f64>,
    pub pipelines: BTreeMap<String, PipelineHealth>,
    pub models: BTreeMap<String, ModelHealth>,
    /// ONNX Runtime in this process: loaded (version, library, providers) or why not.
    pub onnxruntime: crate::model::RuntimeStatus,
    pub broker: BrokerHealth,
    pub outbox: OutboxHealth,
    pub operations: OpsHealth,
}

#[derive(Debug, Serialize)]
pub struct OpsHealth {
    pub requests: u64,
    pub busy: u64,
    pub overflowed: u64,
    pub queued: u64,
}

#[derive(Debug, Serialize)]
pub struct MemoryHealth {
    pub rss_bytes: u64,
    pub system_available_bytes: u64,
    /// The memory budget in force, in bytes: `limits.memory_mb`, or 80 % of
    /// the cgroup's limit where that is tighter.
    pub budget_bytes: u64,
    /// The tightest of the cgroup's memory.high and memory.max (0: none).
    pub cgroup_limit_bytes: u64,
    /// What one camera frame's decoding may take (0: no camera pipeline).
    pub frame_budget_bytes: u64,
    /// Input payloads waiting in pipeline queues.
    pub queued_input_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct PipelineHealth {
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub received: u64,
    pub processed: u64,
    pub dropped: u64,
    pub errors: u64,
    pub results: u64,
    pub evicted_sources: u64,
    pub replaced: u64,
    /// Inputs that arrived while the pipeline was disabled.
    pub ignored: u64,
    pub queue_depth: u64,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct ModelHealth {
    /// What it runs on: `tract-cpu`, `onnxruntime-cpu`, `onnxruntime-openvino`, …
    pub backend: String,
    pub inference_ms: Percentiles,
    /// Why there: the engine asked for, the ones passed over, `auto`'s figures.
    pub engine: Option<crate::model::EngineReport>,
}

#[derive(Debug, Serialize)]
pub struct BrokerHealth {
    pub connected: bool,
    pub reconnects: u64,
    pub in_flight: u64,
    pub oversize_packets: u64,
    pub max_incoming_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct OutboxHealth {
    pub queued_messages: u64,
    pub queued_bytes: u64,
    pub dropped: u64,
    pub expired: u64,
    pub corrupt_skipped: u64,
    pub unpublishable: u64,
    pub quarantined: u64,
    pub persistent: bool,
}

/// Process CPU share between two calls, plus where to read temperatures.
pub struct SystemSampler {
    started: Instant,
    thermal_dir: std::path::PathBuf,
    last: Option<(Instant, u64)>,
}

impl SystemSampler {
    pub fn new(thermal_dir: &Path) -> SystemSampler {
        let mut s = SystemSampler {
            started: Instant::now(),
            thermal_dir: thermal_dir.to_owned(),
            last: None,
        };
        s.cpu_percent();
        s
    }

    /// CPU used by this process since the last call, in percent of one core.
    pub fn cpu_percent(&mut self) -> f64 {
        let now = Instant::now();
        let ticks = cpu_ticks().unwrap_or(0);
        let pct = match self.last {
            Some((t, prev)) if now > t => {
                let secs = (ticks.saturating_sub(prev)) as f64 / CLOCK_TICKS_PER_SEC;
                (secs / (now - t).as_secs_f64() * 1000.0).round() / 10.0
            }
            _ => 0.0,
        };
        self.last = Some((now, ticks));
        pct
    }
}

/// USER_HZ is 100 on every Linux architecture edgeinfer targets.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of this process.
/// The tightest of `memory.high` and `memory.max` of this process's cgroup
/// (v2), where one is set: under systemd, the unit's MemoryHigh=/MemoryMax=.
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_limit_in(&own, std::path::Path::new("/sys/fs/cgroup"))
}

/// [`cgroup_memory_limit`] from a `/proc/self/cgroup` text and the cgroup
/// file system's root.
pub fn cgroup_limit_in(proc_self_cgroup: &str, root: &std::path::Path) -> Option<u64> {
    let path = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim()
        .trim_start_matches('/');
    let dir = root.join(path);
    ["memory.high", "memory.max"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok()) // "max": no limit
        .min()
}

pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident set size of this process.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn read_loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// Reads `thermal_zone*/temp` (millidegrees) under `dir`, keyed by the
/// zone's `type` (e.g. `cpu-thermal`), or its directory name.
pub fn read_temperatures(dir: &Path) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("thermal_zone") {
            continue;
        }
        let path = entry.path();
        let Some(milli) = std::fs::read_to_string(path.join("temp"))
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
        else {
            continue;
        };
        let kind = std::fs::read_to_string(path.join("type"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
        let key = if kind.is_empty() || out.contains_key(&kind) {
            name
        } else {
            kind
        };
        out.insert(key, milli as f64 / 1000.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_limit_is_the_tighter_of_high_and_max() {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/edgeinfer.service");
        std::fs::create_dir_all(&unit).unwrap();
        let own = "0::/system.slice/edgeinfer.service\n";
        assert_eq!(cgroup_limit_in(own, root.path()), None, "no files");
        std::fs::write(unit.join("memory.max"), "201326592\n").unwrap();
        std::fs::write(unit.join("memory.high"), "max\n").unwrap();
        assert_eq!(cgroup_limit_in(own, root.path()), Some(192 << 20));
        std::fs::write(unit.join("memory.high"), "167772160\n").unwrap();
        assert_eq!(cgroup_limit_in(own, root.path()), Some(160 << 20));
        // cgroup v1 only: no unified line.
        assert_eq!(cgroup_limit_in("4:memory:/x\n", root.path()), None);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile::<u32>(&[], 0.5), 0);
        assert_eq!(percentile(&[7u32], 0.99), 7);
    }

    #[test]
    fn latency_history_keeps_the_most_recent() {
        let l = Latencies::default();
        for _ in 0..2000 {
            l.record(100.0);
        }
        for _ in 0..1024 {
            l.record(1.0);
        }
        assert_eq!(l.percentiles(), Percentiles { p50: 1.0, p99: 1.0 });
    }

    #[test]
    fn thermal_zones_are_read_by_type() {
        let dir = tempfile::tempdir().unwrap();
        for (zone, kind, temp) in [
            ("thermal_zone0", "cpu-thermal", "47312"),
            ("thermal_zone1", "", "39000"),
        ] {
            let z = dir.path().join(zone);
            std::fs::create_dir(&z).unwrap();
            std::fs::write(z.join("temp"), temp).unwrap();
            if !kind.is_empty() {
                std::fs::write(z.join("type"), kind).unwrap();
            }
        }
        std::fs::create_dir(dir.path().join("cooling_device0")).unwrap();
        let t = read_temperatures(dir.path());
        assert_eq!(t.len(), 2);
        assert_eq!(t["cpu-thermal"], 47.312);
        assert_eq!(t["thermal_zone1"], 39.0);
    }

    #[test]
    fn proc_readings_are_plausible() {
        assert!(rss_bytes().unwrap() > 1024 * 1024);
        assert!(peak_rss_bytes().unwrap() >= rss_bytes().unwrap() / 2);
        assert!(mem_available() > 0);
        assert!(cpu_ticks().is_some());
    }

    #[test]
    fn latencies_fill_their_buckets() {
        let l = Latencies::default();
        for ms in [0.05, 0.3, 0.3, 7.0, 20_000.0] {
            l.record(ms);
        }
        let h = l.histogram();
        assert_eq!(h.count, 5);
        assert!((h.sum_s - 20.00765).abs() < 1e-6, "{}", h.sum_s);
        let at = |bound: f64| h.buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!(at(0.0001), 1);
        assert_eq!(at(0.0005), 2);
        assert_eq!(at(0.01), 1);
        assert_eq!(at(f64::INFINITY), 1);
        assert_eq!(h.buckets.len(), LATENCY_BUCKETS_S.len() + 1);
    }
}
