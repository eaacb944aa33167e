//! Hostile TLS peers: raw records against our record layer.
