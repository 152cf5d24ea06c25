//! The stdio transport's two guards: the child process, killed with its whole process group when the
//! session ends or is dropped, and a reader that lets only well-formed JSON-RPC lines reach `rmcp`.
//!
//! Why a reader of our own: `rmcp`'s line transport skips a line that is not JSON and drops a line
//! over its 16 MiB limit, both silently, so a server writing garbage on stdout left the call waiting
//! for its full timeout and then failed it as a "timeout" (the 10 MB answer of a tool whose SDK
//! sends it twice, as text and as structured content, is over that limit). [`StrictLines`] ends the stream at the
//! first bad line instead: every call in flight fails at once, and the session records why
//! ([`Violation`]), naming the line number and the parse error — never the line's bytes, which may
//! hold anything the server had (its environment's secrets included).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::Child;

/// The first protocol violation seen on the server's stdout, shared with the session.
pub type Violation = Arc<OnceLock<Broken>>;

/// How the server broke the stdio protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Broken {
    /// A line that is not JSON (the text says which and why, never what it held).
    Malformed(String),
    /// A line longer than the session's message limit (`max` bytes).
    Oversized { max: usize },
}

/// Passes the child's stdout through line by line, each line only once it parsed as JSON.
pub struct StrictLines<R> {
    inner: R,
    buf: Vec<u8>,
    /// `buf[..start]` was handed on; `buf[start..ready_end]` is validated and may be; the rest is
    /// an incomplete line, searched for its newline up to `scanned`.
    start: usize,
    ready_end: usize,
    scanned: usize,
    lines: u64,
    max_line: usize,
    eof: bool,
    violation: Violation,
}

impl<R> StrictLines<R> {
    pub fn new(inner: R, max_line: usize, violation: Violation) -> Self {
        StrictLines {
            max_line,
            inner,
            buf: Vec::new(),
            start: 0,
            ready_end: 0,
            scanned: 0,
            lines: 0,
            eof: false,
            violation,
        }
    }

    fn fail(&mut self, why: Broken) -> io::Error {
        let _ = self.violation.set(why);
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the MCP server wrote a malformed JSON-RPC message",
        )
    }

    /// Validates the complete lines buffered; `Err` at the first bad one.
    fn validate(&mut self) -> Result<(), io::Error> {
        while let Some(pos) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
            let end = self.scanned + pos;
            self.lines += 1;
            let line = &self.buf[self.ready_end..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
            if !line.iter().all(u8::is_ascii_whitespace)
                && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(line)
            {
                // serde_json's message names a position and what it expected, not the input.
                let why = format!(
                    "stdout line {} ({} bytes) is not JSON: {e}",
                    self.lines,
                    line.len()
                );
                return Err(self.fail(Broken::Malformed(why)));
            }
            self.ready_end = end + 1;
            self.scanned = end + 1;
        }
        self.scanned = self.buf.len();
        if self.buf.len() - self.ready_end > self.max_line {
            let max = self.max_line;
            return Err(self.fail(Broken::Oversized { max }));
        }
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for StrictLines<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.violation.get().is_some() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the MCP server wrote a malformed JSON-RPC message",
                )));
            }
            if this.start < this.ready_end {
                let n = (this.ready_end - this.start).min(out.remaining());
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A trailing fragment without a newline is no message; rmcp would drop it too.
                return Poll::Ready(Ok(()));
            }
            // Everything validated was handed on: move the incomplete line to the front.
            if this.start > 0 {
                this.buf.drain(..this.start);
                this.scanned -= this.start;
                this.ready_end = 0;
                this.start = 0;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    this.buf.extend_from_slice(rb.filled());
                    if let Err(e) = this.validate() {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

/// The server's process, and the process group it leads (`process_group(0)` at spawn): a server
/// started through a wrapper (`npx`, a shell script) has children of its own, and killing only the
/// wrapper would leave them running.
pub struct ChildGuard {
    child: Mutex<Child>,
    pid: Option<u32>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        let pid = child.id();
        ChildGuard {
            child: Mutex::new(child),
            pid,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How the process ended, if it has.
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()
            .ok()
            .flatten()
    }

    fn kill_group(&self) {
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is shared.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }

    /// Waits up to `grace` for the server to exit by itself (its stdin is closed by then), then
    /// kills its process group and reaps it.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.exit_status().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The group may outlive its leader: signal it either way.
        self.kill_group();
        for _ in 0..100 {
            if self.exit_status().is_some() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A session dropped without `close` (a cancelled plan, a panic unwinding): the child and its
        // group go now; tokio reaps the leader (`kill_on_drop`).
        self.kill_group();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    async fn read_all(input: &[u8]) -> (io::Result<Vec<u8>>, Option<Broken>) {
        let v: Violation = Arc::default();
        let mut r = StrictLines::new(input, 1 << 20, v.clone());
        let mut out = Vec::new();
        let res = r.read_to_end(&mut out).await.map(|_| out);
        (res, v.get().cloned())
    }

    #[tokio::test]
    async fn passes_json_lines_and_stops_at_the_first_bad_one_without_quoting_it() {
        let (ok, none) = read_all(b"{\"a\":1}\r\n\n[2]\n").await;
        assert_eq!(ok.unwrap(), b"{\"a\":1}\r\n\n[2]\n");
        assert_eq!(none, None);

        let (err, why) = read_all(b"{\"a\":1}\n{\"token\": \"s3cret\" <<garbage>>\n[3]\n").await;
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let Some(Broken::Malformed(why)) = why else {
            panic!("{why:?}")
        };
        assert!(
            why.starts_with("stdout line 2 (30 bytes) is not JSON"),
            "{why}"
        );
        assert!(!why.contains("s3cret"), "{why}");
    }

    #[tokio::test]
    async fn a_line_split_over_many_reads_is_whole_before_it_is_passed_on() {
        let big = format!("{{\"x\":\"{}\"}}\n", "y".repeat(100_000));
        let (ok, _) = read_all(big.as_bytes()).await;
        assert_eq!(ok.unwrap(), big.as_bytes());

        let over = format!("{{\"x\":\"{}\"}}\n", "y".repeat(2 << 20));
        let (err, why) = read_all(over.as_bytes()).await;
        assert!(err.is_err());
        assert_eq!(why, Some(Broken::Oversized { max: 1 << 20 }));
    }
}
