//! A real S3 server for tests: `moto_server` (PyPI `moto[server]`) on a free loopback port,
//! killed by its process id when dropped.
//!
//! A missing `moto_server` fails the test: `scripts/test` installs it. The server keeps
//! everything in memory, accepts any credentials (unless started with
//! `INITIAL_NO_AUTH_ACTION_COUNT`), and writes its log to a temporary file that is shown if it
//! does not start.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rusoto_core::{HttpClient, Region};
use rusoto_credential::StaticProvider;
use rusoto_s3::{CreateBucketRequest, S3, S3Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::S3Config;

/// The access key the tests use.
pub(crate) const ACCESS_KEY: &str = "AKIATESTNBDRS";
/// The secret the tests use: it must never show in a message.
pub(crate) const SECRET_KEY: &str = "tEsT/sEcReT+vAlUe=9x7Q";

/// How long moto may take to answer after it was started.
const STARTUP: Duration = Duration::from_secs(60);

/// A running `moto_server`, killed on drop.
pub(crate) struct MotoServer {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl MotoServer {
    /// Starts a server and waits until it answers.
    pub(crate) async fn start() -> MotoServer {
        Self::start_with_env(&[]).await
    }

    /// Starts a server with extra environment variables and waits until it answers.
    pub(crate) async fn start_with_env(env: &[(&str, &str)]) -> MotoServer {
        // The port is free when chosen; should another process take it first, moto exits and
        // another port is tried.
        for _ in 0..5 {
            let port = free_port();
            let log = std::env::temp_dir().join(format!(
                "nbd-rs-moto-{port}-{}.log",
                uuid::Uuid::new_v4().simple()
            ));
            let log_file = std::fs::File::create(&log)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
            let log_err = log_file
                .try_clone()
                .unwrap_or_else(|e| panic!("cannot duplicate a file handle: {e}"));
            let mut command = Command::new("moto_server");
            command
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err);
            for (k, v) in env {
                command.env(k, v);
            }
            let child = match command.spawn() {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "moto_server is not installed: run scripts/test, which installs the PyPI \
                     package moto[server] (or `pip install 'moto[server]'`)"
                ),
                Err(e) => panic!("cannot start moto_server: {e}"),
            };
            let mut server = MotoServer {
                child: Some(child),
                port,
                log,
            };
            if server.wait_ready().await {
                return server;
            }
        }
        panic!("moto_server did not start on any of 5 ports");
    }

    /// Waits until the server answers HTTP; false if it exited (its port was taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                self.child = None;
                if log.contains("Address already in use") {
                    return false;
                }
                panic!("moto_server exited ({status}) at startup; its log:\n{log}");
            }
            if answers(self.port).await {
                return true;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("moto_server did not answer within {STARTUP:?}; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A configuration for `bucket` on this server with the test credentials.
    pub(crate) fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        let mut cfg = S3Config::new(bucket);
        cfg.endpoint = Some(self.endpoint());
        cfg.prefix = prefix.to_owned();
        cfg.access_key_id = Some(ACCESS_KEY.to_owned());
        cfg.secret_access_key = Some(SECRET_KEY.to_owned());
        cfg
    }

    /// A plain client of this server.
    pub(crate) fn client(&self) -> S3Client {
        let http = HttpClient::new().unwrap_or_else(|e| panic!("http client: {e}"));
        S3Client::new_with(
            http,
            StaticProvider::new_minimal(ACCESS_KEY.to_owned(), SECRET_KEY.to_owned()),
            Region::Custom {
                name: "us-east-1".to_owned(),
                endpoint: self.endpoint(),
            },
        )
    }

    /// Creates a bucket.
    pub(crate) async fn create_bucket(&self, bucket: &str) {
        self.client()
            .create_bucket(CreateBucketRequest {
                bucket: bucket.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
    }

    /// Kills the server now (SIGKILL to its process id) and waits for it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A port nothing listens on at this moment.
pub(crate) fn free_port() -> u16 {
    let listener =
        TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"))
        .port()
}

/// True if an HTTP server answers on the port.
async fn answers(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 8];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/"))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
