//! The team's build cache (issue 14): archives shared through an object store by build id and
//! platform, so a tree built once by anyone is fetched, not built, by everyone else.
//!
//! An entry is one object, `<prefix>/v1/<platform>/<id>.pmesh`: a magic line, one line of JSON
//! ([`Meta`]: id, platform, payload size, its SHA-256, an optional Ed25519 signature), then the
//! payload, the build directory as tar + zstd. One object, written with one PUT, so a reader
//! never pairs the description of one upload with the bytes of another.
//!
//! Fetching streams the object into a temporary directory under `.pmesh/cache/`, checking as it
//! goes (see [`archive`]), and only a complete entry whose size, digest, signature and
//! `.buildid` all match becomes a `.build-<ts>` archive, by one rename. Anything else is a
//! warning, the temporary directory goes, and the build runs locally. The cache never turns a
//! build into an error: at worst it costs one connect timeout per outage.

pub mod archive;
pub mod remote;
pub mod sign;

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::{GetResultPayload, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, EventKind, Sink};
use crate::hash::BuildId;
use crate::manifest::{CacheSettings, Service};
use crate::pipeline::Outcome;
use crate::store::{self, Store};
use remote::Remote;

/// The first bytes of every entry; the version is the layout's, also in the key.
const MAGIC: &[u8] = b"pmesh-dev cache 1\n";
/// The longest [`Meta`] line accepted.
const MAX_META: usize = 16 * 1024;
/// A download that brings no byte for this long is given up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Download chunks buffered between the network and the unpacker.
const PIPE_DEPTH: usize = 16;

/// What an entry says of itself, on its second line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    pub platform: String,
    /// Bytes of the payload (the tar + zstd stream after this line).
    pub size: u64,
    /// Lowercase hex SHA-256 of the payload.
    pub sha256: String,
    /// Base64 Ed25519 signature of [`sign::statement`], when the pusher had a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The platform part of a key: artifacts carry the OS, the CPU and the C library.
pub fn platform() -> String {
    let env = if cfg!(target_env = "gnu") {
        "-gnu"
    } else if cfg!(target_env = "musl") {
        "-musl"
    } else {
        ""
    };
    format!("{}-{}{env}", std::env::consts::OS, std::env::consts::ARCH)
}

/// The object key of build `id` on this platform, below the store's prefix.
pub fn entry_name(id: &str) -> [String; 3] {
    ["v1".to_owned(), platform(), format!("{id}.pmesh")]
}

/// Why an entry was not used or not stored.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The store could not be reached or broke off: an outage, warned about once.
    #[error("{0}")]
    Unreachable(String),
    #[error("the entry is not a pmesh-dev cache entry")]
    NotAnEntry,
    #[error("the entry is for {0}, not for this build and platform")]
    Mismatch(String),
    #[error("the entry is cut short ({got} of {want} bytes)")]
    Truncated { got: u64, want: u64 },
    #[error("the entry's content does not match its digest")]
    Tampered,
    #[error("the entry is not signed by a trusted key")]
    BadSignature,
    #[error("the entry holds no `.buildid` of this build")]
    NoBuildId,
    #[error("{0}")]
    Archive(#[from] archive::ArchiveError),
    #[error("the store has a [cache] that needs signed entries, but there is no signing key: {0}")]
    NoSigningKey(String),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Local(String),
}

/// A download error is an outage; anything the entry itself says is not.
fn io_to_cache(e: io::Error) -> CacheError {
    // The tar reader wraps the errors of what it reads: look through the chain.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|i| i as _);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<Transport>() {
            return CacheError::Unreachable(t.0.clone());
        }
        cur = err.source();
    }
    CacheError::Archive(archive::ArchiveError::Io(e))
}

/// A failure of the network under the unpacker, told apart from the archive's own errors.
#[derive(Debug)]
struct Transport(String);
impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Transport {}

fn transport(msg: String) -> io::Error {
    io::Error::other(Transport(msg))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);
/// The urls whose client could not be made, warned about once.
static SETUP_WARNED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Mutex::default);

/// The client of `svc`'s cache, or a warning (once per url) saying why there is none.
fn remote_of(svc: &Service, sink: &Sink) -> Option<(Arc<CacheSettings>, Arc<Remote>)> {
    let settings = svc.cache.clone()?;
    match remote::remote(&settings) {
        Ok(r) => Some((settings, r)),
        Err(e) => {
            let mut warned = SETUP_WARNED.lock().unwrap_or_else(|e| e.into_inner());
            if warned.insert(settings.url.clone()) {
                warn(sink, &svc.name, format!("{e}; building locally"));
            }
            None
        }
    }
}

fn warn(sink: &Sink, service: &str, message: String) {
    sink.emit(&Event::now(service, EventKind::Warning { message }));
}

/// Warns about `e` from `remote`: an outage once until the store answers again, anything
/// else every time.
fn report(sink: &Sink, service: &str, remote: &Remote, what: &str, e: &CacheError) {
    match e {
        CacheError::Unreachable(why) => {
            if remote.went_down() {
                warn(
                    sink,
                    service,
                    format!(
                        "cache {} is unreachable ({why}): building locally, and leaving it alone for a while",
                        remote.url
                    ),
                );
            }
        }
        e => warn(sink, service, format!("cache {}: {what}: {e}", remote.url)),
    }
}

fn outage(e: object_store::Error) -> CacheError {
    CacheError::Unreachable(e.to_string())
}

/// A build taken from the cache: a new archive, not yet live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The `.build-<ts>` it became.
    pub archive: String,
    /// Downloaded.
    pub bytes: u64,
    pub duration_ms: u64,
}

impl Fetched {
    /// The `fetched` event, for once `.run` points to it.
    pub fn event(&self, id: BuildId) -> EventKind {
        EventKind::Fetched {
            id: id.to_string(),
            archive: self.archive.clone(),
            bytes: self.bytes,
            duration_ms: self.duration_ms,
        }
    }
}

/// Looks build `id` up in `svc`'s cache and, when a good entry is there, makes it a new
/// archive (not yet live: the caller publishes it and then sends [`Fetched::event`]). `None`
/// (after a warning when something went wrong) means: build locally. The caller holds the
/// lock.
pub async fn fetch(
    svc: &Service,
    store: &Store,
    id: BuildId,
    sink: &Sink,
    cancel: &CancellationToken,
) -> Option<Fetched> {
    let (settings, remote) = remote_of(svc, sink)?;
    if remote.paused() || cancel.is_cancelled() {
        return None;
    }
    let started = Instant::now();
    let key = remote.key(&entry_name(&id.to_string()).each_ref().map(String::as_str));
    // However the client retries, a lookup costs at most this before the build goes on.
    let patience = settings.connect_timeout + Duration::from_secs(1);
    let got = tokio::select! {
        r = tokio::time::timeout(patience, remote.store.get(&key)) => r,
        () = cancel.cancelled() => return None,
    };
    let stream = match got {
        Ok(Ok(g)) => g.payload,
        Ok(Err(object_store::Error::NotFound { .. })) => {
            remote.came_up();
            return None;
        }
        Ok(Err(e)) => {
            report(sink, &svc.name, &remote, "lookup failed", &outage(e));
            return None;
        }
        Err(_) => {
            let e = CacheError::Unreachable(format!(
                "no answer within {}",
                crate::log::human_ms(u64::try_from(patience.as_millis()).unwrap_or(u64::MAX))
            ));
            report(sink, &svc.name, &remote, "lookup failed", &e);
            return None;
        }
    };
    remote.came_up();

    let tmp = match fetch_dir(store) {
        Ok(t) => t,
        Err(e) => {
            warn(sink, &svc.name, format!("cache: {e}"));
            return None;
        }
    };
    // A file:// store hands over the open file: read it directly, not in the client's 8 KiB
    // chunks through the runtime.
    let (input, pump): (Box<dyn Read + Send>, _) = match stream {
        GetResultPayload::File(file, _) => (Box::new(file), None),
        GetResultPayload::Stream(s) => {
            let (tx, rx) = mpsc::channel(PIPE_DEPTH);
            let pump = tokio::spawn(pump(s, tx, cancel.clone()));
            (Box::new(ChannelReader::new(rx)), Some(pump))
        }
    };
    let unpacked = {
        let (tmp, settings) = (tmp.clone(), settings.clone());
        tokio::task::spawn_blocking(move || receive(input, &tmp, id, &settings))
            .await
            .unwrap_or_else(|e| Err(CacheError::Local(format!("the unpacking task failed: {e}"))))
    };
    if let Some(p) = pump {
        p.abort();
    }
    let adopted = unpacked.and_then(|bytes| {
        let a = store
            .adopt(&tmp, id, started.elapsed(), None)
            .map_err(|e| CacheError::Local(e.to_string()))?;
        Ok((a.name, bytes))
    });
    match adopted {
        Ok((archive, bytes)) => {
            mark_stored(store, id);
            Some(Fetched {
                archive,
                bytes,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        }
        Err(e) => {
            // Never a partial tree left behind, nor one that could pass for an archive.
            let _ = std::fs::remove_dir_all(&tmp);
            if !cancel.is_cancelled() {
                report(
                    sink,
                    &svc.name,
                    &remote,
                    &format!("entry {id} refused, building locally"),
                    &e,
                );
            }
            None
        }
    }
}

/// Whether `fetch-<pid>-<n>` or `push-<pid>-<n>` belongs to a process that is gone.
fn abandoned(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("fetch-")
        .or_else(|| name.strip_prefix("push-"))
    else {
        return false;
    };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    matches!(
        nix::sys::signal::kill(pid, None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// A fresh temporary directory for one download, on the service root's file system so that
/// adopting it is one rename; what a killed process left is removed here.
fn fetch_dir(store: &Store) -> Result<PathBuf, String> {
    let dir = store.state_dir("cache").map_err(|e| e.to_string())?;
    let pid = std::process::id();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if abandoned(&e.file_name().to_string_lossy()) {
                let p = e.path();
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
    }
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("fetch-{pid}-{n}"));
    std::fs::create_dir(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    Ok(tmp)
}

/// Moves download chunks to the unpacker, bounded (backpressure, never the whole entry in
/// memory) and with an idle timeout; a cancel or a failure ends the stream with an error.
async fn pump(
    mut stream: futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
    tx: mpsc::Sender<io::Result<Bytes>>,
    cancel: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => n,
            () = cancel.cancelled() => {
                let _ = tx.send(Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"))).await;
                return;
            }
        };
        let item = match next {
            Err(_) => Err(transport(format!(
                "no data for {}s",
                IDLE_TIMEOUT.as_secs()
            ))),
            Ok(None) => return,
            Ok(Some(Ok(b))) => Ok(b),
            Ok(Some(Err(e))) => Err(transport(e.to_string())),
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// The download as a blocking reader for the unpacker.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> ChannelReader {
        ChannelReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => self.cur = chunk?,
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Counts and hashes every byte read through it, refusing more than `limit`.
struct Digesting<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    /// The input ended (before `limit`, or the unpacker would not have asked again).
    ended: bool,
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ended |= n == 0 && !buf.is_empty();
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "longer than its header says",
            ));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads one entry from `input` into `dest`, checking everything; returns the bytes read.
fn receive(
    input: impl Read + Send,
    dest: &Path,
    id: BuildId,
    settings: &CacheSettings,
) -> Result<u64, CacheError> {
    let mut r = BufReader::with_capacity(256 * 1024, input);
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|e| match io_to_cache(e) {
        CacheError::Unreachable(w) => CacheError::Unreachable(w),
        _ => CacheError::NotAnEntry,
    })?;
    if magic != MAGIC {
        return Err(CacheError::NotAnEntry);
    }
    let mut line = Vec::new();
    (&mut r)
        .take(MAX_META as u64)
        .read_until(b'\n', &mut line)
        .map_err(io_to_cache)?;
    if line.last() != Some(&b'\n') {
        return Err(CacheError::NotAnEntry);
    }
    let meta: Meta = serde_json::from_slice(&line).map_err(|_| CacheError::NotAnEntry)?;
    let (want_id, want_platform) = (id.to_string(), platform());
    if meta.id != want_id || meta.platform != want_platform {
        return Err(CacheError::Mismatch(format!(
            "{} on {}",
            meta.id, meta.platform
        )));
    }
    if !settings.trusted_keys.is_empty() {
        let st = sign::statement(&meta.id, &meta.platform, meta.size, &meta.sha256);
        let ok = meta
            .signature
            .as_deref()
            .is_some_and(|s| sign::verify(&settings.trusted_keys, &st, s));
        if !ok {
            return Err(CacheError::BadSignature);
        }
    }
    if meta.size > settings.max_size {
        return Err(archive::ArchiveError::TooLarge(settings.max_size).into());
    }
    let header_len = (MAGIC.len() + line.len()) as u64;
    let payload = Digesting {
        inner: r,
        hasher: Sha256::new(),
        count: 0,
        limit: meta.size,
        ended: false,
    };
    // Two threads, as `zstd -d | tar -x` has two processes: this one checks and writes the
    // entries while the other downloads, digests and decompresses.
    let (tx, rx) = std::sync::mpsc::sync_channel(PIPE_DEPTH);
    let max = settings.max_size;
    let (unpacked, decoded) = std::thread::scope(|s| {
        let decoder = s.spawn(move || decode(payload, max, tx));
        let unpacked = archive::unpack_tar(Chunks::new(rx), dest, max);
        (unpacked, decoder.join())
    });
    let decoded =
        decoded.map_err(|_| CacheError::Local("the decompressing thread panicked".to_owned()))?;
    let truncated = || CacheError::Truncated {
        got: decoded.count,
        want: meta.size,
    };
    // The decoder's error comes first: the unpacker's is then only the stream ending early.
    if let Some(e) = decoded.error {
        return Err(match io_to_cache(e) {
            CacheError::Unreachable(w) => CacheError::Unreachable(w),
            // A payload cut short shows as a broken zstd stream.
            _ if decoded.ended => truncated(),
            other => other,
        });
    }
    unpacked?;
    if decoded.count != meta.size {
        return Err(truncated());
    }
    if decoded.sha256 != meta.sha256 {
        return Err(CacheError::Tampered);
    }
    let buildid = dest.join(store::BUILDID_FILE);
    let real_file = std::fs::symlink_metadata(&buildid).is_ok_and(|m| m.is_file());
    if !real_file || store::read_id(dest) != Some(id) {
        return Err(CacheError::NoBuildId);
    }
    Ok(header_len + decoded.count)
}

/// What the decompressing thread saw of the payload.
struct Decoded {
    count: u64,
    sha256: String,
    ended: bool,
    error: Option<io::Error>,
}

/// Digests and decompresses `payload`, sending the tar stream to the unpacker in chunks, then
/// reads what is left after the zstd frame (the digest covers every byte). Stops early,
/// without an error, when the unpacker gave up: its own error says why.
fn decode<R: Read>(mut payload: Digesting<R>, max: u64, tx: SyncSender<Vec<u8>>) -> Decoded {
    let error = (|| -> io::Result<()> {
        let mut tar = archive::decompress(&mut payload, max)?;
        loop {
            let mut buf = vec![0u8; 256 * 1024];
            let n = tar.read(&mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if tx.send(buf).is_err() {
                return Ok(());
            }
        }
        drop(tar);
        io::copy(&mut payload, &mut io::sink())?;
        Ok(())
    })()
    .err();
    Decoded {
        count: payload.count,
        sha256: hex(&payload.hasher.finalize()),
        ended: payload.ended,
        error,
    }
}

/// The decompressed tar stream, as the unpacker reads it.
struct Chunks {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Chunks {
    fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Chunks {
        Chunks {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(v) => (self.cur, self.pos) = (v, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `.pmesh/cache/stored/<platform>-<id>`: this root knows the store has that entry (it pushed
/// or fetched it), so it is not uploaded again.
fn stored_marker(store: &Store, id: BuildId) -> Option<PathBuf> {
    let dir = store.state_dir("cache/stored").ok()?;
    Some(dir.join(format!("{}-{id}", platform())))
}

fn mark_stored(store: &Store, id: BuildId) {
    if let Some(m) = stored_marker(store, id) {
        let _ = std::fs::write(m, b"");
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Uploaded this many bytes.
    Uploaded(u64),
    /// The store had it already.
    AlreadyThere,
}

/// The pushes under way, by key: a second request for the same entry waits for nothing and
/// does nothing.
static IN_FLIGHT: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Mutex::default);

/// Packs archive `archive` (build `id`) of `svc` and uploads it unless the store has it; emits
/// `pushed` when it uploaded.
pub async fn push(
    svc: &Service,
    archive: &str,
    id: BuildId,
    sink: &Sink,
) -> Result<Pushed, CacheError> {
    let settings = svc
        .cache
        .clone()
        .ok_or_else(|| CacheError::Setup("the manifest has no [cache] table".to_owned()))?;
    let remote = remote::remote(&settings).map_err(|e| CacheError::Setup(e.to_string()))?;
    let store = Store::new(&svc.root);
    let marker = stored_marker(&store, id);
    if marker.as_ref().is_some_and(|m| m.exists()) {
        return Ok(Pushed::AlreadyThere);
    }
    let names = entry_name(&id.to_string());
    let key = remote.key(&names.each_ref().map(String::as_str));
    let slot = format!("{}/{key}", remote.url);
    if !IN_FLIGHT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(slot.clone())
    {
        return Ok(Pushed::AlreadyThere);
    }
    let result = upload(svc, &settings, &remote, &store, archive, id, &key, sink).await;
    IN_FLIGHT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&slot);
    if result.is_ok() {
        remote.came_up();
        mark_stored(&store, id);
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn upload(
    svc: &Service,
    settings: &CacheSettings,
    remote: &Remote,
    store: &Store,
    archive: &str,
    id: BuildId,
    key: &object_store::path::Path,
    sink: &Sink,
) -> Result<Pushed, CacheError> {
    let started = Instant::now();
    match remote.store.head(key).await {
        Ok(_) => return Ok(Pushed::AlreadyThere),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(outage(e)),
    }
    let signing = sign::load_signing_key(settings.signing_key.as_deref())
        .map_err(|e| CacheError::NoSigningKey(e.to_string()))?;
    if signing.is_none() && !settings.trusted_keys.is_empty() {
        return Err(CacheError::NoSigningKey(
            "set PMESH_CACHE_SIGNING_KEY or the [cache] table's signing_key".to_owned(),
        ));
    }
    let dir = store.root().join(archive);
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = store
        .state_dir("cache")
        .map_err(|e| CacheError::Local(e.to_string()))?
        .join(format!("push-{}-{n}", std::process::id()));
    let max = settings.max_size;
    let packed = {
        let (dir, tmp) = (dir.clone(), tmp.clone());
        tokio::task::spawn_blocking(move || pack_to(&dir, &tmp, max))
            .await
            .unwrap_or_else(|e| Err(CacheError::Local(format!("the packing task failed: {e}"))))
    };
    let result = match packed {
        Ok((size, sha256)) => {
            let id_s = id.to_string();
            let plat = platform();
            let signature = signing
                .as_ref()
                .map(|k| sign::sign(k, &sign::statement(&id_s, &plat, size, &sha256)));
            let meta = Meta {
                id: id_s,
                platform: plat,
                size,
                sha256,
                signature,
            };
            let mut head = MAGIC.to_vec();
            head.extend(serde_json::to_vec(&meta).unwrap_or_default());
            head.push(b'\n');
            let total = head.len() as u64 + size;
            send(remote, key, head, &tmp).await.map(|()| total)
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&tmp);
    let bytes = result?;
    sink.emit(&Event::now(
        &svc.name,
        EventKind::Pushed {
            id: id.to_string(),
            bytes,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        },
    ));
    Ok(Pushed::Uploaded(bytes))
}

/// Counts and hashes what is written through it.
struct DigestingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for DigestingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Packs `dir` into the file `tmp`; returns the payload's size and SHA-256.
fn pack_to(dir: &Path, tmp: &Path, max: u64) -> Result<(u64, String), CacheError> {
    let file = std::fs::File::create(tmp)
        .map_err(|e| CacheError::Local(format!("cannot create {}: {e}", tmp.display())))?;
    let mut w = DigestingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        count: 0,
    };
    archive::pack(dir, &mut w, max)?;
    w.flush().map_err(archive::ArchiveError::Io)?;
    Ok((w.count, hex(&w.hasher.finalize())))
}

/// Uploads `head` then the file `payload` as one object: streamed in parts where the store
/// takes multipart uploads (S3, files), else (WebDAV) in one PUT from memory.
async fn send(
    remote: &Remote,
    key: &object_store::path::Path,
    head: Vec<u8>,
    payload: &Path,
) -> Result<(), CacheError> {
    use tokio::io::AsyncReadExt;
    let open = || async {
        tokio::fs::File::open(payload)
            .await
            .map_err(|e| CacheError::Local(format!("cannot read {}: {e}", payload.display())))
    };
    let mut buf = vec![0u8; 1 << 20];
    match remote.store.put_multipart(key).await {
        Ok(upload) => {
            let mut mp = WriteMultipart::new(upload);
            mp.write(&head);
            let mut f = open().await?;
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = mp.abort().await;
                        return Err(CacheError::Local(e.to_string()));
                    }
                };
                if n == 0 {
                    break;
                }
                if let Err(e) = mp.wait_for_capacity(4).await {
                    return Err(outage(e));
                }
                mp.write(&buf[..n]);
            }
            mp.finish().await.map(|_| ()).map_err(outage)
        }
        Err(object_store::Error::NotImplemented { .. }) => {
            let mut parts: Vec<Bytes> = vec![Bytes::from(head)];
            let mut f = open().await?;
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| CacheError::Local(e.to_string()))?;
                if n == 0 {
                    break;
                }
                parts.push(Bytes::copy_from_slice(&buf[..n]));
            }
            let payload: PutPayload = parts.into_iter().collect();
            remote
                .store
                .put(key, payload)
                .await
                .map(|_| ())
                .map_err(outage)
        }
        Err(e) => Err(outage(e)),
    }
}

/// Pushes in the background what `watch` just made live, when the manifest's `[cache]` has
/// `push = true`; a failure is one warning (one per outage) and never delays anything. For the
/// engine to call once a build is live.
pub fn push_in_background(svc: &Arc<Service>, archive: &str, id: BuildId, sink: &Arc<Sink>) {
    if !svc.cache.as_ref().is_some_and(|c| c.push) {
        return;
    }
    let (svc, archive, sink) = (svc.clone(), archive.to_owned(), sink.clone());
    tokio::spawn(async move {
        // An outage was warned about; its pause applies to pushes too.
        if svc
            .cache
            .as_deref()
            .and_then(|c| remote::remote(c).ok())
            .is_some_and(|r| r.paused())
        {
            return;
        }
        if let Err(e) = push(&svc, &archive, id, &sink).await {
            push_warning(&svc, &sink, &e);
        }
    });
}

fn push_warning(svc: &Service, sink: &Sink, e: &CacheError) {
    match (svc.cache.as_deref().map(remote::remote), e) {
        (Some(Ok(r)), e) => report(sink, &svc.name, &r, "push failed", e),
        (_, e) => warn(sink, &svc.name, format!("cache: push failed: {e}")),
    }
}

/// After a one-shot `build`: uploads the live build when asked (`--push`, or `push = true`)
/// and waits for it. An explicit `--push` that fails is an error (CI asked to fill the cache);
/// otherwise a failure is a warning.
pub async fn push_after_build(
    svc: &Service,
    outcome: &anyhow::Result<Outcome>,
    explicit: bool,
    sink: &Sink,
) -> Option<anyhow::Error> {
    let wanted = explicit || svc.cache.as_ref().is_some_and(|c| c.push);
    let id = match outcome {
        Ok(Outcome::Built { id, .. } | Outcome::Reused { id, .. } | Outcome::UpToDate(id)) => *id,
        _ => return None,
    };
    if !wanted || svc.cache.is_none() {
        return None;
    }
    // An outage already warned about (this very build's lookup, say) is not waited on again,
    // unless CI asked for the upload.
    let paused = || {
        svc.cache
            .as_deref()
            .and_then(|c| remote::remote(c).ok())
            .is_some_and(|r| r.paused())
    };
    if !explicit && paused() {
        return None;
    }
    let store = Store::new(&svc.root);
    let archive = store.live().filter(|_| store.live_id() == Some(id))?;
    match push(svc, &archive, id, sink).await {
        Ok(_) => None,
        Err(e) if explicit => Some(anyhow::anyhow!(
            "the build is archived, but pushing it to the cache failed: {e}"
        )),
        Err(e) => {
            push_warning(svc, sink, &e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_leftovers_of_dead_processes_are_abandoned() {
        let me = std::process::id();
        assert!(!abandoned(&format!("fetch-{me}-0")));
        // Above the kernel's pid limit: no such process.
        assert!(abandoned("fetch-2147483600-3"));
        assert!(abandoned("push-2147483600-0"));
        assert!(!abandoned("stored"));
        assert!(!abandoned("fetch-x-1"));
    }

    #[test]
    fn the_platform_names_os_and_cpu() {
        let p = platform();
        assert!(p.starts_with(std::env::consts::OS), "{p}");
        assert!(p.contains(std::env::consts::ARCH), "{p}");
        assert_eq!(entry_name("ab")[2], "ab.pmesh");
    }
}
