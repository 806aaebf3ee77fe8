//! Raw TCP forwarding: each connection goes to the instance live when it arrives.

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::switch::{Route, Switch};
use super::{ACCEPT_BACKOFF, connect, finish};

/// Forwards raw TCP: each new connection goes to the live instance at accept time (Starting:
/// wait as for HTTP; Down: close).
pub async fn serve_tcp(
    listener: TcpListener,
    _service: String,
    switch: Switch,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(tunnel_tcp(switch.clone(), stream));
                }
                Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    finish(conns).await;
}

async fn tunnel_tcp(switch: Switch, mut inbound: TcpStream) {
    let Route::Live(in_flight) = switch.route().await else {
        // Down, or still starting past the wait: closing is all raw TCP can say.
        return;
    };
    let Ok(mut outbound) = connect(in_flight.upstream().addr()).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}
