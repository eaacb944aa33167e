//! The agent's side of the CNI socket: a [`CniServer`] takes the plugin's requests and posts
//! them on a [`CniBoard`]; the node agent ([`crate::agent::NodeAgent::with_cni`]) works them
//! off in its convergence passes and posts each answer back.
//!
//! An ADD names a pod by namespace and name, with the network namespace the runtime made for it.
//! The agent decides with the pod as its source reports it (labels, its namespace's labels,
//! annotations: [`crate::agent::Enablement`]); a pod that joins is captured in exactly that
//! namespace, and the answer is [`CniAnswer::Captured`] only once its rules are in and the
//! proxy acknowledged it ([`crate::agent::Handoff::served`]). A pod the source does not list
//! yet is waited for; one that does not appear, or is not served, within
//! [`CniServerConfig::answer_within`] is refused (the runtime tries the pod again). A DEL
//! releases the pod captured under that name, and is answered once its rules are gone.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{CniAnswer, CniEvent, CniRequest, read_bounded};
use crate::sys;

/// How a [`CniServer`] serves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CniServerConfig {
    /// How long an ADD may take, from the request to the proxy's acknowledgement (the plugin
    /// waits 30 s; this must be shorter, so the plugin reads the reason).
    pub answer_within: Duration,
    /// Users besides root whose processes may connect (SO_PEERCRED; anyone else is refused and
    /// logged).
    pub allowed_uids: Vec<u32>,
    /// Where the host's file system is, as this process sees it: the runtime's netns paths
    /// (`CNI_NETNS`) are host paths, read under this directory (`/` outside a container,
    /// `/host` when the host's root is mounted there).
    pub host_root: PathBuf,
}

impl Default for CniServerConfig {
    fn default() -> Self {
        CniServerConfig {
            answer_within: Duration::from_secs(25),
            allowed_uids: Vec::new(),
            host_root: PathBuf::from("/"),
        }
    }
}

impl CniServerConfig {
    /// `path` (a host path) as this process reaches it.
    pub fn on_host(&self, path: &Path) -> PathBuf {
        self.host_root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Posted; the agent has not decided.
    Waiting,
    /// Rules in, pod `uid` handed to the proxy; waiting for its acknowledgement.
    Captured(String),
    /// Answered.
    Done(CniAnswer),
}

/// A request on the board.
#[derive(Debug, Clone)]
pub(crate) struct Posted {
    pub(crate) event: CniEvent,
    /// The pod's network namespace, as this process reaches it.
    pub(crate) netns: PathBuf,
    pub(crate) uid: Option<String>,
    pub(crate) ips: Vec<IpAddr>,
    pub(crate) stage: Stage,
    /// The last reason the agent could not capture the pod (for a refusal's text).
    pub(crate) last_error: Option<String>,
    /// Which request this is (a newer one for the same pod replaces it).
    pub(crate) seq: u64,
}

/// The pods the CNI plugin asked about, by (namespace, name): shared by the [`CniServer`]
/// (which posts requests and waits for their answers) and the node agent (which works them off).
#[derive(Debug, Default)]
pub struct CniBoard {
    state: Mutex<BoardState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct BoardState {
    posted: BTreeMap<(String, String), Posted>,
    /// A request came that the agent has not seen yet.
    dirty: bool,
    next_seq: u64,
}

impl CniBoard {
    /// Posts `request` (replacing what was posted for that pod) and waits until the agent
    /// answers it or `within` elapses.
    fn ask(&self, request: &CniRequest, netns: PathBuf, within: Duration) -> CniAnswer {
        let key = (request.pod_namespace.clone(), request.pod_name.clone());
        let deadline = Instant::now() + within;
        let mut state = self.state.lock().expect("lock");
        state.next_seq += 1;
        let seq = state.next_seq;
        state.posted.insert(
            key.clone(),
            Posted {
                event: request.event,
                netns,
                uid: request.pod_uid.clone(),
                ips: request.ips.clone(),
                stage: Stage::Waiting,
                last_error: None,
                seq,
            },
        );
        state.dirty = true;
        self.changed.notify_all();
        loop {
            let Some(posted) = state.posted.get(&key).filter(|p| p.seq == seq) else {
                return CniAnswer::Refused {
                    reason: "a newer request for the same pod replaced this one".into(),
                };
            };
            if let Stage::Done(answer) = &posted.stage {
                return answer.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = match (&posted.stage, &posted.last_error) {
                    (Stage::Captured(_), _) => format!(
                        "the pod's rules are in but the proxy did not acknowledge it within {within:?}"
                    ),
                    (_, Some(error)) => format!("could not capture the pod: {error}"),
                    (_, None) => {
                        format!("the agent's pod source did not list the pod within {within:?}")
                    }
                };
                if posted.stage == Stage::Waiting {
                    state.posted.remove(&key);
                }
                return CniAnswer::Refused { reason };
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("lock")
                .0;
        }
    }

    /// The agent's side: the posted requests (copied), clearing the new-request flag.
    pub(crate) fn take(&self) -> BTreeMap<(String, String), Posted> {
        let mut state = self.state.lock().expect("lock");
        state.dirty = false;
        state.posted.clone()
    }

    /// The agent's side: `change` updates each posted request and says whether to keep it;
    /// then the waiting server threads are woken.
    pub(crate) fn update(&self, mut change: impl FnMut(&(String, String), &mut Posted) -> bool) {
        let mut state = self.state.lock().expect("lock");
        state.posted.retain(|key, posted| change(key, posted));
        self.changed.notify_all();
    }

    /// The agent's side: waits up to `timeout` for a new request; returns whether one came.
    pub(crate) fn wait_for_request(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("lock");
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| !s.dirty)
            .expect("lock");
        state.dirty
    }

    /// Whether a captured pod waits for its proxy's acknowledgement.
    pub(crate) fn awaits_proxy(&self) -> bool {
        self.state
            .lock()
            .expect("lock")
            .posted
            .values()
            .any(|p| matches!(p.stage, Stage::Captured(_)))
    }
}

/// Serves the CNI plugin on a Unix stream socket (mode 0600, root and the allowed users only).
#[derive(Debug, Clone)]
pub struct CniServer {
    refused: Arc<AtomicU64>,
    answered: Arc<Answered>,
}

/// Answers given, by event and outcome.
#[derive(Debug, Default)]
struct Answered(Mutex<BTreeMap<(&'static str, &'static str), u64>>);

impl Answered {
    fn count(&self, event: CniEvent, answer: &CniAnswer) {
        let event = match event {
            CniEvent::Add => "ADD",
            CniEvent::Del => "DEL",
        };
        let outcome = match answer {
            CniAnswer::Captured => "captured",
            CniAnswer::NotInMesh { .. } => "not_in_mesh",
            CniAnswer::Refused { .. } => "refused",
            CniAnswer::Released => "released",
        };
        *self
            .0
            .lock()
            .expect("lock")
            .entry((event, outcome))
            .or_default() += 1;
    }
}

impl CniServer {
    /// Listens at `path` (replacing a stale socket file) and answers each connection on its own
    /// thread through `board`, which a [`crate::agent::NodeAgent`] works off.
    pub fn bind(
        path: &Path,
        config: CniServerConfig,
        board: Arc<CniBoard>,
    ) -> std::io::Result<Self> {
        let listener = sys::stream_listener(path)?;
        let refused = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(Answered::default());
        let server = CniServer {
            refused: refused.clone(),
            answered: answered.clone(),
        };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "CNI: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match sys::peer_credentials(&conn) {
                    Ok((_, uid)) if uid == 0 || config.allowed_uids.contains(&uid) => {}
                    Ok((pid, uid)) => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        warn!(
                            pid,
                            uid, "CNI: refused a peer that is neither root nor an allowed user"
                        );
                        continue;
                    }
                    Err(e) => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        warn!(error = %e, "CNI: refused a peer whose credentials cannot be read");
                        continue;
                    }
                }
                let (board, config, answered) = (board.clone(), config.clone(), answered.clone());
                std::thread::spawn(move || serve(conn, &config, &board, &answered));
            }
        });
        Ok(server)
    }

    /// How many peers were refused for their credentials so far.
    pub fn refused_peers(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// The Prometheus text of the requests answered, by event and outcome
    /// (`ztunnel_node_agent_cni_requests_total`), and of the peers refused.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP ztunnel_node_agent_cni_requests_total CNI plugin requests answered, by event and outcome.\n# TYPE ztunnel_node_agent_cni_requests_total counter\n",
        );
        for ((event, outcome), n) in self.answered.0.lock().expect("lock").iter() {
            out.push_str(&format!(
                "ztunnel_node_agent_cni_requests_total{{event=\"{event}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        out.push_str(&format!(
            "# HELP ztunnel_node_agent_cni_refused_peers_total Peers refused on the CNI socket for their credentials.\n# TYPE ztunnel_node_agent_cni_refused_peers_total counter\nztunnel_node_agent_cni_refused_peers_total {}\n",
            self.refused_peers()
        ));
        out
    }
}

/// One plugin connection: one request, one answer.
fn serve(mut conn: UnixStream, config: &CniServerConfig, board: &CniBoard, answered: &Answered) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let request = read_bounded(&mut conn).and_then(|body| {
        serde_json::from_slice::<CniRequest>(&body).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a CniRequest: {e}"),
            )
        })
    });
    let answer = match request {
        Err(e) => {
            warn!(error = %e, "CNI: unreadable request");
            CniAnswer::Refused {
                reason: format!("unreadable request: {e}"),
            }
        }
        Ok(request) => {
            let answer = answer(&request, config, board);
            answered.count(request.event, &answer);
            answer
        }
    };
    let body = serde_json::to_vec(&answer).expect("answers serialize");
    if let Err(e) = conn.write_all(&body) {
        warn!(error = %e, "CNI: could not answer the plugin");
    }
}

fn answer(request: &CniRequest, config: &CniServerConfig, board: &CniBoard) -> CniAnswer {
    let pod = format!("{}/{}", request.pod_namespace, request.pod_name);
    if request.pod_name.is_empty() || request.pod_namespace.is_empty() {
        return CniAnswer::Refused {
            reason: "the request names no pod".into(),
        };
    }
    let netns = config.on_host(Path::new(&request.netns));
    if request.event == CniEvent::Add {
        if request.netns.is_empty() || !Path::new(&request.netns).is_absolute() {
            return CniAnswer::Refused {
                reason: format!(
                    "pod {pod}: the network namespace {:?} is not an absolute path",
                    request.netns
                ),
            };
        }
        if let Err(e) = std::fs::metadata(&netns) {
            return CniAnswer::Refused {
                reason: format!("pod {pod}: network namespace {}: {e}", netns.display()),
            };
        }
    }
    let started = Instant::now();
    let answer = board.ask(request, netns, config.answer_within);
    info!(pod = %pod, event = ?request.event, answer = ?answer, took = ?started.elapsed(), "CNI: answered");
    answer
}
