//! Embed HBONE in your own program: a mutual-TLS tunnel server and a pooled client.
//!
//! Run with `cargo run -p examples --example embed_hbone`. It makes a development CA, starts an
//! HBONE server that answers every CONNECT by echoing, and sends a message through a tunnel whose
//! client insists on the server's SPIFFE identity.

use std::sync::Arc;
use std::time::Duration;

use hbone::{Authority, Config, InboundConnect, Pool, Server, StaticTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = identity::DevCa::generate("cluster.local")?;
    let day = Duration::from_secs(24 * 3600);
    let server_id: identity::SpiffeId = "spiffe://cluster.local/ns/default/sa/echo".parse()?;
    let client_id = identity::SpiffeId::istio("cluster.local", "default", "client")?;
    let server_creds = ca.issue(&server_id, day)?;
    let client_creds = ca.issue(&client_id, day)?;

    // Server: accept every CONNECT, report who asked, echo the bytes.
    let server_tls = identity::tls::server_config(
        server_creds.chain,
        server_creds.key,
        ca.roots(),
        "cluster.local",
    )?;
    let server = Server::new(
        Config::default(),
        Arc::new(server_tls),
        |req: InboundConnect| async move {
            match identity::tls::peer_spiffe_id(req.peer_certificates()) {
                Ok(who) => println!("server: CONNECT {} from {who}", req.authority()),
                Err(e) => println!(
                    "server: CONNECT {} from an unreadable identity: {e}",
                    req.authority()
                ),
            }
            let Ok(mut tunnel) = req.accept() else { return };
            let (mut rd, mut wr) = tokio::io::split(&mut tunnel);
            if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                let _ = wr.shutdown().await;
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    tokio::spawn(async move { server.serve(listener).await });

    // Client: only talk to a server that proves `server_id`.
    let client_tls = identity::tls::client_config(
        client_creds.chain,
        client_creds.key,
        ca.roots(),
        vec![server_id],
    )?;
    let pool = Pool::new(Config::default(), StaticTls(Arc::new(client_tls)));
    let destination: Authority = "10.0.0.7:8080".parse()?;
    let mut tunnel = pool
        .connect("echo", server_addr, &destination, Default::default())
        .await?;
    tunnel.write_all(b"hello over HBONE").await?;
    tunnel.shutdown().await?;
    let mut answer = String::new();
    tunnel.read_to_string(&mut answer).await?;
    println!("client: got {answer:?} back");
    assert_eq!(answer, "hello over HBONE");
    Ok(())
}
