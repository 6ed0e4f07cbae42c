//! The admin port's client, for `sluice ctl` and tests: one request per connection
//! over a plain `TcpStream`, read to the end (the server closes after each answer).
//! Hand-written like the server side: the subset is a dozen lines and an HTTP client
//! crate would bring TLS, pools and redirects that a loopback operator tool never uses.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer read, bytes (a channel list or metrics page is a few KB).
const ANSWER_MAX: u64 = 64 * 1024 * 1024;

/// An answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code.
    pub code: u16,
    /// Body text.
    pub body: String,
}

/// Send one request to `addr` (`host:port`) and read the answer, within `timeout`.
pub async fn request(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Answer> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut raw = Vec::new();
        s.take(ANSWER_MAX).read_to_end(&mut raw).await?;
        parse(&raw)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "admin port did not answer in time"))?
}

/// Split a whole HTTP/1.1 answer into code and body.
fn parse(raw: &[u8]) -> std::io::Result<Answer> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok(Answer {
        code,
        body: String::from_utf8_lossy(&raw[end + 4..]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        let a = parse(b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nno\n").unwrap();
        assert_eq!(
            a,
            Answer {
                code: 404,
                body: "no\n".into()
            }
        );
        assert!(parse(b"garbage").is_err());
    }
}
