//! What Istio's `ztunnel` chart gives the container, read as Istio's ztunnel reads it, so that
//! the chart works with only the image swapped: the argument `ztunnel`, control-plane addresses
//! without a scheme, the projected token and the mesh root at their default paths, the cluster
//! id, the xDS node id and metadata from the downward API, the drain from the pod's termination
//! grace period and the worker threads from its CPU limit.
//!
//! Each rule is a plain function of its inputs, tested here; `args.rs` names the flags and
//! environment variables and `mod.rs` applies them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The projected service-account token (audience `istio-ca`) the chart mounts, sent as the
/// bearer token on xDS and CA calls when `AUTH_TOKEN` names no other file.
pub(crate) const DEFAULT_TOKEN: &str = "/var/run/secrets/tokens/istio-token";

/// The mesh's root (the `istio-ca-root-cert` ConfigMap) the chart mounts, used when
/// `CA_ROOT_CA` / `XDS_ROOT_CA` name no other.
pub(crate) const DEFAULT_ROOT: &str = "/var/run/secrets/istio/root-cert.pem";

/// The cluster id when neither `ISTIO_META_CLUSTER_ID` nor `CLUSTER_ID` gives one.
pub(crate) const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// The drain when neither `CONNECTION_TERMINATION_DEADLINE` nor
/// `TERMINATION_GRACE_PERIOD_SECONDS` gives one.
pub(crate) const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

/// The most worker threads the proxy runs.
pub(crate) const MAX_WORKER_THREADS: u16 = 256;

/// The environment variables that carry node metadata: each `ISTIO_META_<KEY>` is sent as
/// `<KEY>`, as Istio's ztunnel sends it.
pub(crate) const META_PREFIX: &str = "ISTIO_META_";

/// A control-plane address as Istio's chart writes it (`istiod.istio-system.svc:15012`, no
/// scheme: TLS implied) or with an explicit `https://` or `http://`, as a URL.
pub(crate) fn control_plane_url(address: &str) -> Result<String, String> {
    let address = address.trim();
    if address.is_empty() {
        return Err("empty".into());
    }
    if address.starts_with("https://") || address.starts_with("http://") {
        return Ok(address.to_owned());
    }
    if let Some((scheme, _)) = address.split_once("://") {
        return Err(format!(
            "scheme {scheme:?} is not https or http (an address without a scheme is https, as Istio's chart writes it)"
        ));
    }
    if address.contains('/') {
        return Err("expected host:port (or a URL with https:// or http://)".into());
    }
    Ok(format!("https://{address}"))
}

/// The cluster id: `ISTIO_META_CLUSTER_ID` (Istio's chart), else `CLUSTER_ID`, else
/// `Kubernetes`. An empty value counts as unset.
pub(crate) fn cluster_id(istio_meta: Option<&str>, plain: Option<&str>) -> String {
    [istio_meta, plain]
        .into_iter()
        .flatten()
        .find(|v| !v.is_empty())
        .unwrap_or(DEFAULT_CLUSTER_ID)
        .to_owned()
}

/// How long the proxy drains on SIGTERM: `CONNECTION_TERMINATION_DEADLINE` when given, else the
/// pod's `TERMINATION_GRACE_PERIOD_SECONDS` less 5 s (less 1 s when it is 10 s or shorter, at
/// least 1 s), so the proxy ends its connections itself before the kubelet kills it; else 5 s.
pub(crate) fn drain_deadline(explicit: Option<Duration>, grace_seconds: Option<u64>) -> Duration {
    if let Some(d) = explicit {
        return d;
    }
    match grace_seconds {
        Some(g) if g > 10 => Duration::from_secs(g - 5),
        Some(g) => Duration::from_secs(g.saturating_sub(1).max(1)),
        None => DEFAULT_DRAIN,
    }
}

/// `ZTUNNEL_WORKER_THREADS`: a number, a percentage of the CPUs, or `0` for all of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum WorkerThreads {
    /// This many (`0`: one per CPU).
    Count(u16),
    /// This share of the CPUs, rounded up, at least one.
    Percent(f64),
}

/// Parses `ZTUNNEL_WORKER_THREADS`: `N` (1 to 256, or 0 for one per CPU) or `P%` (0 < P <= 100).
pub(crate) fn parse_worker_threads(text: &str) -> Result<WorkerThreads, String> {
    if let Some(percent) = text.strip_suffix('%') {
        let p: f64 = percent
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a percentage"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(format!(
                "{text:?}: a percentage must be above 0 and at most 100"
            ));
        }
        return Ok(WorkerThreads::Percent(p));
    }
    let n: u16 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of threads or a percentage"))?;
    if n > MAX_WORKER_THREADS {
        return Err(format!("{n} is more than {MAX_WORKER_THREADS} threads"));
    }
    Ok(WorkerThreads::Count(n))
}

/// Parses a Kubernetes CPU quantity (`ZTUNNEL_CPU_LIMIT`, the container's `limits.cpu` from
/// the downward API: `2`, `1.5`, `500m`) as whole CPUs, rounded up.
pub(crate) fn parse_cpu_quantity(text: &str) -> Result<u32, String> {
    let cores = match text.trim().strip_suffix('m') {
        Some(millis) => millis.parse::<f64>().map(|m| m / 1000.0),
        None => text.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a CPU quantity (e.g. 2, 1.5, 500m)"))?;
    if !(cores.is_finite() && cores > 0.0) {
        return Err(format!("{text:?}: a CPU quantity must be above 0"));
    }
    Ok(cores.ceil().min(f64::from(u32::MAX)) as u32)
}

/// The data path's threads: as `ZTUNNEL_WORKER_THREADS` says, counted against `cpus` (the CPU
/// limit, else the CPUs this process may run on); when unset, a quarter of `cpus`, rounded up,
/// and at least 2 (Istio's ztunnel's default). Never more than [`MAX_WORKER_THREADS`].
pub(crate) fn worker_threads(setting: Option<WorkerThreads>, cpus: u32) -> u16 {
    let cpus = f64::from(cpus.max(1));
    let n = match setting {
        Some(WorkerThreads::Count(0)) => cpus,
        Some(WorkerThreads::Count(n)) => f64::from(n),
        Some(WorkerThreads::Percent(p)) => (cpus * p / 100.0).ceil().max(1.0),
        None => (cpus * 0.25).ceil().max(2.0),
    };
    n.min(f64::from(MAX_WORKER_THREADS)) as u16
}

/// Who this proxy is, from the downward API (`POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`,
/// `NODE_NAME`); fields may be empty outside Kubernetes.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProxyPod<'a> {
    /// The proxy's pod name.
    pub(crate) name: &'a str,
    /// Its namespace (`istio-system`, or `kube-system` in the OpenShift and GKE profiles).
    pub(crate) namespace: &'a str,
    /// Its IP (the node's, for a host-network DaemonSet).
    pub(crate) ip: &'a str,
    /// The node it runs on.
    pub(crate) node: &'a str,
}

/// The xDS node id and metadata Istio's ztunnel sends: the id
/// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` (istiod takes the proxy's
/// namespace from it and checks it against the token's), and the metadata `NAME`, `NAMESPACE`,
/// `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID`, then every `ISTIO_META_<KEY>` of `vars` as
/// `<KEY>` (these override the others, as `ISTIO_META_CLUSTER_ID` sets `CLUSTER_ID`). Outside
/// Kubernetes the pod is named after the node (`ztunnel` without one), the namespace is
/// `istio-system` and the IP `0.0.0.0`.
pub(crate) fn xds_node(
    pod: &ProxyPod<'_>,
    cluster_id: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> (String, BTreeMap<String, String>) {
    let pick = |v: &str, default: &str| {
        if v.is_empty() {
            default.to_owned()
        } else {
            v.to_owned()
        }
    };
    let name = pick(
        pod.name,
        if pod.node.is_empty() {
            "ztunnel"
        } else {
            pod.node
        },
    );
    let namespace = pick(pod.namespace, "istio-system");
    let ip = pick(pod.ip, "0.0.0.0");
    let id = format!("ztunnel~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local");
    let mut metadata = BTreeMap::from([
        ("NAME".to_owned(), name),
        ("NAMESPACE".to_owned(), namespace),
        ("INSTANCE_IPS".to_owned(), ip),
        ("NODE_NAME".to_owned(), pod.node.to_owned()),
        ("CLUSTER_ID".to_owned(), cluster_id.to_owned()),
    ]);
    for (key, value) in vars {
        if let Some(key) = key.strip_prefix(META_PREFIX)
            && !key.is_empty()
        {
            metadata.insert(key.to_owned(), value);
        }
    }
    (id, metadata)
}

/// Whether `path` names an existing file (the chart's defaults are used only when mounted).
pub(crate) fn mounted(path: &str) -> bool {
    Path::new(path).is_file()
}

/// Where a root for the control plane's TLS (and, from the CA's, the mesh's trust) comes from:
/// `CA_ROOT_CA` / `XDS_ROOT_CA` name a file, say `SYSTEM` (the system's trust store) or hold the
/// PEM itself, as Istio's ztunnel reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootSource {
    /// A PEM file.
    File(std::path::PathBuf),
    /// The system's trust store.
    System,
    /// PEM given in the variable itself.
    Inline(String),
}

/// Reads a root setting; unset, the chart's mount at `default` when it is there. A value that
/// is neither an existing file, `SYSTEM` nor PEM is an error (Istio's ztunnel would take it as
/// PEM and fail later, less clearly).
pub(crate) fn root_source(
    value: Option<&str>,
    default: &str,
) -> Result<Option<RootSource>, String> {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(mounted(default).then(|| RootSource::File(default.into())));
    };
    if value == "SYSTEM" {
        return Ok(Some(RootSource::System));
    }
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(Some(RootSource::Inline(value.to_owned())));
    }
    if Path::new(value).is_file() {
        return Ok(Some(RootSource::File(value.into())));
    }
    Err(format!(
        "{value:?} is not a readable file, SYSTEM or PEM (-----BEGIN CERTIFICATE-----)"
    ))
}

/// The bearer token file: `AUTH_TOKEN` when given, else the chart's projected token at
/// `default` when it is mounted, else none.
pub(crate) fn token_file(value: Option<&Path>, default: &str) -> Option<std::path::PathBuf> {
    match value {
        Some(path) => Some(path.to_owned()),
        None => mounted(default).then(|| default.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_scheme_are_https_and_others_are_refused_by_name() {
        assert_eq!(
            control_plane_url("istiod.istio-system.svc:15012").unwrap(),
            "https://istiod.istio-system.svc:15012"
        );
        assert_eq!(
            control_plane_url("http://127.0.0.1:15010").unwrap(),
            "http://127.0.0.1:15010"
        );
        assert_eq!(
            control_plane_url(" https://istiod:15012 ").unwrap(),
            "https://istiod:15012"
        );
        assert!(control_plane_url("").unwrap_err().contains("empty"));
        assert!(
            control_plane_url("grpc://istiod:15012")
                .unwrap_err()
                .contains("\"grpc\"")
        );
        assert!(
            control_plane_url("istiod:15012/x")
                .unwrap_err()
                .contains("host:port")
        );
    }

    #[test]
    fn the_cluster_id_prefers_istios_variable() {
        assert_eq!(cluster_id(Some("east"), Some("west")), "east");
        assert_eq!(cluster_id(Some(""), Some("west")), "west");
        assert_eq!(cluster_id(None, None), "Kubernetes");
    }

    #[test]
    fn the_drain_follows_the_grace_period_less_a_margin() {
        let s = Duration::from_secs;
        assert_eq!(drain_deadline(Some(s(7)), Some(30)), s(7));
        assert_eq!(drain_deadline(None, Some(30)), s(25));
        assert_eq!(drain_deadline(None, Some(11)), s(6));
        assert_eq!(drain_deadline(None, Some(10)), s(9));
        assert_eq!(drain_deadline(None, Some(1)), s(1));
        assert_eq!(drain_deadline(None, Some(0)), s(1));
        assert_eq!(drain_deadline(None, None), s(5));
    }

    #[test]
    fn worker_threads_from_the_setting_and_the_cpu_limit() {
        assert_eq!(worker_threads(None, 2), 2);
        assert_eq!(worker_threads(None, 16), 4);
        assert_eq!(worker_threads(None, 9), 3);
        assert_eq!(worker_threads(Some(WorkerThreads::Count(1)), 16), 1);
        assert_eq!(worker_threads(Some(WorkerThreads::Count(0)), 6), 6);
        assert_eq!(worker_threads(Some(WorkerThreads::Percent(50.0)), 8), 4);
        assert_eq!(worker_threads(Some(WorkerThreads::Percent(10.0)), 4), 1);
        assert_eq!(worker_threads(Some(WorkerThreads::Count(0)), 1000), 256);
        assert_eq!(parse_worker_threads("4").unwrap(), WorkerThreads::Count(4));
        assert_eq!(
            parse_worker_threads("30%").unwrap(),
            WorkerThreads::Percent(30.0)
        );
        for bad in ["", "x", "-1", "0%", "101%", "257"] {
            assert!(parse_worker_threads(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cpu_quantity("2").unwrap(), 2);
        assert_eq!(parse_cpu_quantity("1.5").unwrap(), 2);
        assert_eq!(parse_cpu_quantity("500m").unwrap(), 1);
        assert_eq!(parse_cpu_quantity("2500m").unwrap(), 3);
        for bad in ["", "0", "-1", "two", "NaN", "inf"] {
            assert!(parse_cpu_quantity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_node_id_and_metadata_are_istios() {
        let pod = ProxyPod {
            name: "ztunnel-x7k2p",
            namespace: "kube-system",
            ip: "10.0.3.7",
            node: "worker-3",
        };
        let vars = [
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_META_", "ignored"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let (id, meta) = xds_node(&pod, "east", vars);
        assert_eq!(
            id,
            "ztunnel~10.0.3.7~ztunnel-x7k2p.kube-system~kube-system.svc.cluster.local"
        );
        let expect = [
            ("CLUSTER_ID", "east"),
            ("DNS_CAPTURE", "true"),
            ("INSTANCE_IPS", "10.0.3.7"),
            ("NAME", "ztunnel-x7k2p"),
            ("NAMESPACE", "kube-system"),
            ("NODE_NAME", "worker-3"),
        ];
        let got: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, expect);
        // Outside Kubernetes: named after the node.
        let bare = ProxyPod {
            node: "node-a",
            ..ProxyPod::default()
        };
        let (id, _) = xds_node(&bare, "Kubernetes", []);
        assert_eq!(
            id,
            "ztunnel~0.0.0.0~node-a.istio-system~istio-system.svc.cluster.local"
        );
    }

    #[test]
    fn roots_and_tokens_come_from_a_file_system_or_the_charts_mounts() {
        let dir = std::env::temp_dir().join(format!("zt-istio-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root-cert.pem");
        let token = dir.join("istio-token");
        let (root_s, token_s) = (root.to_str().unwrap(), token.to_str().unwrap());
        // Not mounted: nothing.
        assert_eq!(root_source(None, root_s).unwrap(), None);
        assert_eq!(token_file(None, token_s), None);
        std::fs::write(&root, "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(&token, "t").unwrap();
        assert_eq!(
            root_source(None, root_s).unwrap(),
            Some(RootSource::File(root.clone()))
        );
        assert_eq!(token_file(None, token_s), Some(token.clone()));
        let other = Path::new("/elsewhere/token");
        assert_eq!(token_file(Some(other), token_s), Some(other.to_owned()));
        assert_eq!(
            root_source(Some("SYSTEM"), root_s).unwrap(),
            Some(RootSource::System)
        );
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            root_source(Some(pem), root_s).unwrap(),
            Some(RootSource::Inline(pem.to_owned()))
        );
        assert_eq!(
            root_source(Some(root_s), "/nowhere").unwrap(),
            Some(RootSource::File(root.clone()))
        );
        let err = root_source(Some("/no/such/root.pem"), root_s).unwrap_err();
        assert!(
            err.contains("/no/such/root.pem") && err.contains("SYSTEM"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
