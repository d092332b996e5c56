//! Response-path plugins: they see the response on its way back to the client.

use std::sync::Arc;

use crate::datastore::Endpoint;
use crate::scheduling::Scorer;

/// Response header set by the `destination-endpoint-served-verifier` test plugin.
pub const SERVED_ENDPOINT_TEST_HEADER: &str = "x-conformance-test-served-endpoint";

/// Which endpoint served a response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Served<'a> {
    /// The `ip:port` Envoy reported (`envoy.lb` / `x-gateway-destination-endpoint-served`).
    pub address: Option<&'a str>,
    /// The pool's endpoint at that address, else the request's primary target.
    pub endpoint: Option<&'a Endpoint>,
}

/// A response-path plugin.
pub trait ResponsePlugin: Send + Sync + std::fmt::Debug {
    /// Headers to add to the response, given the endpoint that served it.
    fn response_headers(&self, served: &Served<'_>) -> Vec<(String, String)>;
}

/// The response side of a scorer that has one (see [`crate::scheduling::Scorer::response_plugin`]).
#[derive(Debug)]
pub struct ScorerResponse(pub Arc<dyn Scorer>);

impl ResponsePlugin for ScorerResponse {
    fn response_headers(&self, served: &Served<'_>) -> Vec<(String, String)> {
        self.0
            .response_plugin()
            .map(|p| p.response_headers(served))
            .unwrap_or_default()
    }
}

/// `destination-endpoint-served-verifier` (conformance only): echoes the served endpoint
/// Envoy reported into a response header.
#[derive(Debug)]
pub struct DestinationEndpointServedVerifier;

// === impl DestinationEndpointServedVerifier ===

impl ResponsePlugin for DestinationEndpointServedVerifier {
    fn response_headers(&self, served: &Served<'_>) -> Vec<(String, String)> {
        let value = match served.address {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => "fail: missing destination endpoint served metadata".to_owned(),
        };
        vec![(SERVED_ENDPOINT_TEST_HEADER.to_owned(), value)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_echoes_the_served_endpoint_or_fails() {
        let v = DestinationEndpointServedVerifier;
        assert_eq!(
            v.response_headers(&Served {
                address: Some("10.0.0.1:3000"),
                endpoint: None
            }),
            vec![(
                SERVED_ENDPOINT_TEST_HEADER.to_owned(),
                "10.0.0.1:3000".to_owned()
            )]
        );
        for missing in [None, Some("")] {
            let served = Served {
                address: missing,
                endpoint: None,
            };
            assert!(v.response_headers(&served)[0].1.starts_with("fail:"));
        }
    }
}
