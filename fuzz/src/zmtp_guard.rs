//! Harness for the ZMTP frame guard (`kv_events::transport::guard`): its copy of a peer's
//! stream to zmq.rs, `checked_copy`, which parses the ZMTP 3 greeting and every frame header
//! (flags, a 1- or 8-byte length) before zmq.rs sees them, and the unfinished-bytes budget it
//! charges and releases.
//!
//! Shared by the `zmtp_guard` fuzz target and `kv-events/tests/fuzz_regressions.rs` (feature
//! `zmq`). Uses the guard through `kv_events::transport::guard::fuzzing` only, from an
//! in-memory reader into a `Vec` on a current-thread tokio runtime.
//!
//! Input: byte 0 is the options, then the streams:
//!
//! - bits 0–1: the caps — 0 tiny (16-byte frames, 3 frames and 40 bytes a message, 4 messages
//!   a connection, a budget of 48 bytes and 32 per IP), 1 a publisher's guard facing
//!   subscribers (one-frame messages of 1 KiB, 64 of them), 2 a subscriber's facing engines
//!   (the production constants), 3 small (300-byte frames, so long headers pass; 8 frames and
//!   600 bytes a message, a budget of 1,000 bytes and 700 per IP);
//! - bit 2: a valid greeting is put before connection A's stream; bit 3: before B's;
//! - bit 4: two connections sharing the budget, A then B, A still open (holding what it
//!   charged) while B runs: byte 1 is then the length of A's stream, the rest is B's; else all
//!   the rest is A's stream;
//! - bit 5: B from A's IP (else another).
//!
//! Invariants: no panic; what reaches zmq.rs is a prefix of the peer's stream, and exactly
//! what a model of the module's rules lets through, with the same ending (closed, cut by a
//! rule, cut by the budget, failed inside the greeting or a header) and the same bytes left
//! charged; no frame passed is over the frame cap or has a reserved flag, no message passed has
//! more frames or bytes than its caps, no connection more messages; the budget holds what the
//! open connections hold, by IP too, and is back to zero, with no IP listed, once they are
//! dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kv_events::transport::guard::fuzzing::{Caps, Ending, GuardBudget, checked_copy};

const GREETING_BYTES: usize = 64;
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
/// Another IP; an IPv4-mapped IPv6 address of A counts as A (the guard canonicalises).
const B: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
const A_MAPPED: IpAddr = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());

/// A ZMTP 3.0 greeting of the NULL mechanism (what zmq.rs and libzmq send).
pub fn greeting() -> Vec<u8> {
    let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
    g.extend_from_slice(b"NULL");
    g.resize(GREETING_BYTES, 0);
    g
}

fn caps(options: u8) -> Caps {
    match options & 3 {
        0 => Caps {
            frame_bytes: 16,
            frames_per_message: 3,
            message_bytes: 40,
            unfinished_bytes: 48,
            unfinished_bytes_per_ip: 32,
            messages_per_connection: 4,
        },
        1 => Caps::facing_subscribers(),
        2 => Caps::facing_publishers(),
        _ => Caps {
            frame_bytes: 300,
            frames_per_message: 8,
            message_bytes: 600,
            unfinished_bytes: 1_000,
            unfinished_bytes_per_ip: 700,
            messages_per_connection: u64::MAX,
        },
    }
}

/// How a copy ends, without the reason's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    Rule,
    Budget,
    Io,
}

/// What the guard must do with `input`, by the module's rules, with `others` bytes charged
/// already by other connections and `same_ip` of them by this connection's IP.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    end: End,
    /// Bytes passed on to zmq.rs (a prefix of `input`).
    written: usize,
    /// Bytes left charged to the connection.
    held: u64,
}

fn model(input: &[u8], caps: &Caps, others: u64, same_ip: u64) -> Expected {
    let ends = |end, written, held| Expected { end, written, held };
    if input.len() < GREETING_BYTES {
        return ends(End::Io, 0, 0);
    }
    let g = &input[..GREETING_BYTES];
    if g[0] != 0xFF || g[9] & 1 != 1 || g[10] < 3 {
        return ends(End::Rule, 0, 0);
    }
    let mut pos = GREETING_BYTES;
    let (mut frames, mut message, mut messages, mut held) = (0usize, 0u64, 0u64, 0u64);
    loop {
        let Some(&flags) = input.get(pos) else {
            return ends(End::Closed, pos, held);
        };
        if flags & !(MORE | LONG | COMMAND) != 0 {
            return ends(End::Rule, pos, held);
        }
        let header = if flags & LONG != 0 { 9 } else { 2 };
        let Some(length) = input.get(pos + 1..pos + header) else {
            return ends(End::Io, pos, held);
        };
        let len = length.iter().fold(0u64, |n, &b| n << 8 | u64::from(b));
        if len > caps.frame_bytes {
            return ends(End::Rule, pos, held);
        }
        let command = flags & COMMAND != 0;
        let last = !command && flags & MORE == 0;
        if !command {
            frames += 1;
            message += len;
            if frames > caps.frames_per_message || message > caps.message_bytes {
                return ends(End::Rule, pos, held);
            }
            if last {
                messages += 1;
                if messages > caps.messages_per_connection {
                    return ends(End::Rule, pos, held);
                }
            }
        }
        if others + held + len > caps.unfinished_bytes
            || same_ip + held + len > caps.unfinished_bytes_per_ip
        {
            return ends(End::Budget, pos, held);
        }
        held += len;
        let body = input.len() - pos - header;
        pos += header;
        if (body as u64) < len {
            return ends(End::Closed, input.len(), held);
        }
        pos += len as usize;
        if command {
            held -= len;
        } else if last {
            held -= message;
            frames = 0;
            message = 0;
        }
    }
}

/// Reads what was passed on to zmq.rs frame by frame and checks it against the caps alone
/// (independently of the model): the greeting first, then frames without reserved flags, none
/// over the frame cap, no message over its frame or byte caps, no more messages than allowed.
fn check_passed(out: &[u8], caps: &Caps) {
    if out.is_empty() {
        return;
    }
    assert!(out.len() >= GREETING_BYTES, "a partial greeting passed on");
    assert_eq!(out[0], 0xFF, "a greeting without the signature passed on");
    assert!(out[10] >= 3, "a greeting before ZMTP 3 passed on");
    let mut rest = &out[GREETING_BYTES..];
    let (mut frames, mut message, mut messages) = (0usize, 0u64, 0u64);
    while let Some(&flags) = rest.first() {
        assert_eq!(
            flags & !(MORE | LONG | COMMAND),
            0,
            "reserved flags passed on"
        );
        let header = if flags & LONG != 0 { 9 } else { 2 };
        assert!(rest.len() >= header, "a partial frame header passed on");
        let len = rest[1..header]
            .iter()
            .fold(0u64, |n, &b| n << 8 | u64::from(b));
        assert!(len <= caps.frame_bytes, "a frame of {len} bytes passed on");
        if flags & COMMAND == 0 {
            frames += 1;
            message += len;
            assert!(
                frames <= caps.frames_per_message,
                "{frames} frames passed on"
            );
            assert!(message <= caps.message_bytes, "a {message}-byte message");
            if flags & MORE == 0 {
                messages += 1;
                assert!(messages <= caps.messages_per_connection);
                frames = 0;
                message = 0;
            }
        }
        // The last frame may be cut short by the peer closing.
        let body = (rest.len() - header).min(usize::try_from(len).unwrap_or(usize::MAX));
        rest = &rest[header + body..];
    }
}

fn end_of(ending: &Ending) -> End {
    match ending {
        Ending::Closed => End::Closed,
        Ending::Rule(_) => End::Rule,
        Ending::Budget(_) => End::Budget,
        Ending::Io(_) => End::Io,
    }
}

pub fn run(data: &[u8]) {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let caps = caps(options);
    let (a_stream, b_stream) = if options & 0x10 != 0 {
        let Some((&len, rest)) = rest.split_first() else {
            return;
        };
        let (a, b) = rest.split_at(usize::from(len).min(rest.len()));
        (a, Some(b))
    } else {
        (rest, None)
    };
    let with_greeting = |bit: u8, s: &[u8]| {
        let mut v = if options & bit != 0 {
            greeting()
        } else {
            Vec::new()
        };
        v.extend_from_slice(s);
        v
    };
    let a_input = with_greeting(0x04, a_stream);
    let b_input = b_stream.map(|s| with_greeting(0x08, s));
    let b_ip = if options & 0x20 != 0 { A_MAPPED } else { B };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let budget = GuardBudget::new(caps);
    rt.block_on(async {
        let mut a = budget.admit(A).expect("a first connection is admitted");
        let mut out = Vec::new();
        let ending = checked_copy(&mut a_input.as_slice(), &mut out, &mut a).await;
        let expected = model(&a_input, &caps, 0, 0);
        check(&a_input, &out, &ending, a.held(), &expected, &caps);
        assert_eq!(budget.unfinished(), a.held());
        assert_eq!(budget.unfinished_of(A), a.held());

        if let Some(b_input) = b_input {
            let mut b = budget.admit(b_ip).expect("a second connection is admitted");
            let same_ip = if b_ip == A_MAPPED { a.held() } else { 0 };
            let mut out = Vec::new();
            let ending = checked_copy(&mut b_input.as_slice(), &mut out, &mut b).await;
            let expected = model(&b_input, &caps, a.held(), same_ip);
            check(&b_input, &out, &ending, b.held(), &expected, &caps);
            assert_eq!(budget.unfinished(), a.held() + b.held());
            if b_ip == A_MAPPED {
                assert_eq!(budget.ips(), 1);
                assert_eq!(budget.unfinished_of(A), a.held() + b.held());
            } else {
                assert_eq!(budget.ips(), 2);
                assert_eq!(budget.unfinished_of(B), b.held());
                assert_eq!(budget.unfinished_of(A), a.held());
            }
            assert!(budget.unfinished() <= caps.unfinished_bytes);
            drop(b);
        }
        assert!(budget.unfinished_of(A) <= caps.unfinished_bytes_per_ip);
        drop(a);
    });
    assert_eq!(
        budget.unfinished(),
        0,
        "bytes still charged with no connection"
    );
    assert_eq!(budget.ips(), 0, "an IP still listed with no connection");
}

fn check(input: &[u8], out: &[u8], ending: &Ending, held: u64, expected: &Expected, caps: &Caps) {
    assert!(
        input.starts_with(out),
        "what was passed on is not what came"
    );
    check_passed(out, caps);
    let got = Expected {
        end: end_of(ending),
        written: out.len(),
        held,
    };
    assert_eq!(&got, expected, "{ending:?}");
    // A message's frames so far, and a command cut short inside its body.
    assert!(held <= caps.message_bytes + caps.frame_bytes);
    assert!(held <= caps.unfinished_bytes_per_ip);
}
