//! Operations endpoints: liveness (`/healthz`), readiness (`/readyz`) and
//! Prometheus metrics (`/metrics`, text exposition format via the
//! `prometheus-client` crate).
//!
//! None of them touches patient data, and none is audited: a load
//! balancer's probes every second would otherwise outnumber every real
//! access in the audit log. Metrics carry route templates (`/{rtype}/{id}`),
//! never concrete paths or query strings, so they hold no identifiers.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

/// The process's operational state and metrics.
pub struct Ops {
    started: Instant,
    shutting_down: AtomicBool,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    gauges: Gauges,
    registry: parking_lot::Mutex<Registry>,
}

/// Values read at scrape time.
#[derive(Default)]
struct Gauges {
    up_seconds: Gauge,
    leader: Gauge,
    audit_entries: Gauge,
    audit_pending: Gauge,
    audit_unsigned: Gauge,
    detection_lag_events: Gauge,
    detection_event_p99_us: Gauge,
    detection_alert_p99_us: Gauge,
    pool_open: Gauge,
    pool_idle: Gauge,
    pool_max: Gauge,
    ready: Gauge,
}

impl Default for Ops {
    fn default() -> Self {
        Ops::new()
    }
}

impl Ops {
    pub fn new() -> Ops {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 100 µs … ~6.5 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 17,
            ))
        });
        let gauges = Gauges::default();
        let mut r = Registry::with_prefix("custos");
        r.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to answer, by method and route template (audit append included)",
            latency.clone(),
        );
        let g = &gauges;
        for (name, help, gauge) in [
            (
                "uptime_seconds",
                "Seconds since this node started",
                &g.up_seconds,
            ),
            (
                "leader",
                "1 while this node leads (signs checkpoints, runs detection)",
                &g.leader,
            ),
            (
                "audit_entries",
                "Entries in the audit log (all nodes)",
                &g.audit_entries,
            ),
            (
                "audit_pending_events",
                "Audit events queued on this node, not yet committed (audit lag)",
                &g.audit_pending,
            ),
            (
                "audit_unsigned_entries",
                "Entries not yet covered by the last checkpoint this node knows",
                &g.audit_unsigned,
            ),
            (
                "detection_lag_events",
                "Audit entries not yet judged by detection (on the leader)",
                &g.detection_lag_events,
            ),
            (
                "detection_event_latency_p99_microseconds",
                "Commit-to-judged latency of recent events, p99",
                &g.detection_event_p99_us,
            ),
            (
                "detection_alert_latency_p99_microseconds",
                "Commit-to-alert latency of recent findings, p99",
                &g.detection_alert_p99_us,
            ),
            (
                "db_pool_connections",
                "Open database connections of this node's pool",
                &g.pool_open,
            ),
            (
                "db_pool_idle_connections",
                "Idle database connections of this node's pool",
                &g.pool_idle,
            ),
            ("db_pool_max_connections", "The pool's limit", &g.pool_max),
            ("ready", "1 when this node accepts traffic", &g.ready),
        ] {
            r.register(name, help, gauge.clone());
        }
        Ops {
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            requests,
            latency,
            gauges,
            registry: parking_lot::Mutex::new(r),
        }
    }

    /// Count one answered request.
    pub fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// From now on `/readyz` answers 503 (load balancers stop sending
    /// traffic) while in-flight requests finish.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Liveness: the process answers.
pub async fn healthz(State(s): State<AppState>) -> Response {
    let body = json!({
        "status": "ok",
        "uptimeSeconds": s.ops.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    text(StatusCode::OK, body.to_string(), "application/json")
}

/// Readiness: not shutting down, and the store answers within 2 s.
pub async fn readyz(State(s): State<AppState>) -> Response {
    let (ready, body) = readiness(&s).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, body.to_string(), "application/json")
}

async fn readiness(s: &AppState) -> (bool, serde_json::Value) {
    if s.ops.shutting_down.load(Ordering::Acquire) {
        return (false, json!({ "status": "shutting down" }));
    }
    let store = s.records.store().clone();
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        store.sys_version("custos-ready", "probe"),
    )
    .await;
    match probe {
        Ok(Ok(_)) => (
            true,
            json!({
                "status": "ready",
                "store": store.backend(),
                "leader": s.audit.as_ref().is_some_and(|t| t.is_leader()),
            }),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store failed");
            (false, json!({ "status": "store unavailable" }))
        }
        Err(_) => (false, json!({ "status": "store timed out" })),
    }
}

/// Prometheus metrics, text exposition format.
pub async fn metrics(State(s): State<AppState>) -> Response {
    let ops = s.ops.clone();
    let g = &ops.gauges;
    g.up_seconds.set(ops.started.elapsed().as_secs() as i64);
    let (ready, _) = readiness(&s).await;
    g.ready.set(i64::from(ready));
    let stats = s.records.store().stats();
    g.pool_open.set(stats.pool_size.unwrap_or(0) as i64);
    g.pool_idle.set(stats.pool_idle.unwrap_or(0) as i64);
    g.pool_max.set(stats.pool_max.unwrap_or(0) as i64);
    let mut size = None;
    if let Some(trail) = &s.audit {
        g.leader.set(i64::from(trail.is_leader()));
        g.audit_pending.set(trail.pending_appends() as i64);
        if let Ok(n) = trail.size().await {
            size = Some(n);
            g.audit_entries.set(n as i64);
            if let Some(signed) = trail.last_signed_size().await {
                g.audit_unsigned.set(n.saturating_sub(signed) as i64);
            }
        }
    }
    if let Some(d) = &s.detection {
        let st = d.stats();
        if let Some(n) = size {
            g.detection_lag_events
                .set(n.saturating_sub(st.cursor) as i64);
        }
        g.detection_event_p99_us.set(st.event_latency_p99_us as i64);
        g.detection_alert_p99_us.set(st.alert_latency_p99_us as i64);
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &ops.registry.lock()).is_err() {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded\n".into(),
            "text/plain; charset=utf-8",
        );
    }
    text(
        StatusCode::OK,
        out,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
}

/// A shared handle (what `AppState` holds).
pub type SharedOps = Arc<Ops>;
