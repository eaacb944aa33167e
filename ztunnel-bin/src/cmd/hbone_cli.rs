//! `ztunnel hbone serve` and `ztunnel hbone connect`.

use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::{Authority, Config, InboundConnect, Pool, Server, StaticTls};
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::Error;

#[derive(Debug, Subcommand)]
pub(crate) enum HboneCommand {
    /// Terminate HBONE: accept mTLS + HTTP/2 CONNECT and forward each stream over TCP.
    ///
    /// Prints one line per stream on stdout: peer identity (URI SAN), authority, upstream,
    /// status, bytes each way, duration.
    Serve(ServeArgs),
    /// Open an HBONE tunnel: from stdin/stdout (like `nc`), or for each TCP connection accepted
    /// on `--listen`.
    Connect(ConnectArgs),
}

/// Certificate files shared by both ends.
#[derive(Debug, Args)]
pub(crate) struct TlsFiles {
    /// PEM certificate chain to present, leaf first.
    #[arg(long, value_name = "PEM")]
    pub(crate) cert: PathBuf,
    /// PEM private key of the leaf certificate.
    #[arg(long, value_name = "PEM")]
    pub(crate) key: PathBuf,
    /// PEM trust roots; the peer's chain must verify against them.
    #[arg(long, value_name = "PEM")]
    pub(crate) ca: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on, e.g. `0.0.0.0:15008`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: SocketAddr,
    #[command(flatten)]
    pub(crate) tls: TlsFiles,
    /// Forward every stream to this address instead of the stream's `:authority`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) forward_to: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// The HBONE server to dial, `ip:port` or `host:port`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) to: String,
    /// The tunnel's destination, sent as the CONNECT `:authority` (`ip:port`, `[v6]:port`,
    /// `host:port`).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) authority: String,
    #[command(flatten)]
    pub(crate) tls: TlsFiles,
    /// The SPIFFE id the server must present (repeat to accept any of several). Required unless
    /// --insecure-any-san is given.
    #[arg(long, value_name = "URI", required_unless_present = "insecure_any_san")]
    pub(crate) expect_san: Vec<String>,
    /// INSECURE, for debugging: accept a server with any identity issued under --ca (any
    /// workload of the mesh could then pose as the destination). Says so on stderr.
    #[arg(long, conflicts_with = "expect_san")]
    pub(crate) insecure_any_san: bool,
    /// Accept plain TCP here and tunnel each connection, instead of using stdin/stdout.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,
}

/// How long `serve` waits for the upstream TCP connect before answering 503.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(args: ServeArgs) -> Result<(), Error> {
    let (chain, key, roots) = load(&args.tls)?;
    // Clients must be in our own trust domain, which our certificate names.
    let own_id = identity::tls::peer_spiffe_id(&chain)?;
    let tls = identity::tls::server_config(chain, key, roots, own_id.trust_domain())?;
    let forward_to = match &args.forward_to {
        Some(addr) => Some(resolve("--forward-to", addr).await?),
        None => None,
    };
    let listener = super::listen(args.listen).await?;
    info!(listen = %args.listen, forward_to = ?forward_to, "HBONE server ready");
    let server = Server::new(
        Config::default(),
        Arc::new(tls),
        move |req: InboundConnect| forward(req, forward_to),
    );
    server.serve(listener).await.map_err(|source| Error::Io {
        what: format!("listener on {} failed", args.listen),
        source,
    })
}

/// Forwards one accepted CONNECT to `forward_to` (or its authority) and prints its line.
pub(crate) async fn forward(req: InboundConnect, forward_to: Option<SocketAddr>) {
    let start = Instant::now();
    let peer_id = identity::tls::peer_uri_sans(req.peer_certificates())
        .into_iter()
        .next()
        .unwrap_or_else(|| "-".to_owned());
    let authority = req.authority().clone();
    let peer_addr = req.peer_addr();
    let line = |upstream: &str, status: u16, moved: hbone::Transferred, error: Option<String>| {
        let mut line = format!(
            "stream peer={peer_id} peer_addr={peer_addr} authority={authority} upstream={upstream} status={status} bytes_in={} bytes_out={} duration={:?}",
            moved.a_to_b,
            moved.b_to_a,
            start.elapsed()
        );
        if let Some(e) = error {
            line.push_str(&format!(" error={e:?}"));
        }
        println!("{line}");
    };
    let upstream = match forward_to {
        Some(addr) => connect_upstream(&[addr]).await,
        None => match &authority {
            Authority::Addr(addr) => connect_upstream(&[*addr]).await,
            Authority::Host { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => connect_upstream(&addrs.collect::<Vec<_>>()).await,
                    Err(e) => Err(("-".to_owned(), format!("cannot resolve {authority}: {e}"))),
                }
            }
        },
    };
    let (target, mut upstream) = match upstream {
        Ok(connected) => connected,
        Err((target, error)) => {
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            line(&target, 503, Default::default(), Some(error));
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut tunnel = match req.accept() {
        Ok(tunnel) => tunnel,
        Err(e) => {
            line(
                &target.to_string(),
                200,
                Default::default(),
                Some(e.to_string()),
            );
            return;
        }
    };
    match hbone::copy_tunnel_bidirectional(&mut tunnel, &mut upstream).await {
        Ok(moved) => line(&target.to_string(), 200, moved, None),
        Err(e) => line(&target.to_string(), 200, e.transferred, Some(e.to_string())),
    }
}

/// Connects to the first of `addrs` that answers, within one overall timeout. On failure returns
/// the last address tried and why.
async fn connect_upstream(
    addrs: &[SocketAddr],
) -> Result<(SocketAddr, TcpStream), (String, String)> {
    let attempt = async {
        let mut last = ("-".to_owned(), "the name has no address".to_owned());
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok((*addr, stream)),
                Err(e) => last = (addr.to_string(), e.to_string()),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err((
            addrs.first().map_or("-".to_owned(), ToString::to_string),
            format!("connect timed out after {UPSTREAM_CONNECT_TIMEOUT:?}"),
        )),
    }
}

pub(crate) async fn connect(args: ConnectArgs) -> Result<(), Error> {
    let authority = Authority::parse(&args.authority).map_err(|e| Error::Flag {
        flag: "--authority",
        value: args.authority.clone(),
        reason: e.to_string(),
    })?;
    let server = resolve("--to", &args.to).await?;
    let (chain, key, roots) = load(&args.tls)?;
    let expected = args
        .expect_san
        .iter()
        .map(|san| {
            identity::SpiffeId::parse(san).map_err(|e| Error::Flag {
                flag: "--expect-san",
                value: san.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tls = if args.insecure_any_san {
        eprintln!(
            "ztunnel hbone connect: WARNING: --insecure-any-san: accepting any server identity issued under --ca; the server is not authenticated as a particular workload"
        );
        identity::tls::insecure_client_config_accepting_any_identity(chain, key, roots)?
    } else {
        identity::tls::client_config(chain, key, roots, expected)?
    };
    let pool = Pool::new(Config::default(), StaticTls(Arc::new(tls)));
    match args.listen {
        None => connect_stdio(&pool, server, &authority).await,
        Some(listen) => connect_listen(pool, server, authority, listen).await,
    }
}

/// Tunnels stdin to the server and the server's bytes to stdout; done when the server closes.
async fn connect_stdio(
    pool: &Pool<(), StaticTls>,
    server: SocketAddr,
    authority: &Authority,
) -> Result<(), Error> {
    let tunnel = pool
        .connect((), server, authority, request_headers(None))
        .await?;
    let (mut from_server, mut to_server) = tokio::io::split(tunnel);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        // stdin closed: half-close the tunnel and keep reading the answer.
        let _ = to_server.shutdown().await;
    });
    let mut stdout = tokio::io::stdout();
    tokio::io::copy(&mut from_server, &mut stdout)
        .await
        .map_err(|source| Error::Io {
            what: format!("tunnel to {authority} via {server}"),
            source,
        })?;
    stdout.flush().await.map_err(|source| Error::Io {
        what: "writing stdout".into(),
        source,
    })
}

/// Accepts plain TCP on `listen` and tunnels each connection.
async fn connect_listen(
    pool: Pool<(), StaticTls>,
    server: SocketAddr,
    authority: Authority,
    listen: SocketAddr,
) -> Result<(), Error> {
    let listener = super::listen(listen).await?;
    info!(%listen, %server, %authority, "tunneling each accepted connection");
    loop {
        let (mut tcp, client) = listener.accept().await.map_err(|source| Error::Io {
            what: format!("accept on {listen}"),
            source,
        })?;
        let pool = pool.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let _ = tcp.set_nodelay(true);
            let tunnel = pool
                .connect((), server, &authority, request_headers(Some(client)))
                .await;
            let mut tunnel = match tunnel {
                Ok(t) => t,
                Err(e) => {
                    warn!(%client, error = %e, "tunnel refused; closing the client connection");
                    println!(
                        "connection client={client} authority={authority} error={:?}",
                        e.to_string()
                    );
                    return;
                }
            };
            let (moved, error) = match hbone::copy_tunnel_bidirectional(&mut tunnel, &mut tcp).await
            {
                Ok(moved) => (moved, String::new()),
                Err(e) => (e.transferred, format!(" error={:?}", e.to_string())),
            };
            // a = tunnel, b = the client's TCP connection.
            println!(
                "connection client={client} authority={authority} bytes_sent={} bytes_received={} duration={:?}{error}",
                moved.b_to_a,
                moved.a_to_b,
                start.elapsed()
            );
        });
    }
}

/// The headers Istio's ztunnel sends: `forwarded` (when there is a client) and `traceparent`.
fn request_headers(client: Option<SocketAddr>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(client) = client {
        headers.insert(
            hbone::headers::FORWARDED,
            hbone::headers::forwarded_for(client),
        );
    }
    headers.insert(hbone::headers::TRACEPARENT, hbone::headers::traceparent());
    headers
}

type Loaded = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
    Arc<rustls::RootCertStore>,
);

fn load(files: &TlsFiles) -> Result<Loaded, Error> {
    let chain = identity::pem::read_certs(&files.cert)?;
    let key = identity::pem::read_key(&files.key)?;
    let roots = identity::pem::read_roots(&files.ca)?;
    Ok((chain, key, Arc::new(roots)))
}

/// Resolves `ip:port` or `host:port` to the first address.
async fn resolve(flag: &'static str, value: &str) -> Result<SocketAddr, Error> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let bad = |reason: String| Error::Flag {
        flag,
        value: value.to_owned(),
        reason,
    };
    tokio::net::lookup_host(value)
        .await
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name has no address".into()))
}
