//! Reading and writing newline-delimited frames on async streams.

use std::io;

use proto::MAX_FRAME_BYTES;
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one line, appending it to `buf`; the caller clears `buf` once it handled the frame.
/// `Ok(false)` is a clean end of stream. Cancel-safe in `select!`: bytes already read stay in
/// `buf`, so the next call continues the same line.
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        let room = (MAX_FRAME_BYTES + 1).saturating_sub(buf.len()) as u64;
        let n = (&mut *reader).take(room).read_until(b'\n', buf).await?;
        if buf.last() == Some(&b'\n') {
            return Ok(true);
        }
        if buf.len() > MAX_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame exceeds the limit of {MAX_FRAME_BYTES} bytes"),
            ));
        }
        if n == 0 {
            // A last line without its newline still counts; an empty read is the end.
            return Ok(!buf.is_empty());
        }
    }
}

/// A decoder's error quotes the offending input: its explanation is kept, the echo bounded.
pub fn frame_error(e: &proto::FrameError) -> String {
    proto::excerpt_within(&e.to_string(), 4 * proto::EXCERPT_CHARS).to_string()
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    msg: &T,
) -> io::Result<()> {
    writer.write_all(&proto::encode_frame(msg)).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn frames_are_lines_and_the_last_may_lack_its_newline() {
        let mut r = BufReader::new(&b"{\"a\":1}\n{\"b\":2}"[..]);
        let mut buf = Vec::new();
        assert!(read_frame(&mut r, &mut buf).await.unwrap());
        assert_eq!(buf, b"{\"a\":1}\n");
        buf.clear();
        assert!(read_frame(&mut r, &mut buf).await.unwrap());
        assert_eq!(buf, b"{\"b\":2}");
        buf.clear();
        assert!(!read_frame(&mut r, &mut buf).await.unwrap());
    }

    #[tokio::test]
    async fn an_endless_line_is_refused() {
        let big = vec![b'x'; MAX_FRAME_BYTES + 10];
        let mut r = BufReader::new(&big[..]);
        let mut buf = Vec::new();
        let err = read_frame(&mut r, &mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[tokio::test]
    async fn written_frames_read_back() {
        let mut out = Vec::new();
        write_frame(&mut out, &proto::agent::AgentMsg::Heartbeat)
            .await
            .unwrap();
        assert_eq!(out, b"{\"type\":\"heartbeat\"}\n");
    }
}
