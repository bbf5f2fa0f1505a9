//! The read benchmark's load generator: one keep-alive HTTP/1.1 connection
//! per task, a request written and its answer read in that task, as `wrk`
//! drives a server.
//!
//! Hand-written around `httparse` (the parser hyper itself uses) rather
//! than hyper's pooled client because the load generator shares the
//! benchmark machine's two CPUs with the server it measures: the pooled
//! client hands every request to a connection task over a channel, checks
//! the connection out of and back into a locked pool and builds a full
//! `http::Response`, work the server's figures should not pay for. The
//! published figures this benchmark compares against (Helios, HAPI) were
//! taken with `wrk`, which does no more than this.
use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted (bytes); the server's are a few hundred.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers parsed.
const MAX_HEADERS: usize = 32;

/// Where and how to send: the server's address, the path prefix of its
/// FHIR base and the fixed request headers.
#[derive(Clone)]
pub struct Target {
    addr: String,
    prefix: String,
    /// `Host`, `Accept` and (with a token) `Authorization` lines, each ending in CRLF.
    headers: String,
}

impl Target {
    /// A target for `base` (`http://host:port/path`), sending `authorization` if given.
    pub fn new(base: &str, authorization: Option<&str>) -> anyhow::Result<Target> {
        let Some(rest) = base.strip_prefix("http://") else {
            bail!("the load generator speaks plain HTTP only, not {base}");
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let mut headers = format!("host: {authority}\r\naccept: application/fhir+json\r\n");
        if let Some(a) = authorization {
            if a.contains(['\r', '\n']) {
                bail!("an Authorization header value may not hold a line break");
            }
            headers.push_str("authorization: ");
            headers.push_str(a);
            headers.push_str("\r\n");
        }
        Ok(Target {
            addr: authority.to_string(),
            prefix: prefix.to_string(),
            headers,
        })
    }
}

/// One keep-alive connection; reconnects after the server closes it.
pub struct Conn {
    target: Target,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` that belong to the previous answer.
    consumed: usize,
}

impl Conn {
    pub fn new(target: Target) -> Conn {
        Conn {
            target,
            stream: None,
            request: Vec::with_capacity(1024),
            buf: Vec::with_capacity(64 * 1024),
            consumed: 0,
        }
    }

    /// `GET {base}/{path}`: the status and the body of the answer.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, &[u8])> {
        match self.exchange(path).await {
            Ok((status, start, end)) => Ok((status, &self.buf[start..end])),
            Err(e) => {
                // The connection's state is unknown after an error: start afresh.
                self.stream = None;
                Err(e)
            }
        }
    }

    async fn exchange(&mut self, path: &str) -> anyhow::Result<(u16, usize, usize)> {
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.target.addr)
                .await
                .with_context(|| format!("connecting to {}", self.target.addr))?;
            s.set_nodelay(true)?;
            self.buf.clear();
            self.stream = Some(s);
        }
        self.request.clear();
        self.request.extend_from_slice(b"GET ");
        self.request
            .extend_from_slice(self.target.prefix.as_bytes());
        self.request.push(b'/');
        self.request
            .extend_from_slice(path.trim_start_matches('/').as_bytes());
        self.request.extend_from_slice(b" HTTP/1.1\r\n");
        self.request
            .extend_from_slice(self.target.headers.as_bytes());
        self.request.extend_from_slice(b"\r\n");
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(&self.request).await?;
        // The head, then the body it announces.
        let (status, head_len, body_len, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf)? {
                httparse::Status::Complete(head_len) => {
                    let status = resp.code.unwrap_or(0);
                    let mut body_len = None;
                    let mut close = false;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            body_len = Some(
                                std::str::from_utf8(h.value)
                                    .ok()
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .context("a malformed Content-Length")?,
                            );
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            bail!("a chunked answer (the server sends Content-Length)");
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    break (status, head_len, body_len.unwrap_or(0), close);
                }
                httparse::Status::Partial => {
                    if self.buf.len() > MAX_HEAD {
                        bail!("a response head over {MAX_HEAD} bytes");
                    }
                    read_more(stream, &mut self.buf).await?;
                }
            }
        };
        let end = head_len + body_len;
        while self.buf.len() < end {
            read_more(stream, &mut self.buf).await?;
        }
        self.consumed = end;
        if close {
            self.stream = None;
        }
        Ok((status, head_len, end))
    }
}

/// Append what the socket has to `buf`; an error if it closed.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    if stream.read_buf(buf).await? == 0 {
        bail!("the server closed the connection mid-answer");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_target_splits_the_base_and_refuses_what_it_cannot_send() {
        let t = Target::new("http://127.0.0.1:8080/fhir/", Some("Bearer abc")).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080");
        assert_eq!(t.prefix, "/fhir");
        assert!(t.headers.contains("host: 127.0.0.1:8080\r\n"));
        assert!(t.headers.ends_with("authorization: Bearer abc\r\n"));
        let bare = Target::new("http://[::1]:9", None).unwrap();
        assert_eq!((bare.addr.as_str(), bare.prefix.as_str()), ("[::1]:9", ""));
        assert!(!bare.headers.contains("authorization"));
        assert!(Target::new("https://127.0.0.1:8443/fhir", None).is_err());
        assert!(Target::new("http://127.0.0.1:1/fhir", Some("a\r\nx: y")).is_err());
    }

    /// A server that reads one request head per answer in `answers` and
    /// writes that answer (split in two writes, to exercise partial reads);
    /// returns its base URL and, when it ends, the request lines it saw.
    async fn scripted(answers: Vec<Vec<u8>>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter().peekable();
            while answers.peek().is_some() {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                for answer in answers.by_ref() {
                    loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8(buf.drain(..end + 4).collect()).unwrap();
                            seen.push(head.lines().next().unwrap().to_string());
                            break;
                        }
                        if s.read_buf(&mut buf).await.unwrap() == 0 {
                            return seen;
                        }
                    }
                    let (a, b) = answer.split_at(answer.len() / 2);
                    s.write_all(a).await.unwrap();
                    s.flush().await.unwrap();
                    tokio::task::yield_now().await;
                    s.write_all(b).await.unwrap();
                    if answer
                        .windows(17)
                        .any(|w| w.eq_ignore_ascii_case(b"connection: close"))
                    {
                        break;
                    }
                }
            }
            seen
        });
        (base, task)
    }

    #[tokio::test]
    async fn answers_are_read_whole_and_a_closed_connection_is_reopened() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec();
        let close =
            b"HTTP/1.1 404 Not Found\r\nConnection: close\r\ncontent-length: 2\r\n\r\n{}".to_vec();
        let (base, server) = scripted(vec![ok.clone(), close, ok]).await;
        let mut conn = Conn::new(Target::new(&base, Some("Bearer t")).unwrap());
        assert_eq!(conn.get("Patient/1").await.unwrap(), (200, &b"hello"[..]));
        assert_eq!(conn.get("/Patient/2").await.unwrap(), (404, &b"{}"[..]));
        assert_eq!(
            conn.get("Observation/3").await.unwrap(),
            (200, &b"hello"[..])
        );
        assert_eq!(
            server.await.unwrap(),
            [
                "GET /fhir/Patient/1 HTTP/1.1",
                "GET /fhir/Patient/2 HTTP/1.1",
                "GET /fhir/Observation/3 HTTP/1.1"
            ]
        );
    }

    #[tokio::test]
    async fn answers_it_cannot_frame_are_errors() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec();
        let bad_length = b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n".to_vec();
        let garbage = b"NOT HTTP AT ALL\r\n\r\n".to_vec();
        for (answer, why) in [
            (chunked, "chunked"),
            (bad_length, "Content-Length"),
            (garbage, "invalid HTTP version"),
        ] {
            let (base, _server) = scripted(vec![answer]).await;
            let mut conn = Conn::new(Target::new(&base, None).unwrap());
            let err = conn.get("Patient/1").await.unwrap_err();
            assert!(format!("{err:#}").contains(why), "{err:#}");
        }
        // Nothing listening: an error, not a panic.
        let (base, server) = scripted(Vec::new()).await;
        server.await.unwrap();
        let mut conn = Conn::new(Target::new(&base, None).unwrap());
        let err = conn.get("Patient/1").await.unwrap_err();
        assert!(format!("{err:#}").contains("connecting to"), "{err:#}");
    }
}
