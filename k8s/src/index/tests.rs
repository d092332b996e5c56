//! Index-level tests: objects are plain values fed to `apply`/`delete`/`reset`; assertions
//! read what the datastore and director received.

use k8s_openapi::api::core::v1::Pod;

use super::*;
use crate::fixtures::*;

fn e(name: &str, addr: &str) -> (String, String) {
    (name.to_owned(), addr.to_owned())
}

/// A synced index with pool `app=vllm` on `ports` and the given pods.
fn synced(ports: &[i32], pods: Vec<Pod>) -> (Index, Publisher) {
    let (mut idx, p) = index();
    idx.reset(vec![pool(POOL, "vllm", ports)]);
    idx.reset(pods);
    (idx, p)
}

#[test]
fn nothing_is_published_until_pool_and_pods_have_both_synced() {
    let (mut idx, p) = index();
    idx.apply(pod("a", "vllm", "10.0.0.1"));
    idx.reset(vec![pool(POOL, "vllm", &[8000])]);
    assert!(!p.datastore.is_synced(), "pods not listed yet");
    assert!(!idx.is_synced());
    idx.reset(vec![pod("a", "vllm", "10.0.0.1")]);
    assert!(p.datastore.is_synced());
    assert_eq!(endpoints(&p), vec![e("a-rank-0", "10.0.0.1:8000")]);
}

/// Routing the first requests without the cluster's rewrites sends them to a model name the
/// engines do not serve: where the policy kinds are watched, the pool waits for each to answer
/// once, by a listing or by being unavailable.
#[test]
fn the_first_publication_waits_for_the_policies_awaited() {
    let p = publisher();
    let mut idx = Index::new(pool_ref(), None, p.clone()).awaiting_policies();
    idx.reset(vec![pool(POOL, "vllm", &[8000])]);
    idx.reset(vec![pod("a", "vllm", "10.0.0.1")]);
    assert!(!p.datastore.is_synced(), "objectives and rewrites unheard");
    idx.reset(vec![rewrite("r", POOL, 100, &[(&["m"], &[("m-a", 1)])])]);
    assert!(!p.datastore.is_synced(), "objectives unheard");
    // The rewrites reached the director before the pool is published.
    assert!(policies(&p).rewrite_rule("m").is_some());
    IndexResource::<InferenceObjective>::unavailable(&mut idx);
    assert!(p.datastore.is_synced(), "every kind has answered");
    assert_eq!(endpoints(&p), vec![e("a-rank-0", "10.0.0.1:8000")]);
    // Once published, a later failure of a policy kind does not unpublish anything.
    IndexResource::<InferenceModelRewrite>::unavailable(&mut idx);
    idx.apply(pod("b", "vllm", "10.0.0.2"));
    assert_eq!(endpoints(&p).len(), 2);
}

#[test]
fn a_missing_pool_keeps_the_datastore_unsynced() {
    let (mut idx, p) = index();
    idx.reset(vec![pool("someone-else", "vllm", &[8000])]);
    idx.reset(vec![pod("a", "vllm", "10.0.0.1")]);
    assert!(!p.datastore.is_synced());
    idx.apply(pool(POOL, "vllm", &[8000]));
    assert!(p.datastore.is_synced());
    assert_eq!(endpoints(&p).len(), 1);
}

#[test]
fn only_ready_selected_pods_without_deletion_are_endpoints() {
    let (_idx, p) = synced(
        &[8000],
        vec![
            pod("a", "vllm", "10.0.0.1"),
            unready(pod("b", "vllm", "10.0.0.2")),
            deleting(pod("c", "vllm", "10.0.0.3")),
            pod("d", "other", "10.0.0.4"),
            pod("e", "vllm", "not-an-ip"),
        ],
    );
    assert_eq!(endpoints(&p), vec![e("a-rank-0", "10.0.0.1:8000")]);
}

#[test]
fn pod_churn_updates_the_snapshot() {
    let (mut idx, p) = synced(&[8000], vec![pod("a", "vllm", "10.0.0.1")]);
    let v0 = *p.datastore.subscribe().borrow();
    idx.apply(pod("b", "vllm", "10.0.0.2"));
    assert_eq!(
        endpoints(&p),
        vec![
            e("a-rank-0", "10.0.0.1:8000"),
            e("b-rank-0", "10.0.0.2:8000")
        ]
    );
    // Becoming unready removes it; becoming ready again brings it back.
    idx.apply(unready(pod("b", "vllm", "10.0.0.2")));
    assert_eq!(endpoints(&p), vec![e("a-rank-0", "10.0.0.1:8000")]);
    idx.apply(pod("b", "vllm", "10.0.0.2"));
    assert_eq!(endpoints(&p).len(), 2);
    // Terminating pods leave at once, before the delete event.
    idx.apply(deleting(pod("a", "vllm", "10.0.0.1")));
    assert_eq!(endpoints(&p), vec![e("b-rank-0", "10.0.0.2:8000")]);
    idx.delete(pod("a", "vllm", "10.0.0.1"));
    idx.delete(pod("b", "vllm", "10.0.0.2"));
    assert!(endpoints(&p).is_empty());
    assert!(*p.datastore.subscribe().borrow() > v0);
}

#[test]
fn unrelated_changes_do_not_republish() {
    let (mut idx, p) = synced(&[8000], vec![pod("a", "vllm", "10.0.0.1")]);
    let v = *p.datastore.subscribe().borrow();
    idx.apply(pod("z", "other", "10.0.0.9"));
    idx.apply(pod("a", "vllm", "10.0.0.1"));
    assert_eq!(*p.datastore.subscribe().borrow(), v);
}

#[test]
fn reset_replaces_the_pod_set() {
    let (mut idx, p) = synced(
        &[8000],
        vec![pod("a", "vllm", "10.0.0.1"), pod("b", "vllm", "10.0.0.2")],
    );
    // A relist after a watch gap: `a` vanished while we were not looking.
    idx.reset(vec![
        pod("b", "vllm", "10.0.0.2"),
        pod("c", "vllm", "10.0.0.3"),
    ]);
    assert_eq!(
        endpoints(&p),
        vec![
            e("b-rank-0", "10.0.0.2:8000"),
            e("c-rank-0", "10.0.0.3:8000")
        ]
    );
}

#[test]
fn selector_changes_reselect_pods() {
    let (mut idx, p) = synced(
        &[8000],
        vec![pod("a", "vllm", "10.0.0.1"), pod("b", "sglang", "10.0.0.2")],
    );
    assert_eq!(endpoints(&p), vec![e("a-rank-0", "10.0.0.1:8000")]);
    idx.apply(pool(POOL, "sglang", &[8000]));
    assert_eq!(endpoints(&p), vec![e("b-rank-0", "10.0.0.2:8000")]);
    // A pod relabelled into the pool joins it.
    idx.apply(labelled(pod("a", "vllm", "10.0.0.1"), "app", "sglang"));
    assert_eq!(endpoints(&p).len(), 2);
}

#[test]
fn every_target_port_is_a_rank() {
    let (_idx, p) = synced(&[8000, 8001, 8002], vec![pod("a", "vllm", "10.0.0.1")]);
    assert_eq!(
        endpoints(&p),
        vec![
            e("a-rank-0", "10.0.0.1:8000"),
            e("a-rank-1", "10.0.0.1:8001"),
            e("a-rank-2", "10.0.0.1:8002"),
        ]
    );
    let snap = p.datastore.snapshot();
    assert_eq!(snap.endpoints[2].spec.rank, 2);
    assert_eq!(snap.endpoints[2].spec.pod_name, "a");
    assert_eq!(snap.endpoints[2].spec.metrics_address.port(), 8002);
}

#[test]
fn active_ports_annotation_limits_ranks_and_keeps_rank_numbers() {
    let (mut idx, p) = synced(
        &[8000, 8001, 8002],
        vec![annotated(
            pod("a", "vllm", "10.0.0.1"),
            ACTIVE_PORTS_ANNOTATION,
            "8002, 8000",
        )],
    );
    assert_eq!(
        endpoints(&p),
        vec![
            e("a-rank-0", "10.0.0.1:8000"),
            e("a-rank-2", "10.0.0.1:8002")
        ]
    );
    // Dropping the annotation activates every port.
    idx.apply(pod("a", "vllm", "10.0.0.1"));
    assert_eq!(endpoints(&p).len(), 3);
}

#[test]
fn ipv6_pods_are_bracketed() {
    let (_idx, p) = synced(&[8000], vec![pod("a", "vllm", "fd00::5")]);
    assert_eq!(endpoints(&p), vec![e("a-rank-0", "[fd00::5]:8000")]);
}

#[test]
fn metrics_port_override_only_for_single_port_pools() {
    let p = publisher();
    let mut idx = Index::new(pool_ref(), Some(9090), p.clone());
    idx.reset(vec![pool(POOL, "vllm", &[8000])]);
    idx.reset(vec![pod("a", "vllm", "10.0.0.1")]);
    assert_eq!(
        p.datastore.snapshot().endpoints[0]
            .spec
            .metrics_address
            .port(),
        9090
    );
    assert!(!idx.metrics_port_ignored());
    idx.apply(pool(POOL, "vllm", &[8000, 8001]));
    assert_eq!(
        p.datastore.snapshot().endpoints[1]
            .spec
            .metrics_address
            .port(),
        8001
    );
    // Ignored, as the reference does, and said (once, on the change).
    assert!(idx.metrics_port_ignored());
    idx.apply(pool(POOL, "vllm", &[8000]));
    assert!(!idx.metrics_port_ignored());
    // Without the flag nothing is ignored.
    let (mut plain, _) = index();
    plain.reset(vec![pool(POOL, "vllm", &[8000, 8001])]);
    assert!(!plain.metrics_port_ignored());
}

#[test]
fn engine_type_label_selects_the_engine() {
    let (_idx, p) = synced(
        &[8000],
        vec![
            labelled(
                pod("a", "vllm", "10.0.0.1"),
                endpoint_picker::datastore::ENGINE_TYPE_LABEL,
                "sglang",
            ),
            pod("b", "vllm", "10.0.0.2"),
        ],
    );
    let snap = p.datastore.snapshot();
    assert_eq!(&*snap.endpoints[0].engine, "sglang");
    assert_eq!(&*snap.endpoints[1].engine, "vllm");
}

#[test]
fn pool_deletion_empties_the_pool_and_recreation_restores_it() {
    let (mut idx, p) = synced(&[8000], vec![pod("a", "vllm", "10.0.0.1")]);
    idx.delete(pool(POOL, "vllm", &[8000]));
    assert!(endpoints(&p).is_empty());
    idx.apply(pool(POOL, "vllm", &[8000]));
    assert_eq!(endpoints(&p).len(), 1);
    // Other pools in the namespace are none of our business.
    idx.apply(pool("other", "sglang", &[9000]));
    idx.delete(pool("other", "sglang", &[9000]));
    assert_eq!(endpoints(&p).len(), 1);
}

#[test]
fn h2c_app_protocol_is_passed_on() {
    let (mut idx, p) = synced(&[8000], vec![pod("a", "vllm", "10.0.0.1")]);
    let mut h2c = pool(POOL, "vllm", &[8000]);
    h2c.spec.app_protocol = crate::api::AppProtocol::H2c;
    idx.apply(h2c);
    assert_eq!(p.datastore.snapshot().app_protocol, "kubernetes.io/h2c");
}

#[test]
fn standalone_mode_needs_only_the_pod_listing() {
    let p = publisher();
    let spec = pool(POOL, "vllm", &[8000]).spec;
    let mut idx = Index::standalone(pool_ref(), spec, None, p.clone());
    assert!(!p.datastore.is_synced());
    idx.reset(vec![pod("a", "vllm", "10.0.0.1")]);
    assert_eq!(endpoints(&p), vec![e("a-rank-0", "10.0.0.1:8000")]);
    // A pool object of the same name changes nothing in standalone mode.
    idx.apply(pool(POOL, "other", &[9000]));
    assert_eq!(endpoints(&p).len(), 1);
}

fn policies(p: &Publisher) -> std::sync::Arc<Policies> {
    p.director.as_ref().unwrap().policies()
}

#[test]
fn objectives_of_our_pool_give_priorities() {
    let (mut idx, p) = index();
    idx.reset(vec![
        objective("batch", POOL, Some(-1)),
        objective("chat", POOL, Some(10)),
        objective("default", POOL, None),
        objective("elsewhere", "pool-1", Some(5)),
    ]);
    let pol = policies(&p);
    assert_eq!(pol.objectives.get("batch"), Some(&-1));
    assert_eq!(pol.objectives.get("chat"), Some(&10));
    assert_eq!(pol.objectives.get("default"), Some(&0));
    assert_eq!(pol.objectives.get("elsewhere"), None);
    // Policies do not wait for the pool: they are published as they arrive.
    assert!(!p.datastore.is_synced());

    idx.apply(objective("chat", POOL, Some(3)));
    assert_eq!(policies(&p).objectives.get("chat"), Some(&3));
    // Moving an objective to another pool removes it from ours.
    idx.apply(objective("batch", "pool-1", Some(-1)));
    assert_eq!(policies(&p).objectives.get("batch"), None);
    idx.delete(objective("chat", POOL, Some(3)));
    assert_eq!(policies(&p).objectives.len(), 1);
}

#[test]
fn objectives_of_another_pool_group_are_ignored() {
    let (mut idx, p) = index();
    let mut o = objective("x", POOL, Some(1));
    o.spec.pool_ref.group = "inference.networking.x-k8s.io".into();
    idx.apply(o);
    assert!(policies(&p).objectives.is_empty());
}

#[test]
fn rewrite_precedence_exact_then_oldest_then_first_rule() {
    let (mut idx, p) = index();
    idx.reset(vec![
        // Newest, exact.
        rewrite("new", POOL, 300, &[(&["llama"], &[("llama-new", 1)])]),
        // Oldest, but generic for llama; exact for another model.
        rewrite(
            "old",
            POOL,
            100,
            &[
                (&["mistral"], &[("mistral-v2", 1)]),
                (&[], &[("catch-all", 1)]),
            ],
        ),
        // Middle age, exact: beats "new" by age; its first matching rule wins.
        rewrite(
            "mid",
            POOL,
            200,
            &[
                (
                    &["llama", "llama-alias"],
                    &[("llama-mid", 9), ("llama-canary", 1)],
                ),
                (&["llama"], &[("never", 1)]),
            ],
        ),
        rewrite("foreign", "pool-1", 1, &[(&["llama"], &[("foreign", 1)])]),
    ]);
    let pol = policies(&p);
    let (res, rule) = pol.rewrite_rule("llama").unwrap();
    assert_eq!(res.name, "mid");
    assert_eq!(rule.targets[0].model, "llama-mid");
    assert_eq!(rule.targets[0].weight, 9);
    assert_eq!(pol.rewrite_rule("mistral").unwrap().0.name, "old");
    // No exact rule anywhere: the oldest generic rule.
    let (res, rule) = pol.rewrite_rule("phi").unwrap();
    assert_eq!(
        (res.name.as_str(), rule.targets[0].model.as_str()),
        ("old", "catch-all")
    );

    // Deleting "mid" hands llama to the next exact rule.
    idx.delete(rewrite("mid", POOL, 200, &[]));
    assert_eq!(policies(&p).rewrite_rule("llama").unwrap().0.name, "new");
}

#[test]
fn unchanged_policies_are_not_republished() {
    let (mut idx, p) = index();
    idx.apply(objective("a", POOL, Some(1)));
    let before = policies(&p);
    idx.apply(objective("b", "pool-1", Some(1)));
    assert!(std::sync::Arc::ptr_eq(&before, &policies(&p)));
}

/// Review: the API server does not enforce `format: int32`, and one object that fails to
/// decode failed the whole list of its kind (kube decodes a list at once), so no objective or
/// rewrite of the namespace loaded, and the watch retried forever. Out-of-range integers are
/// clamped, an unknown match type matches nothing, and the list decodes.
#[test]
fn a_list_with_an_out_of_range_or_unknown_field_still_decodes() {
    use kube::core::ObjectList;
    let objectives: ObjectList<InferenceObjective> = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "List", "metadata": {},
        "items": [
            {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
             "metadata": {"name": "huge"}, "spec": {"priority": 2147483648u64, "poolRef": {"name": POOL}}},
            {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
             "metadata": {"name": "tiny"}, "spec": {"priority": -1e30, "poolRef": {"name": POOL}}},
            {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
             "metadata": {"name": "vast"}, "spec": {"priority": 18446744073709551615u64, "poolRef": {"name": POOL}}},
            {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
             "metadata": {"name": "chat"}, "spec": {"priority": 10, "poolRef": {"name": POOL}}}
        ]
    }))
    .unwrap();
    let priorities: Vec<Option<i32>> = objectives.items.iter().map(|o| o.spec.priority).collect();
    assert_eq!(
        priorities,
        [Some(i32::MAX), Some(i32::MIN), Some(i32::MAX), Some(10)]
    );
    let rewrites: ObjectList<InferenceModelRewrite> = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "List", "metadata": {},
        "items": [{
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModelRewrite",
            "metadata": {"name": "future"},
            "spec": {"poolRef": {"name": POOL}, "rules": [
                {"matches": [{"model": {"type": "RegularExpression", "value": ".*"}}],
                 "targets": [{"modelRewrite": "everything", "weight": 4294967296u64}]},
                {"matches": [{"model": {"type": "RegularExpression", "value": "l.*"}},
                             {"model": {"value": "llama"}}],
                 "targets": [{"modelRewrite": "llama-2"}]}
            ]}
        }]
    }))
    .unwrap();
    let (mut idx, p) = index();
    idx.reset(objectives.items);
    assert_eq!(policies(&p).objectives.get("huge"), Some(&i32::MAX));
    idx.reset(rewrites.items);
    let pol = policies(&p);
    // The rule whose only match is of an unknown kind matches nothing (not everything).
    assert!(pol.rewrite_rule("phi").is_none());
    let (_, rule) = pol.rewrite_rule("llama").unwrap();
    assert_eq!(rule.targets[0].model, "llama-2");
}
