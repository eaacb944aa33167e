//! The connection's control frames: the peer's SETTINGS, PING both ways (our keepalive), and
//! GOAWAY.

use super::*;

/// The peer's SETTINGS that matter to us.
#[derive(Debug)]
pub(super) struct PeerSettings {
    pub(super) initial_window: u32,
    pub(super) max_frame_size: u32,
    pub(super) max_concurrent_streams: u32,
}

#[derive(Debug, Default)]
pub(super) struct PingState {
    /// Payload of our PING awaiting its ACK.
    pub(super) outstanding: Option<[u8; 8]>,
    pub(super) answered: bool,
    pub(super) waker: Option<Waker>,
    pub(super) next: u64,
}

impl Session {
    pub(super) fn on_settings(
        &mut self,
        head: Head,
        payload: &[u8],
    ) -> Result<(), (Reason, String)> {
        if head.stream != 0 {
            return Err(proto("SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            return if payload.is_empty() {
                Ok(())
            } else {
                Err(frame_size("SETTINGS ACK with a payload"))
            };
        }
        let values = frame::parse_settings(payload).ok_or_else(|| frame_size("SETTINGS"))?;
        for (id, value) in values {
            match id {
                setting::ENABLE_PUSH if value > 1 || (value == 1 && self.role == Role::Client) => {
                    return Err(proto("SETTINGS_ENABLE_PUSH from a server, or above 1"));
                }
                // RFC 8441 §3: any value but 0 or 1 is a connection error (h2 checks it too).
                setting::ENABLE_CONNECT_PROTOCOL if value > 1 => {
                    return Err(proto("SETTINGS_ENABLE_CONNECT_PROTOCOL above 1"));
                }
                setting::MAX_CONCURRENT_STREAMS => self.peer.max_concurrent_streams = value,
                setting::INITIAL_WINDOW_SIZE => {
                    if value as i64 > MAX_WINDOW {
                        return Err((
                            Reason::FLOW_CONTROL_ERROR,
                            format!("SETTINGS_INITIAL_WINDOW_SIZE of {value}"),
                        ));
                    }
                    let delta = value as i64 - self.peer.initial_window as i64;
                    self.peer.initial_window = value;
                    for stream in self.streams.values_mut() {
                        stream.send_window += delta;
                        if stream.send_window > MAX_WINDOW {
                            return Err((
                                Reason::FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window".to_owned(),
                            ));
                        }
                        if delta > 0
                            && let Some(w) = stream.send_waker.take()
                        {
                            w.wake();
                        }
                    }
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME..(1 << 24)).contains(&value) {
                        return Err(proto("SETTINGS_MAX_FRAME_SIZE out of range"));
                    }
                    self.peer.max_frame_size = value;
                }
                // HEADER_TABLE_SIZE: our encoder uses no dynamic table; MAX_HEADER_LIST_SIZE:
                // our heads are a few hundred bytes. Unknown settings are ignored (§6.5.2).
                _ => {}
            }
        }
        self.got_settings = true;
        frame::put_frame(&mut self.out, kind::SETTINGS, flag::ACK, 0, &[]);
        self.control_frame("SETTINGS frames")
    }

    pub(super) fn on_ping(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
        if head.stream != 0 {
            return Err(proto("PING on a stream"));
        }
        let data: [u8; 8] = payload.try_into().map_err(|_| frame_size("PING"))?;
        if !head.has(flag::ACK) {
            frame::put_frame(&mut self.out, kind::PING, flag::ACK, 0, &data);
            return self.control_frame("PING frames");
        }
        if self.ping.outstanding == Some(data) {
            self.ping.outstanding = None;
            self.ping.answered = true;
            if let Some(w) = self.ping.waker.take() {
                w.wake();
            }
            return Ok(());
        }
        self.control_frame("unsolicited PING answers")
    }

    pub(super) fn on_goaway(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
        if head.stream != 0 {
            return Err(proto("GOAWAY on a stream"));
        }
        if payload.len() < 8 {
            return Err(frame_size("GOAWAY"));
        }
        let last = frame::u32_at(payload, 0) & 0x7fff_ffff;
        let reason = Reason(frame::u32_at(payload, 4));
        let again = self.goaway_received.is_some();
        let last = self.goaway_received.map_or(last, |prev| prev.min(last));
        self.goaway_received = Some(last);
        for (id, stream) in &mut self.streams {
            if stream.local && *id > last {
                stream.fail(Failure::GoAway {
                    reason,
                    remote: true,
                });
            }
        }
        if reason != Reason::NO_ERROR {
            tracing::debug!(%reason, last_stream = last, "HBONE: the peer sent GOAWAY");
        }
        if again {
            return self.control_frame("GOAWAY frames");
        }
        Ok(())
    }

    /// Sends a PING (into `out`) unless one is outstanding.
    pub(crate) fn send_ping(&mut self) {
        if self.ping.outstanding.is_none() {
            self.ping.next += 1;
            let data = self.ping.next.to_be_bytes();
            self.ping.outstanding = Some(data);
            self.ping.answered = false;
            frame::put_frame(&mut self.out, kind::PING, 0, 0, &data);
        }
    }

    /// Waits for the answer to the PING last sent.
    pub(crate) fn poll_pong(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        if self.ping.answered {
            self.ping.answered = false;
            return Poll::Ready(Ok(()));
        }
        if let Some(f) = &self.failure {
            return Poll::Ready(Err(f.clone()));
        }
        self.ping.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
