//! Moving a connection's tunnels along with it: the copy loops joining each tunnel to its
//! application socket stop between two steps, and what they hold (bytes read and not yet
//! written, the ends already seen, a duplicate of the application socket) goes with the
//! connection to the other process.
//!
//! A [`Mover`] belongs to one HTTP/2 connection. Its copy loops ([`copy_tunnel_movable`]
//! (crate::handoff::copy_tunnel_movable)) register with it and look at its phase before each step:
//!
//! - running: they copy;
//! - pausing: they stop where they are and say so (the connection may still move or not);
//! - taking: the connection has been taken apart; each loop hands its state over and ends with
//!   [`Copied::Moved`].
//!
//! Taking happens only once every stream of the connection has a paused loop, so nothing is
//! half-copied; a connection whose loops do not all pause in time resumes them and stays.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use crate::copy::Transferred;

const RUNNING: u8 = 0;
const PAUSING: u8 = 1;
const TAKING: u8 = 2;

/// Where a copy loop stands with respect to a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Copy.
    Running,
    /// Stop between two steps and wait.
    Pausing,
    /// Hand the state over and end.
    Taking,
}

/// The copy loops of one connection (or the one loop of a plain copy, [`PlainMover`]), and the
/// move they take part in; `T` is what a loop hands over.
#[derive(Debug)]
pub(crate) struct Mover<T = MovedTunnel> {
    phase: AtomicU8,
    inner: Mutex<Inner<T>>,
    /// Woken when a loop pauses or hands its state over.
    changed: tokio::sync::Notify,
}

impl<T> Default for Mover<T> {
    fn default() -> Self {
        Mover {
            phase: AtomicU8::new(RUNNING),
            inner: Mutex::new(Inner {
                copies: HashMap::new(),
                paused: HashSet::new(),
                taken: HashMap::new(),
            }),
            changed: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Debug)]
struct Inner<T> {
    /// The running copy loops, by stream id, with the waker of their task.
    copies: HashMap<u32, Waker>,
    /// The loops that have paused.
    paused: HashSet<u32>,
    /// What the loops handed over, by stream id.
    taken: HashMap<u32, T>,
}

impl<T> Mover<T> {
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            RUNNING => Phase::Running,
            PAUSING => Phase::Pausing,
            _ => Phase::Taking,
        }
    }

    /// A copy loop on stream `id` runs in the task `waker` wakes.
    pub(crate) fn register(&self, id: u32, waker: &Waker) {
        self.lock().copies.insert(id, waker.clone());
    }

    /// The copy loop on stream `id` has ended (or handed over).
    pub(crate) fn unregister(&self, id: u32) {
        let mut inner = self.lock();
        inner.copies.remove(&id);
        inner.paused.remove(&id);
    }

    /// The copy loop on stream `id` stopped where it was.
    pub(crate) fn paused(&self, id: u32) {
        if self.lock().paused.insert(id) {
            self.changed.notify_waiters();
        }
    }

    /// The copy loop on stream `id` hands over its state.
    pub(crate) fn hand_over(&self, id: u32, tunnel: T) {
        let mut inner = self.lock();
        inner.taken.insert(id, tunnel);
        inner.copies.remove(&id);
        inner.paused.remove(&id);
        drop(inner);
        self.changed.notify_waiters();
    }

    fn set(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
        let inner = self.lock();
        for waker in inner.copies.values() {
            waker.wake_by_ref();
        }
    }

    /// Asks every copy loop to stop between two steps.
    pub(crate) fn pause(&self) {
        self.set(PAUSING);
    }

    /// Lets the paused loops go on: the connection stays here.
    pub(crate) fn resume(&self) {
        self.lock().paused.clear();
        self.set(RUNNING);
    }

    /// Asks the paused loops for their state: the connection has been taken apart.
    pub(crate) fn take(&self) {
        self.set(TAKING);
    }

    /// Whether a copy loop runs on stream `id`.
    fn registered(&self, id: u32) -> bool {
        self.lock().copies.contains_key(&id)
    }

    /// Whether every id in `streams` has a paused copy loop.
    pub(crate) fn all_paused(&self, streams: impl IntoIterator<Item = u32>) -> Result<(), u32> {
        let inner = self.lock();
        for id in streams {
            if !inner.paused.contains(&id) {
                return Err(id);
            }
        }
        Ok(())
    }

    /// What the loop of stream `id` handed over, if it has.
    pub(crate) fn taken(&self, id: u32) -> Option<T> {
        self.lock().taken.remove(&id)
    }

    /// A future that completes at the next pause or hand-over (create it before looking).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// One tunnel of a moved connection, as its copy loop left it.
#[derive(Debug)]
pub struct MovedTunnel {
    /// The HTTP/2 stream it runs on.
    pub stream_id: u32,
    /// The application's side of the copy: a duplicate of its socket's descriptor.
    pub app: OwnedFd,
    /// Where the copy stood.
    pub copy: CopyState,
    /// What the application attached to the copy when it started it (see
    /// [`copy_tunnel_movable`](crate::handoff::copy_tunnel_movable)), for the other process.
    pub memo: Vec<u8>,
}

/// Where a copy between a tunnel and an application socket stood when it stopped: enough for
/// another process to go on with it, not a byte lost or repeated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyState {
    /// Received from the tunnel and not yet written to the application.
    pub to_app: Vec<u8>,
    /// The tunnel's peer has ended its side (END_STREAM read); the application gets a FIN
    /// after `to_app`.
    pub to_app_eof: bool,
    /// The application got that FIN.
    pub to_app_done: bool,
    /// Read from the application and not yet sent into the tunnel.
    pub from_app: Vec<u8>,
    /// The application has ended its side; END_STREAM follows `from_app`.
    pub from_app_eof: bool,
    /// END_STREAM was sent.
    pub from_app_done: bool,
    /// Bytes moved so far each way.
    pub transferred: Transferred,
}

/// How a movable copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Both directions reached their end: what moved.
    Done(Transferred),
    /// The connection moved to another process, this copy's state with it: what moved here.
    /// The application socket still open here is a duplicate; close it without a reset.
    Moved(Transferred),
}

/// A copy loop's registration with its connection's [`Mover`]; unregisters when dropped.
pub(crate) struct Watch<T = MovedTunnel> {
    mover: Arc<Mover<T>>,
    id: u32,
    waker: Option<Waker>,
    paused: bool,
}

/// What a copy loop does at its next step.
pub(crate) enum Step {
    Copy,
    Wait,
    HandOver,
}

impl<T> Watch<T> {
    pub(crate) fn new(mover: Arc<Mover<T>>, id: u32) -> Watch<T> {
        Watch {
            mover,
            id,
            waker: None,
            paused: false,
        }
    }

    /// Looks at the phase before a step; `can_pause` says whether the loop stands where it may
    /// stop (a loop that has seen an error it has not yet reported goes on to report it).
    pub(crate) fn step(&mut self, waker: &Waker, can_pause: bool) -> Step {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.mover.register(self.id, waker);
            self.waker = Some(waker.clone());
        }
        match self.mover.phase() {
            Phase::Running => {
                self.paused = false;
                Step::Copy
            }
            Phase::Pausing if !can_pause => Step::Copy,
            Phase::Pausing => {
                // Said at every wake-up while pausing: a move given up and begun again clears
                // what the first one was told.
                self.paused = true;
                self.mover.paused(self.id);
                Step::Wait
            }
            Phase::Taking if self.paused => Step::HandOver,
            // Not paused when the connection was taken apart: the taking waits for every stream's
            // loop to pause, so this loop's stream was not part of it.
            Phase::Taking => Step::Copy,
        }
    }

    /// Whether a move began while the loop stepped (its wake may have been missed).
    pub(crate) fn phase_changed(&self) -> bool {
        self.mover.phase() != Phase::Running
    }

    pub(crate) fn hand_over(&self, tunnel: T) {
        self.mover.hand_over(self.id, tunnel);
    }
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        self.mover.unregister(self.id);
    }
}

/// A plain copy between two sockets (a proxy's passthrough or plaintext connection, no
/// tunnel) that may move to another process: make one per copy, give it to
/// [`copy_movable`](crate::handoff::copy_movable) and keep a clone to move the copy with
/// [`PlainMover::hand_off`]. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct PlainMover(pub(crate) Arc<Mover<MovedPlain>>);

/// A plain copy handed out of this process: duplicates of its two sockets' descriptors, where
/// it stood, and what the application attached to it. Another process goes on with it by
/// giving the sockets and `copy` to [`copy_movable`](crate::handoff::copy_movable).
#[derive(Debug)]
pub struct MovedPlain {
    /// The copy's `a` socket.
    pub a: OwnedFd,
    /// Its `b` socket.
    pub b: OwnedFd,
    /// Where the copy stood, `a` in a tunnel's place: `to_app` holds bytes read from `a` and not
    /// yet written to `b`, `from_app` bytes read from `b` and not yet written to `a`.
    pub copy: CopyState,
    /// What the application attached to the copy.
    pub memo: Vec<u8>,
}

/// Why a plain copy did not move ([`PlainMover::hand_off`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlainNotMoved {
    /// The copy was not running (not yet started, ended, or moved already): nothing to move.
    #[error("the copy is not running")]
    NotRunning,
    /// It did not stop between two steps in time; it goes on here.
    #[error("the copy did not pause")]
    DidNotPause,
    /// It stopped, and then never handed over (its task is gone): its sockets are lost.
    #[error("the copy did not hand over; its sockets are lost")]
    Lost,
}

/// The one copy loop of a plain copy.
const PLAIN: u32 = 0;

/// How often a plain move waiting for its copy looks again.
const PLAIN_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

impl PlainMover {
    /// A mover for one copy.
    pub fn new() -> PlainMover {
        PlainMover::default()
    }

    /// Stops the copy between two steps and takes it: the copy ends with
    /// [`Copied::Moved`] and this returns what it handed over. Refused, the copy going on as
    /// before, when it is not running (not started, or ended) or does not stop within
    /// `patience`.
    pub async fn hand_off(
        &self,
        patience: std::time::Duration,
    ) -> Result<MovedPlain, PlainNotMoved> {
        let mover = &self.0;
        if !mover.registered(PLAIN) {
            return Err(PlainNotMoved::NotRunning);
        }
        mover.pause();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = mover.changed();
            if !mover.registered(PLAIN) {
                mover.resume();
                return Err(PlainNotMoved::NotRunning);
            }
            if mover.all_paused([PLAIN]).is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                mover.resume();
                return Err(PlainNotMoved::DidNotPause);
            }
            let next = deadline.min(tokio::time::Instant::now() + PLAIN_CHECK);
            let _ = tokio::time::timeout_at(next, changed).await;
        }
        mover.take();
        loop {
            let changed = mover.changed();
            if let Some(moved) = mover.taken(PLAIN) {
                return Ok(moved);
            }
            // Paused, it hands over at its next wake-up; its task gone, never.
            if tokio::time::timeout_at(deadline + patience, changed)
                .await
                .is_err()
            {
                return Err(PlainNotMoved::Lost);
            }
        }
    }
}
