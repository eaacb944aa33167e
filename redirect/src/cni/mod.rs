//! What the CNI plugin (`ztunnel-cni`) and the node agent say to each other over the agent's
//! CNI socket (default [`DEFAULT_CNI_SOCKET`]): one JSON [`CniRequest`] per connection, written
//! whole with the writing side then shut, and one JSON [`CniAnswer`] back.
//!
//! The container runtime runs the plugin after the primary CNI plugin set up a pod's network
//! and before any of its containers starts; the plugin asks the agent to capture the pod and
//! lets the pod start only once the agent answers [`CniAnswer::Captured`] (rules in, proxy
//! acknowledged) or [`CniAnswer::NotInMesh`]. Anything else fails the pod's network setup, and
//! the kubelet tries again: a pod that belongs to the mesh never starts uncaptured.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens by default.
pub const DEFAULT_CNI_SOCKET: &str = "/var/run/ztunnel/cni.sock";

/// The largest request or answer either side reads (a pod's names, netns path and IPs).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the runtime asked the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniEvent {
    /// A pod's network was set up.
    Add,
    /// A pod's network is being torn down.
    Del,
}

/// One pod, as the runtime describes it to the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    /// Add or delete.
    pub event: CniEvent,
    /// The runtime's container id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// The pod's network namespace (`CNI_NETNS`, a path).
    pub netns: String,
    /// `K8S_POD_NAME`.
    pub pod_name: String,
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `K8S_POD_UID`, when the runtime passes it.
    pub pod_uid: Option<String>,
    /// The pod's addresses, from the primary plugin's result.
    pub ips: Vec<IpAddr>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CniAnswer {
    /// The pod's rules are in and the proxy acknowledged it: it may start.
    Captured,
    /// The pod does not join the mesh: it may start as it is.
    NotInMesh {
        /// Why (for the plugin's log).
        reason: String,
    },
    /// The pod joins the mesh but could not be captured: it must not start.
    Refused {
        /// Why.
        reason: String,
    },
    /// A delete was taken note of.
    Released,
}

/// Asks the agent at `socket`, waiting at most `timeout` for each step.
pub fn ask(socket: &Path, request: &CniRequest, timeout: Duration) -> std::io::Result<CniAnswer> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    stream.write_all(&body)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let answer = read_bounded(&mut stream)?;
    serde_json::from_slice(&answer).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the agent's answer is not a CniAnswer: {e}"),
        )
    })
}

/// Reads until the peer shuts its writing side, refusing more than [`MAX_MESSAGE`] bytes.
pub fn read_bounded(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let read = stream.take(MAX_MESSAGE as u64 + 1).read_to_end(&mut buf)?;
    if read > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message over {MAX_MESSAGE} bytes"),
        ));
    }
    Ok(buf)
}

pub mod install;
pub mod server;

pub use server::{CniBoard, CniServer, CniServerConfig};
