//! A scripted API server for tests: a `tower-test` mock service behind a real `kube::Client`
//! (the kube-rs way). Each test plays the server side request by request; list responses are
//! one JSON document, watch responses are held open and fed event by event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tower_test::mock::{Handle, SendResponse};

/// Response bodies the mock produces: a stream of frames, so a watch can stay open.
pub type MockBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// The server side of a mocked client.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<MockBody>>,
}

/// A mocked client and its server.
pub fn client(namespace: &str) -> (Client, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    (Client::new(svc, namespace), ApiServer { handle })
}

fn body(bytes: Vec<u8>) -> (MockBody, mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
    let (tx, rx) = mpsc::channel(16);
    if !bytes.is_empty() {
        tx.try_send(Ok(Frame::data(Bytes::from(bytes)))).unwrap();
    }
    (StreamBody::new(ReceiverStream::new(rx)), tx)
}

/// Sends `value` as a complete JSON response.
pub fn respond_json(send: SendResponse<Response<MockBody>>, status: StatusCode, value: &Value) {
    let (b, tx) = body(serde_json::to_vec(value).unwrap());
    drop(tx);
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(b)
            .unwrap(),
    );
}

/// The JSON body of a request.
pub async fn json_body(req: Request<Body>) -> Value {
    use http_body_util::BodyExt;
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// Answers with a watch stream that stays open.
pub fn respond_watch(send: SendResponse<Response<MockBody>>) -> WatchStream {
    let (b, tx) = body(Vec::new());
    send.send_response(
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(b)
            .unwrap(),
    );
    WatchStream(tx)
}

/// Answers a list request with `items`.
pub fn respond_list(send: SendResponse<Response<MockBody>>, items: Vec<Value>) {
    respond_json(
        send,
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": "1"}, "items": items}),
    );
}

/// A Kubernetes `Status` error body.
pub fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

/// An open watch response.
pub struct WatchStream(mpsc::Sender<Result<Frame<Bytes>, Infallible>>);

impl WatchStream {
    /// Sends one watch event (`ADDED`, `MODIFIED`, `DELETED`, `ERROR`).
    pub async fn send(&self, kind: &str, object: Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        line.push(b'\n');
        self.0
            .send(Ok(Frame::data(Bytes::from(line))))
            .await
            .unwrap();
    }
}

impl ApiServer {
    /// The next request, within a bound (time is usually paused, so this is virtual time).
    pub async fn next(&mut self) -> (Request<Body>, SendResponse<Response<MockBody>>) {
        tokio::time::timeout(Duration::from_secs(300), self.handle.next_request())
            .await
            .expect("no request from the client in time")
            .expect("the client went away")
    }

    /// Asserts that the client sends nothing more (within a second, usually of paused time).
    pub async fn expect_no_request(&mut self) {
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_secs(1), self.handle.next_request()).await
        {
            panic!("unexpected request: {} {}", req.method(), req.uri());
        }
    }

    /// Expects a `method` request of `path` and returns it with its responder.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
    ) -> (Request<Body>, SendResponse<Response<MockBody>>) {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), method, "{}", req.uri());
        assert_eq!(req.uri().path(), path, "{}", req.uri());
        (req, send)
    }

    /// Expects a GET of `path` and returns it with its responder.
    pub async fn expect_get(
        &mut self,
        path: &str,
        watch: bool,
    ) -> (Request<Body>, SendResponse<Response<MockBody>>) {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::GET, "{}", req.uri());
        assert_eq!(req.uri().path(), path, "{}", req.uri());
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert_eq!(query.contains("watch=true"), watch, "{}", req.uri());
        (req, send)
    }

    /// Expects a list of `path` and answers with `items` at `resource_version`.
    pub async fn expect_list(
        &mut self,
        path: &str,
        items: Vec<Value>,
        resource_version: &str,
    ) -> Request<Body> {
        let (req, send) = self.expect_get(path, false).await;
        respond_json(
            send,
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": resource_version}, "items": items}),
        );
        req
    }

    /// Expects a watch of `path` and keeps it open.
    pub async fn expect_watch(&mut self, path: &str) -> (Request<Body>, WatchStream) {
        let (req, send) = self.expect_get(path, true).await;
        (req, respond_watch(send))
    }
}
