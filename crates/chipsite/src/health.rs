//! `chipsite health`: a container health check with no shell and no curl in
//! the image. It asks this process's ops port (`addresses.ops`, plain HTTP on
//! the same host) for `/readyz` (or `/livez`) and exits 0 on `200`.

use std::time::Duration;

use chipsite_site::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub struct Args {
    /// Ask whether the process runs (`/livez`) instead of whether it is
    /// ready to serve (`/readyz`).
    #[arg(long)]
    live: bool,
    /// The ops port to ask (default: `addresses.ops` of the configuration,
    /// `CHIPSITE_ADDRESSES__OPS`, with an unspecified address asked on
    /// loopback).
    #[arg(long)]
    addr: Option<String>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

/// Where to ask: `0.0.0.0:9090` (what a container listens on) is asked at
/// `127.0.0.1:9090`, `[::]:9090` at `[::1]:9090`.
fn target(addr: &str) -> String {
    if let Some(port) = addr.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = addr.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        addr.to_owned()
    }
}

/// Print why the check failed (stderr, which the runtime keeps) and return
/// whether it passed.
pub async fn check(config: &Config, args: &Args) -> bool {
    let addr = target(args.addr.as_deref().unwrap_or(&config.addresses.ops));
    if addr.is_empty() {
        eprintln!("no ops port: set addresses.ops (CHIPSITE_ADDRESSES__OPS) or --addr");
        return false;
    }
    let path = if args.live { "/livez" } else { "/readyz" };
    match tokio::time::timeout(Duration::from_millis(args.timeout_ms), ask(&addr, path)).await {
        Ok(Ok((200, _))) => true,
        Ok(Ok((status, body))) => {
            eprintln!("{path} at {addr}: {status} {}", body.trim());
            false
        }
        Ok(Err(e)) => {
            eprintln!("{path} at {addr}: {e}");
            false
        }
        Err(_) => {
            eprintln!("{path} at {addr}: no answer in {} ms", args.timeout_ms);
            false
        }
    }
}

/// One HTTP/1.1 GET; the status code and (up to 64 KiB of) the body.
async fn ask(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(bad)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn an_unspecified_address_is_asked_on_loopback() {
        assert_eq!(target("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(target("[::]:9090"), "[::1]:9090");
        assert_eq!(target("10.0.0.7:9090"), "10.0.0.7:9090");
    }
}
