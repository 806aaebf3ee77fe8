//! The control socket: while `watch` runs, `build`, `rollback` and `run` typed in another
//! shell are sent to it and carried out by the running watch, instead of a second process
//! racing it on the same files.
//!
//! One Unix socket per service root, `.pmesh/control.sock`, mode 0600. A client writes one JSON
//! request line; the server answers with the service's events as NDJSON while the request is
//! carried out, then one `{"done": {...}}` line with the exit code and a message.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::event::{Command, Done, Event, EventKind, Received, Sink};
use crate::manifest::Service;
use crate::store::STATE_DIR;

/// The socket's path inside a service root.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(STATE_DIR).join("control.sock")
}

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Build { force: bool },
    Rollback { build: Option<String> },
    Restart,
    Run,
}

/// One line of the answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Answer {
    Done { done: Done },
    Event(Event),
}

/// Binds the socket of the root, replacing a stale one (the caller holds the root's lock, so
/// any socket already there was left by a watch that is gone).
pub fn listen(root: &Path) -> io::Result<UnixListener> {
    let path = socket_path(root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Binds `svc`'s control socket and answers it until `shutdown`, handing requests to its
/// engine through `commands`. The caller holds the root's lock. A socket that cannot be bound
/// is a warning: watching still works, only other shells cannot reach this watch (they then
/// fail on the root's lock, naming this process).
pub fn start(
    svc: &Service,
    commands: mpsc::UnboundedSender<Command>,
    sink: &Arc<Sink>,
    shutdown: &CancellationToken,
) {
    match listen(&svc.root) {
        Ok(listener) => {
            tokio::spawn(serve(
                listener,
                svc.name.clone(),
                commands,
                sink.clone(),
                shutdown.clone(),
            ));
        }
        Err(e) => sink.now(
            &svc.name,
            EventKind::Warning {
                message: format!(
                    "no control socket at {} ({e}); `build` and `rollback` from other shells \
                     cannot reach this watch",
                    socket_path(&svc.root).display()
                ),
            },
        ),
    }
}

/// Removes the socket of a watch that has stopped.
pub fn remove(root: &Path) {
    let _ = std::fs::remove_file(socket_path(root));
}

/// Answers requests for `service` until `shutdown`, handing them to its engine as Commands.
pub async fn serve(
    listener: UnixListener,
    service: String,
    commands: mpsc::UnboundedSender<Command>,
    sink: Arc<Sink>,
    shutdown: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else { continue };
        let (service, commands, sink) = (service.clone(), commands.clone(), sink.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &service, &commands, &sink, &shutdown).await;
        });
    }
    // The CLI removes the socket file once the watch has stopped.
}

async fn answer(
    stream: UnixStream,
    service: &str,
    commands: &mpsc::UnboundedSender<Command>,
    sink: &Sink,
    shutdown: &CancellationToken,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let done = Done::new(2, format!("bad request: {e}"));
            return write_line(&mut write, &Answer::Done { done }).await;
        }
    };
    let mut events = sink.subscribe();
    let (tx, mut rx) = oneshot::channel();
    let command = match request {
        Request::Build { force } => Command::Build {
            force,
            reply: Some(tx),
        },
        Request::Rollback { build } => Command::Rollback {
            build,
            reply: Some(tx),
        },
        Request::Restart => Command::Restart { reply: Some(tx) },
        Request::Run => {
            let done = Done::new(
                0,
                format!(
                    "`{service}` is served by the running pmesh-dev watch (pid {})",
                    std::process::id()
                ),
            );
            return write_line(&mut write, &Answer::Done { done }).await;
        }
    };
    if commands.send(command).is_err() {
        let done = Done::new(1, "the watch is stopping");
        return write_line(&mut write, &Answer::Done { done }).await;
    }
    loop {
        // Biased: events are emitted before the command's reply is sent, so every event of the
        // request is forwarded before its `done` line.
        tokio::select! {
            biased;
            e = events.recv() => match e {
                Some(Received::Event(e)) if e.service == service => {
                    write_line(&mut write, &Answer::Event(e)).await?;
                }
                Some(_) => {}
                None => return Ok(()),
            },
            done = &mut rx => {
                let done = done.unwrap_or_else(|_| Done::new(1, "the watch stopped"));
                return write_line(&mut write, &Answer::Done { done }).await;
            }
            _ = shutdown.cancelled() => {
                let done = Done::new(130, "the watch is stopping");
                return write_line(&mut write, &Answer::Done { done }).await;
            }
        }
    }
}

async fn write_line(w: &mut tokio::net::unix::OwnedWriteHalf, a: &Answer) -> io::Result<()> {
    let mut line = serde_json::to_vec(a).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// Sends `request` to the watch running on `root`, handing its events to `on_event`.
/// `None` when no watch is listening there (no socket, or a stale one).
pub async fn request(
    root: &Path,
    request: &Request,
    mut on_event: impl FnMut(Event),
) -> Option<io::Result<Done>> {
    let mut stream = UnixStream::connect(socket_path(root)).await.ok()?;
    let result = async {
        let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
        line.push(b'\n');
        stream.write_all(&line).await?;
        let mut lines = BufReader::new(stream).lines();
        while let Some(l) = lines.next_line().await? {
            match serde_json::from_str::<Answer>(&l) {
                Ok(Answer::Done { done }) => return Ok(done),
                Ok(Answer::Event(e)) => on_event(e),
                Err(_) => {}
            }
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the watch closed the control socket without an answer",
        ))
    }
    .await;
    Some(result)
}
