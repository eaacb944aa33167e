//! The ports Istio's ambient data plane listens on; operators, probes and Istio's own parts
//! expect exactly these.

/// Outbound capture, in each captured pod's network namespace: the application's connections
/// are redirected here.
pub const OUTBOUND: u16 = 15001;
/// Inbound plaintext, in each captured pod's network namespace: connections from outside the
/// mesh are redirected here.
pub const INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE (mutual TLS, HTTP/2 CONNECT), in each captured pod's network namespace, and the
/// port a tunnel is sent to on the destination's node.
pub const HBONE: u16 = 15008;
/// The DNS proxy, in each captured pod (the node agent's DNS capture sends port 53 here).
pub const DNS: u16 = 15053;
/// The proxy's listeners in a captured pod, which capture rules leave alone.
pub const PROXY_PORTS: [u16; 3] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE];
/// The admin endpoint (on localhost).
pub const ADMIN: u16 = 15000;
/// Prometheus metrics.
pub const STATS: u16 = 15020;
/// Readiness (`/healthz/ready`).
pub const READINESS: u16 = 15021;
