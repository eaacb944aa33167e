//! Where an explanation goes: evaluation is generic over a [`Trace`] sink; deciding uses one
//! that does nothing (it compiles away), `explain` one that keeps the text.

/// Receives explanation lines; the decision path uses [`NoTrace`].
pub trait Trace {
    /// Whether lines are wanted (so callers can skip building them).
    const ENABLED: bool;
    /// Records one line at an indentation depth.
    fn line(&mut self, depth: usize, text: String);
}

/// Records nothing.
#[derive(Debug, Default)]
pub struct NoTrace;

impl Trace for NoTrace {
    const ENABLED: bool = false;
    fn line(&mut self, _depth: usize, _text: String) {}
}

/// Records lines for [`PolicyStore::explain`](super::PolicyStore::explain).
#[derive(Debug, Default)]
pub struct TextTrace {
    /// The explanation so far.
    pub text: String,
}

impl Trace for TextTrace {
    const ENABLED: bool = true;
    fn line(&mut self, depth: usize, text: String) {
        for _ in 0..depth {
            self.text.push_str("  ");
        }
        self.text.push_str(&text);
        self.text.push('\n');
    }
}
