//! Line framing: a frame is the bytes up to a `\n` (a `\r` before it is
//! dropped), at most [`Limits::max_frame`] bytes, valid UTF-8.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Frame size and time limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest frame, without its line end.
    pub max_frame: usize,
    /// How long a connection may stay silent between frames.
    pub idle: Duration,
    /// How long one frame may take to arrive once its first byte has.
    pub frame: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 64 * 1024,
            idle: Duration::from_secs(300),
            frame: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame longer than {0} bytes")]
    TooLong(usize),
    #[error("frame is not valid UTF-8")]
    NotUtf8,
    #[error("no frame within the idle timeout")]
    Idle,
    #[error("frame not finished within the frame timeout")]
    Slow,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from a stream. After any error the stream is in an unknown
/// position: the connection must be closed.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    limits: Limits,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a line end.
    scanned: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, limits: Limits) -> Self {
        Self {
            inner,
            limits,
            buf: Vec::with_capacity(4096),
            scanned: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The next frame, or `None` when the peer closed the connection
    /// cleanly between frames.
    pub async fn next_frame(&mut self) -> Result<Option<String>, FrameError> {
        let mut deadline: Option<tokio::time::Instant> =
            (!self.buf.is_empty()).then(|| tokio::time::Instant::now() + self.limits.frame);
        loop {
            if let Some(end) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + end;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > self.limits.max_frame {
                    return Err(FrameError::TooLong(self.limits.max_frame));
                }
                return String::from_utf8(line).map(Some).map_err(|_| FrameError::NotUtf8);
            }
            self.scanned = self.buf.len();
            // Room for the longest frame and its "\r\n", and no more.
            if self.buf.len() > self.limits.max_frame + 1 {
                return Err(FrameError::TooLong(self.limits.max_frame));
            }
            let mut chunk = [0u8; 8192];
            let room = (self.limits.max_frame + 2 - self.buf.len()).min(chunk.len());
            let wait = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.inner.read(&mut chunk[..room])).await,
                None => tokio::time::timeout(self.limits.idle, self.inner.read(&mut chunk[..room])).await,
            };
            let n = match wait {
                Err(_) if deadline.is_some() => return Err(FrameError::Slow),
                Err(_) => return Err(FrameError::Idle),
                Ok(read) => read?,
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.limits.frame);
        }
    }
}

/// Write one frame (the line end added), giving up (an error) when the peer
/// has not taken it within `within`: a peer that stops reading cannot pin
/// the writer's task.
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &str,
    within: Duration,
) -> std::io::Result<()> {
    write_frames(w, &[frame], within).await
}

/// Write several frames in one write (each with its line end), within
/// `within` for all of them, as [`write_frame`].
pub async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[impl AsRef<str>],
    within: Duration,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut line = Vec::with_capacity(frames.iter().map(|f| f.as_ref().len() + 1).sum());
    for frame in frames {
        line.extend_from_slice(frame.as_ref().as_bytes());
        line.push(b'\n');
    }
    let write = async {
        w.write_all(&line).await?;
        w.flush().await
    };
    tokio::time::timeout(within, write)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer does not read"))?
}

/// End the stream (a TLS close_notify), bounded like any write.
pub async fn close<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, within: Duration) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(within, w.shutdown()).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn limits(max: usize) -> Limits {
        Limits {
            max_frame: max,
            idle: Duration::from_millis(200),
            frame: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn frames_are_lines_without_their_ends() {
        let data: &[u8] = b"{\"a\":1}\r\n{\"b\":2}\n\n";
        let mut r = FrameReader::new(data, limits(64));
        assert_eq!(r.next_frame().await.unwrap().as_deref(), Some("{\"a\":1}"));
        assert_eq!(r.next_frame().await.unwrap().as_deref(), Some("{\"b\":2}"));
        assert_eq!(r.next_frame().await.unwrap().as_deref(), Some(""));
        assert_eq!(r.next_frame().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_frame_at_the_limit_passes_and_one_byte_more_does_not() {
        let ok = format!("{}\n", "x".repeat(64));
        assert_eq!(
            FrameReader::new(ok.as_bytes(), limits(64))
                .next_frame()
                .await
                .unwrap()
                .unwrap()
                .len(),
            64
        );
        let crlf = format!("{}\r\n", "x".repeat(64));
        assert!(
            FrameReader::new(crlf.as_bytes(), limits(64))
                .next_frame()
                .await
                .is_ok()
        );
        let long = format!("{}\n", "x".repeat(65));
        assert!(matches!(
            FrameReader::new(long.as_bytes(), limits(64)).next_frame().await,
            Err(FrameError::TooLong(64))
        ));
        // Without a line end in sight, reading stops at the limit.
        let endless = vec![b'x'; 1 << 20];
        assert!(matches!(
            FrameReader::new(endless.as_slice(), limits(64))
                .next_frame()
                .await,
            Err(FrameError::TooLong(64))
        ));
    }

    #[tokio::test]
    async fn broken_utf8_and_truncation_are_errors() {
        assert!(matches!(
            FrameReader::new(&b"\xff\xfe\n"[..], limits(64))
                .next_frame()
                .await,
            Err(FrameError::NotUtf8)
        ));
        assert!(matches!(
            FrameReader::new(&b"{\"half"[..], limits(64)).next_frame().await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn silence_and_slow_lines_time_out() {
        let (client, server) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(server, limits(64));
        assert!(matches!(r.next_frame().await, Err(FrameError::Idle)));

        let (mut client2, server2) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(server2, limits(64));
        client2.write_all(b"{\"never\": \"ends\"").await.unwrap();
        assert!(matches!(r.next_frame().await, Err(FrameError::Slow)));
        drop(client);
    }
}
