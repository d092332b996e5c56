//! gRPC health on the health port, with the reference's service names.
//!
//! `liveness` is SERVING while the process answers. `readiness`, `""`,
//! `inference-extension` and `envoy.service.ext_proc.v3.ExternalProcessor` are SERVING once the
//! pool has synced (and, with leader election, only on the leader).

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Services that follow readiness.
pub const READY_SERVICES: [&str; 4] = [
    "",
    "readiness",
    "inference-extension",
    "envoy.service.ext_proc.v3.ExternalProcessor",
];

/// Sets the readiness-following services.
pub async fn set_ready(reporter: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for s in READY_SERVICES {
        reporter.set_service_status(s, status).await;
    }
}

/// Marks liveness SERVING and readiness NOT_SERVING.
pub async fn init(reporter: &HealthReporter) {
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    set_ready(reporter, false).await;
}
