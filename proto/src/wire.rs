//! Reading and writing newline-delimited frames on async streams, each read bounded by a limit
//! chosen by what the peer is trusted with (see the `*_FRAME_BYTES` constants of this crate).

use std::io;

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one line, appending it to `buf`; the caller clears `buf` once it handled the frame.
/// `Ok(false)` is a clean end of stream. A line longer than `limit` is an error as soon as the
/// limit is passed, so a peer that never sends a newline costs at most `limit` bytes.
/// Cancel-safe in `select!`: bytes already read stay in `buf`, so the next call continues the
/// same line.
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<bool> {
    loop {
        let room = (limit + 1).saturating_sub(buf.len()) as u64;
        let n = (&mut *reader).take(room).read_until(b'\n', buf).await?;
        if buf.last() == Some(&b'\n') {
            return Ok(true);
        }
        if buf.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame exceeds the limit of {limit} bytes"),
            ));
        }
        if n == 0 {
            // A last line without its newline still counts; an empty read is the end.
            return Ok(!buf.is_empty());
        }
    }
}

/// A decoder's error quotes the offending input: its explanation is kept, the echo bounded.
pub fn frame_error(e: &crate::FrameError) -> String {
    crate::excerpt_within(&e.to_string(), 4 * crate::EXCERPT_CHARS).to_string()
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    msg: &T,
) -> io::Result<()> {
    writer.write_all(&crate::encode_frame(msg)).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_FRAME_BYTES;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn frames_are_lines_and_the_last_may_lack_its_newline() {
        let mut r = BufReader::new(&b"{\"a\":1}\n{\"b\":2}"[..]);
        let mut buf = Vec::new();
        assert!(read_frame(&mut r, &mut buf, MAX_FRAME_BYTES).await.unwrap());
        assert_eq!(buf, b"{\"a\":1}\n");
        buf.clear();
        assert!(read_frame(&mut r, &mut buf, MAX_FRAME_BYTES).await.unwrap());
        assert_eq!(buf, b"{\"b\":2}");
        buf.clear();
        assert!(!read_frame(&mut r, &mut buf, MAX_FRAME_BYTES).await.unwrap());
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_once_past_the_limit() {
        let big = vec![b'x'; 1 << 20];
        let mut r = BufReader::new(&big[..]);
        let mut buf = Vec::new();
        let err = read_frame(&mut r, &mut buf, crate::PREAUTH_FRAME_BYTES)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // What was buffered is bounded by the limit, not by what the peer sent.
        assert!(
            buf.len() <= crate::PREAUTH_FRAME_BYTES + 8 * 1024,
            "{}",
            buf.len()
        );
    }

    #[tokio::test]
    async fn written_frames_read_back() {
        let mut out = Vec::new();
        write_frame(&mut out, &crate::agent::AgentMsg::Heartbeat)
            .await
            .unwrap();
        assert_eq!(out, b"{\"type\":\"heartbeat\"}\n");
    }
}
