//! The metrics registry: Istio's names and labels in the Prometheus text format, counters that
//! move while a connection is open, and series of gone workloads dropped after the expiry.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::workload;
use proxy::state::{State, StateStore};
use proxy::telemetry::metrics::{Ends, Flow, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xds_client::resources::Address;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 9, 0, last])
}

#[tokio::test]
async fn counters_move_while_open_and_render_with_istios_labels() {
    let (client, server) = (
        workload("sleep", ip(1), true, &[]),
        workload("web", ip(2), true, &[]),
    );
    let metrics = Metrics::new(Duration::from_secs(300));
    let ends = Ends {
        source: Some(&client),
        destination: Some(&server),
        mtls: true,
        ..Ends::default()
    };
    let open = metrics.opened("destination", ends);
    let (a, mut b) = tokio::io::duplex(1024);
    let mut counted = open.count(a, Flow::Sent);
    counted.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    b.read_exact(&mut buf).await.unwrap();
    b.write_all(b"abc").await.unwrap();
    let mut back = [0u8; 3];
    counted.read_exact(&mut back).await.unwrap();
    let text = metrics.render();
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .to_owned()
    };
    // Bytes written to the app count as received (client to server), read from it as sent.
    assert!(
        line("istio_tcp_received_bytes_total").ends_with(" 5"),
        "{text}"
    );
    assert!(line("istio_tcp_sent_bytes_total").ends_with(" 3"), "{text}");
    assert!(line("istio_tcp_connections_opened_total").ends_with(" 1"));
    assert!(line("istio_tcp_connections_closed_total").ends_with(" 0"));
    let opened = line("istio_tcp_connections_opened_total");
    for label in [
        r#"reporter="destination""#,
        r#"source_workload="sleep""#,
        r#"source_canonical_service="sleep""#,
        r#"source_canonical_revision="latest""#,
        r#"source_workload_namespace="default""#,
        r#"source_principal="cluster.local/ns/default/sa/sleep""#,
        r#"source_cluster="Kubernetes""#,
        r#"destination_service="unknown""#,
        r#"destination_workload="web""#,
        r#"destination_principal="cluster.local/ns/default/sa/web""#,
        r#"destination_cluster="Kubernetes""#,
        r#"request_protocol="tcp""#,
        r#"response_flags="-""#,
        r#"connection_security_policy="mutual_tls""#,
    ] {
        assert!(opened.contains(label), "{label} missing in {opened}");
    }
    assert!(text.contains("# TYPE istio_tcp_connections_failed_total counter"));
    drop(counted);
    drop(open);
    assert!(
        metrics
            .render()
            .contains("istio_tcp_connections_closed_total{reporter=\"destination\"")
    );
    metrics.failed("destination", ends, "DENY");
    let text = metrics.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_failed_total{")
                && l.contains(r#"response_flags="DENY""#)
                && l.ends_with(" 1")),
        "{text}"
    );
}

#[test]
fn series_of_gone_workloads_expire_and_the_others_stay() {
    let sleep = workload("sleep", ip(1), true, &[]);
    let web = workload("web", ip(2), true, &[]);
    let store = Arc::new(StateStore::new(State::new("istio-system")));
    store.update(|s| {
        s.insert_address(Address::Workload(sleep.clone()));
        s.insert_address(Address::Workload(web.clone()));
    });
    let metrics = Metrics::new(Duration::ZERO);
    let to_web = Ends {
        source: Some(&sleep),
        destination: Some(&web),
        mtls: true,
        ..Ends::default()
    };
    let outside = Ends {
        source: Some(&sleep),
        ..Ends::default()
    };
    let held = metrics.opened("source", to_web);
    drop(metrics.opened("source", outside));
    assert_eq!(metrics.len(), 2);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(metrics.expire(&store.snapshot()), 0, "all workloads exist");
    store.update(|s| s.remove_address("web"));
    assert_eq!(
        metrics.expire(&store.snapshot()),
        0,
        "a series with an open connection stays"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(metrics.expire(&store.snapshot()), 1, "web is gone");
    assert_eq!(metrics.len(), 1, "sleep to outside the mesh stays");
    assert!(!metrics.render().contains(r#"destination_workload="web""#));
    // With a longer expiry, a gone workload's series waits.
    let patient = Metrics::new(Duration::from_secs(300));
    drop(patient.opened("source", to_web));
    assert_eq!(patient.expire(&store.snapshot()), 0);
}
