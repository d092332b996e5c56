//! One process-wide cap on the request-body bytes the EPP holds before it routes.
//!
//! Each stream may gather up to `--max-request-body-bytes` (16 MiB by default) before it can
//! parse and route, and the body then waits for its token ids. Nothing else bounds the sum
//! over streams: a client that opens many streams and sends long bodies slowly would make the
//! EPP hold them all, until it is killed for its memory. The budget bounds that sum
//! (`--max-gathered-request-bytes`). A stream charges each chunk as it arrives; a charge that
//! would pass the budget ends the request with 429 `rejected-saturated`, and the stream's
//! charge is given back at once. What a request holds beside its body until it is routed is
//! charged with it (`InferenceRequest::held_beside_body`: a prompt copied apart from the
//! body, the token ids), each up to the body's size: uncharged, a chat body with tools held
//! three times its bytes.
//!
//! The buffer a stream sizes from its declared `content-length` (at most
//! [`crate::body_pool::MAX_RESERVED_AHEAD`]) is a reservation, not a charge: its pages cost no
//! memory until bytes are written, and those bytes are charged. Charging the reservation let a
//! few hundred streams that declare 4 MiB and send nothing hold the whole budget, and every
//! other request was refused. Reservations are capped apart, at [`RESERVED_SHARE`] of the
//! budget (so that their address space stays bounded too); past it a stream starts with an
//! empty buffer, which grows as bytes come.
//!
//! The charge ends when the request leaves the EPP's hands: routed (once the answers that carry
//! its body back to Envoy are sent: [`charged`]), refused, or queued in flow control, whose own `maxBytes` caps then hold the queued
//! bodies, as the operator configured them. Counting those here as well would make the two
//! caps fight, and flow control's would stop meaning what its configuration says. Once flow
//! control lets the request go, its body is charged here again ([`BodyCharge::grow_past`],
//! whatever the budget holds: it is already in hand) until its answers are sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// The default budget: 64 bodies of the default maximum size.
pub const DEFAULT_GATHERED_REQUEST_BYTES: usize = 1024 * 1024 * 1024;

/// Smallest `--max-request-body-bytes` accepted: below it every request with a body would get
/// 413 (0 was accepted, and refused every POST).
pub const MIN_REQUEST_BODY_LIMIT: usize = 1024;

/// Longest `--request-body-timeout` accepted: a day (`Instant + Duration` overflows, a panic on
/// every request, for values near `Duration::MAX`).
pub const MAX_REQUEST_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(86_400);

/// Checks a `--request-body-timeout` value, parsed by the binary's duration parser.
pub fn check_body_timeout(d: std::time::Duration) -> Result<std::time::Duration, String> {
    if d.is_zero() || d > MAX_REQUEST_BODY_TIMEOUT {
        return Err(format!(
            "{d:?} must be above zero and at most a day ({MAX_REQUEST_BODY_TIMEOUT:?})"
        ));
    }
    Ok(d)
}

/// Parses a `--max-request-body-bytes` value (clap's `value_parser`, in the EPP and in bbr).
pub fn parse_body_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= MIN_REQUEST_BODY_LIMIT => Ok(n),
        Ok(n) => Err(format!(
            "{n} is below {MIN_REQUEST_BODY_LIMIT}: every request with a body would be refused"
        )),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// The part of the budget that reservations made from declared lengths may take together.
pub const RESERVED_SHARE: usize = 4;

/// Request-body bytes held by every stream together, and their cap.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    held: AtomicUsize,
    /// Buffer capacity reserved ahead of the bytes, at most `limit / RESERVED_SHARE`.
    reserved: AtomicUsize,
}

/// A charge would pass the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request bodies held by the EPP would pass {limit} bytes")]
pub struct OverBudget {
    /// The budget.
    pub limit: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            held: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
        }
    }

    /// The cap.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Buffer capacity reserved now (not charged: see the module's documentation).
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: usize) -> Result<(), OverBudget> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .map(drop)
            .map_err(|_| OverBudget { limit: self.limit })
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        let cap = self.limit / RESERVED_SHARE;
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reserved| {
                reserved.checked_add(bytes).filter(|&total| total <= cap)
            })
            .is_ok()
    }
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self::new(DEFAULT_GATHERED_REQUEST_BYTES)
    }
}

/// What one stream has charged and reserved; given back when released or dropped.
#[derive(Debug, Default)]
pub struct BodyCharge {
    charged: Option<(Arc<BodyBudget>, usize)>,
    reserved: Option<(Arc<BodyBudget>, usize)>,
}

impl BodyCharge {
    /// Charges `bytes` more to `budget`, or nothing if that would pass it. A charge keeps to
    /// the budget it started with.
    pub fn grow(&mut self, budget: &Arc<BodyBudget>, bytes: usize) -> Result<(), OverBudget> {
        match &mut self.charged {
            Some((held_from, charged)) => {
                held_from.try_take(bytes)?;
                *charged += bytes;
            }
            None => {
                budget.try_take(bytes)?;
                self.charged = Some((budget.clone(), bytes));
            }
        }
        Ok(())
    }

    /// Charges `bytes` more to `budget` whatever it holds: for a body already in hand (one
    /// flow control has just let go, whose `maxBytes` counted it while it waited), which
    /// refusing now would only waste. Past the limit, new bodies are refused until it goes.
    pub fn grow_past(&mut self, budget: &Arc<BodyBudget>, bytes: usize) {
        match &mut self.charged {
            Some((held_from, charged)) => {
                held_from.held.fetch_add(bytes, Ordering::AcqRel);
                *charged += bytes;
            }
            None => {
                budget.held.fetch_add(bytes, Ordering::AcqRel);
                self.charged = Some((budget.clone(), bytes));
            }
        }
    }

    /// Reserves `bytes` of buffer capacity ahead of the bytes, if the budget's reservations
    /// have room; the capacity granted (`bytes` or 0). A second reservation replaces the
    /// first.
    pub fn reserve(&mut self, budget: &Arc<BodyBudget>, bytes: usize) -> usize {
        self.unreserve();
        if bytes == 0 || !budget.try_reserve(bytes) {
            return 0;
        }
        self.reserved = Some((budget.clone(), bytes));
        bytes
    }

    /// Bytes charged by this stream.
    pub fn bytes(&self) -> usize {
        self.charged.as_ref().map_or(0, |(_, bytes)| *bytes)
    }

    /// Gives the whole charge and the reservation back.
    pub fn release(&mut self) {
        if let Some((budget, bytes)) = self.charged.take() {
            budget.give_back(bytes);
        }
        self.unreserve();
    }

    fn unreserve(&mut self) {
        if let Some((budget, bytes)) = self.reserved.take() {
            budget.reserved.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        self.release();
    }
}

/// `body`, holding `charge` until its last slice is dropped: the answers that carry a body
/// back to Envoy wait in the gRPC stream until Envoy's window lets them out, and the bytes
/// stay counted until then.
pub fn charged(body: Bytes, charge: BodyCharge) -> Bytes {
    if charge.charged.is_none() && charge.reserved.is_none() {
        return body;
    }
    Bytes::from_owner(Charged {
        body,
        _charge: charge,
    })
}

/// A body and what it is charged.
struct Charged {
    body: Bytes,
    _charge: BodyCharge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn charges_add_up_to_the_limit_and_no_further() {
        let budget = Arc::new(BodyBudget::new(100));
        let (mut a, mut b) = (BodyCharge::default(), BodyCharge::default());
        a.grow(&budget, 60).unwrap();
        b.grow(&budget, 40).unwrap();
        assert_eq!(budget.held(), 100);
        assert_eq!(b.grow(&budget, 1), Err(OverBudget { limit: 100 }));
        assert_eq!(b.bytes(), 40, "a refused charge is not taken");
        a.release();
        assert_eq!(budget.held(), 40);
        b.grow(&budget, 60).unwrap();
        drop(b);
        assert_eq!(budget.held(), 0, "dropping a charge gives it back");
        a.release();
        assert_eq!(budget.held(), 0, "releasing twice gives back once");
    }

    #[test]
    fn a_charge_far_over_the_limit_does_not_wrap() {
        let budget = Arc::new(BodyBudget::new(usize::MAX - 1));
        let mut a = BodyCharge::default();
        a.grow(&budget, usize::MAX - 1).unwrap();
        assert!(BodyCharge::default().grow(&budget, usize::MAX).is_err());
        assert_eq!(budget.held(), usize::MAX - 1);
    }

    #[test]
    fn a_charged_body_holds_its_charge_until_its_last_slice_goes() {
        let budget = Arc::new(BodyBudget::new(100));
        let mut charge = BodyCharge::default();
        charge.grow(&budget, 10).unwrap();
        let body = charged(Bytes::from_static(b"0123456789"), charge);
        let tail = body.slice(5..);
        drop(body);
        assert_eq!(budget.held(), 10, "a slice still holds the bytes");
        assert_eq!(&tail[..], b"56789");
        drop(tail);
        assert_eq!(budget.held(), 0);
    }

    proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0xb0d9),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Whatever the interleaving of charges and releases, the budget holds exactly what
        /// the live charges hold, never more than its limit, and nothing once they are gone.
        #[test]
        fn the_budget_is_the_sum_of_live_charges(
            ops in proptest::collection::vec((0usize..4, 0usize..80, any::<bool>()), 0..64),
        ) {
            let budget = Arc::new(BodyBudget::new(150));
            let mut charges: Vec<BodyCharge> = (0..4).map(|_| BodyCharge::default()).collect();
            for (stream, bytes, release) in ops {
                if release {
                    charges[stream].release();
                } else {
                    let before = budget.held();
                    match charges[stream].grow(&budget, bytes) {
                        Ok(()) => prop_assert!(before + bytes <= 150),
                        Err(_) => prop_assert!(before + bytes > 150),
                    }
                }
                let sum: usize = charges.iter().map(BodyCharge::bytes).sum();
                prop_assert_eq!(budget.held(), sum);
            }
            drop(charges);
            prop_assert_eq!(budget.held(), 0);
        }
    }
}
