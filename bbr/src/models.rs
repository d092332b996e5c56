//! `GET /v1/models` through the gateway: the router answers it itself.
//!
//! Why the router: it is the one hop that sees every request before route matching and knows
//! every base model and adapter (the mapping); an EPP only knows its own pool, and a request
//! without a body carries no model to route on, so without an answer here the gateway could only
//! send it to one arbitrary pool or answer 404. The answer is an ext_proc `ImmediateResponse`:
//! no route is matched, no EPP asked, no model server reached.
//!
//! What is answered: `GET` on the path `/v1/models` exactly; a query string is ignored (as
//! vLLM and OpenAI ignore unknown query parameters), so `/v1/models?x` gets the same list.
//! Any other method (a `POST` to `/v1/models`) and any other path (`/v1/models/`,
//! `/v1/models/{id}`) pass through untouched, as every other request: routed on the body's
//! model if there is one, else the gateway's 404. `--list-models=false` turns the answer off.
//!
//! The list is OpenAI's (`{"object":"list","data":[…]}`) with vLLM's `root`/`parent` fields:
//! base models in name order, then each base model's adapters (base models in name order,
//! adapters in name order), `parent` the base model for an adapter and `null` for a base model,
//! `root` the entry's own name (vLLM's `root` is a local path, which the router does not know),
//! `owned_by` `"switchyard"`, `created` the time (Unix seconds) the router built this list. At
//! most [`MAX_LISTED_MODELS`] entries: base models come first, so a long tail of adapters is
//! what a cut drops; the cut is logged and counted (`bbr_models_list_truncated`).
//!
//! In Kubernetes mode only what a route serves is listed (see [`crate::routes`]): a base model
//! when an HTTPRoute matches it, an adapter when a route matches its base model (or the adapter
//! itself). Until HTTPRoutes and InferencePools were listed once (and in file mode), every
//! mapped model is listed.
//!
//! The body is rendered off the request path, once per change of the mapping or of the
//! routes, by a supervised task ([`run`]); a request copies the rendered bytes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use ext_proc::envoy;
use ext_proc::envoy::ext_proc::processing_response::Response;
use ext_proc::envoy::ext_proc::{HeaderMutation, ProcessingResponse};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::mapping::{Lookup, Mapping};
use crate::metrics::Metrics;
use crate::routes::RouteIndex;

/// The path answered.
pub const MODELS_PATH: &str = "/v1/models";
/// Most entries listed (base models first). At ~150 bytes an entry, about 150 KB of JSON.
pub const MAX_LISTED_MODELS: usize = 1_000;
/// `owned_by` of every entry.
pub const OWNED_BY: &str = "switchyard";

/// Which mapped models a route serves; `None` anywhere below means "every mapped model".
pub trait Served {
    /// True when a request for `model` (whose base model is `base`) matches some route.
    fn serves(&self, model: &str, base: &str) -> bool;
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: &'a str,
    parent: Option<&'a str>,
}

#[derive(Serialize)]
struct ModelListBody<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

/// A rendered list and how many entries the cap left out.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The JSON body.
    pub body: Bytes,
    /// Entries listed.
    pub listed: usize,
    /// Entries past [`MAX_LISTED_MODELS`] left out.
    pub truncated: usize,
}

/// Renders the list of `lookup`'s models that `served` serves (all when `None`), at most `cap`
/// entries, base models first.
pub fn render(lookup: &Lookup, served: Option<&dyn Served>, created: u64, cap: usize) -> Rendered {
    let serves = |model: &str, base: &str| served.is_none_or(|s| s.serves(model, base));
    let entry = |id, parent| ModelEntry {
        id,
        object: "model",
        created,
        owned_by: OWNED_BY,
        root: id,
        parent,
    };
    let bases: Vec<(&str, _)> = lookup.by_base().collect();
    let base_models = bases
        .iter()
        .filter(|(base, _)| serves(base, base))
        .map(|(base, _)| entry(base, None));
    let adapters = bases.iter().flat_map(|(base, adapters)| {
        adapters
            .iter()
            .filter(|a| serves(a, base))
            .map(|a| entry(a.as_str(), Some(*base)))
    });
    let mut all = base_models.chain(adapters);
    let data: Vec<ModelEntry<'_>> = all.by_ref().take(cap).collect();
    let truncated = all.count();
    let listed = data.len();
    let body = serde_json::to_vec(&ModelListBody {
        object: "list",
        data,
    })
    // Serialising strings and numbers cannot fail; an empty list is the safe answer anyway.
    .unwrap_or_else(|_| br#"{"object":"list","data":[]}"#.to_vec());
    Rendered {
        body: Bytes::from(body),
        listed,
        truncated,
    }
}

/// The rendered list the request path answers with.
#[derive(Debug)]
pub struct ModelList {
    body: ArcSwap<Bytes>,
}

impl Default for ModelList {
    fn default() -> Self {
        Self {
            body: ArcSwap::from_pointee(Bytes::from_static(br#"{"object":"list","data":[]}"#)),
        }
    }
}

impl ModelList {
    /// An empty list.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the body.
    pub fn store(&self, body: Bytes) {
        self.body.store(Arc::new(body));
    }

    /// The current body.
    pub fn body(&self) -> Arc<Bytes> {
        self.body.load_full()
    }

    /// The ext_proc answer to `GET /v1/models`: 200, `application/json`, the rendered list.
    pub fn response(&self) -> ProcessingResponse {
        let mut answer = envoy::immediate_response(200, String::new(), &[]);
        if let Some(Response::ImmediateResponse(immediate)) = answer.response.as_mut() {
            immediate.headers = Some(HeaderMutation {
                set_headers: vec![envoy::set_header("content-type", "application/json")],
                remove_headers: Vec::new(),
            });
            immediate.body = self.body().to_vec();
        }
        answer
    }
}

/// True when a request with this method and path is answered with the list.
pub fn is_list_request(method: Option<&str>, path: Option<&str>) -> bool {
    let path = path.map(|p| p.split_once('?').map_or(p, |(p, _)| p));
    method == Some("GET") && path == Some(MODELS_PATH)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Renders the list again whenever the mapping or the route index changes, until `shutdown`.
/// `routes` is `None` in file mode; in Kubernetes mode it holds `None` until the routes were
/// listed.
pub async fn run(
    mapping: Arc<Mapping>,
    routes: Option<watch::Receiver<Option<Arc<RouteIndex>>>>,
    list: Arc<ModelList>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut changes = mapping.changes();
    let mut routes = routes;
    let mut last_truncated = 0;
    loop {
        changes.borrow_and_update();
        let index = routes.as_mut().and_then(|r| r.borrow_and_update().clone());
        let lookup = mapping.lookup();
        let rendered = render(
            &lookup,
            index.as_deref().map(|i| i as &dyn Served),
            now_unix(),
            MAX_LISTED_MODELS,
        );
        if rendered.truncated > 0 && rendered.truncated != last_truncated {
            tracing::warn!(
                listed = rendered.listed,
                left_out = rendered.truncated,
                cap = MAX_LISTED_MODELS,
                "/v1/models lists at most {MAX_LISTED_MODELS} models; the rest are left out"
            );
        }
        last_truncated = rendered.truncated;
        list.store(rendered.body);
        // Known models that left the mapping give their metric labels back.
        metrics.reclaim_model_labels(&lookup);
        metrics
            .models_listed
            .set(i64::try_from(rendered.listed).unwrap_or(i64::MAX));
        metrics
            .models_list_truncated
            .set(i64::try_from(rendered.truncated).unwrap_or(i64::MAX));
        let routes_changed = async {
            match routes.as_mut() {
                Some(r) => r.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            ok = routes_changed => if !ok { return },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::{Value, json};

    use super::*;
    use crate::mapping::Entry;

    fn lookup() -> Arc<Lookup> {
        let m = Mapping::new();
        m.reset([
            (
                "ns/llama".to_owned(),
                Entry::new(Some("llama"), ["sql", "food"]).unwrap(),
            ),
            ("ns/qwen".to_owned(), Entry::new(Some("qwen"), []).unwrap()),
        ]);
        m.lookup()
    }

    fn ids(r: &Rendered) -> Vec<String> {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn openai_list_base_models_first_then_adapters_in_name_order() {
        let r = render(&lookup(), None, 7, MAX_LISTED_MODELS);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            json!({"object": "list", "data": [
                {"id": "llama", "object": "model", "created": 7, "owned_by": "switchyard",
                 "root": "llama", "parent": null},
                {"id": "qwen", "object": "model", "created": 7, "owned_by": "switchyard",
                 "root": "qwen", "parent": null},
                {"id": "food", "object": "model", "created": 7, "owned_by": "switchyard",
                 "root": "food", "parent": "llama"},
                {"id": "sql", "object": "model", "created": 7, "owned_by": "switchyard",
                 "root": "sql", "parent": "llama"},
            ]})
        );
        assert_eq!((r.listed, r.truncated), (4, 0));
    }

    #[test]
    fn the_cap_cuts_adapters_before_base_models() {
        let r = render(&lookup(), None, 0, 3);
        assert_eq!(ids(&r), ["llama", "qwen", "food"]);
        assert_eq!((r.listed, r.truncated), (3, 1));
    }

    struct OnlyQwen;
    impl Served for OnlyQwen {
        fn serves(&self, _model: &str, base: &str) -> bool {
            base == "qwen"
        }
    }

    #[test]
    fn only_served_models_are_listed() {
        let r = render(&lookup(), Some(&OnlyQwen), 0, MAX_LISTED_MODELS);
        assert_eq!(ids(&r), ["qwen"]);
    }

    #[test]
    fn only_get_on_the_exact_path_is_answered() {
        assert!(is_list_request(Some("GET"), Some("/v1/models")));
        assert!(is_list_request(Some("GET"), Some("/v1/models?x")));
        assert!(!is_list_request(Some("POST"), Some("/v1/models")));
        assert!(!is_list_request(Some("HEAD"), Some("/v1/models")));
        assert!(!is_list_request(Some("GET"), Some("/v1/models/")));
        assert!(!is_list_request(Some("GET"), Some("/v1/models/llama")));
        assert!(!is_list_request(Some("GET"), Some("/v1/modelsx")));
        assert!(!is_list_request(None, Some("/v1/models")));
    }

    #[tokio::test]
    async fn the_task_renders_again_on_every_mapping_change() {
        let mapping = Mapping::new();
        let list = ModelList::new();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            mapping.clone(),
            None,
            list.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let mut changes = mapping.changes();
        mapping.reset([("a".to_owned(), Entry::new(Some("m"), ["x"]).unwrap())]);
        changes.changed().await.unwrap();
        // The task renders after the change; the gauge is set after the list is stored.
        for _ in 0..10_000 {
            if metrics.models_listed.get() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.models_listed.get(), 2);
        let v: Value = serde_json::from_slice(&list.body()).unwrap();
        assert_eq!(v["data"][1]["parent"], "m");
        shutdown.cancel();
        task.await.unwrap();
    }
}
