//! The checked-in CRDs under `manifests/crds/` must be exactly what the Rust types generate.

use std::path::PathBuf;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    for (name, yaml) in k8s::api::crd_documents().unwrap() {
        let path = dir.join(name);
        let expected = format!("{}{yaml}", k8s::api::GENERATED_HEADER);
        let found = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            found == expected,
            "{} is stale: run `cargo run -p k8s --bin crdgen` and commit the result",
            path.display()
        );
    }
}

#[test]
fn the_protected_group_crd_carries_the_api_approval_annotation() {
    let docs = k8s::api::crd_documents().unwrap();
    let (_, pool) = docs
        .iter()
        .find(|(n, _)| n.contains("inferencepools"))
        .unwrap();
    assert!(
        pool.contains("api-approved.kubernetes.io: https://"),
        "{pool}"
    );
}
