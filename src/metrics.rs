//! Prometheus/OpenMetrics: the health message's counters, gauges and
//! latency histograms at `GET /metrics` (off by default, loopback by
//! default). The exposition is prometheus-client's; the HTTP side is
//! hyper's HTTP/1.1 server, one request per connection, with a cap on
//! connections and deadlines (see [`serve`]).

use crate::health::{rss_bytes, Histogram, Telemetry};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt::Error;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// OpenMetrics' content type (Prometheus negotiates it, and reads it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads the daemon's telemetry on every scrape.
struct TelemetryCollector {
    telemetry: Arc<Telemetry>,
    started: Instant,
}

impl std::fmt::Debug for TelemetryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TelemetryCollector")
    }
}

/// One metric family: a descriptor, then a value per label set.
fn family<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> Result<MetricEncoder<'a>, Error> {
    encoder.encode_descriptor(name, help, None, kind)
}

fn counter(m: &mut MetricEncoder, labels: &[(&str, &str)], v: u64) -> Result<(), Error> {
    ConstCounter::new(v).encode(m.encode_family(&labels.to_vec())?)
}

fn gauge(m: &mut MetricEncoder, labels: &[(&str, &str)], v: f64) -> Result<(), Error> {
    ConstGauge::new(v).encode(m.encode_family(&labels.to_vec())?)
}

fn histogram(m: &mut MetricEncoder, labels: &[(&str, &str)], h: &Histogram) -> Result<(), Error> {
    m.encode_family(&labels.to_vec())?
        .encode_histogram::<NoLabelSet>(h.sum_s, h.count, &h.buckets, None)
}

impl Collector for TelemetryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        self.encode_pipelines(&mut encoder)?;
        self.encode_models(&mut encoder)?;
        for (name, help, kind, v) in self.scalars() {
            let mut m = family(&mut encoder, name, help, kind)?;
            match kind {
                MetricType::Counter => counter(&mut m, &[], v as u64)?,
                _ => gauge(&mut m, &[], v)?,
            }
        }
        Ok(())
    }
}

/// One value without labels: name, help, kind, value.
type Scalar = (&'static str, &'static str, MetricType, f64);

impl TelemetryCollector {
    /// Per pipeline: counters, queue depth, up, latency histogram.
    fn encode_pipelines(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let t = &self.telemetry;
        let pipelines = t.pipeline_stats();
        type Read = fn(&crate::health::PipelineStats) -> u64;
        let counters: [(&str, &str, Read); 7] = [
            ("edgeinfer_pipeline_received", "Inputs received", |s| {
                s.received.get()
            }),
            (
                "edgeinfer_pipeline_processed",
                "Inputs decoded and windowed",
                |s| s.processed.get(),
            ),
            (
                "edgeinfer_pipeline_dropped",
                "Inputs dropped: the pipeline's queue was full",
                |s| s.dropped.get(),
            ),
            (
                "edgeinfer_pipeline_errors",
                "Inputs rejected and failed inferences",
                |s| s.errors.get(),
            ),
            ("edgeinfer_pipeline_results", "Results published", |s| {
                s.results.get()
            }),
            (
                "edgeinfer_pipeline_evicted_sources",
                "Source windows evicted (limits.max_sources)",
                |s| s.evicted.get(),
            ),
            (
                "edgeinfer_pipeline_replaced",
                "Camera frames replaced by a newer frame before processing",
                |s| s.replaced.get(),
            ),
        ];
        for (name, help, read) in counters {
            let mut m = family(encoder, name, help, MetricType::Counter)?;
            for (p, s) in &pipelines {
                counter(&mut m, &[("pipeline", p)], read(s))?;
            }
        }
        let mut m = family(
            encoder,
            "edgeinfer_pipeline_queue_depth",
            "Inputs waiting in the pipeline's queues",
            MetricType::Gauge,
        )?;
        for (p, s) in &pipelines {
            gauge(
                &mut m,
                &[("pipeline", p)],
                s.queued.load(Ordering::Relaxed) as f64,
            )?;
        }
        let mut m = family(
            encoder,
            "edgeinfer_pipeline_up",
            "1 while the pipeline runs, 0 when it could not start",
            MetricType::Gauge,
        )?;
        for (p, s) in &pipelines {
            let failed = s.failed.lock().map(|f| f.is_some()).unwrap_or(true);
            gauge(&mut m, &[("pipeline", p)], if failed { 0.0 } else { 1.0 })?;
        }
        let mut m = family(
            encoder,
            "edgeinfer_pipeline_latency_seconds",
            "Input received to result handed to the outbox",
            MetricType::Histogram,
        )?;
        for (p, s) in &pipelines {
            histogram(&mut m, &[("pipeline", p)], &s.latency.histogram())?;
        }
        Ok(())
    }

    /// Per model: the inference time histogram, labelled with its engine.
    fn encode_models(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let t = &self.telemetry;
        let models = t.model_stats();
        let mut m = family(
            encoder,
            "edgeinfer_model_inference_seconds",
            "Time in the inference engine per run",
            MetricType::Histogram,
        )?;
        for (name, s) in &models {
            let backend = s
                .placement
                .lock()
                .ok()
                .and_then(|p| p.as_ref().map(|p| p.runs_on.clone()))
                .unwrap_or_default();
            histogram(
                &mut m,
                &[("model", name), ("backend", &backend)],
                &s.inference.histogram(),
            )?;
        }

        Ok(())
    }

    /// The broker, the outbox, the operations and the process.
    fn scalars(&self) -> Vec<Scalar> {
        use MetricType::{Counter, Gauge};
        let t = &self.telemetry;
        let (b, o, ops) = (&t.broker, &t.outbox, &t.ops);
        let flag = |x: bool| if x { 1.0 } else { 0.0 };
        let load = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed) as f64;
        vec![
            (
                "edgeinfer_broker_connected",
                "1 while connected to the broker",
                Gauge,
                flag(b.connected.load(Ordering::Relaxed)),
            ),
            (
                "edgeinfer_broker_reconnects",
                "Connections to the broker lost",
                Counter,
                b.reconnects.get() as f64,
            ),
            (
                "edgeinfer_broker_oversize_packets",
                "Incoming packets too large to read",
                Counter,
                b.oversize_packets.get() as f64,
            ),
            (
                "edgeinfer_broker_in_flight",
                "Publishes not acknowledged by the broker yet",
                Gauge,
                load(&b.in_flight),
            ),
            (
                "edgeinfer_outbox_queued_messages",
                "Results and errors waiting for the broker",
                Gauge,
                load(&o.queued_messages),
            ),
            (
                "edgeinfer_outbox_queued_bytes",
                "Bytes waiting for the broker",
                Gauge,
                load(&o.queued_bytes),
            ),
            (
                "edgeinfer_outbox_dropped",
                "Dropped by the outbox's cap",
                Counter,
                o.dropped.get() as f64,
            ),
            (
                "edgeinfer_outbox_expired",
                "Dropped unsent after outbox.ttl_s",
                Counter,
                o.expired.get() as f64,
            ),
            (
                "edgeinfer_outbox_corrupt",
                "Torn or corrupt spool records skipped",
                Counter,
                o.corrupt.get() as f64,
            ),
            (
                "edgeinfer_outbox_unpublishable",
                "Refused: topic or packet over the broker's limits",
                Counter,
                o.unpublishable.get() as f64,
            ),
            (
                "edgeinfer_outbox_quarantined",
                "Dropped after repeatedly ending connections unacknowledged",
                Counter,
                o.quarantined.get() as f64,
            ),
            (
                "edgeinfer_operations_requests",
                "Operation requests taken",
                Counter,
                ops.requests.get() as f64,
            ),
            (
                "edgeinfer_operations_busy",
                "Operation requests answered busy",
                Counter,
                ops.busy.get() as f64,
            ),
            (
                "edgeinfer_operations_overflowed",
                "Operation requests dropped unanswered (counted, logged)",
                Counter,
                ops.overflowed.get() as f64,
            ),
            (
                "edgeinfer_operations_queued",
                "Changing operations waiting for their turn",
                Gauge,
                load(&ops.queued),
            ),
            (
                "edgeinfer_resident_memory_bytes",
                "Resident set size of the process",
                Gauge,
                rss_bytes().unwrap_or(0) as f64,
            ),
            (
                "edgeinfer_memory_budget_bytes",
                "The memory budget in force",
                Gauge,
                load(&t.memory_budget),
            ),
            (
                "edgeinfer_uptime_seconds",
                "Seconds since this run started",
                Gauge,
                self.started.elapsed().as_secs_f64(),
            ),
        ]
    }
}

/// The exposition, as one scrape returns it.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String does not fail");
    out
}

/// A registry reading `telemetry` on every scrape.
pub fn registry(telemetry: Arc<Telemetry>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TelemetryCollector {
        telemetry,
        started: Instant::now(),
    }));
    registry
}

/// Deadline for a request's line and headers, from the connection's
/// accept: a sender of one byte a second cannot extend it.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline for a whole connection (a client that does not read its
/// answer is closed too).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (and `HEAD`) on `listener` until `stop`, at most
/// `max_connections` at a time: beyond that nothing more is accepted, and
/// further connections wait in the kernel's backlog without taking a
/// descriptor of the daemon's (the broker socket and the spool's files
/// are never starved by scrapers). One request per connection.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    max_connections: usize,
    stop: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let mut failures = 0u64;
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let registry = Arc::clone(&registry);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection(stream, registry))
                        .await;
                    drop(permit);
                });
            }
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "metrics: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, registry: Arc<Registry>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let registry = Arc::clone(&registry);
        async move { Ok::<_, std::convert::Infallible>(answer(&req, &registry)) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_DEADLINE)
        .keep_alive(false)
        .max_buf_size(16 * 1024)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// The answer to one request: the exposition at `/metrics`, 404
/// elsewhere, 405 for methods other than GET and HEAD (hyper leaves the
/// body out of a HEAD answer).
fn answer<B>(
    req: &hyper::Request<B>,
    registry: &Registry,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{Method, StatusCode};
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, render(registry))
        }
        (&Method::GET | &Method::HEAD, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics is here\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".to_owned(),
        ),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    }
    response
}
