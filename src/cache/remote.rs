//! The object store behind a `[cache]` url: one client per url for the whole process, with
//! credentials from the environment only, short timeouts, no retry storm, and a memory of
//! outages so that an unreachable store costs one warning and one timeout, not one per build.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as KeyPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::manifest::CacheSettings;

/// How long the store is left alone after it could not be reached.
const OUTAGE_PAUSE: Duration = Duration::from_secs(30);

/// The longest wait for the next bytes of an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The bearer token for an `http(s)://` store.
pub const TOKEN_VAR: &str = "PMESH_CACHE_TOKEN";

/// One store and what this process knows of its health.
#[derive(Debug)]
pub struct Remote {
    pub store: Arc<dyn ObjectStore>,
    /// Prepended to every key: the url's path for `s3://`; empty where the client's url
    /// already holds it.
    prefix: Vec<String>,
    /// The url as the manifest gives it: safe to show (it holds no credential).
    pub url: String,
    /// Since when the store is thought down, and until when it is left alone. Shared by every
    /// build of every service that uses this url.
    outage: Mutex<Option<Instant>>,
}

static REMOTES: LazyLock<Mutex<HashMap<String, Arc<Remote>>>> = LazyLock::new(Mutex::default);

/// Why a store could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cache {url}: {error}")]
pub struct SetupError {
    url: String,
    error: String,
}

/// The process's client for `settings.url`, made on first use.
pub fn remote(settings: &CacheSettings) -> Result<Arc<Remote>, SetupError> {
    let mut all = REMOTES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = all.get(&settings.url) {
        return Ok(r.clone());
    }
    let fail = |error: String| SetupError {
        url: settings.url.clone(),
        error,
    };
    let (store, prefix) = open(settings).map_err(fail)?;
    let r = Arc::new(Remote {
        store,
        prefix,
        url: settings.url.clone(),
        outage: Mutex::new(None),
    });
    all.insert(settings.url.clone(), r.clone());
    Ok(r)
}

fn client_options(settings: &CacheSettings) -> ClientOptions {
    // The connect timeout bounds what an unreachable store costs and the read timeout what a
    // stalled one does; a request as a whole has no limit, since an archive may be large.
    ClientOptions::new()
        .with_connect_timeout(settings.connect_timeout)
        .with_read_timeout(READ_TIMEOUT)
        .with_timeout_disabled()
}

/// One quick retry: a store that fails twice in a row is treated as down, not hammered.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 1,
        retry_timeout: Duration::from_secs(10),
    }
}

fn open(settings: &CacheSettings) -> Result<(Arc<dyn ObjectStore>, Vec<String>), String> {
    let url = &settings.url;
    let (scheme, rest) = url.split_once("://").ok_or("no scheme")?;
    match scheme {
        "s3" => {
            let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
            // AWS_REGION, AWS_ENDPOINT_URL, keys and tokens; the region defaults to us-east-1.
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
                && let Some((id, secret, token)) = profile_credentials()
            {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
                if let Some(t) = token {
                    b = b.with_token(t);
                }
            }
            let mut options = client_options(settings);
            // An explicit http:// endpoint (a local S3-compatible server) is the user's choice.
            let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
                .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            if endpoint.starts_with("http://") {
                options = options.with_allow_http(true);
            }
            let store = b
                .with_retry(retry())
                .with_client_options(options)
                .build()
                .map_err(|e| e.to_string())?;
            let prefix = path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            Ok((Arc::new(store), prefix))
        }
        "http" | "https" => {
            let mut options = client_options(settings);
            if scheme == "http" {
                options = options.with_allow_http(true);
            }
            if let Ok(token) = std::env::var(TOKEN_VAR) {
                let mut headers = http::HeaderMap::new();
                let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| format!("{TOKEN_VAR} is not a valid header value"))?;
                value.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, value);
                options = options.with_default_headers(headers);
            }
            let store = HttpBuilder::new()
                .with_url(url.clone())
                .with_retry(retry())
                .with_client_options(options)
                .build()
                .map_err(|e| e.to_string())?;
            Ok((Arc::new(store), Vec::new()))
        }
        "file" => {
            std::fs::create_dir_all(rest).map_err(|e| format!("cannot create {rest}: {e}"))?;
            let store = LocalFileSystem::new_with_prefix(rest).map_err(|e| e.to_string())?;
            Ok((Arc::new(store), Vec::new()))
        }
        other => Err(format!("unsupported scheme `{other}`")),
    }
}

/// The keys of `AWS_PROFILE` (or `default`) in `~/.aws/credentials` (or
/// `AWS_SHARED_CREDENTIALS_FILE`), for machines set up with `aws configure` rather than
/// variables.
fn profile_credentials() -> Option<(String, String, Option<String>)> {
    let file = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(f) => std::path::PathBuf::from(f),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".aws/credentials"),
    };
    let text = std::fs::read_to_string(file).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_owned());
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if in_profile {
            let v = Some(v.trim().to_owned());
            match k.trim() {
                "aws_access_key_id" => id = v,
                "aws_secret_access_key" => secret = v,
                "aws_session_token" => token = v,
                _ => {}
            }
        }
    }
    Some((id?, secret?, token))
}

impl Remote {
    /// The key of `name` under this store's prefix.
    pub fn key(&self, name: &[&str]) -> KeyPath {
        KeyPath::from_iter(
            self.prefix
                .iter()
                .map(String::as_str)
                .chain(name.iter().copied()),
        )
    }

    /// Whether the store is being left alone after an outage.
    pub fn paused(&self) -> bool {
        let outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        outage.is_some_and(|since| since.elapsed() < OUTAGE_PAUSE)
    }

    /// Notes that the store could not be reached; `true` when this starts an outage (the one
    /// time to warn).
    pub fn went_down(&self) -> bool {
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let first = outage.is_none();
        *outage = Some(Instant::now());
        first
    }

    /// Notes that the store answered.
    pub fn came_up(&self) {
        *self.outage.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
