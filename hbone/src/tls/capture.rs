//! The application traffic secrets of a handshake, taken from rustls as it derives them, so the
//! connection can later be handed to another process (which goes on with our key schedule,
//! [`super::schedule`]). rustls hands them out only through its `KeyLog` hook: a configuration
//! whose `key_log` is [`traffic_secret_log`] gives them to the handshake that is being driven on
//! this thread, and to nobody else (nothing is written anywhere, nothing is kept once that
//! handshake has taken them). A configuration with another `key_log` (or none) makes connections
//! that cannot be moved.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use zeroize::Zeroizing;

use super::keys::Secrets;
use super::schedule::{Suite, TrafficSecret};

/// Secret bytes, overwritten with zeros when dropped.
pub(super) type Secret = Zeroizing<Vec<u8>>;

/// rustls's label for the client's first application traffic secret (TLS 1.3).
const CLIENT_TRAFFIC: &str = "CLIENT_TRAFFIC_SECRET_0";
/// rustls's label for the server's.
const SERVER_TRAFFIC: &str = "SERVER_TRAFFIC_SECRET_0";

/// The two secrets of one handshake, as far as it got.
#[derive(Default)]
pub(super) struct Captured {
    pub(super) client: Option<Secret>,
    pub(super) server: Option<Secret>,
}

impl Captured {
    /// Both directions' secrets, `tx` being ours (the client's when `client`), when the
    /// handshake logged both; `None` when the configuration did not log them to us.
    pub(super) fn into_secrets(
        self,
        client: bool,
        suite: Suite,
    ) -> std::io::Result<Option<Secrets>> {
        let (Some(c), Some(s)) = (self.client, self.server) else {
            return Ok(None);
        };
        let (tx, rx) = if client { (c, s) } else { (s, c) };
        Ok(Some(Secrets {
            tx: TrafficSecret::new(suite, tx.to_vec())?,
            rx: TrafficSecret::new(suite, rx.to_vec())?,
        }))
    }
}

thread_local! {
    /// The captures of the handshake driven on this thread right now (set only around rustls's
    /// synchronous work, never across an await).
    static SLOT: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// Where rustls's secrets go while it works on a handshake's bytes: created before the
/// synchronous call into rustls, dropped before the next await, it moves what rustls logged into
/// `into`.
pub(super) struct Capturing<'a> {
    into: &'a mut Captured,
}

impl<'a> Capturing<'a> {
    pub(super) fn begin(into: &'a mut Captured) -> Capturing<'a> {
        let so_far = std::mem::take(into);
        SLOT.with(|slot| *slot.borrow_mut() = Some(so_far));
        Capturing { into }
    }
}

impl Drop for Capturing<'_> {
    fn drop(&mut self) {
        *self.into = SLOT
            .with(|slot| slot.borrow_mut().take())
            .unwrap_or_default();
    }
}

/// rustls's `KeyLog` that hands each handshake its own application traffic secrets.
#[derive(Debug)]
struct TrafficSecretLog;

impl rustls::KeyLog for TrafficSecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        SLOT.with(|slot| {
            if let Some(captured) = slot.borrow_mut().as_mut() {
                match label {
                    CLIENT_TRAFFIC => captured.client = Some(Zeroizing::new(secret.to_vec())),
                    SERVER_TRAFFIC => captured.server = Some(Zeroizing::new(secret.to_vec())),
                    _ => {}
                }
            }
        });
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_TRAFFIC || label == SERVER_TRAFFIC
    }
}

/// The `key_log` to put in a rustls configuration whose connections may be handed to another
/// process: it gives each handshake driven by this crate its own application traffic secrets,
/// and writes nothing anywhere.
pub fn traffic_secret_log() -> Arc<dyn rustls::KeyLog> {
    static LOG: OnceLock<Arc<dyn rustls::KeyLog>> = OnceLock::new();
    LOG.get_or_init(|| Arc::new(TrafficSecretLog)).clone()
}
