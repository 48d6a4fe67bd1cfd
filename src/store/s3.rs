//! `s3`: an object store in an S3 bucket (AWS or any S3-compatible server), through rusoto.
//!
//! # Where objects live
//!
//! Every object of a store lives under its `prefix` (normalized without a leading `/` and with
//! a trailing `/` when not empty). Below the prefix, keys are spread over 65,536 folders so
//! that a large volume does not crowd one S3 partition:
//!
//! ```text
//! {prefix}{h}/{key}        for example  vols/vm1/3fa2/vm1.1234.chunk
//! ```
//!
//! where `h` is 4 lowercase hex digits: the top 16 bits of the FNV-1a 64-bit hash of the key's
//! bytes, passed through the MurmurHash3 64-bit finalizer (for an even spread even when keys
//! differ only in a digit). The hash is fixed forever (a test pins it); changing it would
//! orphan every stored object. Every key is spread the same way, `NAME.volume` files
//! included, so an object's place never depends on what it is, and no key can be mistaken for
//! another. To find a volume's objects by hand: `aws s3 ls --recursive s3://BUCKET/{prefix}`.
//!
//! `list(p)` lists every object under `{prefix}` (ListObjectsV2, 1,000 per page, following
//! continuation tokens), keeps those of the form `{h}/{key}` whose `h` is the hash of `key`
//! (anything else under the prefix, such as a file an operator left there, is ignored), and
//! returns the keys starting with `p`. It costs one request per 1,000 objects of the volume
//! whatever `p` is. Two volumes must not have nested prefixes (`a/` and `a/b/`).
//!
//! # Behaviour
//!
//! - `get` sends a `Range: bytes=a-b` header for a range; a missing object is `Ok(None)`; a
//!   range reaching past the end is [`StoreError::OutOfRange`] (from the response's
//!   `Content-Range`, or a HEAD after a `416 InvalidRange`). Empty ranges, which HTTP cannot
//!   express, cost one HEAD.
//! - `put` is one PutObject with `Content-Length` and the body's SHA-256 in the signature
//!   (`x-amz-content-sha256`; S3 rejects a body that does not match it, so one damaged on the
//!   way is refused). S3 acknowledges a put only once it is durable, so `sync` and `flush` have
//!   nothing to do. S3 objects cannot be written in part: `supports_put_range()` is false.
//! - `delete` of a missing object succeeds (S3 answers 204 either way).
//! - `head` is a HeadObject. Its answers have no body, so a 404 is taken for a missing object
//!   even if the bucket is what is missing (`get` and `list` tell the two apart; layouts read
//!   with those).
//! - Every request has a time limit (`request_timeout`, default 30 s; connecting has
//!   `connect_timeout`, default 5 s, and a refused connection fails at once).
//!
//! # Errors
//!
//! Failures are [`StoreError::Remote`] naming the operation, the key, the HTTP status and the
//! S3 error code. `transient` is true for what may pass: connection failures, time-outs, HTTP
//! 5xx, 429, 408 and the codes `SlowDown`, `RequestTimeout`, `InternalError`,
//! `ServiceUnavailable`; false for the rest (403 `AccessDenied`, `InvalidAccessKeyId`,
//! `SignatureDoesNotMatch`, 400, `NoSuchBucket`, ...).
//!
//! # Credentials
//!
//! `access_key_id` and `secret_access_key` when given; else the `profile` (default `default`)
//! of `credentials_file` (AWS shared credentials format) when given; else the standard chain:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, then
//! `~/.aws/credentials` (`AWS_PROFILE`), then container and instance roles. Credentials that
//! were obtained are reused until they expire; a failure to obtain them is not remembered.
//! The secret never appears in errors, logs or `Debug` output.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rusoto_core::request::BufferedHttpResponse;
use rusoto_core::request::DispatchSignedRequest;
use rusoto_core::signature::SignedRequest;
use rusoto_core::{HttpClient, HttpConfig, Region, RusotoError};
use rusoto_credential::{
    AwsCredentials, ChainProvider, CredentialsError, ProfileProvider, ProvideAwsCredentials,
    StaticProvider,
};
use rusoto_s3::{
    DeleteObjectRequest, GetObjectError, GetObjectRequest, HeadBucketError, HeadBucketRequest,
    HeadObjectError, HeadObjectRequest, ListObjectsV2Error, ListObjectsV2Request, S3, S3Client,
};
use serde::Deserialize;

use super::file::check_prefix;
use super::{ObjectStore, StoreError, check_key};
use crate::block::retry::{duration_text, parse_duration};

#[cfg(test)]
#[path = "s3_testserver.rs"]
pub(crate) mod testserver;

/// Region used when none is given.
pub const DEFAULT_REGION: &str = "us-east-1";
/// Profile of a credentials file used when none is given.
pub const DEFAULT_PROFILE: &str = "default";
/// Default for [`S3Config::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`S3Config::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What stands in for a secret in `Debug` output and messages.
const REDACTED: &str = "<redacted>";
/// Idle pooled connections are closed before S3 closes them (about 20 s), so a request rarely
/// meets a connection the server already dropped.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// The most keys one ListObjectsV2 page returns.
const LIST_PAGE: i64 = 1000;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Parameters of the `s3` store: the `[exports.NAME.s3]` table, or a connection string read by
/// [`parse_url`]. Unknown keys are refused. Check and normalize with [`S3Config::validate`]
/// ([`S3Store::open`] does).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `http://HOST[:PORT]` or `https://HOST[:PORT]` of an S3-compatible server (path-style
    /// addressing); none for AWS S3 in `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region requests are signed for. Default `us-east-1`.
    #[serde(default = "default_region")]
    pub region: String,
    /// The bucket; it must exist.
    pub bucket: String,
    /// Where the objects live in the bucket; may be empty. Normalized without a leading `/`
    /// and with a trailing `/` when not empty.
    #[serde(default)]
    pub prefix: String,
    /// Access key id; given with `secret_access_key` or not at all.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key; never shown.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// An AWS shared credentials file, read when no keys are given.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// The profile of `credentials_file`. Default `default`.
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Time limit to open a connection. Default `5s`.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "duration_text::deserialize"
    )]
    pub connect_timeout: Duration,
    /// Time limit of one request, its body included. Default `30s`.
    #[serde(
        default = "default_request_timeout",
        deserialize_with = "duration_text::deserialize"
    )]
    pub request_timeout: Duration,
}

fn default_region() -> String {
    DEFAULT_REGION.to_owned()
}

fn default_profile() -> String {
    DEFAULT_PROFILE.to_owned()
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| REDACTED),
            )
            .field("credentials_file", &self.credentials_file)
            .field("profile", &self.profile)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl S3Config {
    /// A configuration for `bucket` with every other parameter at its default.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            endpoint: None,
            region: default_region(),
            bucket: bucket.into(),
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            credentials_file: None,
            profile: default_profile(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Checks every parameter and returns the configuration normalized (prefix with a trailing
    /// `/`, endpoint without one). Messages never contain the secret.
    pub fn validate(mut self) -> Result<S3Config, String> {
        if let Some(endpoint) = self.endpoint.take() {
            self.endpoint = Some(check_endpoint(&endpoint)?);
        }
        if self.region.is_empty() || !self.region.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("bad region {:?}", self.region));
        }
        if self.endpoint.is_none() && Region::from_str(&self.region).is_err() {
            return Err(format!(
                "unknown AWS region {:?} (give `endpoint` for other S3 servers)",
                self.region
            ));
        }
        check_bucket(&self.bucket)?;
        self.prefix = normalize_prefix(&self.prefix)?;
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => {}
            (None, None) => {}
            (Some(_), Some(_)) => {
                return Err("access_key_id and secret_access_key must not be empty".to_owned());
            }
            (Some(_), None) => {
                return Err("access_key_id is given without secret_access_key".into());
            }
            (None, Some(_)) => {
                return Err("secret_access_key is given without access_key_id".into());
            }
        }
        if self.profile.is_empty() {
            return Err("profile must not be empty".to_owned());
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err("connect_timeout and request_timeout must be more than 0".to_owned());
        }
        Ok(self)
    }

    /// Where the bucket is, for messages: the endpoint, or AWS and the region.
    pub fn location(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("AWS S3 region {}", self.region),
        }
    }
}

/// Checks an endpoint and returns it without a trailing `/`. Never quotes it: a mistaken
/// `http://KEY:SECRET@HOST` must not be shown.
fn check_endpoint(endpoint: &str) -> Result<String, String> {
    let trimmed = endpoint.strip_suffix('/').unwrap_or(endpoint);
    let host = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    match host {
        Some(host) if check_host_port(host).is_ok() => Ok(trimmed.to_owned()),
        _ => Err(
            "endpoint must be http://HOST[:PORT] or https://HOST[:PORT], without credentials, path or query"
                .to_owned(),
        ),
    }
}

/// Checks `HOST[:PORT]`, where HOST is a name, an IPv4 address or a bracketed IPv6 address.
/// Quotes nothing of it (see [`check_endpoint`]).
fn check_host_port(host_port: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err("an IPv6 host lacks its ']'".to_owned());
        };
        if inside.is_empty()
            || !inside
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err("bad IPv6 host".to_owned());
        }
        match after {
            "" => (inside, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (inside, Some(p)),
                None => return Err("bad text after an IPv6 host".to_owned()),
            },
        }
    } else {
        match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    let name_ok = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !host_port.starts_with('[') && !name_ok(host) {
        return Err("bad host name".to_owned());
    }
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !ok {
            return Err("bad port".to_owned());
        }
    }
    Ok(())
}

/// Bucket names of AWS and of S3-compatible servers (some allow capitals and `_`).
fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok = !bucket.is_empty()
        && bucket.len() <= 255
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad bucket name {bucket:?} (letters, digits, '.', '-' and '_')"
        ))
    }
}

/// `a/b` and `/a/b/` become `a/b/`; the empty prefix stays empty.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_start_matches('/');
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.len() > 512 || check_key(trimmed).is_err() {
        return Err(format!(
            "bad prefix {prefix:?} (printable ASCII, no empty, '.' or '..' components, at most 512 bytes)"
        ));
    }
    Ok(format!("{trimmed}/"))
}

/// Parameters of a connection string that [`parse_url`] takes for itself; the others are
/// returned to the caller.
const URL_OPTIONS: &[&str] = &[
    "region",
    "profile",
    "credentials_file",
    "connect_timeout",
    "request_timeout",
];

/// Reads a connection string:
///
/// - `http://[KEY:SECRET@]HOST[:PORT]/BUCKET[/PREFIX][?PARAMS]` (or `https://`): an
///   S3-compatible server at `http://HOST[:PORT]`;
/// - `s3://[KEY:SECRET@]BUCKET[/PREFIX][?PARAMS]`: AWS S3.
///
/// A leading `s3:` before any of these is skipped (`s3:http://...`). KEY and SECRET are
/// percent-decoded: a `/` or `?` in them must be written `%2F` or `%3F`, a `:` in KEY `%3A`.
/// Without them the credentials come from a credentials file or the environment, and no `@`
/// may follow the host (it would be the sign of a secret cut short by a `/`). The parameters `region`,
/// `profile`, `credentials_file`, `connect_timeout` and `request_timeout` set the fields of the
/// same names; every other `NAME=VALUE` pair (such as `size=10GiB`) is returned, in order and
/// as written, for the caller. Error messages never contain the secret.
pub fn parse_url(url: &str) -> Result<(S3Config, Vec<(String, String)>), String> {
    const FORMS: &str = "expected http[s]://[KEY:SECRET@]HOST[:PORT]/BUCKET[/PREFIX] or s3://[KEY:SECRET@]BUCKET[/PREFIX]";
    let url = match url.strip_prefix("s3:") {
        Some(rest) if rest.contains("://") => rest,
        _ => url,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("not an S3 URL: {FORMS}"));
    };
    if !matches!(scheme, "http" | "https" | "s3") {
        // Quoted only when it cannot be a piece of a misplaced secret.
        return Err(
            if scheme.len() <= 8 && scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
                format!("unknown scheme {scheme:?}: {FORMS}")
            } else {
                format!("unknown scheme: {FORMS}")
            },
        );
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(authority_end);
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    // A '/' or '?' left unencoded in a secret ends the authority early and leaves the rest of
    // the secret in the path or the parameters, where a message might quote it.
    if userinfo.is_none() && after.contains('@') {
        return Err(
            "'@' after the host: write '/' and '?' in a key or secret as %2F and %3F \
                    ('@' in the bucket, prefix or parameters is not supported)"
                .to_owned(),
        );
    }
    let (path, query) = match after.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (after, None),
    };
    let mut cfg;
    let mut path = path.strip_prefix('/').unwrap_or(path);
    if scheme == "s3" {
        cfg = S3Config::new(host);
        if check_bucket(host).is_err() {
            return Err(format!("bad bucket name in the URL: {FORMS}"));
        }
    } else {
        check_host_port(host).map_err(|why| format!("{why} in the URL: {FORMS}"))?;
        let (bucket, rest) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(format!("no bucket in the URL: {FORMS}"));
        }
        cfg = S3Config::new(bucket);
        cfg.endpoint = Some(format!("{scheme}://{host}"));
        path = rest;
    }
    cfg.prefix = path.to_owned();

    if let Some(userinfo) = userinfo {
        let Some((key, secret)) = userinfo.split_once(':') else {
            return Err("the URL has an access key but no secret (KEY:SECRET@)".to_owned());
        };
        let key = percent_decode(key)
            .ok_or("the access key in the URL is not valid percent-encoded UTF-8")?;
        let secret = percent_decode(secret)
            .ok_or("the secret in the URL is not valid percent-encoded UTF-8")?;
        if key.is_empty() || secret.is_empty() {
            return Err("the URL's access key or secret is empty".to_owned());
        }
        cfg.access_key_id = Some(key);
        cfg.secret_access_key = Some(secret);
    }

    let mut rest = Vec::new();
    let mut seen = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !URL_OPTIONS.contains(&name) {
            rest.push((name.to_owned(), value.to_owned()));
            continue;
        }
        if seen.contains(&name) {
            return Err(format!("parameter {name:?} is given twice"));
        }
        seen.push(name);
        if value.is_empty() {
            return Err(format!("parameter {name:?} needs a value"));
        }
        match name {
            "region" => cfg.region = value.to_owned(),
            "profile" => cfg.profile = value.to_owned(),
            "credentials_file" => cfg.credentials_file = Some(PathBuf::from(value)),
            "connect_timeout" => cfg.connect_timeout = parse_duration(value)?,
            _ => cfg.request_timeout = parse_duration(value)?,
        }
    }
    Ok((cfg.validate()?, rest))
}

/// Percent-decodes `text` into UTF-8 (`+` stays `+`).
fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

// ---------------------------------------------------------------------------------------------
// Key layout
// ---------------------------------------------------------------------------------------------

/// FNV-1a 64 then the MurmurHash3 finalizer: fixed, and well spread in every bit.
fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The folder a key is spread into: 4 lowercase hex digits.
fn spread(key: &str) -> String {
    format!("{:04x}", key_hash(key) >> 48)
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why an `s3` store could not be opened. Messages never contain the secret.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// A parameter is wrong.
    #[error("s3: {0}")]
    Config(String),
    /// The TLS library could not be set up.
    #[error("s3: cannot set up TLS: {0}")]
    Tls(String),
    /// The bucket cannot be used.
    #[error("s3 bucket {bucket:?} at {location}: {message}")]
    Bucket {
        /// The endpoint, or AWS and the region.
        location: String,
        /// The bucket.
        bucket: String,
        /// What happened.
        message: String,
        /// Trying again later may succeed (the server could not be reached, 5xx, ...).
        transient: bool,
    },
}

impl S3Error {
    /// True if opening again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            S3Error::Bucket {
                transient: true,
                ..
            }
        )
    }
}

/// Codes S3 uses for failures that may pass.
const TRANSIENT_CODES: &[&str] = &[
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
];

/// An S3 failure: what to say and whether it may pass.
#[derive(Debug)]
struct Failure {
    status: Option<u16>,
    message: String,
    transient: bool,
}

impl Failure {
    fn from_response(res: &BufferedHttpResponse) -> Self {
        let status = res.status.as_u16();
        let body = String::from_utf8_lossy(&res.body);
        let code = xml_element(&body, "Code");
        let detail = xml_element(&body, "Message");
        let transient = status >= 500
            || status == 429
            || status == 408
            || code
                .as_deref()
                .is_some_and(|c| TRANSIENT_CODES.contains(&c));
        let reason = res.status.canonical_reason().unwrap_or("");
        let mut message = format!("HTTP {status}");
        match &code {
            Some(c) => message.push_str(&format!(" {c}")),
            None if !reason.is_empty() => message.push_str(&format!(" {reason}")),
            None => {}
        }
        if let Some(d) = detail.filter(|d| !d.is_empty()) {
            message.push_str(&format!(": {d}"));
        }
        Failure {
            status: Some(status),
            message,
            transient,
        }
    }

    fn from_rusoto<E: fmt::Debug>(err: RusotoError<E>) -> Self {
        let (message, transient) = match err {
            RusotoError::Unknown(res) => return Failure::from_response(&res),
            // Typed errors (NoSuchKey, NoSuchBucket, InvalidObjectState for archived objects)
            // never pass by themselves.
            RusotoError::Service(e) => (format!("S3 error {e:?}"), false),
            RusotoError::HttpDispatch(e) => (format!("request failed: {e}"), true),
            RusotoError::Credentials(e) => (format!("no usable credentials: {}", e.message), false),
            RusotoError::Validation(m) => (format!("invalid request: {m}"), false),
            RusotoError::ParseError(m) => (format!("unreadable response: {m}"), false),
            RusotoError::Blocking => ("blocking call failed".to_owned(), false),
        };
        Failure {
            status: None,
            message,
            transient,
        }
    }

    fn timed_out(limit: Duration) -> Self {
        Failure {
            status: None,
            message: format!("no answer within {limit:?}"),
            transient: true,
        }
    }
}

/// The text of the first `<name>` element of an XML error body, unescaped.
fn xml_element(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find("</")?;
    let text = body[start..start + len].trim();
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

// ---------------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------------

/// Keeps credentials until they are about to expire; unlike rusoto's `AutoRefreshingProvider`,
/// never keeps a failure (one unreachable instance-metadata call must not fail every later
/// request).
struct Cached<P> {
    inner: P,
    current: tokio::sync::Mutex<Option<AwsCredentials>>,
}

impl<P> Cached<P> {
    fn new(inner: P) -> Self {
        Cached {
            inner,
            current: tokio::sync::Mutex::new(None),
        }
    }
}

/// True if `creds` expire within a minute.
fn expiring(creds: &AwsCredentials) -> bool {
    let Some(at) = creds.expires_at() else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    at.timestamp() < now.saturating_add(60)
}

#[async_trait]
impl<P: ProvideAwsCredentials + Send + Sync> ProvideAwsCredentials for Cached<P> {
    async fn credentials(&self) -> Result<AwsCredentials, CredentialsError> {
        // Held across the call on purpose: one refresh at a time, the others wait for it.
        let mut current = self.current.lock().await;
        if let Some(creds) = current.as_ref().filter(|c| !expiring(c)) {
            return Ok(creds.clone());
        }
        let creds = self.inner.credentials().await?;
        *current = Some(creds.clone());
        Ok(creds)
    }
}

/// One credentials provider used both by the rusoto client and by the store's own requests.
#[derive(Clone)]
struct Shared(Arc<dyn ProvideAwsCredentials + Send + Sync>);

#[async_trait]
impl ProvideAwsCredentials for Shared {
    async fn credentials(&self) -> Result<AwsCredentials, CredentialsError> {
        self.0.credentials().await
    }
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// An object store in an S3 bucket. See the module documentation.
pub struct S3Store {
    client: S3Client,
    /// The client's HTTP connections, credentials and region, for the PUTs this store signs
    /// itself (see [`S3Store::put`]).
    dispatcher: Arc<HttpClient>,
    credentials: Shared,
    region: Region,
    bucket: String,
    prefix: String,
    location: String,
    request_timeout: Duration,
    /// Only to scrub it from messages, should a server ever echo it.
    secret: Option<String>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// What a GetObject found.
enum Fetched {
    Missing,
    /// The body and, for a ranged answer, the object's total size from `Content-Range`.
    Found(Bytes, Option<u64>),
    /// `416`: the range starts at or beyond the end.
    Unsatisfiable,
}

impl S3Store {
    /// Checks `cfg`, builds the client and checks that the bucket answers (HeadBucket).
    pub async fn open(cfg: S3Config) -> Result<S3Store, S3Error> {
        let store = Self::connect(cfg)?;
        store.check_bucket().await?;
        tracing::debug!(
            location = %store.location,
            bucket = %store.bucket,
            prefix = %store.prefix,
            "s3 store opened"
        );
        Ok(store)
    }

    /// Builds the client without any request.
    fn connect(cfg: S3Config) -> Result<S3Store, S3Error> {
        let cfg = cfg.validate().map_err(S3Error::Config)?;
        let region = match &cfg.endpoint {
            Some(endpoint) => Region::Custom {
                name: cfg.region.clone(),
                endpoint: endpoint.clone(),
            },
            None => Region::from_str(&cfg.region).map_err(|e| S3Error::Config(e.to_string()))?,
        };
        let tls = native_tls::TlsConnector::new().map_err(|e| S3Error::Tls(e.to_string()))?;
        let mut http = hyper::client::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let https =
            hyper_tls::HttpsConnector::from((http, tokio_native_tls::TlsConnector::from(tls)));
        let mut http_config = HttpConfig::new();
        http_config.pool_idle_timeout(POOL_IDLE_TIMEOUT);
        let dispatcher = Arc::new(HttpClient::from_connector_with_config(https, http_config));

        let credentials = Shared(
            match (
                &cfg.access_key_id,
                &cfg.secret_access_key,
                &cfg.credentials_file,
            ) {
                (Some(key), Some(secret), _) => {
                    Arc::new(StaticProvider::new_minimal(key.clone(), secret.clone()))
                }
                (_, _, Some(file)) => Arc::new(Cached::new(ProfileProvider::with_configuration(
                    file,
                    cfg.profile.clone(),
                ))),
                _ => Arc::new(Cached::new(ChainProvider::new())),
            },
        );
        let client =
            S3Client::new_with(Arc::clone(&dispatcher), credentials.clone(), region.clone());
        Ok(S3Store {
            client,
            dispatcher,
            credentials,
            region,
            location: cfg.location(),
            bucket: cfg.bucket,
            prefix: cfg.prefix,
            request_timeout: cfg.request_timeout,
            secret: cfg.secret_access_key,
        })
    }

    async fn check_bucket(&self) -> Result<(), S3Error> {
        let request = HeadBucketRequest {
            bucket: self.bucket.clone(),
            ..Default::default()
        };
        let failure = match self.timed(self.client.head_bucket(request)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(RusotoError::Service(HeadBucketError::NoSuchBucket(_)))) => Failure {
                status: Some(404),
                message: "HTTP 404 NoSuchBucket".to_owned(),
                transient: false,
            },
            Ok(Err(e)) => Failure::from_rusoto(e),
            Err(f) => f,
        };
        // HEAD answers have no body: explain the usual statuses.
        let explain = match failure.status {
            Some(404) => ": no such bucket",
            Some(403) => ": access denied (check the credentials and the bucket's policy)",
            Some(301) => ": the bucket is in another region",
            Some(400) => ": bad request (check the region)",
            _ => "",
        };
        Err(S3Error::Bucket {
            location: self.location.clone(),
            bucket: self.bucket.clone(),
            message: self.scrub(format!("{}{explain}", failure.message)),
            transient: failure.transient,
        })
    }

    /// The S3 key of a store key.
    fn object_key(&self, key: &str) -> String {
        format!("{}{}/{key}", self.prefix, spread(key))
    }

    /// The store key of an S3 key under the prefix, if it is in the layout.
    fn store_key<'a>(&self, object_key: &'a str) -> Option<&'a str> {
        let rest = object_key.strip_prefix(&self.prefix)?;
        let (h, key) = rest.split_at_checked(4)?;
        let key = key.strip_prefix('/')?;
        (check_key(key).is_ok() && spread(key) == h).then_some(key)
    }

    /// Runs one request within the time limit.
    async fn timed<T>(&self, request: impl Future<Output = T>) -> Result<T, Failure> {
        tokio::time::timeout(self.request_timeout, request)
            .await
            .map_err(|_| Failure::timed_out(self.request_timeout))
    }

    /// PutObject with the body's SHA-256 in the signature (`x-amz-content-sha256`), which S3
    /// checks against the body it receives: a body damaged on the way is refused, as with
    /// `Content-MD5`, for less than half the hashing (SHA-256 runs on the CPU's SHA
    /// instructions, MD5 cannot). rusoto signs a streamed body as `UNSIGNED-PAYLOAD`, so the
    /// request is built, signed (on the blocking pool: hashing 4 MiB takes milliseconds) and
    /// sent here, the way rusoto's `put_object` builds it.
    async fn put_signed(&self, object: &str, data: Bytes) -> Result<(), Failure> {
        let creds = self
            .credentials
            .credentials()
            .await
            .map_err(|e| Failure::from_rusoto(RusotoError::<()>::Credentials(e)))?;
        let path = format!("/{}/{object}", self.bucket);
        let small = data.len() < HASH_INLINE_MAX;
        let mut request = SignedRequest::new("PUT", "s3", &self.region, &path);
        request.set_payload(Some(data));
        let request = if small {
            request.sign(&creds);
            request
        } else {
            tokio::task::spawn_blocking(move || {
                request.sign(&creds);
                request
            })
            .await
            .map_err(|e| Failure {
                status: None,
                message: format!("signing failed: {e}"),
                transient: true,
            })?
        };
        let mut response = self
            .dispatcher
            .dispatch(request, None)
            .await
            .map_err(|e| Failure::from_rusoto(RusotoError::<()>::HttpDispatch(e)))?;
        let buffered = response
            .buffer()
            .await
            .map_err(|e| Failure::from_rusoto(RusotoError::<()>::HttpDispatch(e)))?;
        if buffered.status.is_success() {
            Ok(())
        } else {
            Err(Failure::from_response(&buffered))
        }
    }

    /// Removes the secret from a message, should it ever be there.
    fn scrub(&self, message: String) -> String {
        match &self.secret {
            Some(s) if s.len() >= 4 && message.contains(s.as_str()) => message.replace(s, REDACTED),
            _ => message,
        }
    }

    fn error(&self, op: &'static str, key: &str, object: &str, failure: Failure) -> StoreError {
        let message = format!(
            "{} [{}/{object} at {}]",
            failure.message, self.bucket, self.location
        );
        StoreError::Remote {
            op,
            key: key.to_owned(),
            message: self.scrub(message),
            transient: failure.transient,
        }
    }

    /// One GetObject, body included, within the time limit.
    async fn fetch(
        &self,
        key: &str,
        object: &str,
        range: Option<String>,
    ) -> Result<Fetched, StoreError> {
        let request = GetObjectRequest {
            bucket: self.bucket.clone(),
            key: object.to_owned(),
            range,
            ..Default::default()
        };
        let result = self
            .timed(async {
                let out = match self.client.get_object(request).await {
                    Ok(out) => out,
                    Err(RusotoError::Service(GetObjectError::NoSuchKey(_))) => {
                        return Ok(Fetched::Missing);
                    }
                    Err(RusotoError::Unknown(res)) if res.status.as_u16() == 416 => {
                        return Ok(Fetched::Unsatisfiable);
                    }
                    Err(e) => return Err(Failure::from_rusoto(e)),
                };
                let total = out.content_range.as_deref().and_then(content_range_total);
                let capacity = out
                    .content_length
                    .and_then(|l| usize::try_from(l).ok())
                    .unwrap_or(0);
                let mut data = BytesMut::with_capacity(capacity);
                if let Some(mut body) = out.body {
                    while let Some(piece) = body.next().await {
                        let piece = piece.map_err(|e| Failure {
                            status: None,
                            message: format!("reading the body failed: {e}"),
                            transient: true,
                        })?;
                        data.extend_from_slice(&piece);
                    }
                }
                if let Some(expected) = out.content_length.and_then(|l| usize::try_from(l).ok())
                    && expected != data.len()
                {
                    return Err(Failure {
                        status: None,
                        message: format!(
                            "the body has {} bytes where Content-Length said {expected}",
                            data.len()
                        ),
                        transient: true,
                    });
                }
                Ok(Fetched::Found(data.freeze(), total))
            })
            .await;
        match result {
            Ok(Ok(fetched)) => Ok(fetched),
            Ok(Err(f)) | Err(f) => Err(self.error("get", key, object, f)),
        }
    }

    async fn head_object(&self, key: &str, object: &str) -> Result<Option<u64>, StoreError> {
        let request = HeadObjectRequest {
            bucket: self.bucket.clone(),
            key: object.to_owned(),
            ..Default::default()
        };
        let failure = match self.timed(self.client.head_object(request)).await {
            Ok(Ok(out)) => {
                return match out.content_length.and_then(|l| u64::try_from(l).ok()) {
                    Some(size) => Ok(Some(size)),
                    None => Err(self.error(
                        "head",
                        key,
                        object,
                        Failure {
                            status: None,
                            message: "the answer has no Content-Length".to_owned(),
                            transient: false,
                        },
                    )),
                };
            }
            Ok(Err(RusotoError::Service(HeadObjectError::NoSuchKey(_)))) => return Ok(None),
            // HEAD answers have no body, so no code: 404 is a missing object.
            Ok(Err(RusotoError::Unknown(res))) if res.status.as_u16() == 404 => return Ok(None),
            Ok(Err(e)) => Failure::from_rusoto(e),
            Err(f) => f,
        };
        Err(self.error("head", key, object, failure))
    }

    /// A ranged read of at least one byte.
    async fn get_range(
        &self,
        key: &str,
        object: &str,
        range: Range<u64>,
    ) -> Result<Option<Bytes>, StoreError> {
        let out_of_range = |size| StoreError::OutOfRange {
            key: key.to_owned(),
            start: range.start,
            end: range.end,
            size,
        };
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let (data, total) = match self.fetch(key, object, Some(header)).await? {
            Fetched::Missing => return Ok(None),
            Fetched::Found(data, total) => (data, total),
            Fetched::Unsatisfiable => {
                return match self.head_object(key, object).await? {
                    None => Ok(None),
                    Some(size) if range.end > size => Err(out_of_range(size)),
                    // It grew between the two requests.
                    Some(size) => Err(self.error(
                        "get",
                        key,
                        object,
                        Failure {
                            status: Some(416),
                            message: format!(
                                "the object changed during the read (now {size} bytes)"
                            ),
                            transient: true,
                        },
                    )),
                };
            }
        };
        let want = range.end - range.start;
        match total {
            // A ranged answer: S3 shortens a range that reaches past the end.
            Some(size) if range.end > size => Err(out_of_range(size)),
            Some(_) if data.len() as u64 == want => Ok(Some(data)),
            // The whole object (a server that ignores ranges): cut the range out.
            None if range.end > data.len() as u64 => Err(out_of_range(data.len() as u64)),
            // Both bounds are at most `data.len()`, so they fit in usize.
            None => Ok(Some(data.slice(range.start as usize..range.end as usize))),
            Some(_) => Err(self.error(
                "get",
                key,
                object,
                Failure {
                    status: None,
                    message: format!("asked for {want} bytes, got {}", data.len()),
                    transient: true,
                },
            )),
        }
    }
}

/// Bodies at least this large are hashed on the blocking pool.
const HASH_INLINE_MAX: usize = 64 * 1024;

/// The `Content-MD5` of a body. OpenSSL's MD5 is hand-written assembly, about 45% faster than
/// the `md-5` crate's (which stays as the fallback where OpenSSL refuses MD5, as in FIPS mode).
/// A large body is hashed on the blocking pool: a 4 MiB chunk takes about 5 ms, and that must
/// not hold up the other connections of the worker it would run on.
/// The total size in a `Content-Range: bytes a-b/total` header.
fn content_range_total(header: &str) -> Option<u64> {
    header.rsplit_once('/')?.1.trim().parse().ok()
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let object = self.object_key(key);
        let Some(range) = range else {
            return match self.fetch(key, &object, None).await? {
                Fetched::Missing => Ok(None),
                Fetched::Found(data, _) => Ok(Some(data)),
                Fetched::Unsatisfiable => Err(self.error(
                    "get",
                    key,
                    &object,
                    Failure {
                        status: Some(416),
                        message: "HTTP 416 without a range".to_owned(),
                        transient: false,
                    },
                )),
            };
        };
        if range.start < range.end {
            return self.get_range(key, &object, range).await;
        }
        // Empty or reversed: HTTP cannot ask for it, the size decides.
        match self.head_object(key, &object).await? {
            None => Ok(None),
            Some(size) if range.start > range.end || range.end > size => {
                Err(StoreError::OutOfRange {
                    key: key.to_owned(),
                    start: range.start,
                    end: range.end,
                    size,
                })
            }
            Some(_) => Ok(Some(Bytes::new())),
        }
    }

    async fn put(&self, key: &str, data: Bytes, _sync: bool) -> Result<(), StoreError> {
        check_key(key)?;
        let object = self.object_key(key);
        let failure = match self.timed(self.put_signed(&object, data)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(f)) | Err(f) => f,
        };
        Err(self.error("put", key, &object, failure))
    }

    fn supports_put_range(&self) -> bool {
        false
    }

    async fn put_range(
        &self,
        key: &str,
        _offset: u64,
        _data: Bytes,
        _size: u64,
        _sync: bool,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        Err(StoreError::Remote {
            op: "put_range",
            key: key.to_owned(),
            message: "S3 objects cannot be written in part (supports_put_range is false)"
                .to_owned(),
            transient: false,
        })
    }

    async fn delete(&self, key: &str, _sync: bool) -> Result<(), StoreError> {
        check_key(key)?;
        let object = self.object_key(key);
        let request = DeleteObjectRequest {
            bucket: self.bucket.clone(),
            key: object.clone(),
            ..Default::default()
        };
        let failure = match self.timed(self.client.delete_object(request)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(RusotoError::Unknown(res)))
                if res.status.as_u16() == 404
                    && xml_element(&String::from_utf8_lossy(&res.body), "Code").as_deref()
                        == Some("NoSuchKey") =>
            {
                return Ok(());
            }
            Ok(Err(e)) => Failure::from_rusoto(e),
            Err(f) => f,
        };
        Err(self.error("delete", key, &object, failure))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        check_key(key)?;
        let object = self.object_key(key);
        self.head_object(key, &object).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let request = ListObjectsV2Request {
                bucket: self.bucket.clone(),
                prefix: Some(self.prefix.clone()).filter(|p| !p.is_empty()),
                continuation_token: token.take(),
                max_keys: Some(LIST_PAGE),
                ..Default::default()
            };
            let page = match self.timed(self.client.list_objects_v2(request)).await {
                Ok(Ok(page)) => page,
                Ok(Err(RusotoError::Service(ListObjectsV2Error::NoSuchBucket(_)))) => {
                    let failure = Failure {
                        status: Some(404),
                        message: "HTTP 404 NoSuchBucket: the bucket does not exist".to_owned(),
                        transient: false,
                    };
                    return Err(self.error("list", prefix, &self.prefix, failure));
                }
                Ok(Err(e)) => {
                    return Err(self.error("list", prefix, &self.prefix, Failure::from_rusoto(e)));
                }
                Err(f) => return Err(self.error("list", prefix, &self.prefix, f)),
            };
            for object in page.contents.unwrap_or_default() {
                if let Some(key) = object.key.as_deref().and_then(|k| self.store_key(k))
                    && key.starts_with(prefix)
                {
                    keys.push(key.to_owned());
                }
            }
            match page.next_continuation_token {
                Some(next) if page.is_truncated == Some(true) => token = Some(next),
                _ => break,
            }
        }
        Ok(keys)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use rusoto_s3::{ListObjectsV2Request, PutObjectRequest};

    use super::testserver::{ACCESS_KEY, MotoServer, SECRET_KEY, free_port};
    use super::*;

    const BUCKET: &str = "nbd-test";

    async fn server() -> MotoServer {
        let moto = MotoServer::start().await;
        moto.create_bucket(BUCKET).await;
        moto
    }

    async fn open(moto: &MotoServer, prefix: &str) -> S3Store {
        S3Store::open(moto.config(BUCKET, prefix))
            .await
            .unwrap_or_else(|e| panic!("open: {e}"))
    }

    /// Every S3 key in the bucket, straight from S3.
    async fn raw_keys(moto: &MotoServer) -> Vec<String> {
        let out = moto
            .client()
            .list_objects_v2(ListObjectsV2Request {
                bucket: BUCKET.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut keys: Vec<String> = out
            .contents
            .unwrap_or_default()
            .into_iter()
            .filter_map(|o| o.key)
            .collect();
        keys.sort();
        keys
    }

    fn remote(e: &StoreError) -> (&'static str, &str, &str, bool) {
        match e {
            StoreError::Remote {
                op,
                key,
                message,
                transient,
            } => (op, key.as_str(), message.as_str(), *transient),
            other => panic!("expected a remote error, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance() {
        let moto = server().await;
        crate::store::conformance::run(Arc::new(open(&moto, "vols/conformance").await)).await;
        // And at the top of the bucket.
        crate::store::conformance::run(Arc::new(open(&moto, "").await)).await;
        assert!(raw_keys(&moto).await.is_empty(), "the suite cleans up");
    }

    #[test]
    fn parse_url_cases() {
        let secret = "s3cr/t:p@ss";
        let url = "s3:http://AKIA%2Bkey:s3cr%2Ft%3Ap%40ss@127.0.0.1:9000/bkt/vols/vm1?size=10GiB&region=eu-west-3&read_only=true&request_timeout=2s";
        let (cfg, rest) = parse_url(url).unwrap();
        let mut want = S3Config::new("bkt");
        want.endpoint = Some("http://127.0.0.1:9000".to_owned());
        want.region = "eu-west-3".to_owned();
        want.prefix = "vols/vm1/".to_owned();
        want.access_key_id = Some("AKIA+key".to_owned());
        want.secret_access_key = Some(secret.to_owned());
        want.request_timeout = Duration::from_secs(2);
        assert_eq!(cfg, want);
        assert_eq!(
            rest,
            [
                ("size".to_owned(), "10GiB".to_owned()),
                ("read_only".to_owned(), "true".to_owned())
            ]
        );
        assert!(!format!("{cfg:?}").contains("s3cr"));

        let (cfg, rest) = parse_url("https://s3.example.com/bucket").unwrap();
        assert_eq!(cfg.endpoint.as_deref(), Some("https://s3.example.com"));
        assert_eq!((cfg.bucket.as_str(), cfg.prefix.as_str()), ("bucket", ""));
        assert_eq!((cfg.access_key_id, cfg.secret_access_key), (None, None));
        assert_eq!(cfg.region, "us-east-1");
        assert!(rest.is_empty());

        let (cfg, _) = parse_url("http://[::1]:9000/b/p/").unwrap();
        assert_eq!(cfg.endpoint.as_deref(), Some("http://[::1]:9000"));
        assert_eq!(cfg.prefix, "p/");

        let (cfg, _) =
            parse_url("s3://my-bucket/a/b?profile=backup&credentials_file=/etc/nbd/aws").unwrap();
        assert_eq!(cfg.endpoint, None);
        assert_eq!(
            (cfg.bucket.as_str(), cfg.prefix.as_str()),
            ("my-bucket", "a/b/")
        );
        assert_eq!(cfg.profile, "backup");
        assert_eq!(cfg.credentials_file, Some(PathBuf::from("/etc/nbd/aws")));

        let (cfg, _) = parse_url("http://K:se@cr:et@host/b/x@y").unwrap();
        assert_eq!(cfg.secret_access_key.as_deref(), Some("se@cr:et"));
        assert_eq!(cfg.prefix, "x@y/");

        let (cfg, _) = parse_url("s3:s3://K:S@bkt").unwrap();
        assert_eq!(cfg.access_key_id.as_deref(), Some("K"));
        assert_eq!(cfg.prefix, "");

        // Errors: exact text, and never the secret.
        let forms = "expected http[s]://[KEY:SECRET@]HOST[:PORT]/BUCKET[/PREFIX] or s3://[KEY:SECRET@]BUCKET[/PREFIX]";
        let at_after_host = "'@' after the host: write '/' and '?' in a key or secret as %2F and %3F ('@' in the bucket, prefix or parameters is not supported)".to_owned();
        let cases: &[(&str, String)] = &[
            ("bucket/prefix", format!("not an S3 URL: {forms}")),
            ("ftp://h/b", format!("unknown scheme \"ftp\": {forms}")),
            ("http://KEY:s3cr/t:p@ss@host:9000/b/p", at_after_host.clone()),
            ("http://KEY:12/s3cr@host:9000/b/p", at_after_host.clone()),
            ("http://KEY:12?s3cr@host:9000/b/p", at_after_host.clone()),
            ("KEY:s3cr@t://host/b", format!("unknown scheme: {forms}")),
            ("http://KEY:s3cr%2Ft@host:9000", format!("no bucket in the URL: {forms}")),
            ("http://KEY:s3cr%2Ft@host:port/b", format!("bad port in the URL: {forms}")),
            ("http://KEY:s3cr%2Ft@:9000/b", format!("bad host name in the URL: {forms}")),
            ("http://s3cr%2Ft@host/b", "the URL has an access key but no secret (KEY:SECRET@)".to_owned()),
            ("http://KEY:s3cr%FFt@host/b", "the secret in the URL is not valid percent-encoded UTF-8".to_owned()),
            ("http://:s3cr%2Ft@host/b", "the URL's access key or secret is empty".to_owned()),
            ("s3://KEY:s3cr%2Ft@bad!bucket", format!("bad bucket name in the URL: {forms}")),
            (
                "http://KEY:s3cr%2Ft@h/b?region=x&region=y",
                "parameter \"region\" is given twice".to_owned(),
            ),
            ("http://KEY:s3cr%2Ft@h/b?profile", "parameter \"profile\" needs a value".to_owned()),
            (
                "s3://KEY:s3cr%2Ft@b?region=mars-1",
                "unknown AWS region \"mars-1\" (give `endpoint` for other S3 servers)".to_owned(),
            ),
            (
                "http://KEY:s3cr%2Ft@h/b/a/../c",
                "bad prefix \"a/../c\" (printable ASCII, no empty, '.' or '..' components, at most 512 bytes)".to_owned(),
            ),
            (
                "http://KEY:s3cr%2Ft@h/b?connect_timeout=5",
                "bad duration \"5\": missing unit (expected a number and a unit ms, s or m, like 100ms, 2s or 1m)".to_owned(),
            ),
        ];
        for (url, want) in cases {
            let got = parse_url(url).map(|(c, _)| c).unwrap_err();
            assert_eq!(&got, want, "{url}");
            assert!(!got.contains("s3cr"), "{url}: {got}");
        }
    }

    #[test]
    fn validate_normalizes_and_refuses() {
        let mut cfg = S3Config::new("b");
        cfg.prefix = "//a/b".to_owned();
        cfg.endpoint = Some("http://minio:9000/".to_owned());
        let cfg = cfg.validate().unwrap();
        assert_eq!(cfg.prefix, "a/b/");
        assert_eq!(cfg.endpoint.as_deref(), Some("http://minio:9000"));

        let bad = |f: &dyn Fn(&mut S3Config)| {
            let mut cfg = S3Config::new("b");
            cfg.secret_access_key = Some("hunter2-secret".to_owned());
            cfg.access_key_id = Some("AK".to_owned());
            f(&mut cfg);
            let e = cfg.validate().unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
            e
        };
        assert_eq!(
            bad(&|c| c.endpoint = Some("http://AK:hunter2-secret@host".to_owned())),
            "endpoint must be http://HOST[:PORT] or https://HOST[:PORT], without credentials, path or query"
        );
        assert_eq!(
            bad(&|c| c.endpoint = Some("s3.example.com".to_owned())),
            "endpoint must be http://HOST[:PORT] or https://HOST[:PORT], without credentials, path or query"
        );
        assert_eq!(
            bad(&|c| c.access_key_id = None),
            "secret_access_key is given without access_key_id"
        );
        assert_eq!(
            bad(&|c| c.secret_access_key = None),
            "access_key_id is given without secret_access_key"
        );
        assert_eq!(
            bad(&|c| c.bucket = String::new()),
            "bad bucket name \"\" (letters, digits, '.', '-' and '_')"
        );
        assert_eq!(
            bad(&|c| c.request_timeout = Duration::ZERO),
            "connect_timeout and request_timeout must be more than 0"
        );
    }

    #[test]
    fn config_from_toml() {
        let cfg: S3Config = toml::from_str(
            r#"
            endpoint = "https://s3.example.com"
            bucket = "vols"
            prefix = "vm1"
            access_key_id = "AK"
            secret_access_key = "hunter2-secret"
            request_timeout = "10s"
            "#,
        )
        .unwrap();
        let cfg = cfg.validate().unwrap();
        assert_eq!(cfg.prefix, "vm1/");
        assert_eq!(cfg.region, DEFAULT_REGION);
        assert_eq!(cfg.profile, DEFAULT_PROFILE);
        assert_eq!(cfg.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(cfg.request_timeout, Duration::from_secs(10));

        let e = toml::from_str::<S3Config>("bucket = \"b\"\nsecret = \"x\"").unwrap_err();
        assert!(e.to_string().contains("unknown field `secret`"), "{e}");
        assert!(
            toml::from_str::<S3Config>("prefix = \"p\"").is_err(),
            "bucket is required"
        );
    }

    #[tokio::test]
    async fn debug_never_shows_the_secret() {
        let mut cfg = S3Config::new("b");
        cfg.endpoint = Some("http://127.0.0.1:9".to_owned());
        cfg.access_key_id = Some("AKIAVISIBLE".to_owned());
        cfg.secret_access_key = Some("hunter2-very-secret".to_owned());
        let text = format!("{cfg:?} {cfg:#?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("secret_access_key: Some(\"<redacted>\")"),
            "{text}"
        );
        assert!(text.contains("AKIAVISIBLE"), "{text}");
        let store = S3Store::connect(cfg).unwrap();
        let text = format!("{store:?} {store:#?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(
            format!("{store:?}"),
            "S3Store { location: \"http://127.0.0.1:9\", bucket: \"b\", prefix: \"\", request_timeout: 30s, .. }"
        );
    }

    #[test]
    fn the_hash_never_changes() {
        // Changing these would orphan every stored object.
        assert_eq!(spread("vm1.0.chunk"), "c594");
        assert_eq!(spread("vm1.1.chunk"), "3a29");
        assert_eq!(spread("vm1.volume"), "ff58");
        // FNV-1a 64 and the MurmurHash3 finalizer, checked against an independent implementation.
        assert_eq!(key_hash(""), 0xefd0_1f60_ba99_2926);
        assert_eq!(key_hash("vm1.0.chunk"), 0xc594_1d38_429d_cf88);
        // Keys differing in one digit spread over many folders.
        let folders: std::collections::HashSet<String> = (0..1000)
            .map(|i| spread(&format!("vm1.{i}.chunk")))
            .collect();
        assert!(folders.len() > 980, "{}", folders.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn keys_are_spread_under_the_prefix() {
        let moto = server().await;
        let a = open(&moto, "/vols/vol-a").await;
        let b = open(&moto, "vols/vol-b/").await;
        let keys: Vec<String> = (0..40)
            .map(|i| format!("vm1.{i}.chunk"))
            .chain(["vm1.volume".to_owned(), "dir/vm1.2.chunk".to_owned()])
            .collect();
        for k in &keys {
            a.put(k, Bytes::from(k.clone()), false).await.unwrap();
        }
        b.put("vm1.0.chunk", Bytes::from_static(b"b"), false)
            .await
            .unwrap();

        let raw = raw_keys(&moto).await;
        assert_eq!(raw.len(), keys.len() + 1);
        let mut folders = std::collections::HashSet::new();
        for k in &keys {
            let h = spread(k);
            assert!(
                raw.contains(&format!("vols/vol-a/{h}/{k}")),
                "{k} in {raw:?}"
            );
            folders.insert(h);
        }
        assert!(folders.len() > 35, "{folders:?}");
        assert!(raw.contains(&format!("vols/vol-b/{}/vm1.0.chunk", spread("vm1.0.chunk"))));

        // list maps back, and each volume sees only its own objects.
        let mut listed = a.list("").await.unwrap();
        listed.sort();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(listed, want);
        let mut listed = a.list("vm1.1").await.unwrap();
        listed.sort();
        assert_eq!(listed.len(), 11, "vm1.1 and vm1.10..19: {listed:?}");
        assert_eq!(b.list("").await.unwrap(), ["vm1.0.chunk"]);
        assert_eq!(
            &b.get("vm1.0.chunk", None).await.unwrap().unwrap()[..],
            b"b"
        );
        assert_eq!(
            &a.get("vm1.0.chunk", None).await.unwrap().unwrap()[..],
            b"vm1.0.chunk"
        );

        // Objects that are not in the layout are ignored.
        let client = moto.client();
        for stray in [
            "vols/vol-a/README",
            "vols/vol-a/0000/vm1.0.chunk",
            "vols/vol-a/zz/x",
        ] {
            client
                .put_object(PutObjectRequest {
                    bucket: BUCKET.to_owned(),
                    key: stray.to_owned(),
                    body: Some(Vec::from(&b"stray"[..]).into()),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        assert_eq!(a.list("").await.unwrap().len(), keys.len());
    }

    #[tokio::test]
    async fn lists_more_than_one_page() {
        let moto = server().await;
        let s = Arc::new(open(&moto, "big").await);
        let tasks: Vec<_> = (0..1050)
            .map(|i| {
                let s = Arc::clone(&s);
                tokio::spawn(
                    async move { s.put(&format!("v.{i}.chunk"), Bytes::new(), false).await },
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(s.list("v.").await.unwrap().len(), 1050);
        assert_eq!(s.list("v.104").await.unwrap().len(), 1 + 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_requests_at_once() {
        let moto = server().await;
        let s = Arc::new(open(&moto, "par").await);
        let data = |i: usize| vec![(i % 251) as u8; 256 * 1024 + i];
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let key = format!("p.{i}.chunk");
                    s.put(&key, Bytes::from(data(i)), true).await.unwrap();
                    let got = s.get(&key, None).await.unwrap().unwrap();
                    assert_eq!(got.len(), data(i).len());
                    assert!(got.iter().all(|&b| b == (i % 251) as u8));
                    let part = s.get(&key, Some(1000..1010)).await.unwrap().unwrap();
                    assert_eq!(&part[..], &data(i)[1000..1010]);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.list("").await.unwrap().len(), 64);
    }

    #[tokio::test]
    async fn keys_with_unusual_characters() {
        let moto = server().await;
        let s = open(&moto, "odd chars+%").await;
        let keys = [
            "a b+c%d=e&f",
            "q?x#y;z,w:v@u!t$s'r(p)o*n~m",
            "dir/sub dir/file+1.chunk",
            "%2F%20plus+",
        ];
        for k in keys {
            s.put(k, Bytes::from(k.as_bytes().to_vec()), false)
                .await
                .unwrap_or_else(|e| panic!("put {k}: {e}"));
            assert_eq!(
                s.get(k, None).await.unwrap().as_deref(),
                Some(k.as_bytes()),
                "{k}"
            );
            assert_eq!(s.head(k).await.unwrap(), Some(k.len() as u64), "{k}");
        }
        let mut listed = s.list("").await.unwrap();
        listed.sort();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(listed, want);
        for k in keys {
            s.delete(k, false).await.unwrap();
            assert_eq!(s.head(k).await.unwrap(), None, "{k}");
        }
    }

    #[tokio::test]
    async fn ranges_of_small_objects() {
        let moto = server().await;
        let s = open(&moto, "r").await;
        s.put("empty", Bytes::new(), false).await.unwrap();
        assert_eq!(
            s.get("empty", Some(0..0)).await.unwrap().as_deref(),
            Some(&b""[..])
        );
        assert!(matches!(
            s.get("empty", Some(0..1)).await,
            Err(StoreError::OutOfRange {
                size: 0,
                start: 0,
                end: 1,
                ..
            })
        ));
        let (start, end) = (3, 1);
        assert_eq!(s.get("none", Some(start..end)).await.unwrap(), None);
        assert_eq!(s.get("none", Some(3..3)).await.unwrap(), None);
        s.put("one", Bytes::from_static(b"x"), false).await.unwrap();
        assert_eq!(
            s.get("one", Some(0..1)).await.unwrap().as_deref(),
            Some(&b"x"[..])
        );
        assert!(matches!(
            s.get("one", Some(1..2)).await,
            Err(StoreError::OutOfRange { size: 1, .. })
        ));
        let e = s
            .put_range("one", 0, Bytes::from_static(b"y"), 1, false)
            .await
            .unwrap_err();
        assert!(!remote(&e).3);
    }

    #[tokio::test]
    async fn a_missing_bucket_is_a_clear_permanent_error() {
        let moto = server().await;
        let e = S3Store::open(moto.config("no-such-bucket", "p"))
            .await
            .unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "s3 bucket \"no-such-bucket\" at {}: HTTP 404 Not Found: no such bucket",
                moto.endpoint()
            )
        );
        assert!(!format!("{e} {e:?}").contains(SECRET_KEY));

        // A bucket removed after opening: operations fail, permanently, naming it.
        moto.create_bucket("short-lived").await;
        let s = S3Store::open(moto.config("short-lived", "p"))
            .await
            .unwrap();
        moto.client()
            .delete_bucket(rusoto_s3::DeleteBucketRequest {
                bucket: "short-lived".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        for e in [
            s.get("k", None).await.unwrap_err(),
            s.put("k", Bytes::from_static(b"x"), false)
                .await
                .unwrap_err(),
            s.list("").await.unwrap_err(),
        ] {
            let (_, _, message, transient) = remote(&e);
            assert!(!transient, "{e}");
            assert!(message.contains("NoSuchBucket"), "{e}");
            assert!(message.contains("short-lived"), "{e}");
            assert!(!message.contains(SECRET_KEY), "{e}");
        }
    }

    #[tokio::test]
    async fn a_vanished_server_fails_fast_and_transiently() {
        let mut moto = server().await;
        let s = open(&moto, "gone").await;
        s.put("k", Bytes::from_static(b"data"), false)
            .await
            .unwrap();
        moto.kill();
        let started = Instant::now();
        let errors = [
            s.get("k", None).await.unwrap_err(),
            s.get("k", Some(0..2)).await.unwrap_err(),
            s.put("k", Bytes::from_static(b"x"), true)
                .await
                .unwrap_err(),
            s.head("k").await.unwrap_err(),
            s.delete("k", true).await.unwrap_err(),
            s.list("").await.unwrap_err(),
        ];
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        for e in &errors {
            let (op, key, message, transient) = remote(e);
            assert!(transient, "{e}");
            assert!(key == "k" || (op == "list" && key.is_empty()), "{e}");
            assert!(message.contains("request failed"), "{e}");
            assert!(!message.contains(SECRET_KEY), "{e}");
        }
        assert!(errors[0].is_transient());

        // Opening against nothing is transient too.
        let mut cfg = moto.config(BUCKET, "");
        cfg.endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
        let e = S3Store::open(cfg).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let mut cfg = S3Config::new("b");
        cfg.endpoint = Some(format!("http://127.0.0.1:{port}"));
        cfg.access_key_id = Some(ACCESS_KEY.to_owned());
        cfg.secret_access_key = Some(SECRET_KEY.to_owned());
        cfg.request_timeout = Duration::from_millis(500);
        let started = Instant::now();
        let e = S3Store::open(cfg.clone()).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("no answer within 500ms"), "{e}");
        let s = S3Store::connect(cfg).unwrap();
        let e = s.get("k", None).await.unwrap_err();
        let (_, _, message, transient) = remote(&e);
        assert!(
            transient && message.contains("no answer within 500ms"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        holder.abort();
    }

    #[tokio::test]
    async fn credentials_file() {
        let moto = server().await;
        let dir = std::env::temp_dir().join(format!("nbd-rs-s3-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("credentials");
        std::fs::write(
            &file,
            format!(
                "[default]\naws_access_key_id = OTHER\naws_secret_access_key = other-secret\n\n[nbd]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
            ),
        )
        .unwrap();
        let mut cfg = moto.config(BUCKET, "cred");
        cfg.access_key_id = None;
        cfg.secret_access_key = None;
        cfg.credentials_file = Some(file.clone());
        cfg.profile = "nbd".to_owned();
        let s = S3Store::open(cfg.clone()).await.unwrap();
        s.put("k", Bytes::from_static(b"v"), false).await.unwrap();

        cfg.profile = "missing".to_owned();
        let e = S3Store::open(cfg).await.unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains("no usable credentials"), "{e}");
        assert!(!format!("{e} {e:?}").contains(SECRET_KEY), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// moto checks the SigV4 signatures of the users it knows: the PUTs this store signs
    /// itself (body hash included) pass with the right secret and are refused with another.
    #[tokio::test]
    async fn signed_puts_pass_a_signature_check() {
        // Three IAM calls and the bucket's creation run before moto checks anything.
        let moto = MotoServer::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]).await;
        let script = "import boto3, sys\n\
            iam = boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1', \
              aws_access_key_id='x', aws_secret_access_key='y')\n\
            iam.create_user(UserName='nbd')\n\
            iam.put_user_policy(UserName='nbd', PolicyName='all', PolicyDocument=\
              '{\"Version\": \"2012-10-17\", \"Statement\": [{\"Effect\": \"Allow\", \
              \"Action\": \"*\", \"Resource\": \"*\"}]}')\n\
            k = iam.create_access_key(UserName='nbd')['AccessKey']\n\
            print(k['AccessKeyId'], k['SecretAccessKey'])\n";
        let out = std::process::Command::new("python3")
            .args(["-c", script, &moto.endpoint()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (key, secret) = text.trim().split_once(' ').unwrap();
        moto.create_bucket(BUCKET).await;
        let cfg = S3Config {
            access_key_id: Some(key.to_owned()),
            secret_access_key: Some(secret.to_owned()),
            ..moto.config(BUCKET, "signed")
        };
        let s = S3Store::open(cfg.clone()).await.unwrap();
        // Small bodies are signed on the async worker, large ones on the blocking pool.
        let large = Bytes::from((0..1 << 20).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
        for body in [Bytes::from_static(b"small"), large] {
            s.put("k", body.clone(), false).await.unwrap();
            assert_eq!(s.get("k", None).await.unwrap(), Some(body));
        }
        let wrong = S3Store::connect(S3Config {
            secret_access_key: Some("not-the-secret".to_owned()),
            ..cfg
        })
        .unwrap();
        let e = wrong
            .put("k", Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("HTTP 403 SignatureDoesNotMatch"),
            "{e}"
        );
        assert!(!e.is_transient());
    }

    #[tokio::test]
    async fn wrong_credentials_are_a_permanent_403() {
        // moto checks credentials after its first INITIAL_NO_AUTH_ACTION_COUNT requests; the
        // test keys exist in no IAM user there.
        let moto = MotoServer::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]).await;
        moto.create_bucket(BUCKET).await;
        let e = S3Store::open(moto.config(BUCKET, "p")).await.unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "s3 bucket \"{BUCKET}\" at {}: HTTP 403 Forbidden: access denied (check the credentials and the bucket's policy)",
                moto.endpoint()
            )
        );
        let s = S3Store::connect(moto.config(BUCKET, "p")).unwrap();
        let e = s
            .put("k", Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "put k: HTTP 403 InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records. [{BUCKET}/p/{}/k at {}]",
                spread("k"),
                moto.endpoint()
            )
        );
        for e in [
            e,
            s.get("k", None).await.unwrap_err(),
            s.head("k").await.unwrap_err(),
            s.list("").await.unwrap_err(),
            s.delete("k", false).await.unwrap_err(),
        ] {
            let (_, _, message, transient) = remote(&e);
            assert!(!transient, "{e}");
            assert!(message.starts_with("HTTP 403"), "{e}");
            assert!(!message.contains(SECRET_KEY), "{e}");
        }
    }

    /// A server on loopback that answers every request with `status` and `body`.
    async fn scripted(status: &'static str, body: String) -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        (endpoint, task)
    }

    fn s3_error(code: &str, message: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>R1</RequestId></Error>"
        )
    }

    fn scripted_store(endpoint: String) -> S3Store {
        let mut cfg = S3Config::new("b");
        cfg.endpoint = Some(endpoint);
        cfg.access_key_id = Some(ACCESS_KEY.to_owned());
        cfg.secret_access_key = Some(SECRET_KEY.to_owned());
        S3Store::connect(cfg).unwrap()
    }

    #[tokio::test]
    async fn error_mapping() {
        let cases = [
            (
                "503 Service Unavailable",
                s3_error("SlowDown", "Please reduce your request rate."),
                true,
                "HTTP 503 SlowDown: Please reduce your request rate.",
            ),
            (
                "500 Internal Server Error",
                s3_error(
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                ),
                true,
                "HTTP 500 InternalError: We encountered an internal error. Please try again.",
            ),
            (
                "503 Service Unavailable",
                s3_error("ServiceUnavailable", "Reduce your request rate."),
                true,
                "HTTP 503 ServiceUnavailable: Reduce your request rate.",
            ),
            (
                "502 Bad Gateway",
                String::new(),
                true,
                "HTTP 502 Bad Gateway",
            ),
            (
                "429 Too Many Requests",
                String::new(),
                true,
                "HTTP 429 Too Many Requests",
            ),
            (
                "400 Bad Request",
                s3_error(
                    "RequestTimeout",
                    "Your socket connection to the server was not read from or written to within the timeout period.",
                ),
                true,
                "HTTP 400 RequestTimeout: Your socket connection to the server was not read from or written to within the timeout period.",
            ),
            (
                "403 Forbidden",
                s3_error("AccessDenied", "Access Denied"),
                false,
                "HTTP 403 AccessDenied: Access Denied",
            ),
            (
                "403 Forbidden",
                s3_error(
                    "SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.",
                ),
                false,
                "HTTP 403 SignatureDoesNotMatch: The request signature we calculated does not match the signature you provided.",
            ),
            (
                "403 Forbidden",
                s3_error(
                    "InvalidAccessKeyId",
                    "The AWS Access Key Id you provided does not exist in our records.",
                ),
                false,
                "HTTP 403 InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records.",
            ),
            (
                "404 Not Found",
                s3_error("NoSuchBucket", "The specified bucket does not exist"),
                false,
                "HTTP 404 NoSuchBucket: The specified bucket does not exist",
            ),
            (
                "400 Bad Request",
                s3_error(
                    "InvalidArgument",
                    &format!("bad header &lt;{SECRET_KEY}&gt;"),
                ),
                false,
                "HTTP 400 InvalidArgument: bad header <<redacted>>",
            ),
            (
                "301 Moved Permanently",
                s3_error(
                    "PermanentRedirect",
                    "The bucket you are attempting to access must be addressed using the specified endpoint.",
                ),
                false,
                "HTTP 301 PermanentRedirect: The bucket you are attempting to access must be addressed using the specified endpoint.",
            ),
        ];
        for (status, body, transient, message) in cases {
            let (endpoint, server) = scripted(status, body).await;
            let s = scripted_store(endpoint.clone());
            let object = format!("b/{}/k", spread("k"));
            for e in [
                s.get("k", None).await.unwrap_err(),
                s.get("k", Some(0..4)).await.unwrap_err(),
                s.put("k", Bytes::from_static(b"x"), false)
                    .await
                    .unwrap_err(),
                s.delete("k", false).await.unwrap_err(),
            ] {
                let (op, key, got, t) = remote(&e);
                assert_eq!(key, "k");
                assert_eq!(
                    got,
                    format!("{message} [{object} at {endpoint}]"),
                    "{op} {status}"
                );
                assert_eq!(t, transient, "{op} {status}");
                assert_eq!(e.is_transient(), transient);
            }
            // HEAD answers carry no body: the status alone decides, and 404 is a missing object.
            if status.starts_with("404") {
                assert_eq!(s.head("k").await.unwrap(), None);
                server.abort();
                continue;
            }
            let e = s.head("k").await.unwrap_err();
            let by_status = status.starts_with('5') || status.starts_with("429");
            assert_eq!(remote(&e).3, by_status, "head {status}: {e}");
            assert!(
                remote(&e).2.starts_with(&format!("HTTP {}", &status[..3])),
                "{e}"
            );
            let e = s.list("").await.unwrap_err();
            assert_eq!(remote(&e).3, transient, "list {status}: {e}");
            server.abort();
        }
    }

    #[tokio::test]
    async fn a_server_that_ignores_ranges() {
        // 200 with the whole object instead of 206: the range is cut out here.
        let (endpoint, server) = scripted("200 OK", "hello world".to_owned()).await;
        let s = scripted_store(endpoint);
        assert_eq!(
            s.get("k", Some(6..11)).await.unwrap().as_deref(),
            Some(&b"world"[..])
        );
        assert!(matches!(
            s.get("k", Some(6..12)).await,
            Err(StoreError::OutOfRange { size: 11, .. })
        ));
        server.abort();
    }
}
