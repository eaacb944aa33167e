//! Handing live connections to a new proxy during an upgrade: the wire
//! format between the old and the new process (`proto/handoff.proto`, package
//! `ambient.handoff.v1`), and its decoder, which trusts nothing it is given.
//!
//! The old proxy offers the format versions it can send ([`Offer`]); the new one answers with
//! the one it takes or refuses ([`Answer`]), and a refusal makes the old proxy drain as it would
//! without a successor. Each moved HBONE connection is a [`proto::Connection`] (its TLS state, its
//! HTTP/2 session, bytes not yet parsed, its tunnels; for one a pod's outbound path dialed, the
//! identities it was pooled by), its socket and its tunnels' application sockets passed beside
//! it. Version 2 carries outbound connections; a successor that takes version 1 only gets the
//! inbound ones, and the outbound ones drain in the old proxy. Decoding bounds the
//! message and every field before anything is built from it, and names the field a refusal is
//! about; `hbone` then checks the state against itself (windows that add up, secrets of the
//! suite's length, stream ids that were opened) when the connection is put together.

mod channel;
mod transfer;
mod wire;

pub use channel::{Channel, Listener, MAX_FDS};
pub use transfer::{Handed, recv_moved, send_moved};
#[cfg(feature = "fuzzing")]
pub use wire::fuzz_decode;
pub use wire::{
    Answer, Carried, CarriedItem, CarriedPlain, CarriedTunnel, MAX_MESSAGE, Offer, PlainKind,
    Refused, VERSION, VERSIONS, answer, decode_answer, decode_connection, decode_moved,
    decode_offer, encode_connection, encode_moved, proto,
};
