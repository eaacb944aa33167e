//! The soak's traffic, from inside a client pod: new connections at a steady rate, each sending
//! a few KiB of its seed's stream through the echo app and checking every byte back, and
//! long-lived connections that carry data both ways the whole time (a connection cut is
//! recorded and replaced, so as many stay open as asked). Every connection ends as a
//! [`Record`]: when it was made, when it ended, and its [`Outcome`].
//!
//! The traffic runs on one thread that entered the pod's network namespace, on a
//! single-threaded runtime of its own (every socket it makes is the pod's).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::check::{Outcome, Verifier, stream_bytes};

/// What traffic to make.
#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// The echo service (its VIP and port).
    pub target: SocketAddr,
    /// New short connections per second.
    pub rate: u32,
    /// Long-lived connections kept open.
    pub long: u32,
    /// Bytes each short connection sends (and must get back).
    pub payload: usize,
    /// Bytes a long connection sends per round, every `long_interval`.
    pub long_chunk: usize,
    /// The pause between a long connection's rounds.
    pub long_interval: Duration,
    /// How long a connection may wait for its next bytes before it counts as cut (or, with
    /// nothing back yet, denied).
    pub timeout: Duration,
}

impl TrafficConfig {
    /// `rate` new connections a second and `long` long ones to `target`, with 4 KiB per short
    /// connection and 1 KiB every 100 ms on each long one.
    pub fn new(target: SocketAddr, rate: u32, long: u32) -> Self {
        TrafficConfig {
            target,
            rate,
            long,
            payload: 4096,
            long_chunk: 1024,
            long_interval: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
        }
    }
}

/// One connection's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When it was made, since the traffic began.
    pub started: Duration,
    /// When it ended.
    pub ended: Duration,
    /// A long-lived one.
    pub long: bool,
    /// How it ended.
    pub outcome: Outcome,
}

/// Counters that can be read while the traffic runs (for the timeline).
#[derive(Debug, Default)]
pub struct Live {
    /// Connections ended so far.
    pub ended: AtomicU64,
    /// Of them, served.
    pub served: AtomicU64,
    /// Long connections open now.
    pub long_open: AtomicU64,
}

/// Runs the traffic from inside network namespace `ns` (by name) until `stop` is set, then lets
/// the connections in flight finish (each within its timeout) and returns every record. `live`
/// is updated as connections end. Fails when the namespace cannot be entered.
pub fn run(
    ns: &str,
    config: TrafficConfig,
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
) -> std::thread::JoinHandle<Result<Vec<Record>, String>> {
    crate::net::spawn_in(ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("a runtime for the soak's traffic: {e}"))?;
        Ok(runtime.block_on(traffic(config, stop, live)))
    })
}

async fn traffic(config: TrafficConfig, stop: Arc<AtomicBool>, live: Arc<Live>) -> Vec<Record> {
    let begin = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Record>();
    let seeds = Arc::new(AtomicU64::new(1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.long {
        let (config, stop, tx, live, seeds) = (
            config.clone(),
            stop.clone(),
            tx.clone(),
            live.clone(),
            seeds.clone(),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let seed = seeds.fetch_add(1, Ordering::Relaxed);
                live.long_open.fetch_add(1, Ordering::Relaxed);
                let (started, outcome) = long_connection(&config, seed, &stop, begin).await;
                live.long_open.fetch_sub(1, Ordering::Relaxed);
                let cut = !matches!(outcome, Outcome::Served);
                record(&tx, &live, started, begin.elapsed(), true, outcome);
                if cut {
                    // Not at once: a refused connection would otherwise spin.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
    }
    if config.rate > 0 {
        let mut ticks = tokio::time::interval(Duration::from_secs(1) / config.rate);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while !stop.load(Ordering::SeqCst) {
            ticks.tick().await;
            let (config, tx, live) = (config.clone(), tx.clone(), live.clone());
            let seed = seeds.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(async move {
                let (started, outcome) = short_connection(&config, seed, begin).await;
                record(&tx, &live, started, begin.elapsed(), false, outcome);
            });
            // Finished tasks are reaped as we go, so the set holds only those in flight.
            while tasks.try_join_next().is_some() {}
        }
    } else {
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let mut records = Vec::new();
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    records.sort_by_key(|r| r.started);
    records
}

fn record(
    tx: &tokio::sync::mpsc::UnboundedSender<Record>,
    live: &Live,
    started: Duration,
    ended: Duration,
    long: bool,
    outcome: Outcome,
) {
    live.ended.fetch_add(1, Ordering::Relaxed);
    if outcome == Outcome::Served {
        live.served.fetch_add(1, Ordering::Relaxed);
    }
    let _ = tx.send(Record {
        started,
        ended,
        long,
        outcome,
    });
}

/// Connects and runs `exchange` on the connection. Returns when the connection was made (since
/// `begin`: when `connect` returned, which is when the mesh first sees it; a `connect` the
/// client's own kernel keeps waiting does not count) and how it ended (`Denied` when `connect`
/// failed).
async fn timed<F: Future<Output = Outcome>>(
    config: &TrafficConfig,
    begin: Instant,
    exchange: impl FnOnce(TcpStream) -> F,
) -> (Duration, Outcome) {
    let connected = connect(config).await;
    let made = begin.elapsed();
    match connected {
        Ok(stream) => (made, exchange(stream).await),
        Err(_) => (made, Outcome::Denied),
    }
}

/// Connects, sends the payload, ends its sending, and reads everything back (see [`timed`]).
async fn short_connection(
    config: &TrafficConfig,
    seed: u64,
    begin: Instant,
) -> (Duration, Outcome) {
    timed(config, begin, |stream| short_exchange(config, seed, stream)).await
}

/// A short connection's exchange on `stream`.
async fn short_exchange(config: &TrafficConfig, seed: u64, mut stream: TcpStream) -> Outcome {
    let mut payload = vec![0u8; config.payload];
    stream_bytes(seed, 0, &mut payload);
    let mut verifier = Verifier::new(seed);
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(&payload).await?;
        write.shutdown().await
    };
    let receive = read_back(&mut read, &mut verifier, None, config.timeout);
    let (sent, received) = tokio::join!(send, receive);
    finish(sent.is_ok(), received, config.payload as u64, &verifier)
}

/// Sends a chunk every interval and checks its echo, until `stop`; then ends its sending and
/// reads the rest (see [`timed`]).
async fn long_connection(
    config: &TrafficConfig,
    seed: u64,
    stop: &AtomicBool,
    begin: Instant,
) -> (Duration, Outcome) {
    timed(config, begin, |stream| {
        long_exchange(config, seed, stop, stream)
    })
    .await
}

/// A long connection's exchange on `stream`.
async fn long_exchange(
    config: &TrafficConfig,
    seed: u64,
    stop: &AtomicBool,
    mut stream: TcpStream,
) -> Outcome {
    let mut verifier = Verifier::new(seed);
    let mut sent: u64 = 0;
    let mut chunk = vec![0u8; config.long_chunk];
    let (mut read, mut write) = stream.split();
    while !stop.load(Ordering::SeqCst) {
        stream_bytes(seed, sent, &mut chunk);
        if write.write_all(&chunk).await.is_err() {
            return cut(&verifier, "write failed");
        }
        sent += chunk.len() as u64;
        if let Err(outcome) = read_back(&mut read, &mut verifier, Some(sent), config.timeout).await
        {
            return outcome;
        }
        tokio::time::sleep(config.long_interval).await;
    }
    let ended = write.shutdown().await.is_ok();
    let received = read_back(&mut read, &mut verifier, None, config.timeout).await;
    finish(ended, received, sent, &verifier)
}

async fn connect(config: &TrafficConfig) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(config.timeout, TcpStream::connect(config.target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Reads and checks until `until` bytes are checked (or, with `None`, to the end of the
/// stream); each read waits at most `timeout`.
async fn read_back(
    read: &mut (impl AsyncReadExt + Unpin),
    verifier: &mut Verifier,
    until: Option<u64>,
    timeout: Duration,
) -> Result<(), Outcome> {
    let mut buf = vec![0u8; 16 * 1024];
    while until.is_none_or(|u| verifier.checked < u) {
        let n = match tokio::time::timeout(timeout, read.read(&mut buf)).await {
            Err(_) => return Err(cut(verifier, "timeout")),
            Ok(Err(_)) => return Err(cut(verifier, "reset")),
            Ok(Ok(0)) => {
                return match until {
                    None => Ok(()),
                    Some(_) => Err(cut(verifier, "closed early")),
                };
            }
            Ok(Ok(n)) => n,
        };
        if let Err(at) = verifier.check(&buf[..n]) {
            return Err(Outcome::Changed { at });
        }
    }
    Ok(())
}

/// A connection that broke: denied when nothing came back, else cut.
fn cut(verifier: &Verifier, reason: &'static str) -> Outcome {
    if verifier.checked == 0 {
        Outcome::Denied
    } else {
        Outcome::Cut {
            checked: verifier.checked,
            reason,
        }
    }
}

/// The outcome of a connection whose sending ended (`sent_ok`) and whose reading ended with
/// `received`, having sent `sent` bytes.
fn finish(sent_ok: bool, received: Result<(), Outcome>, sent: u64, verifier: &Verifier) -> Outcome {
    match received {
        Err(outcome) => outcome,
        Ok(()) if verifier.checked == sent && sent_ok => Outcome::Served,
        // A clean end with bytes missing: silently lost.
        Ok(()) if verifier.checked < sent && verifier.checked > 0 => Outcome::Lost {
            sent,
            echoed: verifier.checked,
        },
        Ok(()) if verifier.checked == 0 => Outcome::Denied,
        Ok(()) => cut(verifier, "send failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo that, after `keep` bytes, drops `skip` bytes then goes on: the soak must see
    /// bytes lost or changed, never a clean result.
    async fn faulty_echo(keep: usize, skip: usize) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    let _ = s.read_to_end(&mut all).await;
                    let end = (keep + skip).min(all.len());
                    let mut out = all[..keep.min(all.len())].to_vec();
                    out.extend_from_slice(&all[end..]);
                    let _ = s.write_all(&out).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_faithful_echo_serves_and_a_lossy_one_is_caught() {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        let now = Instant::now();
        let config = TrafficConfig::new(target, 1, 0);
        assert_eq!(short_connection(&config, 3, now).await.1, Outcome::Served);
        // The last 10 bytes dropped: lost; 10 dropped from the middle: the rest is changed.
        let lossy = TrafficConfig::new(faulty_echo(4086, 10).await, 1, 0);
        assert_eq!(
            short_connection(&lossy, 3, now).await.1,
            Outcome::Lost {
                sent: 4096,
                echoed: 4086
            }
        );
        let shifted = TrafficConfig::new(faulty_echo(100, 10).await, 1, 0);
        assert_eq!(
            short_connection(&shifted, 3, now).await.1,
            Outcome::Changed { at: 100 }
        );
        // Nothing listening: refused before any byte, as a denying policy refuses.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        let refused = TrafficConfig::new(nobody, 1, 0);
        assert_eq!(short_connection(&refused, 3, now).await.1, Outcome::Denied);
        // A long connection against the faithful echo, stopped: served with every round checked.
        let stop = AtomicBool::new(false);
        let long = long_connection(&config, 9, &stop, now);
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(350)).await;
            stop.store(true, Ordering::SeqCst);
        };
        let ((made, outcome), ()) = tokio::join!(long, stopper);
        assert_eq!(outcome, Outcome::Served);
        assert!(
            made < Duration::from_millis(350),
            "made when connected: {made:?}"
        );
    }
}
