//! `ztunnel demo`: an HBONE round trip on loopback with nothing to set up.
//!
//! Makes a development CA, gives a server (`web-api`) and a client (`sleep`) their SPIFFE
//! certificates, starts a TCP echo backend behind an HBONE server, and pushes traffic through
//! tunnels that insist on the server's identity. Then it shows that a client expecting another
//! identity is refused. Exits non-zero if anything differs from what is expected.

use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::{Authority, Config, InboundConnect, Pool, Server, StaticTls};
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Error;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Concurrent tunnels to open.
    #[arg(long, default_value_t = 8)]
    pub(crate) streams: usize,
    /// Bytes each tunnel sends (and gets echoed back).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub(crate) bytes: usize,
    /// Also write the demo's CA and the client/server certificates here, for use with
    /// `ztunnel hbone serve|connect` (subfolders `server/` and `client/`).
    #[arg(long, value_name = "DIR")]
    pub(crate) write_certs: Option<PathBuf>,
}

const TRUST_DOMAIN: &str = "cluster.local";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/web-api";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);

pub(crate) async fn run(args: DemoArgs) -> Result<(), Error> {
    let server_id = spiffe(SERVER_ID);
    let client_id = spiffe(CLIENT_ID);
    let ca = identity::DevCa::generate(TRUST_DOMAIN)?;
    if let Some(dir) = &args.write_certs {
        ca.issue_to_dir(&server_id, CERT_TTL, &dir.join("server"))?;
        ca.issue_to_dir(&client_id, CERT_TTL, &dir.join("client"))?;
        println!(
            "wrote certificates to {}/{{server,client}}/{{cert-chain,key,root-cert}}.pem",
            dir.display()
        );
    }
    let server_creds = ca.issue(&server_id, CERT_TTL)?;
    let client_creds = ca.issue(&client_id, CERT_TTL)?;

    let backend = echo_backend().await?;
    let server_tls = identity::tls::server_config(
        server_creds.chain,
        server_creds.key,
        ca.roots(),
        TRUST_DOMAIN,
    )?;
    // Each stream's line is printed by its handler once it is done, which may be just after
    // the client has read the last echoed byte: the demo waits for all of them (below).
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = handled.clone();
    let server = Server::new(
        Config::default(),
        Arc::new(server_tls),
        move |req: InboundConnect| {
            let done = done.clone();
            async move {
                super::hbone_cli::forward(req, None).await;
                done.add_permits(1);
            }
        },
    );
    let listener = bind().await?;
    let server_addr = listener
        .local_addr()
        .map_err(|source| io("local address", source))?;
    tokio::spawn(async move { server.serve(listener).await });
    println!("HBONE server {SERVER_ID} on {server_addr}, echo backend on {backend}");

    let client_tls = identity::tls::client_config(
        client_creds.chain.clone(),
        client_creds.key.clone_key(),
        ca.roots(),
        vec![server_id.clone()],
    )?;
    let pool = Pool::new(Config::default(), StaticTls(Arc::new(client_tls)));
    let authority = Authority::from(backend);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.streams {
        let pool = pool.clone();
        let authority = authority.clone();
        let len = args.bytes;
        tasks.spawn(async move { echo_through(&pool, server_addr, &authority, i, len).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| Error::Demo(format!("stream task failed: {e}")))??;
    }
    let elapsed = start.elapsed();
    let streams = u32::try_from(args.streams).unwrap_or(u32::MAX);
    match tokio::time::timeout(Duration::from_secs(5), handled.acquire_many(streams)).await {
        Ok(Ok(permits)) => permits.forget(),
        _ => {
            return Err(Error::Demo(
                "the server did not finish every stream within 5 s of the client".into(),
            ));
        }
    }
    let total = (args.streams * args.bytes * 2) as f64;
    println!(
        "{} tunnels echoed {} bytes each over {} HBONE connection(s) in {:?} ({:.1} MiB/s both ways)",
        args.streams,
        args.bytes,
        pool.connection_count(),
        elapsed,
        total / elapsed.as_secs_f64() / (1024.0 * 1024.0)
    );

    // The same client, expecting a different server identity, must be refused.
    let wrong_tls = identity::tls::client_config(
        client_creds.chain,
        client_creds.key,
        ca.roots(),
        vec![spiffe("spiffe://cluster.local/ns/default/sa/not-web-api")],
    )?;
    let wrong = Pool::new(Config::default(), StaticTls(Arc::new(wrong_tls)));
    match wrong
        .connect((), server_addr, &authority, HeaderMap::new())
        .await
    {
        Ok(_) => {
            return Err(Error::Demo(
                "a client expecting another identity got a tunnel".into(),
            ));
        }
        Err(e) => println!("refused as expected: {e}"),
    }
    println!("demo OK");
    Ok(())
}

async fn echo_through(
    pool: &Pool<(), StaticTls>,
    server: std::net::SocketAddr,
    authority: &Authority,
    index: usize,
    len: usize,
) -> Result<(), Error> {
    let tunnel = pool
        .connect((), server, authority, HeaderMap::new())
        .await?;
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let data: Vec<u8> = (0..len)
        .map(|j| (j.wrapping_mul(31) ^ index) as u8)
        .collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await?;
        wr.shutdown().await
    });
    let mut echoed = Vec::with_capacity(len);
    rd.read_to_end(&mut echoed)
        .await
        .map_err(|source| io("reading the echo", source))?;
    writer
        .await
        .map_err(|e| Error::Demo(format!("writer task failed: {e}")))?
        .map_err(|source| io("writing into the tunnel", source))?;
    if echoed != expected {
        return Err(Error::Demo(format!(
            "stream {index}: sent {len} bytes, got {} different bytes back",
            echoed.len()
        )));
    }
    Ok(())
}

async fn echo_backend() -> Result<std::net::SocketAddr, Error> {
    let listener = bind().await?;
    let addr = listener
        .local_addr()
        .map_err(|source| io("local address", source))?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

async fn bind() -> Result<TcpListener, Error> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| io("binding a loopback listener", source))
}

/// The demo's identities are constants known to be valid.
fn spiffe(id: &str) -> identity::SpiffeId {
    identity::SpiffeId::parse(id).expect("a valid constant SPIFFE id")
}

fn io(what: &str, source: std::io::Error) -> Error {
    Error::Io {
        what: what.to_owned(),
        source,
    }
}
