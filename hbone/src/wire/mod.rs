//! Our HTTP/2 for HBONE: the subset of RFC 9113 a CONNECT tunnel needs (one request and one
//! response head per stream, DATA both ways, flow control, PING, GOAWAY, RST_STREAM), built so a
//! tunnel's writes are framed, encrypted and written in the writer's own task.
//!
//! Why not the `h2` crate: it drives each connection from a task of its own, so every chunk a
//! tunnel sends or receives crosses tasks (the writer, the connection task, the socket), and its
//! general stream machinery (priorities, a send queue per stream, a slab of events) costs more per
//! message than AES does (BENCHMARKS.md, issue 12). The wire format is unchanged: interop with
//! Istio's ztunnel, Envoy and the Python peer is checked by `interop/`.
//!
//! Layers: [`frame`] (bytes of one frame), [`hpack`] (header blocks; `hpack_table`, the copy of a peer's dynamic table a moved
//! connection's decoder is rebuilt from), [`budget`] (what a peer may
//! do without progress), [`session`] (the connection state machine, no I/O), [`conn`] (the session
//! plus the byte stream, shared by the tunnels).

pub(crate) mod budget;
pub(crate) mod conn;
pub(crate) mod frame;
pub(crate) mod hpack;
mod hpack_table;
pub(crate) mod session;
