//! The plan, pure: documents, placement, addresses, services, and the steps and processes of a mesh.

use super::*;

const TEXT: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 2\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      serviceAccountName: web\n      containers: [{name: web, image: ambient.local/http-app, env: [{name: UPSTREAM, value: \"http://db:8080/\"}]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n";

fn mesh() -> Mesh {
    let mut m = Mesh::new([10, 250], &["node-a", "node-b"]);
    m.apply(parse_docs(TEXT, "t").unwrap());
    m
}

#[test]
fn deployments_become_pods_spread_over_nodes_with_stable_addresses() {
    let m = mesh();
    let pods = m.pods();
    assert_eq!(pods.len(), 2);
    assert_eq!(pods[0].placement.node, "node-a");
    assert_eq!(pods[1].placement.node, "node-b");
    assert_eq!(pods[0].placement.ip, Ipv4Addr::new(10, 250, 1, 10));
    assert_eq!(pods[1].placement.ip, Ipv4Addr::new(10, 250, 2, 10));
    assert_eq!(
        pods[0].app,
        App::Http {
            port: 8080,
            upstream: Some("http://db:8080/".into())
        }
    );
    // Re-applying changes nothing; a round trip through JSON neither.
    let mut again = m.clone();
    let changes = again.apply(parse_docs(TEXT, "t").unwrap());
    assert!(changes.iter().any(|c| c.contains("Deployment default/web")));
    assert_eq!(again.placements, m.placements);
    let json = serde_json::to_string(&m).unwrap();
    let back: Mesh = serde_json::from_str(&json).unwrap();
    assert_eq!(back.pods(), m.pods());
}

#[test]
fn services_get_a_vip_endpoints_names_and_rules() {
    let m = mesh();
    let s = &m.services()[0];
    assert_eq!(s.vip, IpAddr::from([10, 96, 0, 10]));
    assert_eq!(s.ports, vec![(80, 8080)]);
    assert_eq!(s.endpoints.len(), 2);
    let hosts = m.hosts_file("default");
    assert!(
        hosts
            .contains("10.96.0.10 web.default.svc.cluster.local web.default.svc web.default web\n"),
        "{hosts}"
    );
    assert!(!m.hosts_file("other").contains(" web\n"));
    let rules = m.service_rules("ZL-SERVICES", false);
    assert!(rules.contains("-A ZL-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.250.1.10:8080\n"), "{rules}");
    assert!(
        rules.contains("--dport 80 -j DNAT --to-destination 10.250.2.10:8080\n"),
        "{rules}"
    );
    let manifests = m.manifests_yaml("zl");
    assert!(
        manifests
            .contains("annotations: {ambient.local/netns: /var/run/netns/zl-pod-default-web-0}"),
        "{manifests}"
    );
    assert!(
        manifests.contains("status: {podIP: \"10.250.1.10\""),
        "{manifests}"
    );
}

#[test]
fn labels_and_deletions_change_the_documents() {
    let mut m = mesh();
    m.label_namespace("default", &["istio.io/dataplane-mode=ambient".into()])
        .unwrap();
    assert!(
        m.manifests_yaml("zl")
            .contains("istio.io/dataplane-mode: ambient")
    );
    m.label_namespace("default", &["istio.io/dataplane-mode-".into()])
        .unwrap();
    assert!(!m.manifests_yaml("zl").contains("dataplane-mode"));
    assert!(m.label_namespace("nope", &["a=b".into()]).is_err());
    assert!(m.label_namespace("default", &["nonsense".into()]).is_err());
    let gone = parse_docs(TEXT, "t").unwrap();
    m.delete(&gone[1..2]);
    assert!(m.pods().is_empty());
    assert!(m.services()[0].endpoints.is_empty());
}

#[test]
fn bad_documents_are_refused_with_their_place() {
    for (text, want) in [
        (
            "kind: Secret\nmetadata: {name: x}\n",
            "document 1: kind Secret is not supported",
        ),
        (
            "---\nkind: Service\nmetadata: {}\n",
            "Service without metadata.name",
        ),
        (
            "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n",
            "`port` between 1 and 65535",
        ),
        (
            "kind: Service\nmetadata: {name: s}\nspec: {clusterIP: banana}\n",
            "not an IP address",
        ),
        (
            "kind: Service\nmetadata: {name: s}\nspec: {clusterIPs: [10.96.0.1, 10.96.0.2]}\n",
            "two addresses of one family",
        ),
        (
            "kind: Service\nmetadata: {name: s}\nspec: {clusterIPs: [fd00::1, x]}\n",
            "clusterIPs entry",
        ),
        (
            "kind: Deployment\nmetadata: {name: d}\nspec: {replicas: 99}\n",
            "replicas must be 0 to 16",
        ),
        (
            "kind: Deployment\nmetadata: {name: d}\nspec: {template: {spec: {containers: [{image: ambient.local/gateway, env: [{name: ROUTES, value: oops}]}]}}}\n",
            "not host=url",
        ),
        ("a: [\n", "not YAML"),
    ] {
        let e = parse_docs(text, "f.yaml").unwrap_err().to_string();
        assert!(e.contains(want) && e.starts_with("f.yaml"), "{text}: {e}");
    }
}

fn config() -> crate::Config {
    let mut c = crate::Config::new("/usr/bin/ztunnel".into());
    c.run_dir = "/run/zt-test".into();
    c.prefix = "zt".into();
    c.nodes = vec!["node-a".into(), "node-b".into(), "node-c".into()];
    c
}

fn ip_args(steps: &[NetStep]) -> Vec<(Option<String>, String)> {
    steps
        .iter()
        .filter_map(|s| match s {
            NetStep::Ip { netns, args } => Some((netns.clone(), args.join(" "))),
            _ => None,
        })
        .collect()
}

#[test]
fn a_node_reaches_the_other_nodes_pods_and_the_host_reaches_its_pods() {
    let c = config();
    let mesh = Mesh::new([10, 250], &["node-a", "node-b", "node-c"]);
    let steps = mesh.node_steps(&c, 1);
    assert_eq!(steps[0], NetStep::Namespace("zt-node-b".into()));
    assert!(steps.contains(&NetStep::Forwarding("zt-node-b".into())));
    let ips = ip_args(&steps);
    let in_node = |args: &str| ips.contains(&(Some("zt-node-b".into()), args.to_owned()));
    assert!(in_node("addr add 10.250.0.11/24 dev eth0"));
    assert!(in_node("addr add 10.250.2.1/24 dev cni0"));
    assert!(in_node("route add 10.250.1.0/24 via 10.250.0.10"));
    assert!(in_node("route add 10.250.3.0/24 via 10.250.0.12"));
    assert!(ips.contains(&(
        None,
        "route add 10.250.2.0/24 via 10.250.0.11 dev zt-host".to_owned()
    )));
    // The pod subnets the routes name are the ones pods get their addresses from.
    assert_eq!(mesh.pod_subnet(1), "10.250.2.0/24");
    assert_eq!(mesh.pod_gateway(1).to_string(), "10.250.2.1");
}

#[test]
fn each_process_is_planned_with_its_namespace_flags_and_log() {
    let c = config();
    let mut mesh = Mesh::new([10, 250], &["node-a", "node-b", "node-c"]);
    mesh.apply(parse_docs(TEXT, "test").unwrap());
    let proxy = mesh.proxy_process(&c, "node-a");
    assert_eq!(proxy.netns.as_deref(), Some("zt-node-a"));
    assert_eq!(&proxy.args[..3], ["proxy", "--mode", "shared"]);
    let flag = |p: &Process, f: &str| {
        let i = p.args.iter().position(|a| a == f).unwrap();
        p.args[i + 1].clone()
    };
    assert_eq!(flag(&proxy, "--xds-address"), "https://10.250.0.1:15012");
    assert_eq!(flag(&proxy, "--inpod-uds"), "/run/zt-test/node-a.sock");
    assert_eq!(
        flag(&proxy, "--auth-token"),
        "/run/zt-test/tokens/node-a.token"
    );
    assert!(proxy.env.contains(&("NODE_NAME".into(), "node-a".into())));
    assert_eq!(proxy.log, c.log_file("ztunnel", Some("node-a")));
    let agent = mesh.node_agent_process(&c, "node-a");
    assert_eq!(flag(&agent, "--zds-socket"), flag(&proxy, "--inpod-uds"));
    assert_eq!(flag(&agent, "--backend"), "iptables");
    let cp = mesh.controlplane_process(&c);
    assert_eq!(cp.netns, None);
    assert_eq!(flag(&cp, "--listen"), "10.250.0.1:15012");
    let pods = mesh.pods();
    let web = pods
        .iter()
        .find(|p| p.placement.deployment == "web")
        .unwrap();
    let app = mesh.app_process(&c, web).unwrap();
    assert_eq!(app.netns, Some(Mesh::pod_netns("zt", &web.placement)));
    assert_eq!(flag(&app, "--upstream"), "http://db:8080/");
}

#[test]
fn dual_stack_gives_pods_and_services_both_families_and_ipv6_only_one() {
    let mut m = Mesh::new([10, 250], &["node-a", "node-b"]);
    m.ip_family = IpFamily::Dual;
    m.apply(parse_docs(TEXT, "t").unwrap());
    let pods = m.pods();
    let v6: Ipv6Addr = "fd7a:afa:1::a".parse().unwrap();
    assert_eq!(
        m.pod_addresses(&pods[0].placement),
        vec![IpAddr::from([10, 250, 1, 10]), IpAddr::from(v6)]
    );
    let s = &m.services()[0];
    let vip6: IpAddr = "fd7a:afa:ff96::a".parse().unwrap();
    assert_eq!(s.vips, vec![IpAddr::from([10, 96, 0, 10]), vip6]);
    assert_eq!(s.endpoints.len(), 4, "{:?}", s.endpoints);
    let hosts = m.hosts_file("default");
    assert!(
        hosts.contains("fd7a:afa:ff96::a web.default.svc.cluster.local"),
        "{hosts}"
    );
    assert!(
        hosts.contains("10.96.0.10 web.default.svc.cluster.local"),
        "{hosts}"
    );
    let rules = m.service_rules("ZL-SERVICES", true);
    assert!(
        rules.contains("-d fd7a:afa:ff96::a/128 -p tcp --dport 80 -j DNAT --to-destination [fd7a:afa:2::a]:8080\n"),
        "{rules}"
    );
    assert!(!rules.contains("10.96"), "{rules}");
    let manifests = m.manifests_yaml("zl");
    assert!(
        manifests.contains("podIPs: [{ip: \"10.250.1.10\"}, {ip: \"fd7a:afa:1::a\"}]"),
        "{manifests}"
    );
    let config = crate::Config::new("/bin/true".into());
    let steps = format!("{:?}", m.pod_steps(&config, &pods[0]));
    assert!(steps.contains("\"fd7a:afa:1::a/64\""), "{steps}");
    assert!(steps.contains("\"10.250.1.10/24\""), "{steps}");
    let node = format!("{:?}", m.node_steps(&config, 0));
    assert!(
        node.contains("\"fd7a:afa:2::/64\", \"via\", \"fd7a:afa::b\""),
        "{node}"
    );

    let mut m = Mesh::new([10, 250], &["node-a", "node-b"]);
    m.ip_family = IpFamily::Ipv6;
    m.apply(parse_docs(TEXT, "t").unwrap());
    let pods = m.pods();
    assert_eq!(m.pod_addresses(&pods[0].placement), vec![IpAddr::from(v6)]);
    let services = m.services();
    assert_eq!(services.len(), 1, "{}", m.manifests_yaml("zl"));
    assert_eq!(services[0].vips, vec![vip6]);
    assert!(!m.hosts_file("default").contains("10.96"));
    assert!(
        m.resolv_conf(&pods[0].placement)
            .starts_with("nameserver fd7a:afa:1::1\n")
    );
    assert!(!format!("{:?}", m.pod_steps(&config, &pods[0])).contains("10.250.1.10"));
    assert!("dual".parse::<IpFamily>().is_ok() && "ipv5".parse::<IpFamily>().is_err());
}
