//! Control messages of meshnet.
//!
//! Every connection carries newline-delimited JSON frames ([`encode_frame`], [`decode_frame`]).
//! - [`agent`]: between `mesh-agent` and `mesh-manager` (TCP, `--listen`). The agent opens with
//!   [`agent::AgentMsg::Hello`]; the manager answers [`agent::ManagerMsg::Welcome`] and then sends the
//!   node's full desired state ([`agent::Assignment`]) on connect and on every change.
//! - [`api`]: between `meshctl` and `mesh-manager` (Unix socket or TCP).
//! - [`sd_notify`]: readiness of both daemons to systemd.
//!
//! [`PROTOCOL_VERSION`] is checked on Hello: a peer with another major version is refused with a
//! clear error instead of misreading frames.

pub mod agent;
pub mod api;
pub mod model;
pub mod sd_notify;
pub mod wire;

use serde::{de::DeserializeOwned, Serialize};

/// Bumped on any incompatible change of a message.
pub const PROTOCOL_VERSION: u32 = 3;

/// Frames larger than this are refused: a guard against a peer that never sends a newline. The
/// largest frames are assignments of big clusters, manager to agent.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// What a peer may send before it is authenticated (a join request with its CSR fits in a few KB).
pub const PREAUTH_FRAME_BYTES: usize = 16 * 1024;
/// What an authenticated agent may send in one frame (task statuses, load balancer reports).
pub const AGENT_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// One meshctl request (a service spec with its command and environment).
pub const API_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes one message as a JSON line (with the trailing newline).
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing our own plain data types cannot fail: no maps with non-string keys, no I/O.
    let mut out = serde_json::to_vec(msg).expect("control messages always serialize");
    out.push(b'\n');
    out
}

/// Whether two subnets share an address (one contains the other's first address).
pub fn subnets_overlap(a: &ipnet::Ipv4Net, b: &ipnet::Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Milliseconds since the Unix epoch (0 on a clock before 1970).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// How many characters of a user's or peer's input an error or log line repeats at most.
pub const EXCERPT_CHARS: usize = 64;

/// Input as an error or log line may quote it: whole when short, else its first characters and
/// its size, so an absurd input cannot turn into an absurd message. `{}` shows it bare, `{:?}`
/// quoted; control characters are escaped either way so input cannot forge log lines.
#[derive(Clone, Copy)]
pub struct Excerpt<'a> {
    text: &'a str,
    max_chars: usize,
}

/// The one helper for echoing input: at most [`EXCERPT_CHARS`] characters of `text`.
pub fn excerpt(text: &str) -> Excerpt<'_> {
    excerpt_within(text, EXCERPT_CHARS)
}

/// [`excerpt`] with another bound, for messages such as a decoder's that embed input in text
/// worth keeping.
pub fn excerpt_within(text: &str, max_chars: usize) -> Excerpt<'_> {
    Excerpt { text, max_chars }
}

impl Excerpt<'_> {
    /// The part shown, and whether something was left out.
    fn head(&self) -> (&str, bool) {
        match self.text.char_indices().nth(self.max_chars) {
            Some((at, _)) => (&self.text[..at], true),
            None => (self.text, false),
        }
    }

    fn tail(&self, f: &mut std::fmt::Formatter<'_>, cut: bool) -> std::fmt::Result {
        if cut {
            write!(f, "…({} bytes)", self.text.len())?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (head, cut) = self.head();
        for c in head.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_debug())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        self.tail(f, cut)
    }
}

impl std::fmt::Debug for Excerpt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (head, cut) = self.head();
        write!(f, "{head:?}")?;
        self.tail(f, cut)
    }
}

/// Decodes one JSON line (with or without its trailing newline).
pub fn decode_frame<T: DeserializeOwned>(line: &[u8]) -> Result<T, FrameError> {
    if line.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(line.len()));
    }
    Ok(serde_json::from_slice(line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_bound_what_they_repeat() {
        assert_eq!(excerpt("web").to_string(), "web");
        assert_eq!(format!("{:?}", excerpt("web")), "\"web\"");
        assert_eq!(excerpt("a\nb").to_string(), "a\\nb");
        let long = "x".repeat(10_000);
        let shown = excerpt(&long).to_string();
        assert_eq!(
            shown,
            format!("{}…(10000 bytes)", "x".repeat(EXCERPT_CHARS))
        );
        assert_eq!(
            format!("{:?}", excerpt(&long)),
            format!("\"{}\"…(10000 bytes)", "x".repeat(EXCERPT_CHARS))
        );
        // Cut on a character boundary, sized in bytes.
        let wide = "é".repeat(100);
        assert_eq!(
            excerpt(&wide).to_string(),
            format!("{}…(200 bytes)", "é".repeat(EXCERPT_CHARS))
        );
        assert_eq!(excerpt_within("abcdef", 3).to_string(), "abc…(6 bytes)");
    }
}
