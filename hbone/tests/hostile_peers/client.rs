//! Hostile servers against the client pool.
