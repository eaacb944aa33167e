//! The soak: traffic through a local mesh for minutes or hours while its parts fail, every
//! connection's bytes and outcome checked ([`check`]), leaks watched ([`leaks`]).
//!
//! [`run`] brings a mesh up with the soak's workloads (or adds them to the running one), waits
//! until they are captured and served, takes a baseline, starts the traffic ([`traffic`]) from
//! `soak/soak-client` to the `soak/soak-server` echo service, injects the faults in turn, one at
//! a time, spread over the run (which lasts at least until each was injected once), stops the
//! traffic, lets the mesh settle and compares with the baseline. Every connection is judged by the [`check::Oracle`], which knows when the soak's
//! own policy denied its traffic and when a fault could cut connections.
//!
//! The faults ([`Fault`]): `controlplane` (restarted; nothing may fail), `node-agent` (each
//! node's, restarted; nothing may fail), `proxy-kill` (a node's proxy SIGKILLed and started
//! again; connections through it may be cut until it serves again), `proxy-restart` (each
//! node's proxy restarted the rolling way, [`Stop::Rolling`]: the old proxy hands every live
//! connection to the new one, so nothing may fail, long-lived connections included), `policy` (a DENY policy
//! for the soak's traffic applied, then deleted; connections near either moment may go either
//! way, none other), `pods` (an echo pod added, then deleted; connections near either moment
//! may be cut), `label` (the namespace taken out of ambient and put back; connections near
//! either moment may be cut), `certs` (a mesh the soak brings up asks for one-minute
//! certificates, so they rotate all through the run; the fault waits until every soak pod has
//! a new one; nothing may fail).
//!
//! Served connections between ambient pods must carry mutual TLS: the proxies' access logs
//! are read at the end for inbound connections to the echo pods without a client identity while
//! the namespace was in ambient.

pub mod check;
pub mod leaks;
pub mod picture;
pub mod traffic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::mesh::{self, Part, Progress, Stop};
use crate::net;
use crate::plan::{Mesh, parse_docs};
use crate::{Config, Error};
use check::{Oracle, Wrong};

/// The soak's workloads.
pub const WORKLOADS: &str = include_str!("../../soak/soak.yaml");

/// The policy the `policy` fault applies: the soak's client denied at the echo pods.
const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: soak-deny, namespace: soak}\nspec:\n  selector: {matchLabels: {app: soak-server}}\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/soak/sa/soak-client]}}]\n";

/// A fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Restart the control plane.
    ControlPlane,
    /// Restart each node's agent.
    NodeAgent,
    /// SIGKILL a node's proxy and start it again.
    ProxyKill,
    /// Restart each node's proxy the rolling way: the new one first, which takes the old one's
    /// live connections over; nothing may be cut.
    ProxyRestart,
    /// Apply, then delete, a policy denying the soak's traffic.
    Policy,
    /// Add an echo pod, then delete it.
    Pods,
    /// Take the soak's namespace out of ambient, then put it back.
    Label,
    /// Every certificate rotated: the soak's own mesh runs with short certificate lifetimes
    /// ([`CERT_LIFETIME`]), so they rotate all through the run; this fault waits until each of
    /// the soak's pods got a new one (nothing may fail meanwhile).
    Certs,
}

/// The certificate lifetime of a mesh the soak brings up (its proxies renew at about half).
pub const CERT_LIFETIME: Duration = Duration::from_secs(60);

impl Fault {
    /// Every fault, in the order they are injected.
    pub const ALL: [Fault; 8] = [
        Fault::Policy,
        Fault::ControlPlane,
        Fault::Certs,
        Fault::NodeAgent,
        Fault::ProxyRestart,
        Fault::Pods,
        Fault::ProxyKill,
        Fault::Label,
    ];

    /// Its name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::ControlPlane => "controlplane",
            Fault::NodeAgent => "node-agent",
            Fault::ProxyKill => "proxy-kill",
            Fault::ProxyRestart => "proxy-restart",
            Fault::Policy => "policy",
            Fault::Pods => "pods",
            Fault::Label => "label",
            Fault::Certs => "certs",
        }
    }

    /// `all`, `none`, or names separated by commas.
    pub fn parse_list(text: &str) -> Result<Vec<Fault>, String> {
        match text {
            "all" => return Ok(Fault::ALL.to_vec()),
            "none" => return Ok(Vec::new()),
            _ => {}
        }
        let mut out = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let fault = Fault::ALL
                .into_iter()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    format!(
                        "unknown fault {name:?}; expected all, none or some of {}",
                        known.join(", ")
                    )
                })?;
            if !out.contains(&fault) {
                out.push(fault);
            }
        }
        Ok(out)
    }
}

/// A wrong outcome made on purpose, to show the soak catches it (its tests use them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// The `policy` fault tells the oracle the soak's traffic is denied but applies a policy
    /// that denies someone else: the proxies serve what the oracle expects denied, as a proxy
    /// ignoring a policy would.
    DeniedServed,
    /// Mid-run, one connection from the client pod to an echo pod leaves with the proxy's own
    /// mark (so the capture lets it past the client's proxy) and reaches the echo pod's proxy
    /// in plaintext, as traffic escaping its capture would.
    Plaintext,
}

impl Injection {
    /// `denied-served` or `plaintext`.
    pub fn parse(text: &str) -> Result<Injection, String> {
        match text {
            "denied-served" => Ok(Injection::DeniedServed),
            "plaintext" => Ok(Injection::Plaintext),
            other => Err(format!(
                "unknown injection {other:?}; expected denied-served or plaintext"
            )),
        }
    }
}

/// What the soak does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// How long the traffic runs.
    pub duration: Duration,
    /// New connections per second.
    pub rate: u32,
    /// Long-lived connections.
    pub long: u32,
    /// The faults, injected in turn (each at least once, however short the run).
    pub faults: Vec<Fault>,
    /// One fault every this long, cycling through `faults` from a tenth of the run on until
    /// its last tenth; `None`: each fault once, spread over the run.
    pub fault_every: Option<Duration>,
    /// How long around a policy change either outcome is right, and how long after a fault's
    /// end connections may still fail because of it.
    pub grace: Duration,
    /// Wrong outcomes to make on purpose (none in a real soak).
    pub inject: Vec<Injection>,
}

/// What the soak found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Connections made.
    pub connections: u64,
    /// Of them, served.
    pub served: u64,
    /// Denied (while the soak's policy denied them, or around its changes).
    pub denied: u64,
    /// Cut or refused, all within a fault's window.
    pub excused: u64,
    /// Wrong outcomes by kind.
    pub wrong: BTreeMap<String, u64>,
    /// The first few wrong connections, for a person to look at.
    pub wrong_examples: Vec<String>,
    /// When wrong connections were made (seconds since the start; the first 10 000).
    pub wrong_times: Vec<f64>,
    /// Leaks found at the end.
    pub leaks: Vec<String>,
    /// (seconds since the start, fault, how long it took).
    pub faults: Vec<(f64, String, f64)>,
    /// Samples through the run (for plots): seconds, connections ended so far, served so far,
    /// long connections open, each part's resident memory in KiB.
    pub timeline: Vec<TimelinePoint>,
    /// The baseline and the final sample.
    pub baseline: leaks::Sample,
    /// The final sample.
    pub end: leaks::Sample,
}

/// One moment of the timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TimelinePoint {
    /// Seconds since the traffic began.
    pub at: f64,
    /// Connections ended so far.
    pub ended: u64,
    /// Of them, served.
    pub served: u64,
    /// Long connections open.
    pub long_open: u64,
    /// Each part's resident memory, KiB.
    pub rss_kib: BTreeMap<String, u64>,
}

impl Report {
    /// Wrong outcomes, all kinds.
    pub fn wrong_total(&self) -> u64 {
        self.wrong.values().sum()
    }

    /// `soak: C connections, W wrong (...), L leaks, F faults injected`.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self.wrong.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!(
            "soak: {} connections, {} wrong ({}), {} leaks, {} faults injected",
            self.connections,
            self.wrong_total(),
            kinds.join(", "),
            self.leaks.len(),
            self.faults.len()
        )
    }

    /// Whether the soak passed: nothing wrong, nothing leaked.
    pub fn passed(&self) -> bool {
        self.wrong_total() == 0 && self.leaks.is_empty()
    }
}

/// Runs the soak (see the module's documentation). A mesh this call brings up is taken down at
/// the end; the soak's workloads added to a running mesh are deleted again.
pub fn run(
    config: &Config,
    soak: &SoakConfig,
    cancel: &AtomicBool,
    progress: Progress<'_>,
) -> Result<Report, Error> {
    let docs = parse_docs(WORKLOADS, "built-in soak workloads")?;
    let ours = match mesh::load(config) {
        Ok(running)
            if soak.faults.contains(&Fault::Certs)
                && running
                    .secret_ttl_seconds
                    .is_none_or(|ttl| ttl > CERT_LIFETIME.as_secs()) =>
        {
            return Err(Error::Usage(
                "the certs fault needs a mesh whose certificates live a minute at most (the soak's own: run it without a mesh up), or leave certs out of --faults".into(),
            ));
        }
        Ok(_) => {
            progress("adding the soak's workloads to the running mesh");
            mesh::apply(config, docs.clone(), false, progress)?;
            false
        }
        Err(Error::NotRunning { .. }) => {
            progress(&format!(
                "bringing a mesh up for the soak (certificates live {CERT_LIFETIME:?})"
            ));
            let mut short = config.clone();
            short.secret_ttl = Some(CERT_LIFETIME);
            mesh::up(&short, docs.clone(), cancel, progress)?;
            true
        }
        Err(e) => return Err(e),
    };
    let result = soak_on(config, soak, cancel, progress);
    if ours {
        progress("removing the soak's mesh");
        mesh::down(config, &mut |_| {})?;
    } else {
        progress("removing the soak's workloads");
        mesh::apply(config, docs, true, &mut |_| {})?;
    }
    result
}

fn soak_on(
    config: &Config,
    soak: &SoakConfig,
    cancel: &AtomicBool,
    progress: Progress<'_>,
) -> Result<Report, Error> {
    let mesh = mesh::load(config)?;
    let target = soak_target(&mesh)?;
    let (_, client_ns) = mesh::find_pod(config, &mesh, "soak/soak-client")?;
    progress("waiting until the soak's pods are captured and served");
    wait_served(config, cancel)?;
    // The echo answers through the mesh before anything counts.
    warm_up(&client_ns, target, cancel)?;
    let baseline = leaks::sample(config, &mesh);

    progress(&format!(
        "traffic: {} new connections/s and {} long-lived to {target} for {:?}; faults: {}",
        soak.rate,
        soak.long,
        soak.duration,
        soak.faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if let Some(ceiling) = port_ceiling(&client_ns)
        && soak.rate > ceiling
    {
        progress(&format!(
            "warning: --rate {} is above what the client pod's ephemeral ports allow ({ceiling} connections/s to one service address: each closed connection holds its port for 60 s in TIME_WAIT, and connect takes the even half of the range first); the client's connects will slow down and stall, which says nothing about the mesh",
            soak.rate
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(traffic::Live::default());
    let mut tcfg = traffic::TrafficConfig::new(target, soak.rate, soak.long);
    tcfg.timeout = Duration::from_secs(5);
    let begin = Instant::now();
    let handle = traffic::run(&client_ns, tcfg, stop.clone(), live.clone());
    let mut oracle = Oracle::new(true, soak.grace);
    let mut injected = Vec::new();
    // The timeline is sampled on a thread of its own, so it goes on while a fault is injected.
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (config, live, sampling) = (config.clone(), live.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut points = Vec::new();
            while !sampling.load(Ordering::SeqCst) {
                points.push(point(&config, &live, begin.elapsed()));
                std::thread::sleep(Duration::from_millis(500));
            }
            points.push(point(&config, &live, begin.elapsed()));
            points
        })
    };
    let mut ambient_gaps: Vec<(Duration, Duration)> = Vec::new();
    let slots = soak.faults.len().max(1) as u32;
    // Faults begin after a tenth of the run and are spread over the rest but its last tenth.
    let span = soak.duration.mul_f64(0.8);
    let mut next_fault = 0usize;
    let mut failure = None;
    let mut plaintext_sent = false;
    // The run lasts at least until every fault was injected once.
    while begin.elapsed() < soak.duration || next_fault < soak.faults.len() {
        if cancel.load(Ordering::SeqCst) {
            failure = Some(Error::Interrupted);
            break;
        }
        let at = begin.elapsed();
        if soak.inject.contains(&Injection::Plaintext) && !plaintext_sent && at >= soak.duration / 2
        {
            plaintext_sent = true;
            progress(&format!(
                "{:>6.1} s: injecting a plaintext connection between ambient pods",
                at.as_secs_f64()
            ));
            if let Err(e) = send_plaintext(&mesh, &client_ns) {
                failure = Some(e);
                break;
            }
        }
        let due = match soak.fault_every {
            // Past the last tenth, only faults not yet injected once are due.
            Some(every) if next_fault < soak.faults.len() || at < soak.duration.mul_f64(0.9) => {
                soak.duration / 10 + every * next_fault as u32
            }
            Some(_) => Duration::MAX,
            None => {
                soak.duration / 10
                    + span * (next_fault as u32 % slots) / slots
                    + span * (next_fault as u32 / slots)
            }
        };
        if !soak.faults.is_empty() && at >= due {
            let fault = soak.faults[next_fault % soak.faults.len()];
            next_fault += 1;
            progress(&format!(
                "{:>6.1} s: fault {}",
                at.as_secs_f64(),
                fault.name()
            ));
            let faking = soak.inject.contains(&Injection::DeniedServed);
            match inject(
                config,
                fault,
                next_fault,
                &begin,
                &mut oracle,
                &mut ambient_gaps,
                faking,
            ) {
                Ok(()) => {
                    let took = begin.elapsed() - at;
                    injected.push((
                        at.as_secs_f64(),
                        fault.name().to_owned(),
                        took.as_secs_f64(),
                    ));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            continue;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if failure.is_none() && soak.inject.contains(&Injection::Plaintext) && !plaintext_sent {
        progress("injecting a plaintext connection between ambient pods");
        if let Err(e) = send_plaintext(&mesh, &client_ns) {
            failure = Some(e);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let records = handle
        .join()
        .map_err(|_| Error::Usage("the soak's traffic thread panicked".into()))?
        .map_err(Error::Usage)?;
    sampling.store(true, Ordering::SeqCst);
    let timeline = sampler
        .join()
        .map_err(|_| Error::Usage("the soak's sampler panicked".into()))?;
    if let Some(e) = failure {
        return Err(e);
    }

    progress("traffic stopped; letting the mesh settle");
    let (end, leaks) = settle(config, &baseline)?;

    let mut report = Report {
        connections: records.len() as u64,
        served: 0,
        denied: 0,
        excused: 0,
        wrong: BTreeMap::new(),
        wrong_examples: Vec::new(),
        wrong_times: Vec::new(),
        leaks,
        faults: injected,
        timeline,
        baseline,
        end,
    };
    for r in &records {
        match &r.outcome {
            check::Outcome::Served => report.served += 1,
            check::Outcome::Denied => report.denied += 1,
            _ => {}
        }
        match oracle.judge(r.started, r.ended, &r.outcome) {
            Some(kind) => {
                *report.wrong.entry(kind.name().to_owned()).or_default() += 1;
                if report.wrong_times.len() < 10_000 {
                    report.wrong_times.push(r.started.as_secs_f64());
                }
                if report.wrong_examples.len() < 20 {
                    report.wrong_examples.push(format!(
                        "{} connection made at {:.2} s, ended at {:.2} s: {:?} ({})",
                        if r.long { "long" } else { "short" },
                        r.started.as_secs_f64(),
                        r.ended.as_secs_f64(),
                        r.outcome,
                        kind.name()
                    ));
                }
            }
            None if !matches!(r.outcome, check::Outcome::Served | check::Outcome::Denied) => {
                report.excused += 1;
            }
            None => {}
        }
    }
    let plaintext = plaintext_between_ambient_pods(config, begin, &ambient_gaps, soak.grace);
    if !plaintext.is_empty() {
        report
            .wrong
            .insert(Wrong::Plaintext.name().to_owned(), plaintext.len() as u64);
    }
    // Each with its time and its access-log line: the log goes with the mesh.
    for (at, line) in plaintext {
        if report.wrong_times.len() < 10_000 {
            report
                .wrong_times
                .push(at.map_or(0.0, |at| at.as_secs_f64()));
        }
        if report.wrong_examples.len() < 40 {
            let at = at.map_or_else(
                || "an unknown time".to_owned(),
                |at| format!("{:.2} s", at.as_secs_f64()),
            );
            report
                .wrong_examples
                .push(format!("plaintext connection made at {at}: {line}"));
        }
    }
    Ok(report)
}

/// How many new connections a second namespace `ns` can make to one address and port for long
/// (its ephemeral port range over the 60 s a closed connection stays in TIME_WAIT); `None`
/// when it reuses TIME_WAIT ports (`net.ipv4.tcp_tw_reuse = 1`) or cannot be read.
fn port_ceiling(ns: &str) -> Option<u32> {
    let read = |key: &str| net::run_in(ns, "cat", &[&format!("/proc/sys/net/ipv4/{key}")]).ok();
    if read("tcp_tw_reuse").is_some_and(|v| v.trim() == "1") {
        return None;
    }
    ports_per_second(&read("ip_local_port_range")?)
}

/// The connections a second an ephemeral port range (`"LOW HIGH"`) sustains to one address
/// without `connect` slowing down: Linux tries the even half of the range first (the odd half
/// is for `bind`), and once those are all in TIME_WAIT each `connect` scans them all before it
/// takes an odd one (the soak saw its own client stall at 400 a second, 35 s into the run:
/// 14,116 even ports).
fn ports_per_second(range: &str) -> Option<u32> {
    let mut it = range.split_whitespace().map(|n| n.parse::<u32>().ok());
    let (low, high) = (it.next()??, it.next()??);
    let ports = high.checked_sub(low)? + 1;
    Some(ports / 2 / 60)
}

/// The echo service's VIP and port.
fn soak_target(mesh: &Mesh) -> Result<SocketAddr, Error> {
    mesh.services()
        .into_iter()
        .find(|s| s.namespace == "soak" && s.name == "soak-server")
        .and_then(|s| {
            s.ports
                .first()
                .map(|(port, _)| SocketAddr::new(s.vip, *port))
        })
        .ok_or_else(|| Error::Usage("the soak's service soak/soak-server is missing".into()))
}

/// Waits until every node's proxy serves the soak's pods with their certificates.
fn wait_served(config: &Config, cancel: &AtomicBool) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(Error::Interrupted);
        }
        let served = soak_certificates(config).len();
        if served >= 3 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Timeout {
                what: "the soak's pods to be served".into(),
                logs: config.run_dir.join("logs").display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One short connection through the mesh until it is served (the apps and the service have
/// just started).
fn warm_up(client_ns: &str, target: SocketAddr, cancel: &AtomicBool) -> Result<(), Error> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if cancel.load(Ordering::SeqCst) {
            return Err(Error::Interrupted);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let probe = traffic::run(
            client_ns,
            traffic::TrafficConfig::new(target, 1, 0),
            stop.clone(),
            Arc::new(traffic::Live::default()),
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let records = probe
            .join()
            .map_err(|_| Error::Usage("the warm-up thread panicked".into()))?
            .map_err(Error::Usage)?;
        if !records.is_empty() && records.iter().all(|r| r.outcome == check::Outcome::Served) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(Error::Usage(format!(
        "the soak's echo service {target} does not answer through the mesh"
    )))
}

fn point(config: &Config, live: &traffic::Live, at: Duration) -> TimelinePoint {
    TimelinePoint {
        at: at.as_secs_f64(),
        ended: live.ended.load(Ordering::Relaxed),
        served: live.served.load(Ordering::Relaxed),
        long_open: live.long_open.load(Ordering::Relaxed),
        rss_kib: leaks::processes(config)
            .into_iter()
            .map(|(name, usage)| (name, usage.rss_kib))
            .collect(),
    }
}

/// Injects `fault` (its `n`th injection), telling `oracle` what it may do to connections.
fn inject(
    config: &Config,
    fault: Fault,
    n: usize,
    begin: &Instant,
    oracle: &mut Oracle,
    ambient_gaps: &mut Vec<(Duration, Duration)>,
    ignored_policy: bool,
) -> Result<(), Error> {
    let quiet: Progress<'_> = &mut |_| {};
    let grace = oracle.grace;
    let hold = Duration::from_secs(3);
    match fault {
        Fault::ControlPlane => {
            mesh::restart(config, Part::ControlPlane, None, Stop::Graceful).map(drop)
        }
        Fault::NodeAgent => {
            for node in &config.nodes {
                mesh::restart(config, Part::NodeAgent, Some(node), Stop::Graceful)?;
            }
            Ok(())
        }
        Fault::ProxyKill => {
            let node = &config.nodes[n % config.nodes.len()];
            let from = begin.elapsed();
            mesh::restart(config, Part::Proxy, Some(node), Stop::Kill)?;
            oracle.fault(from, begin.elapsed() + grace);
            Ok(())
        }
        Fault::ProxyRestart => {
            // Nothing is excused: the old proxy hands its connections over (issue 31).
            for node in &config.nodes {
                mesh::restart(config, Part::Proxy, Some(node), Stop::Rolling)?;
            }
            Ok(())
        }
        Fault::Policy => {
            let text = if ignored_policy {
                // Injected: a policy that denies someone else, while the oracle is told ours.
                DENY.replace("sa/soak-client", "sa/someone-else")
            } else {
                DENY.to_owned()
            };
            let deny = parse_docs(&text, "the soak's deny policy")?;
            // The change counts from the moment it is made: the proxies may act on it before
            // `apply` returns.
            oracle.flip(begin.elapsed(), false);
            mesh::apply(config, deny.clone(), false, quiet)?;
            // Long enough that, beyond the grace around both changes, connections are expected
            // denied for a while (twice the grace, at least 2 s).
            std::thread::sleep(grace * 4 + Duration::from_secs(2));
            oracle.flip(begin.elapsed(), true);
            mesh::apply(config, deny, true, quiet)?;
            // Traffic is allowed again before the next fault begins.
            std::thread::sleep(grace);
            Ok(())
        }
        Fault::Pods => {
            let from = begin.elapsed();
            mesh::apply(config, scaled(3)?, false, quiet)?;
            std::thread::sleep(hold);
            mesh::apply(config, scaled(2)?, false, quiet)?;
            oracle.fault(from, begin.elapsed() + grace);
            Ok(())
        }
        Fault::Certs => {
            // Each of the soak's pods gets a new certificate within the lifetime (renewed at
            // about half of it); the traffic goes on meanwhile and nothing is excused.
            let before = soak_certificates(config);
            let start = Instant::now();
            loop {
                let now = soak_certificates(config);
                if !before.is_empty()
                    && before
                        .iter()
                        .all(|(pod, expiry)| now.get(pod).is_some_and(|e| e != expiry))
                {
                    return Ok(());
                }
                if start.elapsed() > CERT_LIFETIME * 2 {
                    return Err(Error::Usage(format!(
                        "certificates did not rotate within {:?}: before {before:?}, now {now:?}",
                        CERT_LIFETIME * 2
                    )));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Fault::Label => {
            let from = begin.elapsed();
            mesh::label(config, "soak", &["istio.io/dataplane-mode-".into()], quiet)?;
            std::thread::sleep(hold);
            mesh::label(
                config,
                "soak",
                &["istio.io/dataplane-mode=ambient".into()],
                quiet,
            )?;
            // Back in ambient once the agent captured and the proxies serve the pods again.
            wait_served(config, &AtomicBool::new(false))?;
            let to = begin.elapsed() + grace;
            oracle.fault(from, to);
            ambient_gaps.push((from, to));
            Ok(())
        }
    }
}

/// One connection from the client pod straight to an echo pod, carrying the proxy's mark so
/// the client's capture lets it by: the echo pod's proxy takes it in plaintext.
fn send_plaintext(mesh: &Mesh, client_ns: &str) -> Result<(), Error> {
    let server = mesh
        .pod("soak", "soak-server")
        .ok_or_else(|| Error::Usage("no echo pod to send plaintext to".into()))?;
    let to = SocketAddr::from((server.placement.ip, 9000));
    net::in_netns(client_ns, move || {
        use std::io::{Read, Write};
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        socket
            .set_mark(common::PACKET_MARK)
            .map_err(|e| format!("SO_MARK: {e}"))?;
        socket
            .connect_timeout(&to.into(), Duration::from_secs(5))
            .map_err(|e| format!("connecting to {to}: {e}"))?;
        let mut stream = std::net::TcpStream::from(socket);
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        stream.write_all(b"plaintext").map_err(|e| e.to_string())?;
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut back = Vec::new();
        let _ = stream.read_to_end(&mut back);
        Ok(())
    })
    .map_err(Error::Usage)
}

/// Each of the soak's pods' certificate expiry, as the proxies serving them report it.
fn soak_certificates(config: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for node in &config.nodes {
        let Some(dump) = mesh::admin_dump(config, node) else {
            continue;
        };
        for p in dump["pods"].as_array().into_iter().flatten() {
            if p["namespace"] == "soak"
                && let (Some(name), Some(expiry)) =
                    (p["name"].as_str(), p["certificateExpiry"].as_str())
            {
                out.insert(name.to_owned(), expiry.to_owned());
            }
        }
    }
    out
}

/// The echo Deployment with `replicas` pods.
fn scaled(replicas: u32) -> Result<Vec<crate::plan::Doc>, Error> {
    let text = WORKLOADS
        .split("\n---\n")
        .find(|d| d.contains("name: soak-server") && d.contains("kind: Deployment"))
        .ok_or_else(|| Error::Usage("the soak's echo Deployment is missing".into()))?
        .replace("replicas: 2", &format!("replicas: {replicas}"));
    Ok(parse_docs(&text, "the soak's echo Deployment")?)
}

/// Inbound connections to the echo pods that the proxies logged without a client identity
/// (plaintext) while the namespace was in ambient (outside `gaps`, and `grace` after them):
/// when each began (since `begin`, when its line says) and its access-log line.
fn plaintext_between_ambient_pods(
    config: &Config,
    begin: Instant,
    gaps: &[(Duration, Duration)],
    grace: Duration,
) -> Vec<(Option<Duration>, String)> {
    // Log times are wall-clock; the soak's are since `begin`.
    let begun = std::time::SystemTime::now() - begin.elapsed();
    let mut found = Vec::new();
    for node in &config.nodes {
        let log =
            std::fs::read_to_string(config.log_file("ztunnel", Some(node))).unwrap_or_default();
        for line in log.lines().filter(|l| {
            l.contains("direction=\"inbound\"")
                && l.contains("dst.namespace=soak")
                && l.contains("src.identity=\"-\"")
        }) {
            // The line is written when the connection ends; what matters is when it began.
            let took = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("duration_ms="))
                .and_then(|ms| ms.parse::<u64>().ok())
                .map_or(Duration::ZERO, Duration::from_millis);
            let at = line
                .split_whitespace()
                .next()
                .and_then(|t| humantime_since(t, begun))
                .map(|ended| ended.saturating_sub(took));
            let excused = at.is_none_or(|at| {
                gaps.iter()
                    .any(|(from, to)| at + grace >= *from && at <= *to + grace)
            });
            if !excused {
                found.push((at, line.to_owned()));
            }
        }
    }
    found
}

/// An RFC 3339 UTC time (`2026-12-07T09:21:58.919185Z`) as time since `since`.
fn humantime_since(text: &str, since: std::time::SystemTime) -> Option<Duration> {
    let t = text.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut parts = time.split(':');
    let (h, min) = (
        parts.next()?.parse::<i64>().ok()?,
        parts.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = parts.next()?.parse().ok()?;
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60;
    let at = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(secs).ok()?)
        + Duration::from_secs_f64(sec);
    at.duration_since(since).ok()
}

/// How long the mesh gets, once the traffic stopped, to come back to its baseline: a proxy
/// restarted moments before the end closes the connections it took over beside its own as their
/// last tunnels end (`hbone::Pool::adopt`), and processes and sockets take a moment to go.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);

/// Samples the mesh every second until it is back to `baseline` (at least 5 s after the
/// traffic stopped, at most [`SETTLE_LIMIT`]): the last sample and what still differs.
fn settle(
    config: &Config,
    baseline: &leaks::Sample,
) -> Result<(leaks::Sample, Vec<String>), Error> {
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    loop {
        let end = leaks::sample(config, &mesh::load(config)?);
        let leaks = leaks::leaks(baseline, &end);
        if leaks.is_empty() || start.elapsed() >= SETTLE_LIMIT {
            return Ok((end, leaks));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_ceiling_is_the_ephemeral_range_over_the_time_wait() {
        assert_eq!(ports_per_second("32768\t60999\n"), Some(235));
        assert_eq!(ports_per_second("1024 65535"), Some(537));
        assert_eq!(ports_per_second("60999 32768"), None);
        assert_eq!(ports_per_second("garbage"), None);
    }

    #[test]
    fn fault_lists_parse_and_unknown_names_are_refused() {
        assert_eq!(Fault::parse_list("all").unwrap().len(), Fault::ALL.len());
        assert!(Fault::parse_list("none").unwrap().is_empty());
        assert_eq!(
            Fault::parse_list("policy,proxy-kill,policy").unwrap(),
            vec![Fault::Policy, Fault::ProxyKill]
        );
        let e = Fault::parse_list("policy,meteor").unwrap_err();
        assert!(e.contains("\"meteor\"") && e.contains("proxy-kill"), "{e}");
    }

    #[test]
    fn log_times_are_read_against_the_soak_start() {
        let since = std::time::UNIX_EPOCH + Duration::from_secs(1_796_634_000); // 2026-12-07T09:00:00Z
        let at = humantime_since("2026-12-07T09:01:02.500000Z", since).unwrap();
        assert_eq!(at, Duration::from_millis(62_500));
        assert!(humantime_since("2026-12-07T08:59:59Z", since).is_none());
        assert!(humantime_since("yesterday", since).is_none());
    }

    /// A report with one wrong connection, one leak and one fault.
    pub(super) fn report() -> Report {
        Report {
            connections: 10,
            served: 8,
            denied: 2,
            excused: 0,
            wrong: [("denied_served".to_owned(), 1)].into(),
            wrong_examples: Vec::new(),
            wrong_times: Vec::new(),
            leaks: vec!["netns: 9 -> 10".into()],
            faults: vec![(1.0, "policy".into(), 9.0)],
            timeline: Vec::new(),
            baseline: leaks::Sample::default(),
            end: leaks::Sample::default(),
        }
    }

    #[test]
    fn the_summary_line_counts_by_kind() {
        let report = report();
        assert_eq!(
            report.summary(),
            "soak: 10 connections, 1 wrong (denied_served 1), 1 leaks, 1 faults injected"
        );
        assert!(!report.passed());
    }
}
