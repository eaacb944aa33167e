//! Helpers shared by the identity tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

/// Which side rejected a handshake, and with what.
#[derive(Debug)]
pub enum Failure {
    Client(rustls::Error),
    Server(rustls::Error),
}

/// Runs a TLS handshake in memory, pumping records until both sides finish or one fails.
pub fn handshake(client: ClientConfig, server: ServerConfig) -> Result<(), Failure> {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets().map_err(Failure::Server)?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets().map_err(Failure::Client)?;
        if !c.is_handshaking() && !s.is_handshaking() {
            // TLS 1.3: the server judges the client certificate after the client is done; make
            // sure its verdict has been read.
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().map_err(Failure::Server)?;
            return Ok(());
        }
    }
    panic!("handshake did not finish")
}
