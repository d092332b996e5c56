//! Deliberately wrong behaviours, for proving that the conformance suite catches them. Compiled
//! only with the `conformance-faults` feature, which only the conformance suite enables: the
//! production binary cannot be told to misbehave.

/// A protocol fault the service can be told to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConformanceFault {
    /// Answer the request headers at once, before the body arrives (routing without the body).
    HeadersBeforeBody,
    /// Do not write the `envoy.lb` dynamic metadata (only the header).
    NoLbMetadata,
}

impl std::str::FromStr for ConformanceFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "headers-before-body" => Ok(Self::HeadersBeforeBody),
            "no-lb-metadata" => Ok(Self::NoLbMetadata),
            other => Err(format!(
                "unknown fault {other:?} (headers-before-body, no-lb-metadata)"
            )),
        }
    }
}
