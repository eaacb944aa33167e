//! Values and parsers several subcommands' arguments share: the log format, the capture
//! backend, durations.

use clap::ValueEnum;

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// `key=value` fields after the message.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Which firewall the capture rules are written for (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CaptureBackend {
    /// `iptables-restore`, in our own chains of the nat table.
    Iptables,
    /// One `nft -f` transaction, in our own `inet` table.
    Nftables,
}

impl CaptureBackend {
    /// The name the flag takes.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CaptureBackend::Iptables => "iptables",
            CaptureBackend::Nftables => "nftables",
        }
    }
}

impl From<CaptureBackend> for redirect::Backend {
    fn from(b: CaptureBackend) -> redirect::Backend {
        match b {
            CaptureBackend::Iptables => redirect::Backend::Iptables,
            CaptureBackend::Nftables => redirect::Backend::Nftables,
        }
    }
}

impl std::fmt::Display for CaptureBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `90s`, `15m`, `24h`, `7d`.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; use s, m, h or d (e.g. 24h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?} has unit {unit:?}; use s, m, h or d")),
    };
    if seconds == 0 {
        return Err("a lifetime must be longer than zero".into());
    }
    Ok(std::time::Duration::from_secs(seconds))
}
