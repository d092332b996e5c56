//! Fixtures shared by the crate's unit tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use endpoint_picker::datastore::EndpointSpec;

/// Endpoint `pod-<i>` at 127.0.0.<i>:8000, namespace `ns`, rank 0, no labels.
pub(crate) fn spec(i: u8) -> EndpointSpec {
    let address = SocketAddr::from(([127, 0, 0, i], 8000));
    EndpointSpec {
        name: format!("pod-{i}"),
        pod_name: format!("pod-{i}"),
        namespace: "ns".into(),
        address,
        metrics_address: address,
        rank: 0,
        labels: BTreeMap::new(),
    }
}
