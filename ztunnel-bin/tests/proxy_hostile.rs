//! The hostile-peer bounds of `hbone` hold through `ztunnel proxy`'s port 15008, configured as
//! the binary configures it (its frame size, windows and stream limit from the flags' defaults):
//! a dedicated proxy in a network namespace of its own (root needed), attacked over a veth from
//! here with a valid mesh certificate, keeps its memory, answers each attack as the library
//! does, and serves a legitimate tunnel at once throughout.

mod common;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../../hbone/tests/hostile_peers/raw.rs"]
mod raw;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Netns, Running, TempDir, dedicated_proxy, python, veth, wait};
use hbone::{Config, Pool, StaticTls};
use http::HeaderMap;
use raw::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn id(sa: &str) -> identity::SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// Connects with a valid client certificate, sends `bytes` (after the preface and SETTINGS) and
/// listens until the proxy closes the connection or is quiet for 2 s.
async fn hear(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>, bytes: &[u8]) -> Heard {
    let mut c = RawH2::connect(addr, tls.clone()).await;
    c.send(bytes).await;
    c.listen(Duration::from_secs(2)).await
}

/// The proxy's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_port_15008_holds_against_hostile_peers() {
    let ns = Netns::new("hostile");
    let octet = std::process::id() % 200 + 20;
    let (host_ip, pod_ip) = (format!("10.76.{octet}.1"), format!("10.76.{octet}.2"));
    let (veth_host, veth_pod) = (format!("zhh{octet}"), format!("zhp{octet}"));
    veth(None, &ns, (&veth_host, &host_ip), (&veth_pod, &pod_ip));

    let dir = TempDir::new("proxy-hostile");
    let ca = identity::DevCa::generate("cluster.local").unwrap();
    ca.issue_to_dir(
        &id("web-api"),
        Duration::from_secs(3600),
        &dir.0.join("web-api"),
    )
    .unwrap();
    std::fs::write(
        dir.0.join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-api, namespace: default, labels: {{app: web-api}}}}\nspec: {{serviceAccountName: web-api, nodeName: node-b}}\nstatus: {{podIP: {pod_ip}}}\n"
        ),
    )
    .unwrap();
    let _app = Running(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c"])
            .arg(format!(
                "import socket,threading\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('{pod_ip}',8080))\nl.listen(512)\ndef h(c):\n  while True:\n    d=c.recv(4096)\n    if not d: break\n    c.sendall(d)\n  c.close()\nwhile True:\n  c,_=l.accept()\n  threading.Thread(target=h,args=(c,),daemon=True).start()"
            ))
            .spawn()
            .unwrap(),
    );
    let proxy = Running(
        dedicated_proxy(
            &ns,
            &dir.0.join("mesh.yaml"),
            &dir.0.join("web-api"),
            "web-api",
            "node-b",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let pid = proxy.0.id();
    wait("the proxy's readiness", || {
        python(
            &ns,
            "import urllib.request,sys\ntry:\n  sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=1).status == 200 else 1)\nexcept Exception:\n  sys.exit(1)",
        )
        .status
        .success()
    });
    wait("the app", || {
        python(
            &ns,
            &format!("import socket\nsocket.create_connection(('{pod_ip}', 8080), timeout=1)"),
        )
        .status
        .success()
    });
    let addr: SocketAddr = format!("{pod_ip}:15008").parse().unwrap();
    let app = format!("{pod_ip}:8080");
    let creds = ca.issue(&id("sleep"), Duration::from_secs(3600)).unwrap();
    let tls = Arc::new(
        identity::tls::client_config(creds.chain, creds.key, ca.roots(), vec![id("web-api")])
            .unwrap(),
    );
    let legit = || {
        let (tls, app) = (tls.clone(), app.clone());
        async move {
            let started = Instant::now();
            let pool = Pool::new(Config::default(), StaticTls(tls));
            let mut t = tokio::time::timeout(
                Duration::from_secs(10),
                pool.connect("k", addr, &app.parse().unwrap(), HeaderMap::new()),
            )
            .await
            .expect("a legitimate tunnel within 10 s")
            .expect("a legitimate tunnel");
            t.write_all(b"still serving").await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = Vec::new();
            t.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"still serving");
            started.elapsed()
        }
    };
    legit().await;
    let baseline = rss_kib(pid);
    let quiet = Duration::from_secs(2);
    let connect = |authority: &str| connect_block(authority, &[]);
    let goaway = async |bytes: Vec<u8>| hear(addr, &tls, &bytes).await.goaway();

    // An HPACK bomb on a skipped stream: refused unread.
    let mut seed = connect(&app);
    literal_indexed(&mut seed, b"x-bomb", &[b'a'; 4000]);
    let refs: Vec<u8> = std::iter::repeat_n(0x80 | 62, 16_000).collect();
    let bomb = [headers(5, 0, &seed), headers(3, 0, &refs)].concat();
    assert_eq!(goaway(bomb).await, Some(PROTOCOL_ERROR), "HPACK bomb");

    // The same bomb as a new stream's request: decoded within the limit, then the connection ends.
    let block = [connect(&app), refs[..4096].to_vec()].concat();
    let bomb = [headers(1, 0, &seed), headers(3, 0, &block)].concat();
    assert_eq!(
        goaway(bomb).await,
        Some(ENHANCE_YOUR_CALM),
        "HPACK bomb, new stream"
    );

    // A header block past the cap (the binary's frames are 1 MiB): refused on its frame header.
    let mut big = connect(&app);
    while big.len() < 250 * 1024 {
        literal(&mut big, b"x-pad", &[b'p'; 1000]);
    }
    assert_eq!(
        goaway(headers(1, 0, &big)).await,
        Some(ENHANCE_YOUR_CALM),
        "big block"
    );

    // MadeYouReset and rapid reset: the budget ends the connection.
    for (what, then) in [
        ("MadeYouReset", window_update as fn(u32, u32) -> Vec<u8>),
        ("rapid reset", rst),
    ] {
        let arg = if what == "rapid reset" { CANCEL } else { 0 };
        let burst: Vec<u8> = (0..500u32)
            .flat_map(|i| [headers(2 * i + 1, 0, &connect(&app)), then(2 * i + 1, arg)].concat())
            .collect();
        assert_eq!(goaway(burst).await, Some(ENHANCE_YOUR_CALM), "{what}");
    }

    // A malformed CONNECT is reset.
    let mut block = connect(&app);
    literal(&mut block, b":path", b"/");
    let heard = hear(addr, &tls, &headers(1, 0, &block)).await;
    assert_eq!(heard.resets(), vec![(1, PROTOCOL_ERROR)], ":path");

    // A ping flood without reading.
    let flood = frame(PING, 0, 0, &[7; 8]).repeat(200_000);
    assert_eq!(goaway(flood).await, Some(ENHANCE_YOUR_CALM), "ping flood");

    // TLS: a changed record gets bad_record_mac; a KeyUpdate flood is cut off.
    let mut c = RawTls::connect(addr, tls.clone()).await;
    c.h2_hello().await;
    let mut r = c.seal(APPLICATION_DATA, b"xx");
    let last = r.len() - 1;
    r[last] ^= 1;
    c.send(&r).await.unwrap();
    assert_eq!(c.alert(quiet).await, Some(20), "bad_record_mac");
    let mut c = RawTls::connect(addr, tls.clone()).await;
    c.h2_hello().await;
    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.extend(c.key_update(true));
    }
    let _ = c.send(&flood).await;
    assert_eq!(c.alert(quiet).await, Some(10), "KeyUpdate flood");

    // Slowloris: 400 silent sockets, and a legitimate client is still served at once.
    let mut silent = Vec::new();
    for _ in 0..400 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = legit().await;
    assert!(
        took < Duration::from_secs(1),
        "a tunnel took {took:?} beside 400 silent sockets"
    );
    drop(silent);

    let grown = rss_kib(pid).saturating_sub(baseline);
    assert!(
        grown < 32 * 1024,
        "the proxy grew by {grown} KiB under the attacks"
    );
    legit().await;
    drop(proxy);
}
