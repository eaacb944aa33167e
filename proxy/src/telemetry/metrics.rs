//! Istio's L4 metrics, in the Prometheus text format on `:15020/metrics` (and
//! `/stats/prometheus`), with the names and labels Istio's dashboards query:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_connections_failed_total`, `istio_tcp_received_bytes_total` (client to server) and
//! `istio_tcp_sent_bytes_total` (server to client).
//!
//! Byte counters move while a connection is open: the data path counts through [`Counted`], so
//! a scrape during a long transfer sees the bytes so far. A connection refused (policy, no
//! route, the upstream not answering) counts only as failed, with `response_flags` `DENY` or
//! `CONNECT`; an established one as opened and, when it ends, closed.
//!
//! Cardinality: a series whose source or destination pods are all gone from the state, with no
//! connection open and idle for [`Metrics::expiry`], is dropped by [`Metrics::expire`] (Istio's
//! ztunnel keeps every series for ever).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use xds_client::resources::{Service, Workload};

use super::{Counted, Record};
use crate::state::State;

/// The label set of one series (values `unknown` when not known, as Istio writes them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels {
    /// `source` (outbound) or `destination` (inbound).
    pub reporter: &'static str,
    /// Source workload name (the owning Deployment, etc.).
    pub source_workload: String,
    /// Source canonical service.
    pub source_canonical_service: String,
    /// Source canonical revision.
    pub source_canonical_revision: String,
    /// Source namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE id without `spiffe://`.
    pub source_principal: String,
    /// Source cluster.
    pub source_cluster: String,
    /// Destination service hostname.
    pub destination_service: String,
    /// Destination service name.
    pub destination_service_name: String,
    /// Destination service namespace.
    pub destination_service_namespace: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination canonical service.
    pub destination_canonical_service: String,
    /// Destination canonical revision.
    pub destination_canonical_revision: String,
    /// Destination namespace.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE id without `spiffe://`.
    pub destination_principal: String,
    /// Destination cluster.
    pub destination_cluster: String,
    /// Always `tcp` (L4).
    pub request_protocol: &'static str,
    /// `-`, `DENY` (policy), `CONNECT` (the upstream could not be reached).
    pub response_flags: &'static str,
    /// `mutual_tls` through HBONE, else `unknown`.
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_owned()
    } else {
        s.to_owned()
    }
}

fn principal(id: &str) -> String {
    or_unknown(id.strip_prefix("spiffe://").unwrap_or(id))
}

/// Who the two ends of a connection are, as far as known.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ends<'a> {
    /// The source workload.
    pub source: Option<&'a Workload>,
    /// The source's identity (from its certificate, inbound; its workload, outbound).
    pub source_identity: Option<&'a str>,
    /// The destination workload.
    pub destination: Option<&'a Workload>,
    /// The identity the destination proved (or was expected to).
    pub destination_identity: Option<&'a str>,
    /// The service it was reached through.
    pub service: Option<&'a Service>,
    /// Whether the connection is (or was to be) tunneled with mutual TLS.
    pub mtls: bool,
}

impl Labels {
    /// The labels of a connection seen by `reporter` (`source` or `destination`).
    pub fn new(reporter: &'static str, ends: Ends<'_>, response_flags: &'static str) -> Self {
        let w = |w: Option<&Workload>, f: fn(&Workload) -> &str| or_unknown(w.map(f).unwrap_or(""));
        Labels {
            reporter,
            source_workload: w(ends.source, |w| &w.workload_name),
            source_canonical_service: w(ends.source, |w| &w.canonical_name),
            source_canonical_revision: w(ends.source, |w| &w.canonical_revision),
            source_workload_namespace: w(ends.source, |w| &w.namespace),
            source_principal: principal(
                ends.source_identity
                    .or(ends.source.map(|w| w.identity.as_str()))
                    .unwrap_or(""),
            ),
            source_cluster: w(ends.source, |w| &w.cluster_id),
            destination_service: or_unknown(
                ends.service.map(|s| s.hostname.as_str()).unwrap_or(""),
            ),
            destination_service_name: or_unknown(
                ends.service.map(|s| s.name.as_str()).unwrap_or(""),
            ),
            destination_service_namespace: or_unknown(
                ends.service.map(|s| s.namespace.as_str()).unwrap_or(""),
            ),
            destination_workload: w(ends.destination, |w| &w.workload_name),
            destination_canonical_service: w(ends.destination, |w| &w.canonical_name),
            destination_canonical_revision: w(ends.destination, |w| &w.canonical_revision),
            destination_workload_namespace: w(ends.destination, |w| &w.namespace),
            destination_principal: principal(
                ends.destination_identity
                    .or(ends.destination.map(|w| w.identity.as_str()))
                    .unwrap_or(""),
            ),
            destination_cluster: w(ends.destination, |w| &w.cluster_id),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: if ends.mtls { "mutual_tls" } else { UNKNOWN },
        }
    }

    fn write(&self, out: &mut String) {
        let pairs: [(&str, &str); 19] = [
            ("reporter", self.reporter),
            ("source_workload", &self.source_workload),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_cluster", &self.source_cluster),
            ("destination_service", &self.destination_service),
            ("destination_service_name", &self.destination_service_name),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_workload", &self.destination_workload),
            (
                "destination_canonical_service",
                &self.destination_canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination_canonical_revision,
            ),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_cluster", &self.destination_cluster),
            ("request_protocol", self.request_protocol),
            ("response_flags", self.response_flags),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ];
        out.push('{');
        let mut first = true;
        for (k, v) in pairs {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
}

/// The counters of one series.
#[derive(Debug)]
pub struct Series {
    opened: AtomicU64,
    closed: AtomicU64,
    failed: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) sent: AtomicU64,
    open: AtomicI64,
    last_used: Mutex<Instant>,
    /// Uids of the source and destination workloads seen in it.
    uids: Mutex<(HashSet<String, RandomState>, HashSet<String, RandomState>)>,
}

impl Default for Series {
    fn default() -> Self {
        Series {
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            open: AtomicI64::new(0),
            last_used: Mutex::new(Instant::now()),
            uids: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Series {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    /// (opened, closed, failed, received bytes, sent bytes).
    pub fn values(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.opened.load(Ordering::Relaxed),
            self.closed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
        )
    }
}

/// All series.
#[derive(Debug)]
pub struct Metrics {
    /// Hashed with foldhash (seeded per process), not SipHash: the labels of every new
    /// connection are hashed here, and SipHash over its 15 strings was the biggest part of the
    /// lookup (label values are workload metadata and CA-issued identities, not free input).
    series: Mutex<HashMap<Labels, Arc<Series>, RandomState>>,
    /// How long a series of gone pods, with nothing open, is kept.
    pub expiry: Duration,
    /// The DNS proxy's counts (rendered once it has had a query).
    pub dns: Arc<crate::dns::DnsMetrics>,
}

/// An open connection's place in its series: counted as opened now and as closed when dropped.
#[derive(Debug)]
pub struct Open {
    series: Arc<Series>,
    /// Handed to another process: not counted closed here.
    moved: bool,
}

impl Drop for Open {
    fn drop(&mut self) {
        if !self.moved {
            self.series.closed.fetch_add(1, Ordering::Relaxed);
        }
        self.series.open.fetch_sub(1, Ordering::Relaxed);
        self.series.touch();
    }
}

impl Open {
    /// The connection moved to another process, which counts its close: still open, as far as
    /// the mesh is concerned, so not counted closed here.
    pub fn moved(mut self) {
        self.moved = true;
    }

    /// Wraps `stream` so the bytes read from it count as `reads` and the bytes written to it as
    /// the other direction.
    pub fn count<S>(&self, stream: S, reads: Flow) -> Counted<S> {
        Counted::new(stream, self.series.clone(), reads)
    }
}

/// A direction of the bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Client to server (`istio_tcp_received_bytes_total`).
    Received,
    /// Server to client (`istio_tcp_sent_bytes_total`).
    Sent,
}

impl Metrics {
    /// No series yet; gone pods' series expire after `expiry`.
    pub fn new(expiry: Duration) -> Arc<Self> {
        Arc::new(Metrics {
            series: Mutex::default(),
            expiry,
            dns: Arc::default(),
        })
    }

    fn get(&self, labels: Labels, ends: &Ends<'_>) -> Arc<Series> {
        let series = lock(&self.series).entry(labels).or_default().clone();
        series.touch();
        let mut uids = lock(&series.uids);
        if let Some(w) = ends.source
            && !uids.0.contains(&w.uid)
        {
            uids.0.insert(w.uid.clone());
        }
        if let Some(w) = ends.destination
            && !uids.1.contains(&w.uid)
        {
            uids.1.insert(w.uid.clone());
        }
        drop(uids);
        series
    }

    /// Counts the connection of `record` as established (opened now, closed when the guard
    /// drops).
    pub fn open<R: Record>(&self, record: &R) -> Open {
        self.opened(R::REPORTER, record.ends())
    }

    /// Counts the connection of `record`, which has ended, as failed if it did.
    pub fn finished<R: Record>(&self, record: &R) {
        if let Some(flags) = record.failure() {
            self.failed(R::REPORTER, record.ends(), flags);
        }
    }

    /// Counts an established connection (opened now, closed when the guard drops).
    pub fn opened(&self, reporter: &'static str, ends: Ends<'_>) -> Open {
        let series = self.get(Labels::new(reporter, ends, "-"), &ends);
        series.opened.fetch_add(1, Ordering::Relaxed);
        series.open.fetch_add(1, Ordering::Relaxed);
        Open {
            series,
            moved: false,
        }
    }

    /// Counts a connection that was refused or could not be established.
    pub fn failed(&self, reporter: &'static str, ends: Ends<'_>, response_flags: &'static str) {
        let series = self.get(Labels::new(reporter, ends, response_flags), &ends);
        series.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The series with exactly these labels, if it exists.
    pub fn find(&self, labels: &Labels) -> Option<Arc<Series>> {
        lock(&self.series).get(labels).cloned()
    }

    /// How many series exist.
    pub fn len(&self) -> usize {
        lock(&self.series).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the series with nothing open, idle longer than [`expiry`](Self::expiry), whose
    /// source or destination workloads are all gone from `state`. Returns how many it dropped.
    pub fn expire(&self, state: &State) -> usize {
        let now = Instant::now();
        let mut series = lock(&self.series);
        let before = series.len();
        series.retain(|_, s| {
            if s.open.load(Ordering::Relaxed) > 0
                || now.duration_since(*lock(&s.last_used)) < self.expiry
            {
                return true;
            }
            let uids = lock(&s.uids);
            let gone = |set: &HashSet<String, RandomState>| {
                !set.is_empty() && set.iter().all(|u| state.workload(u).is_none())
            };
            !(gone(&uids.0) || gone(&uids.1))
        });
        before - series.len()
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut rows: Vec<(Labels, Arc<Series>)> = lock(&self.series)
            .iter()
            .map(|(l, s)| (l.clone(), s.clone()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = String::new();
        let families: [Family; 5] = [
            (
                "istio_tcp_connections_opened_total",
                "The total number of TCP connections opened.",
                |s| s.opened.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_connections_closed_total",
                "The total number of TCP connections closed.",
                |s| s.closed.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_connections_failed_total",
                "The total number of TCP connections that failed to be established (refused by policy, or the upstream could not be reached).",
                |s| s.failed.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_received_bytes_total",
                "The size of the total bytes received (client to server) during a TCP connection.",
                |s| s.received.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_sent_bytes_total",
                "The size of the total bytes sent (server to client) during a TCP connection.",
                |s| s.sent.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, series) in &rows {
                out.push_str(name);
                labels.write(&mut out);
                let _ = writeln!(out, " {}", value(series));
            }
        }
        if self.dns.requests() > 0 {
            out.push_str(&self.dns.render());
        }
        out
    }
}

/// A metric family: name, help text, and the counter of a series it reports.
type Family = (&'static str, &'static str, fn(&Series) -> u64);
