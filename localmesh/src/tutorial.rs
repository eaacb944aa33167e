//! The ambient walkthrough, replayed on a local mesh with real traffic, each step checked:
//!
//! 1. `sleep`, `notsleep`, `web-api` -> `recommendation` -> `purchase-history` in `default`, and
//!    an ingress gateway in `istio-system`, on two nodes; not in the mesh yet (calls go direct).
//! 2. `label namespace default istio.io/dataplane-mode=ambient`: the node agents add each pod to
//!    ambient; no app restarts (same PIDs).
//! 3. `sleep` resolves `web-api.default.svc.cluster.local` through its resolver: the node agent's
//!    DNS capture sends the query to the node proxy, which answers with the service's address.
//!    Then `sleep` calls `http://web-api:8080/` 100 times: all succeed through the chain; both
//!    nodes' access logs show the SPIFFE identities; the L4 metrics count the bytes. `sleep`
//!    calls `http://web-api:8080/whoami`: web-api sees the connection come from sleep's own pod
//!    address (the node proxy connects to the app from the client's address).
//! 4. `allow-nothing`: the calls fail, and so does the request through the gateway.
//! 5. The three ALLOW policies: `sleep` and the gateway get through again, `notsleep` is denied,
//!    and the proxy logs the denial with the source identity and why.
//!
//! Everything is made at the start and removed at the end, whatever happened.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::mesh::{self, Progress};
use crate::plan::{Mesh, parse_docs};
use crate::{Config, Error};

/// The walkthrough's workloads.
pub const APPS: &str = include_str!("../walkthrough/apps.yaml");
/// Step 4's policy.
pub const ALLOW_NOTHING: &str = include_str!("../walkthrough/allow-nothing.yaml");
/// Step 5's policies.
pub const ALLOW_CHAIN: &str = include_str!("../walkthrough/allow-chain.yaml");

const SLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const NOTSLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/notsleep";
const WEB_API_ID: &str = "spiffe://cluster.local/ns/default/sa/web-api";
const CHAIN: &str = "web-api -> recommendation -> purchase-history\n";

/// Runs the whole walkthrough; the mesh is removed at the end in every case.
pub fn run(config: &Config, cancel: &AtomicBool, out: Progress<'_>) -> Result<(), Error> {
    let started = Instant::now();
    let result = steps(config, cancel, out);
    if let Err(Error::AlreadyRunning { .. }) = &result {
        // Someone else's mesh: leave it alone.
        return result;
    }
    out("removing the mesh");
    let removed = mesh::down(config, &mut |_| {});
    match (&result, removed) {
        (Ok(()), Ok(())) => out(&format!(
            "tutorial OK: every step observed as expected ({:.0} s)",
            started.elapsed().as_secs_f64()
        )),
        (Ok(()), Err(e)) => return Err(e),
        (Err(_), _) => {}
    }
    result
}

/// One in-pod HTTP exchange's outcome: status, or why there was none.
type Outcome = Result<crate::app::Answer, String>;

/// Sends `n` GETs of `url` (`host` as the Host header) from inside pod `pod`'s network
/// namespace, sequentially.
fn from_pod(
    config: &Config,
    mesh: &Mesh,
    pod: &str,
    target: SocketAddr,
    host: &str,
    n: usize,
) -> Result<Vec<Outcome>, Error> {
    get_from_pod(config, mesh, pod, (target, host, "/"), n)
}

/// `n` GETs of (address, Host, path) from inside pod `pod`'s network namespace.
fn get_from_pod(
    config: &Config,
    mesh: &Mesh,
    pod: &str,
    (target, host, request_path): (SocketAddr, &str, &str),
    n: usize,
) -> Result<Vec<Outcome>, Error> {
    let (_, netns) = mesh::find_pod(config, mesh, pod)?;
    let host = host.to_owned();
    let request_path = request_path.to_owned();
    crate::net::in_netns(&netns, move || {
        Ok((0..n)
            .map(|_| blocking_get(target, &host, &request_path))
            .collect())
    })
    .map_err(Error::Usage)
}

/// Asks pod `pod`'s nameserver (its `resolv.conf`'s), on port 53 from inside the pod's network
/// namespace as its resolver would, for the `A` records of `name`: the server asked and the
/// addresses answered.
fn resolve_in_pod(
    config: &Config,
    mesh: &Mesh,
    pod: &str,
    name: &str,
) -> Result<(std::net::IpAddr, Vec<std::net::IpAddr>), Error> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let (plan, netns) = mesh::find_pod(config, mesh, pod)?;
    let server: std::net::IpAddr = mesh
        .resolv_conf(&plan.placement)
        .lines()
        .find_map(|l| l.strip_prefix("nameserver "))
        .and_then(|ip| ip.trim().parse().ok())
        .ok_or_else(|| Error::Usage(format!("pod {pod} has no nameserver")))?;
    let mut query = Message::new();
    query
        .set_id(0x2929)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(format!("{name}."))
                .map_err(|e| Error::Usage(format!("{name}: {e}")))?,
            RecordType::A,
        ));
    let bytes = query
        .to_vec()
        .map_err(|e| Error::Usage(format!("encoding the query: {e}")))?;
    let reply = crate::net::in_netns(&netns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        socket
            .send_to(&bytes, (server, 53))
            .map_err(|e| format!("sending to {server}:53: {e}"))?;
        let mut buf = vec![0u8; 65535];
        let (n, _) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("no answer from {server}:53: {e}"))?;
        Ok(buf[..n].to_vec())
    })
    .map_err(Error::Usage)?;
    let reply = Message::from_vec(&reply)
        .map_err(|e| Error::Usage(format!("the DNS answer does not parse: {e}")))?;
    let addresses = reply
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    Ok((server, addresses))
}

fn blocking_get(target: SocketAddr, host: &str, path: &str) -> Outcome {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(crate::app::request(host, path).as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes)
        .map_err(|e| format!("receive: {e}"))?;
    crate::app::parse_response(&bytes)
}

fn ok_count(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, Ok(a) if a.status == 200 && a.body == CHAIN))
        .count()
}

fn first_failure(outcomes: &[Outcome]) -> String {
    outcomes
        .iter()
        .find_map(|o| match o {
            Ok(a) if a.status == 200 && a.body == CHAIN => None,
            Ok(a) => Some(format!("HTTP {}: {}", a.status, a.body.trim())),
            Err(e) => Some(e.clone()),
        })
        .unwrap_or_else(|| "none".into())
}

/// Polls `f` for up to 20 s until it is true (a policy push takes a moment to arrive).
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn service_addr(mesh: &Mesh, ns: &str, name: &str, port: u16) -> Result<SocketAddr, Error> {
    mesh.services()
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
        .map(|s| SocketAddr::from((s.vip, port)))
        .ok_or_else(|| Error::Usage(format!("no service {ns}/{name}")))
}

fn app_pids(config: &Config, mesh: &Mesh) -> Vec<(String, String)> {
    mesh.pods()
        .iter()
        .filter(|p| p.placement.namespace == "default")
        .map(|p| {
            let ns = Mesh::pod_netns(&config.prefix, &p.placement);
            let pids = crate::net::run("ip", &["netns", "pids", &ns]).unwrap_or_default();
            (
                p.placement.name.clone(),
                pids.split_whitespace().collect::<Vec<_>>().join(","),
            )
        })
        .collect()
}

fn log_lines(config: &Config, part: &str, node: &str, all: &[&str]) -> Vec<String> {
    std::fs::read_to_string(config.log_file(part, Some(node)))
        .unwrap_or_default()
        .lines()
        .filter(|l| all.iter().all(|w| l.contains(w)))
        .map(str::to_owned)
        .collect()
}

fn check(step: u8, ok: bool, what: impl FnOnce() -> String) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(Error::Check { step, what: what() })
    }
}

fn steps(config: &Config, cancel: &AtomicBool, out: Progress<'_>) -> Result<(), Error> {
    out("step 1: two nodes, the walkthrough's workloads, not in the mesh yet");
    let docs = parse_docs(APPS, "localmesh/walkthrough/apps.yaml")?;
    let mesh = mesh::up(config, docs, cancel, out)?;
    for p in mesh.pods() {
        out(&format!(
            "  pod {}/{} on {} at {} (service account {})",
            p.placement.namespace,
            p.placement.name,
            p.placement.node,
            p.placement.ip,
            p.service_account
        ));
    }
    let gateway = mesh
        .pod("istio-system", "istio-ingressgateway")
        .ok_or_else(|| Error::Usage("no gateway pod".into()))?;
    let gateway_addr = SocketAddr::from((gateway.placement.ip, 80));
    out(&format!("  GATEWAY_IP={}", gateway.placement.ip));
    let web_api = service_addr(&mesh, "default", "web-api", 8080)?;
    // The apps have just started: wait for the chain to answer once.
    eventually(|| {
        from_pod(config, &mesh, "sleep", web_api, "web-api", 1).is_ok_and(|o| ok_count(&o) == 1)
    });
    let direct = from_pod(config, &mesh, "sleep", web_api, "web-api", 5)?;
    out(&format!(
        "  sleep -> http://web-api:8080/ outside the mesh: {}/5 answered \"{}\"",
        ok_count(&direct),
        CHAIN.trim()
    ));
    check(1, ok_count(&direct) == 5, || {
        format!("calls outside the mesh failed: {}", first_failure(&direct))
    })?;
    let pids_before = app_pids(config, &mesh);

    out("step 2: ztunnel local label namespace default istio.io/dataplane-mode=ambient");
    mesh::label(
        config,
        "default",
        &["istio.io/dataplane-mode=ambient".into()],
        &mut |_| {},
    )?;
    let default_pods: Vec<_> = mesh
        .pods()
        .into_iter()
        .filter(|p| p.placement.namespace == "default")
        .collect();
    let all_added = eventually(|| {
        default_pods.iter().all(|p| {
            !log_lines(
                config,
                "node-agent",
                &p.placement.node,
                &[&format!("Adding pod '{}/default'", p.placement.name)],
            )
            .is_empty()
        }) && config.nodes.iter().all(|n| {
            mesh::admin_dump(config, n).is_some_and(|d| {
                d["pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|p| p["certificateExpiry"].is_string())
            })
        })
    });
    for p in &default_pods {
        for line in log_lines(
            config,
            "node-agent",
            &p.placement.node,
            &[&format!("Adding pod '{}/default'", p.placement.name)],
        )
        .iter()
        .take(1)
        {
            out(&format!("  {}: {}", p.placement.node, excerpt(line)));
        }
    }
    check(2, all_added, || {
        "not every pod was added to ambient within 20 s".into()
    })?;
    let pids_after = app_pids(config, &mesh);
    out(&format!(
        "  app processes unchanged (no restart): {}",
        pids_before == pids_after
    ));
    check(2, pids_before == pids_after, || {
        format!("app processes changed: {pids_before:?} -> {pids_after:?}")
    })?;

    out("step 3: sleep resolves web-api.default.svc.cluster.local through its node proxy");
    let asked = "web-api.default.svc.cluster.local";
    let resolved = resolve_in_pod(config, &mesh, "sleep", asked)?;
    out(&format!(
        "  sleep's resolver ({}:53) answered {asked} -> {} (the service's address is {})",
        resolved.0,
        resolved
            .1
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        web_api.ip()
    ));
    check(3, resolved.1 == [web_api.ip()], || {
        format!(
            "the DNS answer was {:?}, not the service's address",
            resolved.1
        )
    })?;
    out("step 3: sleep sends 100 requests to http://web-api:8080/");
    let web_node = mesh
        .pod("default", "web-api")
        .map(|p| p.placement.node)
        .unwrap_or_default();
    let sleep_node = mesh
        .pod("default", "sleep")
        .map(|p| p.placement.node)
        .unwrap_or_default();
    let ready = eventually(|| {
        from_pod(config, &mesh, "sleep", web_api, "web-api", 1).is_ok_and(|o| ok_count(&o) == 1)
    });
    let outcomes = from_pod(config, &mesh, "sleep", web_api, "web-api", 100)?;
    out(&format!(
        "  {}/100 succeeded: \"{}\"",
        ok_count(&outcomes),
        CHAIN.trim()
    ));
    check(3, ready && ok_count(&outcomes) == 100, || {
        format!(
            "{}/100 succeeded; first failure: {}",
            ok_count(&outcomes),
            first_failure(&outcomes)
        )
    })?;
    let lines = |node: &str, direction: &str| {
        let direction = format!("direction=\"{direction}\"");
        log_lines(config, "ztunnel", node, &[&direction, SLEEP_ID, WEB_API_ID])
    };
    // A connection is logged when it ends, a moment after the client saw its answer.
    eventually(|| {
        lines(&sleep_node, "outbound").len() >= 100 && lines(&web_node, "inbound").len() >= 100
    });
    let client_side = lines(&sleep_node, "outbound");
    let server_side = lines(&web_node, "inbound");
    out(&format!(
        "  {sleep_node} access log ({} lines), e.g.: {}",
        client_side.len(),
        client_side.first().map(|l| excerpt(l)).unwrap_or_default()
    ));
    out(&format!(
        "  {web_node} access log ({} lines), e.g.: {}",
        server_side.len(),
        server_side.first().map(|l| excerpt(l)).unwrap_or_default()
    ));
    check(
        3,
        client_side.len() >= 100 && server_side.len() >= 100,
        || {
            format!(
                "access logs: {} outbound lines on {sleep_node}, {} inbound on {web_node}",
                client_side.len(),
                server_side.len()
            )
        },
    )?;
    let i = mesh.node_index(&web_node).unwrap_or(0);
    let metrics = mesh::http_get(
        SocketAddr::from((mesh.node_ip(i), common::ports::STATS)),
        "/metrics",
    )
    .map(|(_, body)| body)
    .unwrap_or_default();
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_workload=\"sleep\"")
                && l.contains("destination_workload=\"web-api\"")
                && (l.contains("bytes_total") || l.contains("opened_total"))
        })
        .collect();
    for l in &counted {
        out(&format!("  {web_node} metric: {l}"));
    }
    let value = |name: &str| {
        counted
            .iter()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    check(
        3,
        value("istio_tcp_received_bytes_total") > 0
            && value("istio_tcp_sent_bytes_total") > 0
            && value("istio_tcp_connections_opened_total") >= 100,
        || format!("metrics do not count the traffic: {counted:?}"),
    )?;

    out("step 3: sleep calls http://web-api:8080/whoami: whom does web-api see?");
    let pod_ip = |name: &str| {
        mesh.pod("default", name)
            .map(|p| std::net::IpAddr::from(p.placement.ip))
    };
    let (sleep_ip, web_api_ip) = (pod_ip("sleep"), pod_ip("web-api"));
    let whoami = get_from_pod(config, &mesh, "sleep", (web_api, "web-api", "/whoami"), 1)?;
    let seen = match whoami.first() {
        Some(Ok(a)) if a.status == 200 => a.body.trim().to_owned(),
        Some(Ok(a)) => format!("HTTP {}: {}", a.status, a.body.trim()),
        Some(Err(e)) => e.clone(),
        None => String::new(),
    };
    let seen_ip = seen
        .strip_prefix("remote=")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.ip());
    out(&format!(
        "  web-api answered \"{seen}\" (sleep is {}, web-api itself {})",
        sleep_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        web_api_ip.map(|ip| ip.to_string()).unwrap_or_default(),
    ));
    check(3, seen_ip.is_some() && seen_ip == sleep_ip, || {
        format!("web-api did not see sleep's own address: {seen}")
    })?;

    out("step 4: ztunnel local apply -f allow-nothing.yaml");
    let (denied, outcomes) = apply_then_call(
        config,
        &mesh,
        ALLOW_NOTHING,
        "allow-nothing.yaml",
        web_api,
        false,
    )?;
    out(&format!(
        "  sleep -> web-api: {}/100 succeeded (denied: {})",
        ok_count(&outcomes),
        first_failure(&outcomes)
    ));
    check(4, denied && ok_count(&outcomes) == 0, || {
        format!("{}/100 still succeeded", ok_count(&outcomes))
    })?;
    let through_gateway = gateway_get(gateway_addr, out);
    check(
        4,
        !matches!(&through_gateway, Ok(a) if a.status == 200),
        || "the gateway still reached web-api".into(),
    )?;

    out(
        "step 5: ztunnel local apply -f allow-chain.yaml (web-api from sleep and the gateway, the chain)",
    );
    let (allowed, outcomes) = apply_then_call(
        config,
        &mesh,
        ALLOW_CHAIN,
        "allow-chain.yaml",
        web_api,
        true,
    )?;
    out(&format!(
        "  sleep -> web-api: {}/100 succeeded",
        ok_count(&outcomes)
    ));
    check(5, allowed && ok_count(&outcomes) == 100, || {
        format!(
            "{}/100 succeeded; first failure: {}",
            ok_count(&outcomes),
            first_failure(&outcomes)
        )
    })?;
    let through_gateway = gateway_get(gateway_addr, out);
    check(
        5,
        matches!(&through_gateway, Ok(a) if a.status == 200 && a.body == CHAIN),
        || format!("the gateway: {}", describe(&through_gateway)),
    )?;
    let outcomes = from_pod(config, &mesh, "notsleep", web_api, "web-api", 20)?;
    out(&format!(
        "  notsleep -> web-api: {}/20 succeeded",
        ok_count(&outcomes)
    ));
    check(5, ok_count(&outcomes) == 0, || {
        "notsleep got through".into()
    })?;
    let denial = log_lines(
        config,
        "ztunnel",
        &web_node,
        &["connection denied by policy", NOTSLEEP_ID],
    );
    out(&format!(
        "  {web_node}: {}",
        denial.first().map(|l| excerpt(l)).unwrap_or_default()
    ));
    check(5, !denial.is_empty(), || {
        "no denial logged for notsleep".into()
    })?;
    Ok(())
}

/// `curl -H "Host: istioexplained.io" http://GATEWAY_IP/` from the host, reported.
fn gateway_get(addr: SocketAddr, out: Progress<'_>) -> Outcome {
    let outcome = blocking_get(addr, "istioexplained.io", "/");
    out(&format!(
        "  curl -H \"Host: istioexplained.io\" http://{}/ -> {}",
        addr.ip(),
        describe(&outcome)
    ));
    outcome
}

/// Applies a policy file, waits (up to 20 s) until sleep's calls to `target` succeed or fail as
/// `succeed` says, then makes 100 calls. Returns whether the wait saw the change, and the calls.
fn apply_then_call(
    config: &Config,
    mesh: &Mesh,
    text: &str,
    name: &str,
    target: SocketAddr,
    succeed: bool,
) -> Result<(bool, Vec<Outcome>), Error> {
    mesh::apply(config, parse_docs(text, name)?, false, &mut |_| {})?;
    let changed = eventually(|| {
        from_pod(config, mesh, "sleep", target, "web-api", 1)
            .is_ok_and(|o| (ok_count(&o) == 1) == succeed)
    });
    Ok((
        changed,
        from_pod(config, mesh, "sleep", target, "web-api", 100)?,
    ))
}

fn describe(o: &Outcome) -> String {
    match o {
        Ok(a) => format!("HTTP {} {}", a.status, a.body.trim()),
        Err(e) => format!("failed: {e}"),
    }
}

/// A log line without its timestamp, shortened.
fn excerpt(line: &str) -> String {
    let text = line.split_once("Z ").map_or(line, |(_, rest)| rest).trim();
    if text.chars().count() > 400 {
        format!("{}...", text.chars().take(400).collect::<String>())
    } else {
        text.to_owned()
    }
}
