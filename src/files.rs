//! The file server behind a `static` service: a build's directory served over HTTP/1.1 on a
//! loopback port, one per build, so that the proxy swaps between builds exactly as it does
//! between instances of a `run` command.
//!
//! The file handling (index files, content types, `ETag` and `Last-Modified` with conditional
//! requests, byte ranges, paths kept inside the directory) is `hyper-staticfile`'s; what is
//! added here is the single-page-app fallback: with `spa`, a `GET` for a path that matches no
//! file and accepts HTML gets the directory's `index.html`.

use std::convert::Infallible;
use std::path::PathBuf;

use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_staticfile::{ResolveResult, Resolver, ResponseBuilder};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, std::io::Error>;

/// Serves `dir` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, dir: PathBuf, spa: bool, stop: CancellationToken) {
    let resolver = Resolver::new(dir);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((stream, _)) = accepted else {
            // Out of descriptors, most likely: a pause instead of a spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let resolver = resolver.clone();
        conns.spawn(async move {
            let service = service_fn(move |req| {
                let resolver = resolver.clone();
                async move { Ok::<_, Infallible>(answer(&resolver, spa, req).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(resolver: &Resolver, spa: bool, req: Request<Incoming>) -> Response<Body> {
    let mut result = resolver.resolve_request(&req).await;
    if spa && matches!(result, Ok(ResolveResult::NotFound)) && wants_html(&req) {
        let mut index = Request::new(());
        *index.method_mut() = req.method().clone();
        *index.headers_mut() = req.headers().clone();
        *index.uri_mut() = http::Uri::from_static("/index.html");
        result = resolver.resolve_request(&index).await;
    }
    // hyper-staticfile sends ETags but does not read If-None-Match: that is done here, and
    // then (RFC 9110 13.1.3) If-Modified-Since is not looked at.
    let mut headers = req.headers().clone();
    let if_none_match = headers.remove(header::IF_NONE_MATCH);
    if if_none_match.is_some() {
        headers.remove(header::IF_MODIFIED_SINCE);
    }
    let built = result.map(|r| {
        ResponseBuilder::new()
            .request_parts(req.method(), req.uri(), &headers)
            .build(r)
            .map(|res| res.map(|b| b.map_err(std::io::Error::other).boxed()))
    });
    match built {
        Ok(Ok(res)) => match if_none_match {
            Some(tags) if res.status() == StatusCode::OK && etag_matches(&tags, &res) => {
                let mut not_modified = Response::new(empty());
                *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
                for name in [header::ETAG, header::LAST_MODIFIED] {
                    if let Some(v) = res.headers().get(&name) {
                        not_modified.headers_mut().insert(name, v.clone());
                    }
                }
                not_modified
            }
            _ => res,
        },
        Ok(Err(e)) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// A navigation: a `GET` or `HEAD` whose `Accept` names HTML (browsers' page loads), as
/// opposed to a missing script or image, which must stay a 404.
fn wants_html<B>(req: &Request<B>) -> bool {
    matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

/// Whether `If-None-Match: tags` names the response's entity tag (weak comparison).
fn etag_matches(tags: &header::HeaderValue, res: &Response<Body>) -> bool {
    let Some(etag) = res
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let ours = opaque(etag);
    tags.to_str()
        .is_ok_and(|t| t.trim() == "*" || t.split(',').any(|tag| opaque(tag) == ours))
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut res = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
