//! Response-path plugins: they see the response on its way back to the client.

/// Response header set by the `destination-endpoint-served-verifier` test plugin.
pub const SERVED_ENDPOINT_TEST_HEADER: &str = "x-conformance-test-served-endpoint";

/// A response-path plugin.
pub trait ResponsePlugin: Send + Sync + std::fmt::Debug {
    /// Headers to add to the response, given the endpoint that served it (if Envoy said).
    fn response_headers(&self, served_endpoint: Option<&str>) -> Vec<(String, String)>;
}

/// `destination-endpoint-served-verifier` (conformance only): echoes the served endpoint
/// Envoy reported into a response header.
#[derive(Debug)]
pub struct DestinationEndpointServedVerifier;

// === impl DestinationEndpointServedVerifier ===

impl ResponsePlugin for DestinationEndpointServedVerifier {
    fn response_headers(&self, served: Option<&str>) -> Vec<(String, String)> {
        let value = match served {
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
            v.response_headers(Some("10.0.0.1:3000")),
            vec![(
                SERVED_ENDPOINT_TEST_HEADER.to_owned(),
                "10.0.0.1:3000".to_owned()
            )]
        );
        for missing in [None, Some("")] {
            assert!(v.response_headers(missing)[0].1.starts_with("fail:"));
        }
    }
}
