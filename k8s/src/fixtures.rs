//! Test fixtures: Kubernetes objects as plain values, and a datastore/director pair to publish
//! into.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use endpoint_picker::datastore::Datastore;
use endpoint_picker::director::Director;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::api::{
    AppProtocol, InferenceModelRewrite, InferenceModelRewriteRule, InferenceModelRewriteSpec,
    InferenceObjective, InferenceObjectiveSpec, InferencePool, InferencePoolSpec, LabelSelector,
    Match, MatchType, ModelMatch, PoolObjectReference, Port, TargetModel,
};
use crate::index::{Index, PoolRef, Publisher};

pub const NS: &str = "ns-0";
pub const POOL: &str = "pool-0";

pub fn pool_ref() -> PoolRef {
    PoolRef {
        name: POOL.into(),
        namespace: NS.into(),
        group: crate::api::POOL_GROUP.into(),
    }
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        resource_version: Some("1".into()),
        ..Default::default()
    }
}

pub fn pool(name: &str, app: &str, ports: &[i32]) -> InferencePool {
    InferencePool {
        metadata: meta(name),
        spec: InferencePoolSpec {
            selector: LabelSelector {
                match_labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            },
            target_ports: ports.iter().map(|&number| Port { number }).collect(),
            app_protocol: AppProtocol::Http,
            endpoint_picker_ref: None,
        },
        status: None,
    }
}

/// A Ready pod with label `app=<app>` at `ip`.
pub fn pod(name: &str, app: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
            ..meta(name)
        },
        spec: None,
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

pub fn unready(mut p: Pod) -> Pod {
    if let Some(c) = p
        .status
        .as_mut()
        .and_then(|s| s.conditions.as_mut())
        .and_then(|c| c.first_mut())
    {
        c.status = "False".into();
    }
    p
}

pub fn deleting(mut p: Pod) -> Pod {
    p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    p
}

pub fn annotated(mut p: Pod, key: &str, value: &str) -> Pod {
    p.metadata
        .annotations
        .get_or_insert_default()
        .insert(key.into(), value.into());
    p
}

pub fn labelled(mut p: Pod, key: &str, value: &str) -> Pod {
    p.metadata
        .labels
        .get_or_insert_default()
        .insert(key.into(), value.into());
    p
}

fn our_pool_ref(pool: &str) -> PoolObjectReference {
    PoolObjectReference {
        group: crate::api::POOL_GROUP.into(),
        kind: "InferencePool".into(),
        name: pool.into(),
    }
}

pub fn objective(name: &str, pool: &str, priority: Option<i32>) -> InferenceObjective {
    InferenceObjective {
        metadata: meta(name),
        spec: InferenceObjectiveSpec {
            priority,
            pool_ref: our_pool_ref(pool),
        },
        status: None,
    }
}

/// One rewrite rule as `(matches, [(model, weight)])`.
pub type RuleDef<'a> = (&'a [&'a str], &'a [(&'a str, i32)]);

/// A rewrite created at `created` (seconds since the epoch) with one rule per `(matches,
/// targets)` pair; targets are `(model, weight)`.
pub fn rewrite(
    name: &str,
    pool: &str,
    created: i64,
    rules: &[RuleDef<'_>],
) -> InferenceModelRewrite {
    InferenceModelRewrite {
        metadata: ObjectMeta {
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
            )),
            ..meta(name)
        },
        spec: InferenceModelRewriteSpec {
            pool_ref: our_pool_ref(pool),
            rules: rules
                .iter()
                .map(|(matches, targets)| InferenceModelRewriteRule {
                    matches: matches
                        .iter()
                        .map(|m| Match {
                            model: ModelMatch {
                                r#type: MatchType::Exact,
                                value: (*m).into(),
                            },
                        })
                        .collect(),
                    targets: targets
                        .iter()
                        .map(|(m, w)| TargetModel {
                            weight: Some(*w),
                            model_rewrite: (*m).into(),
                        })
                        .collect(),
                })
                .collect(),
        },
        status: None,
    }
}

/// A datastore and a director (default plugin config) to publish into.
pub fn publisher() -> Publisher {
    let datastore = Arc::new(Datastore::new());
    let config = endpoint_picker::config::load_default(1).unwrap();
    let director = Arc::new(Director::new(datastore.clone(), Arc::new(config), 1));
    Publisher {
        datastore,
        director: Some(director),
    }
}

pub fn index() -> (Index, Publisher) {
    let p = publisher();
    (Index::new(pool_ref(), None, p.clone()), p)
}

/// Endpoint names and addresses of the datastore's snapshot.
pub fn endpoints(p: &Publisher) -> Vec<(String, String)> {
    p.datastore
        .snapshot()
        .endpoints
        .iter()
        .map(|e| (e.spec.name.clone(), e.host_port.to_string()))
        .collect()
}
