//! Where the pool comes from. Local mode reads a file; Kubernetes mode (its own crate) watches
//! the InferencePool and its Pods. Both hand the datastore a complete `PoolSpec`.

pub mod file;
