//! Raw TCP forwarding: each connection goes to the instance live when it arrives.

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::fds::{ClientSlot, accept_failed, client_slots, keep_spare_fd};
use super::switch::{Route, Switch};
use super::{connect, finish};

/// Forwards raw TCP: each new connection goes to the live instance at accept time (Starting:
/// wait as for HTTP; Down: close).
pub async fn serve_tcp(
    listener: TcpListener,
    _service: String,
    switch: Switch,
    shutdown: CancellationToken,
) {
    keep_spare_fd();
    let slots = client_slots();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match ClientSlot::take(slots) {
                    Some(slot) => {
                        conns.spawn(tunnel_tcp(switch.clone(), stream, slot));
                    }
                    // Closing is all raw TCP can say.
                    None => switch.report(format!(
                        "refused a client: {slots} connections open, the most the descriptor \
                         limit allows"
                    )),
                },
                Err(e) => accept_failed(&listener, &e).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    finish(conns).await;
}

async fn tunnel_tcp(switch: Switch, mut inbound: TcpStream, _slot: ClientSlot) {
    let Route::Live(in_flight) = switch.route().await else {
        // Down, or still starting past the wait: closing is all raw TCP can say.
        return;
    };
    let addr = in_flight.upstream().addr();
    let mut outbound = match connect(addr).await {
        Ok(outbound) => outbound,
        Err(failure) => {
            switch.report(format!(
                "a connection to the instance at {addr} failed: {failure}"
            ));
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}
