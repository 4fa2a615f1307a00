//! A partner double for the HTTP client tests: answers 200 to every
//! request, over plain TCP or TLS, and keeps each request's head.

use std::sync::{Arc, Mutex};

use dovetail_connectors::http::{HttpSink, Outbound, client_for};
use dovetail_core::clock::Timestamp;
use dovetail_core::config::HttpConnector;
use dovetail_core::policy::Answer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub type Lines = Arc<Mutex<Vec<String>>>;

/// A listener on a free loopback port; with `tls`, it speaks TLS. It
/// keeps each request's head: the request line and the headers, one per line.
pub async fn recorder(tls: Option<TlsAcceptor>) -> (u16, Lines) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Lines::default();
    let lines = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let (lines, tls) = (lines.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    // A failed handshake is the client's refusal: nothing to answer.
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(socket).await {
                            answer(stream, lines).await;
                        }
                    }
                    None => answer(socket, lines).await,
                }
            });
        }
    });
    (port, seen)
}

async fn answer(mut socket: impl AsyncRead + AsyncWrite + Unpin, lines: Lines) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some(head_end) = text.find("\r\n\r\n") else { continue };
        let length = text[..head_end]
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() < head_end + 4 + length {
            continue;
        }
        lines.lock().unwrap().push(text[..head_end].to_string());
        buf.drain(..head_end + 4 + length);
        let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    }
}

/// A sink POSTing to `{base_url}/orders`.
pub fn sink(base_url: &str) -> HttpSink {
    let config: HttpConnector = serde_json::from_value(serde_json::json!({ "base_url": base_url })).unwrap();
    let client = client_for("partner", &config).unwrap();
    HttpSink::new("partner", &config, &Default::default(), None, client, "POST", "/orders").unwrap()
}

/// Sends one record; what came of it, and the detail.
pub async fn send(sink: &HttpSink) -> (Answer, Option<String>) {
    let out = Outbound {
        payload: b"{}",
        content_type: None,
        idempotency_key: "dt1-test",
        correlation_id: "0af7651916cd43dd8448eb211c80319c",
    };
    let result = sink.send(out, || Timestamp::from_millis(0)).await;
    (result.answer, result.detail)
}

/// The request lines of the heads kept.
pub fn request_lines(heads: &Lines) -> Vec<String> {
    heads.lock().unwrap().iter().map(|h| h.lines().next().unwrap_or("").to_string()).collect()
}

/// The values of header `name` in one kept head.
pub fn header_values(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

pub const OK: Answer = Answer::Status { status: 200, retry_after: None };
