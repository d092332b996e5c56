#![allow(clippy::unwrap_used)]
use k8s::mock;
use serde_json::{Value, json};

use super::*;
use crate::mapping::Entry;

fn lookup() -> Arc<Lookup> {
    let m = Mapping::new();
    m.reset([
        (
            "ns/llama".to_owned(),
            Entry::new(Some("llama"), ["food"]).unwrap(),
        ),
        ("ns/qwen".to_owned(), Entry::new(Some("qwen"), []).unwrap()),
        (
            "ns/phi".to_owned(),
            Entry::new(Some("phi"), ["chat"]).unwrap(),
        ),
    ]);
    m.lookup()
}

/// An HTTPRoute in `default` with one rule per (header, value, pool, port).
fn route(name: &str, rules: &[(&str, &str, &str, Option<i32>)]) -> Value {
    let rules: Vec<Value> = rules
        .iter()
        .map(|(header, value, pool, port)| {
            let mut backend = json!({"group": "inference.networking.k8s.io",
                                     "kind": "InferencePool", "name": pool});
            if let Some(p) = port {
                backend["port"] = json!(p);
            }
            json!({
                "matches": [{"path": {"type": "PathPrefix", "value": "/"},
                             "headers": [{"type": "Exact", "name": header, "value": value}]}],
                "backendRefs": [backend],
            })
        })
        .collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": rules}
    })
}

fn pool(name: &str, ports: &[i32]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|p| json!({"number": p})).collect();
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "spec": {"selector": {"matchLabels": {"app": name}}, "targetPorts": ports,
                 "endpointPickerRef": {"name": format!("{name}-epp"), "port": {"number": 9002}}}
    })
}

fn rules_of(v: Value) -> (String, Vec<ModelRule>) {
    let r: HttpRoute = serde_json::from_value(v).unwrap();
    (key(&r), model_rules("default", &r.spec))
}

fn ports(v: &[i32]) -> BTreeSet<i32> {
    v.iter().copied().collect()
}

#[test]
fn model_rules_keep_exact_model_header_matches_to_pools_only() {
    let (_, rules) = rules_of(route(
        "r",
        &[
            ("X-Gateway-Base-Model-Name", "llama", "llama-pool", None),
            ("x-gateway-model-name", "food", "llama-pool", Some(8000)),
            ("x-tenant", "a", "llama-pool", None),
        ],
    ));
    assert_eq!(
        rules,
        [
            ModelRule {
                index: 0,
                matches: vec![ModelMatch {
                    model: None,
                    base: Some("llama".into())
                }],
                pools: vec![PoolRef {
                    pool: "default/llama-pool".into(),
                    port: None
                }],
            },
            ModelRule {
                index: 1,
                matches: vec![ModelMatch {
                    model: Some("food".into()),
                    base: None
                }],
                pools: vec![PoolRef {
                    pool: "default/llama-pool".into(),
                    port: Some(8000)
                }],
            },
        ]
    );
    // A Service backend or a regular expression: not a model rule.
    let mut v = route("s", &[("x-gateway-model-name", "food", "svc", None)]);
    v["spec"]["rules"][0]["backendRefs"][0] = json!({"name": "svc", "port": 80});
    assert!(rules_of(v).1.is_empty());
    let mut v = route("s", &[("x-gateway-model-name", "fo+d", "p", None)]);
    v["spec"]["rules"][0]["matches"][0]["headers"][0]["type"] = json!("RegularExpression");
    assert!(rules_of(v).1.is_empty());
}

#[test]
fn index_serves_models_through_live_pools_and_reports_what_cannot_match() {
    let routes: BTreeMap<_, _> = [
        rules_of(route(
            "llama",
            &[(
                "x-gateway-base-model-name",
                "llama",
                "llama-pool",
                Some(8000),
            )],
        )),
        rules_of(route(
            "qwen",
            &[("x-gateway-base-model-name", "qwen", "qwen-pool", Some(9999))],
        )),
        rules_of(route(
            "ghost",
            &[
                ("x-gateway-base-model-name", "mistral", "llama-pool", None),
                ("x-gateway-model-name", "chat", "phi-pool", None),
                // Review 17: Envoy matches exactly, and BBR's value has no spaces.
                ("x-gateway-base-model-name", "llama ", "llama-pool", None),
            ],
        )),
    ]
    .into_iter()
    .collect();
    let pools: BTreeMap<_, _> = [
        ("default/llama-pool".to_owned(), ports(&[8000, 8001])),
        ("default/qwen-pool".to_owned(), ports(&[8000])),
    ]
    .into_iter()
    .collect();
    let index = RouteIndex::build(&routes, &pools, &lookup());
    // llama and its adapter route to llama-pool.
    assert!(index.serves("llama", "llama") && index.serves("food", "llama"));
    assert_eq!(
        index.pools("food", "llama").into_iter().collect::<Vec<_>>(),
        ["default/llama-pool"]
    );
    // qwen's only backendRef names a port its pool does not have; phi's adapter's pool is
    // missing; nothing routes phi itself.
    assert!(!index.serves("qwen", "qwen"));
    assert!(!index.serves("chat", "phi"));
    assert!(!index.serves("phi", "phi"));
    let got: Vec<(&str, usize, Reason)> = index
        .unmatchable
        .iter()
        .map(|u| (u.route.as_str(), u.rule, u.reason))
        .collect();
    assert_eq!(
        got,
        [
            ("default/ghost", 0, Reason::UnknownModel),
            ("default/ghost", 1, Reason::MissingPool),
            ("default/ghost", 2, Reason::UnknownModel),
            ("default/qwen", 0, Reason::PortMismatch),
        ]
    );
    assert_eq!(
        index.counts(),
        [
            (Reason::UnknownModel, 2),
            (Reason::MissingPool, 1),
            (Reason::PortMismatch, 1)
        ]
    );
    let detail = &index.unmatchable.first().unwrap().detail;
    assert!(detail.contains("mistral"), "{detail}");
}

#[test]
fn a_match_on_both_headers_serves_only_the_pair_the_mapping_makes() {
    let mut v = route(
        "pair",
        &[("x-gateway-model-name", "food", "llama-pool", None)],
    );
    v["spec"]["rules"][0]["matches"][0]["headers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "x-gateway-base-model-name", "value": "llama"}));
    let mut wrong = route(
        "wrong",
        &[("x-gateway-model-name", "food", "llama-pool", None)],
    );
    wrong["spec"]["rules"][0]["matches"][0]["headers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "x-gateway-base-model-name", "value": "qwen"}));
    let routes: BTreeMap<_, _> = [rules_of(v), rules_of(wrong)].into_iter().collect();
    let pools: BTreeMap<_, _> = [("default/llama-pool".to_owned(), ports(&[8000]))]
        .into_iter()
        .collect();
    let index = RouteIndex::build(&routes, &pools, &lookup());
    assert!(index.serves("food", "llama"));
    assert!(!index.serves("llama", "llama"));
    assert_eq!(index.unmatchable.len(), 1);
    assert_eq!(index.unmatchable.first().unwrap().route, "default/wrong");
}

/// The real watchers against scripted API servers (one per kind), the index task and the
/// gauge: a route that can match is indexed, one that cannot is reported; a new pool fixes it.
#[tokio::test(start_paused = true)]
async fn watchers_feed_the_index_and_report_unmatchable_routes() {
    let (route_client, mut route_server) = mock::client("default");
    let (pool_client, mut pool_server) = mock::client("default");
    let mapping = Mapping::new();
    mapping.reset([
        (
            "default/llama".to_owned(),
            Entry::new(Some("llama"), ["food"]).unwrap(),
        ),
        (
            "default/qwen".to_owned(),
            Entry::new(Some("qwen"), []).unwrap(),
        ),
    ]);
    let store = RouteStore::new();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let (tx, mut rx) = channel::channel(None);
    let tasks = [
        tokio::spawn(watch::<HttpRoute>(
            api(route_client, Some("default")),
            store.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch::<InferencePool>(
            api(pool_client, Some("default")),
            store.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(run_index(
            mapping.clone(),
            store.clone(),
            tx,
            metrics.clone(),
            shutdown.clone(),
        )),
    ];
    let routes_path = "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes";
    let pools_path = "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools";
    let (_, send) = route_server.expect_get(routes_path, false).await;
    mock::respond_list(
        send,
        vec![
            route(
                "llama",
                &[(
                    "x-gateway-base-model-name",
                    "llama",
                    "llama-pool",
                    Some(8000),
                )],
            ),
            route(
                "qwen",
                &[("x-gateway-base-model-name", "qwen", "qwen-pool", None)],
            ),
        ],
    );
    let (_, _route_watch) = route_server.expect_watch(routes_path).await;
    let (_, send) = pool_server.expect_get(pools_path, false).await;
    mock::respond_list(send, vec![pool("llama-pool", &[8000])]);
    let (_, pool_watch) = pool_server.expect_watch(pools_path).await;

    let index = rx
        .wait_for(|i| i.as_ref().is_some_and(|i| i.serves("food", "llama")))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(!index.serves("qwen", "qwen"), "qwen-pool does not exist");
    let missing: Vec<&str> = index.unmatchable.iter().map(|u| u.route.as_str()).collect();
    assert_eq!(missing, ["default/qwen"]);
    assert_eq!(unmatchable_gauge(&metrics, "missing_pool"), 1);

    pool_watch.send("ADDED", pool("qwen-pool", &[8000])).await;
    rx.wait_for(|i| i.as_ref().is_some_and(|i| i.serves("qwen", "qwen")))
        .await
        .unwrap();
    assert_eq!(unmatchable_gauge(&metrics, "missing_pool"), 0);
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap();
    }
}

fn unmatchable_gauge(metrics: &Metrics, reason: &str) -> i64 {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let prefix = format!("bbr_unmatchable_routes{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(-1, |v| v.parse().unwrap())
}

/// The body-based-routing gateway config ships an HTTPRoute, InferencePools and mapping
/// ConfigMaps that agree: every rule can match, both base models and their adapters route.
#[test]
fn shipped_gateway_config_has_no_unmatchable_route() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../gateway-configs/body-based-routing/"
    );
    let docs = |file: &str| -> Vec<Value> {
        let text = std::fs::read_to_string(format!("{dir}{file}")).unwrap();
        text.split("\n---")
            .map(|d| yaml_serde::from_str::<Value>(d).unwrap())
            .collect()
    };
    let mapping = Mapping::new();
    for (i, cm) in docs("model-mapping.yaml").into_iter().enumerate() {
        let data: BTreeMap<String, String> = serde_json::from_value(cm["data"].clone()).unwrap();
        mapping
            .apply(
                &format!("cm/{i}"),
                Entry::from_config_map_data(&data).unwrap(),
            )
            .unwrap();
    }
    let pools: BTreeMap<String, BTreeSet<i32>> = docs("inferencepools.yaml")
        .into_iter()
        .map(|v| {
            let mut v = v;
            v["metadata"]["namespace"] = json!("default");
            let p: InferencePool = serde_json::from_value(v).unwrap();
            let Item::Pool(ports) = p.item() else {
                unreachable!()
            };
            (key(&p), ports)
        })
        .collect();
    let routes: BTreeMap<String, Vec<ModelRule>> = docs("httproute.yaml")
        .into_iter()
        .map(|mut v| {
            v["metadata"]["namespace"] = json!("default");
            rules_of(v)
        })
        .collect();
    let index = RouteIndex::build(&routes, &pools, &mapping.lookup());
    assert!(index.unmatchable.is_empty(), "{:?}", index.unmatchable);
    let lookup = mapping.lookup();
    let mut served = 0;
    for (base, adapters) in lookup.by_base() {
        assert!(index.serves(base, base), "{base}");
        for a in adapters {
            assert!(index.serves(a, base), "{a}");
        }
        served += 1;
    }
    assert_eq!(served, 2);
}
