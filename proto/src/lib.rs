//! Control messages of meshnet.
//!
//! Every connection carries newline-delimited JSON frames ([`encode_frame`], [`decode_frame`]).
//! - [`agent`]: between `mesh-agent` and `mesh-manager` (TCP, `--listen`). The agent opens with
//!   [`agent::AgentMsg::Hello`]; the manager answers [`agent::ManagerMsg::Welcome`] and then sends the
//!   node's full desired state ([`agent::Assignment`]) on connect and on every change.
//! - [`api`]: between `meshctl` and `mesh-manager` (Unix socket or TCP).
//!
//! [`PROTOCOL_VERSION`] is checked on Hello: a peer with another major version is refused with a
//! clear error instead of misreading frames.

pub mod agent;
pub mod api;
pub mod model;
pub mod wire;

use serde::{de::DeserializeOwned, Serialize};

/// Bumped on any incompatible change of a message.
pub const PROTOCOL_VERSION: u32 = 2;

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

/// Decodes one JSON line (with or without its trailing newline).
pub fn decode_frame<T: DeserializeOwned>(line: &[u8]) -> Result<T, FrameError> {
    if line.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(line.len()));
    }
    Ok(serde_json::from_slice(line)?)
}

/// A bounded quote of something a peer or user sent, for errors and logs: at most 64
/// characters, with the full length when cut, so a 10 MB name never comes back as 10 MB.
pub fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(MAX).collect();
    format!("{head:?}… ({} bytes)", s.len())
}

#[cfg(test)]
mod excerpt_tests {
    #[test]
    fn long_input_is_cut_and_measured() {
        assert_eq!(super::excerpt("web"), "\"web\"");
        let e = super::excerpt(&"x".repeat(10_000));
        assert!(e.len() < 100 && e.ends_with("… (10000 bytes)"), "{e}");
    }
}
