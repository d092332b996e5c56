//! Kubernetes-mode wiring of the `epp` binary: flags → client, discovery and leader election.

use crate::server::{Election, PoolSource};
use anyhow::{Context, Result, bail};
use k8s::index::PoolRef;
use k8s::lease::{LeaseConfig, lease_name};
use k8s::watch::{Discovery, standalone_spec};

/// Name given to the synthetic pool of standalone mode (also names its lease).
const STANDALONE_POOL: &str = "standalone";

/// The flags Kubernetes mode reads. Exactly one pool source: `pool_name`, or a standalone
/// `endpoint_selector` with its `endpoint_target_ports`.
pub struct Flags {
    /// `--pool-name`: the InferencePool to watch; empty in standalone mode.
    pub pool_name: String,
    /// `--pool-namespace`: the namespace of the pool (and of the lease and the watched pods).
    pub pool_namespace: String,
    /// `--pool-group`: must be `inference.networking.k8s.io`, the only InferencePool group served.
    pub pool_group: String,
    /// `--endpoint-selector`: standalone mode's pod selector, `key=value,...`.
    pub endpoint_selector: String,
    /// `--endpoint-target-ports`: standalone mode's model-server ports.
    pub endpoint_target_ports: Vec<u16>,
    /// `--model-server-metrics-port` when non-zero: scrape this port instead of the target port.
    pub metrics_port: Option<u16>,
    /// `--ha-enable-leader-election`: compete for a Lease (identity `$POD_NAME`); only the
    /// leader reports ready.
    pub leader_election: bool,
}

/// What `run()` needs: the pool source (with the lease to compete for, which `serve` starts
/// once its own checks passed and its supervisor waits for at shutdown, so that the lease is
/// handed back), a label for the start-up log, and the client (for metrics auth).
pub struct Kube {
    /// The pool, its objectives and rewrites, watched.
    pub source: PoolSource,
    /// `namespace/name (kind)`.
    pub label: String,
    /// The API client.
    pub client: k8s::Client,
}

/// What Kubernetes mode will watch and elect, from flags that passed validation: nothing is
/// connected until [`Plan::start`], which `run` calls once every other check has passed and
/// every port is bound, and the lease is competed for only inside `serve`, after its own
/// checks, so that a start-up that fails never holds a lease it would not hand back.
pub struct Plan {
    name: String,
    spec: Option<k8s::api::InferencePoolSpec>,
    pool_namespace: String,
    pool_group: String,
    metrics_port: Option<u16>,
    /// The lease identity (`$POD_NAME`) with leader election.
    identity: Option<String>,
    /// The lease competed for with leader election ([`lease_for`]).
    lease: String,
}

/// Longest object name the API server takes (a DNS subdomain).
const MAX_OBJECT_NAME: usize = 253;

/// The lease of a pool: the reference's name for an InferencePool's. A standalone pool is
/// named by what it selects: two standalone EPPs of one namespace (two models, two selectors)
/// sharing one lease would have one ready replica between them. A name the API server would
/// refuse is an error here, not a 422 every 2 s and an EPP that is never ready.
fn lease_for(
    namespace: &str,
    pool: &str,
    standalone: Option<&k8s::api::InferencePoolSpec>,
) -> Result<String> {
    let name = match standalone {
        None => lease_name(namespace, pool),
        Some(spec) => {
            let mut selected = String::new();
            for (k, v) in &spec.selector.match_labels {
                selected.push_str(&format!("{k}={v},"));
            }
            let mut ports: Vec<i32> = spec.target_ports.iter().map(|p| p.number).collect();
            ports.sort_unstable();
            selected.push_str(&format!("{ports:?}"));
            lease_name(
                namespace,
                &format!("{pool}-{:016x}", fnv1a(selected.as_bytes())),
            )
        }
    };
    if name.len() > MAX_OBJECT_NAME {
        bail!(
            "the lease name {name:?} is {} characters, over the API server's {MAX_OBJECT_NAME}: \
             shorten the pool's name or namespace, or run without --ha-enable-leader-election",
            name.len()
        );
    }
    Ok(name)
}

/// FNV-1a, 64 bits: a name stable across releases and platforms (std's hasher is neither).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Validates the flags (and `$POD_NAME` with leader election), without I/O.
pub fn plan(flags: Flags) -> Result<Plan> {
    let Flags {
        pool_name,
        pool_namespace,
        pool_group,
        endpoint_selector,
        endpoint_target_ports,
        metrics_port,
        leader_election,
    } = flags;
    let standalone = !endpoint_selector.is_empty() || !endpoint_target_ports.is_empty();
    let (name, spec) = match (pool_name.is_empty(), standalone) {
        (false, true) => bail!("pass exactly one of --pool-name and --endpoint-selector"),
        (true, false) => bail!(
            "no pool source: pass --pool-name (Kubernetes), --endpoint-selector with \
             --endpoint-target-ports (standalone), or --pool-file (local mode)"
        ),
        (false, false) => (pool_name, None),
        (true, true) => (
            STANDALONE_POOL.to_owned(),
            Some(standalone_spec(&endpoint_selector, &endpoint_target_ports)?),
        ),
    };
    if pool_group != k8s::api::POOL_GROUP {
        bail!(
            "--pool-group={pool_group:?}: only {} (v1) InferencePools are supported",
            k8s::api::POOL_GROUP
        );
    }
    let lease = if leader_election {
        lease_for(&pool_namespace, &name, spec.as_ref())?
    } else {
        String::new()
    };
    let identity = if leader_election {
        Some(
            std::env::var("POD_NAME")
                .ok()
                .filter(|s| !s.is_empty())
                .context(
                    "--ha-enable-leader-election needs $POD_NAME (downward API) as the lease identity",
                )?,
        )
    } else {
        None
    };
    Ok(Plan {
        name,
        spec,
        pool_namespace,
        pool_group,
        metrics_port,
        identity,
        lease,
    })
}

impl Plan {
    /// Builds the client (in-cluster, else `$KUBECONFIG`/`~/.kube/config`). Leader election
    /// and the watches start later, inside `serve`.
    pub async fn start(self) -> Result<Kube> {
        let Plan {
            name,
            spec,
            pool_namespace,
            pool_group,
            metrics_port,
            identity,
            lease,
        } = self;
        let client = k8s::client()
            .await
            .context("connecting to the Kubernetes API (in-cluster or kubeconfig)")?;
        // Competed for inside `serve`, once it has checked everything it checks.
        let leader = identity.map(|identity| Election::Pending {
            client: client.clone(),
            namespace: pool_namespace.clone(),
            config: LeaseConfig::new(lease, identity),
        });
        let label = format!(
            "{pool_namespace}/{name} ({})",
            if spec.is_some() {
                "standalone selector"
            } else {
                "InferencePool"
            }
        );
        let discovery = Discovery {
            client: client.clone(),
            pool: PoolRef {
                name,
                namespace: pool_namespace,
                group: pool_group,
            },
            metrics_port,
            standalone: spec,
        };
        Ok(Kube {
            source: PoolSource::Kubernetes {
                discovery: Box::new(discovery),
                leader,
            },
            label,
            client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_pools_have_leases_of_their_own_and_long_names_are_refused() {
        let pool = lease_for("ns", "pool-a", None).unwrap();
        assert_eq!(pool, lease_name("ns", "pool-a"));
        let spec = |selector: &str, ports: &[u16]| standalone_spec(selector, ports).unwrap();
        let (a, b) = (spec("app=a", &[8000]), spec("app=b", &[8000]));
        let lease_a = lease_for("ns", STANDALONE_POOL, Some(&a)).unwrap();
        let lease_b = lease_for("ns", STANDALONE_POOL, Some(&b)).unwrap();
        assert_ne!(lease_a, lease_b, "two selectors, two leases");
        assert!(lease_a.starts_with("epp-ns-standalone-"), "{lease_a}");
        // The same selection written otherwise is the same lease (replicas of one Deployment
        // may be rolled with the flags reordered).
        let again = spec("tier=x, app=a", &[8001, 8000]);
        let reordered = spec("app=a,tier=x", &[8000, 8001]);
        assert_eq!(
            lease_for("ns", STANDALONE_POOL, Some(&again)).unwrap(),
            lease_for("ns", STANDALONE_POOL, Some(&reordered)).unwrap()
        );
        let long = "n".repeat(210);
        let err = lease_for(&long, "pool", None).unwrap_err().to_string();
        assert!(err.contains("over the API server's 253"), "{err}");
    }
}
