//! Helpers of the CLI test files: run the `sprig` binary, find the committed fixtures (tests/data).
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn sprig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sprig"))
}

pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../../tests/data").join(p)
}

pub fn run_ok(args: &[&str]) -> (String, String) {
    let out = sprig().args(args).output().unwrap();
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "sprig {args:?} failed: {se}");
    (so, se)
}

/// Fails with exit code 1 and exactly one line on stderr, no backtrace.
pub fn run_err(args: &[&str]) -> String {
    let out = sprig().args(args).env("RUST_BACKTRACE", "1").output().unwrap();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "sprig {args:?}: {se}");
    assert_eq!(se.trim_end().lines().count(), 1, "one line expected: {se}");
    assert!(se.starts_with("sprig: error: ") && !se.contains("panicked") && !se.contains("backtrace"), "{se}");
    se
}

pub struct Server {
    pub child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Server {
    /// Starts `sprig serve --port 0 ARGS` and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let mut child = sprig()
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sprig starts");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("sprig serve exited before listening: {log}");
            };
            log.push_str(&line);
            log.push('\n');
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        assert!(addr.starts_with("127.0.0.1:"), "binds to the loopback address by default: {addr}");
        // Keep reading its stderr so that the pipe never fills.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn rss_pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response's status and body (`Connection: close`, so the body is what follows the headers; never chunked
/// for the JSON answers these tests read).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    // The server may answer (413) and close before reading a large body: a failed write is not the test's
    // failure, the answer is.
    let _ = s.write_all(req.as_bytes()).and_then(|_| s.write_all(body));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}
