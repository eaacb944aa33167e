//! The Kubernetes pod source through the real kube client, against a minimal API server on
//! loopback that answers list and watch requests for Pods and Namespaces (HTTP/1.1, JSON, chunked
//! watch streams) and lets the test push watch events.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redirect::agent::PodSource;
use redirect::k8s::KubeSource;

/// Per kind ("pods", "namespaces").
type ByKind<T> = Arc<Mutex<HashMap<&'static str, Vec<T>>>>;

#[derive(Clone, Default)]
struct ApiServer {
    /// Current objects by kind ("pods", "namespaces"), as JSON.
    objects: ByKind<String>,
    /// Open watch streams by kind.
    watches: ByKind<mpsc::Sender<String>>,
    /// Every request line seen.
    requests: Arc<Mutex<Vec<String>>>,
}

impl ApiServer {
    fn start(&self) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = self.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let server = server.clone();
                std::thread::spawn(move || server.serve(conn));
            }
        });
        port
    }

    fn serve(&self, conn: TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut conn = conn;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            // Skip the headers (GET requests have no body).
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
            }
            self.requests.lock().unwrap().push(line.clone());
            let target = line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let kind = if target.starts_with("/api/v1/pods") {
                "pods"
            } else if target.starts_with("/api/v1/namespaces") {
                "namespaces"
            } else {
                let _ = conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                );
                continue;
            };
            if target.contains("watch=true") {
                let (tx, rx) = mpsc::channel();
                self.watches
                    .lock()
                    .unwrap()
                    .entry(kind)
                    .or_default()
                    .push(tx);
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
                );
                for event in rx {
                    let chunk = format!("{event}\n");
                    let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                    if conn.write_all(framed.as_bytes()).is_err() {
                        return;
                    }
                }
                return;
            }
            let items = self
                .objects
                .lock()
                .unwrap()
                .get(kind)
                .cloned()
                .unwrap_or_default()
                .join(",");
            let list_kind = if kind == "pods" {
                "PodList"
            } else {
                "NamespaceList"
            };
            let body = format!(
                r#"{{"kind":"{list_kind}","apiVersion":"v1","metadata":{{"resourceVersion":"1"}},"items":[{items}]}}"#
            );
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    }

    fn set(&self, kind: &'static str, objects: Vec<String>) {
        self.objects.lock().unwrap().insert(kind, objects);
    }

    fn push(&self, kind: &'static str, event_type: &str, object: &str) {
        let event = format!(r#"{{"type":"{event_type}","object":{object}}}"#);
        for tx in self.watches.lock().unwrap().get(kind).into_iter().flatten() {
            let _ = tx.send(event.clone());
        }
    }

    fn watching(&self, kind: &'static str) -> bool {
        self.watches
            .lock()
            .unwrap()
            .get(kind)
            .is_some_and(|w| !w.is_empty())
    }
}

fn namespace(name: &str, ambient: bool, rv: u32) -> String {
    let labels = if ambient {
        r#"{"istio.io/dataplane-mode":"ambient"}"#
    } else {
        "{}"
    };
    format!(
        r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}","resourceVersion":"{rv}","labels":{labels}}}}}"#
    )
}

fn pod(name: &str, ip: &str, rv: u32) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"shop","uid":"uid-{name}","resourceVersion":"{rv}","labels":{{"app":"{name}"}}}},"spec":{{"nodeName":"node-a","serviceAccountName":"{name}-sa","containers":[{{"name":"c"}}]}},"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
    )
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The names of the pods the source reports as ambient on node-a.
fn ambient(source: &KubeSource) -> Result<Vec<String>, String> {
    Ok(source
        .pods()?
        .into_iter()
        .filter(|p| p.in_ambient("node-a"))
        .map(|p| format!("{} {} {:?}", p.name, p.service_account, p.ips))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_then_follows_watch_events() {
    let api = ApiServer::default();
    api.set("namespaces", vec![namespace("shop", false, 1)]);
    api.set("pods", vec![pod("web", "10.244.0.5", 1)]);
    let port = api.start();

    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let source = KubeSource::start(client, "node-a");

    let s = source.clone();
    tokio::task::spawn_blocking(move || {
        eventually("both lists", || s.pods().is_ok());
        assert_eq!(ambient(&s), Ok(vec![]), "namespace not ambient yet");
    })
    .await
    .unwrap();

    // Pods are asked for this node only.
    let requests = api.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:?}"
    );

    let (s, a) = (source.clone(), api.clone());
    tokio::task::spawn_blocking(move || {
        eventually("both watches open", || {
            a.watching("pods") && a.watching("namespaces")
        });
        a.push("namespaces", "MODIFIED", &namespace("shop", true, 2));
        eventually("namespace label flip", || {
            ambient(&s) == Ok(vec!["web web-sa [10.244.0.5]".to_owned()])
        });
        a.push("pods", "ADDED", &pod("api", "10.244.0.6", 3));
        eventually("a new pod", || ambient(&s).is_ok_and(|p| p.len() == 2));
        a.push("pods", "DELETED", &pod("web", "10.244.0.5", 4));
        eventually("a deleted pod", || {
            ambient(&s) == Ok(vec!["api api-sa [10.244.0.6]".to_owned()])
        });
    })
    .await
    .unwrap();
}
