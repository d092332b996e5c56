//! A minimal HTTP/1.1 client for the tests (hyper), with frame-by-frame body reading.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A plaintext HTTP/1.1 client whose requests carry a whole body.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A response with its body unread.
pub type Response = ::http::Response<Incoming>;

/// A response header as text.
pub fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A new [`HttpClient`] (its own connection pool).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET returning the body as text (None on any failure).
pub async fn get_text(addr: SocketAddr, path: &str) -> Option<String> {
    let uri: http::Uri = format!("http://{addr}{path}").parse().ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client().get(uri))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

/// GET with `headers`, returning the status and the body as text.
pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(15), client().request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    (status, body_text(resp).await)
}

/// GET with `headers`, returning the status and the body as bytes.
pub async fn get_bytes(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, body.to_vec())
}

/// POSTs JSON and returns the response with its body unread.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> ::http::Response<Incoming> {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("response in time")
        .expect("response")
}

/// Reads a whole body.
pub async fn body_text(resp: ::http::Response<Incoming>) -> String {
    try_body_text(resp, Duration::from_secs(30))
        .await
        .expect("body in time and whole")
}

/// Reads a whole body, saying why when it cannot: cut short (a reset after the headers) or
/// not finished within `deadline`.
pub async fn try_body_text(
    resp: ::http::Response<Incoming>,
    deadline: Duration,
) -> Result<String, String> {
    match tokio::time::timeout(deadline, resp.into_body().collect()).await {
        Ok(Ok(b)) => Ok(String::from_utf8_lossy(&b.to_bytes()).into_owned()),
        Ok(Err(e)) => Err(format!("body cut short: {e}")),
        Err(_) => Err(format!("body not finished within {deadline:?}")),
    }
}

/// Reads a body frame by frame, with the arrival time of each frame.
pub async fn frames(resp: ::http::Response<Incoming>) -> Vec<(tokio::time::Instant, Bytes)> {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .expect("frame in time")
    {
        if let Ok(data) = frame.expect("frame").into_data() {
            out.push((tokio::time::Instant::now(), data));
        }
    }
    out
}

/// Reads a body frame by frame (each with its arrival time), sending on `first` when the first
/// non-empty data frame arrives, so that a test can act while the rest is still streaming. A
/// body cut short (reset, error) ends with what arrived and the error's text.
pub async fn frames_signalling_first(
    resp: ::http::Response<Incoming>,
    first: tokio::sync::oneshot::Sender<()>,
) -> (Vec<(tokio::time::Instant, Bytes)>, Option<String>) {
    let mut first = Some(first);
    let mut body = resp.into_body();
    let mut out = Vec::new();
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Err(_) => return (out, Some("no frame for 30 s".to_owned())),
            Ok(None) => return (out, None),
            Ok(Some(Err(e))) => return (out, Some(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            out.push((tokio::time::Instant::now(), data));
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
        }
    }
}
