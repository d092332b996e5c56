#!/usr/bin/env python3
"""vLLM's KV-cache event structs, defined with msgspec exactly as vLLM defines them, for wire
tests of Switchyard's kv-events crate (kv-events/tests/msgspec_wire.rs, sim/tests/kv_events_wire.rs).

The definitions mirror vllm/distributed/kv_events.py: `KVEventBatch` (ts, events,
data_parallel_rank), `BlockStored`, `BlockRemoved`, `AllBlocksCleared`, `tag=True` (the tag is
the class name), `omit_defaults=True`, fields in vLLM's order. Two encodings:

  array  vLLM up to 0.23: every struct `array_like=True` (positional arrays).
  map    vLLM 0.24 and later (vLLM PR #42892): the events drop `array_like` (maps, the tag
         under "type"); the batch stays positional (what vLLM 0.26 sends).

Commands (all output on stdout):

  write DIR                 writes the fixture batches (DIR/{array,map}[-canonical].msgpack)
                            and DIR/expected.json, their meaning in a neutral JSON form
  decode ENCODING FILE...   decodes payloads with the structs of ENCODING; prints the neutral
                            JSON form of each (a list)

With pyzmq (libzmq, what vLLM publishes with), for the transport's interoperability test
(kv-events/tests/libzmq_interop.rs):

  zmq-sub ENDPOINT ENCODING COUNT
                            SUB connects to ENDPOINT (filter "kv@"), takes COUNT messages
                            (10 s at most); prints [{"topic", "seq", "batch"}] (neutral form)
  zmq-replay ENDPOINT ENCODING START
                            asks a replay ROUTER for START.. on a DEALER (vLLM's example
                            subscriber uses REQ, which libzmq lets take only the first of
                            the replies); prints [{"seq", "batch"}] up to the end marker
  zmq-pub ENCODING          vLLM's ZmqEventPublisher in miniature: PUB and replay ROUTER bound
                            on 127.0.0.1; prints {"endpoint", "replay_endpoint"}, then reads
                            commands on stdin: "warm [N]" (one message, batch N, 0 by default,
                            on topic kv@warm-up@m),
                            "pub SEQ" (publish batch SEQ on kv@py@m and keep it), "keep SEQ"
                            (keep it for replay only: a message the subscriber missed)

The neutral form: {"ts_bits": <IEEE bits of ts>, "data_parallel_rank": int|null, "events": [...]}
with block hashes folded to unsigned 64 bits as llm-d folds them (an int modulo 2^64; bytes:
the last 8, big-endian) and the medium upper-cased, "GPU" when absent.
"""

import json
import os
import struct
import sys
from typing import Any

import msgspec

ExternalBlockHash = bytes | int


def structs(array_like: bool, batch_array_like: bool = True) -> dict[str, type]:
    """vLLM's structs, with or without array_like on the events."""

    class EventBatch(
        msgspec.Struct, array_like=batch_array_like, omit_defaults=True, gc=False
    ):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class KVCacheEvent(
        msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True
    ):
        """Base class for all KV cache-related events"""

    class BlockStored(KVCacheEvent):
        block_hashes: list[ExternalBlockHash]
        parent_block_hash: ExternalBlockHash | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[ExternalBlockHash]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]

    return {
        "KVEventBatch": KVEventBatch,
        "BlockStored": BlockStored,
        "BlockRemoved": BlockRemoved,
        "AllBlocksCleared": AllBlocksCleared,
    }


ENCODINGS = {"array": structs(array_like=True), "map": structs(array_like=False)}

DIGEST = bytes(range(32))  # a SHA-256-sized digest: folds to 0x18191a1b1c1d1e1f
PARENT_DIGEST = bytes(range(100, 132))


def fixtures(s: dict[str, type]) -> dict[str, Any]:
    """Two batches: `rich` exercises every form vLLM can send; `canonical` holds only what
    Switchyard's encoder writes (ints, upper-case media, of the newer fields only the KV-cache
    group), so its bytes can be
    compared with the Rust encoder's."""
    stored, removed, cleared = s["BlockStored"], s["BlockRemoved"], s["AllBlocksCleared"]
    rich = s["KVEventBatch"](
        ts=1789095808.8378847,
        events=[
            stored(
                block_hashes=[15760518052499183552, 42],
                parent_block_hash=None,
                token_ids=list(range(151640, 151672)),
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[None, None],
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            ),
            stored(
                block_hashes=[7],
                parent_block_hash=42,
                token_ids=list(range(16)),
                block_size=16,
                lora_id=3,
                medium="CPU",
                lora_name="sql-lora",
                extra_keys=[("sql-lora", "salt")],
            ),
            # CPU offloading: digests as bytes, no tokens, a lower-case medium.
            stored(
                block_hashes=[DIGEST],
                parent_block_hash=PARENT_DIGEST,
                token_ids=[],
                block_size=16,
                lora_id=None,
                medium="cpu",
                lora_name=None,
            ),
            # Python's builtin hash() of older releases can be negative; no medium = GPU.
            removed(block_hashes=[42, -5], medium=None),
            removed(block_hashes=[7], medium="GPU", group_idx=0),
            cleared(),
        ],
        data_parallel_rank=0,
    )
    canonical = s["KVEventBatch"](
        ts=0.25,
        events=[
            stored(
                block_hashes=[1, 2**64 - 1],
                parent_block_hash=None,
                token_ids=[0, 1, 2**32 - 1, 70000],
                block_size=2,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            ),
            stored(
                block_hashes=[3],
                parent_block_hash=2**64 - 1,
                token_ids=[5, 6],
                block_size=2,
                lora_id=12,
                medium="CPU",
                lora_name="adapter-a",
            ),
            removed(block_hashes=[1, 3], medium="GPU"),
            # A hybrid model's sliding-window group (vLLM's group_idx).
            removed(block_hashes=[3], medium="GPU", group_idx=1),
            cleared(),
        ],
        data_parallel_rank=1,
    )
    return {"rich": rich, "canonical": canonical}


def fold(h: ExternalBlockHash | None) -> int | None:
    if h is None:
        return None
    if isinstance(h, bytes):
        return int.from_bytes(h[-8:].rjust(8, b"\0"), "big")
    return h % 2**64


def neutral(batch: Any) -> dict[str, Any]:
    events = []
    for e in batch.events:
        kind = type(e).__name__
        if kind == "BlockStored":
            events.append(
                {
                    "type": kind,
                    "block_hashes": [fold(h) for h in e.block_hashes],
                    "parent_block_hash": fold(e.parent_block_hash),
                    "token_ids": e.token_ids,
                    "block_size": e.block_size,
                    "lora_id": e.lora_id,
                    "lora_name": e.lora_name,
                    "medium": (e.medium or "GPU").upper(),
                    "group_idx": e.group_idx,
                    "kv_cache_spec_kind": e.kv_cache_spec_kind if e.group_idx is not None else None,
                }
            )
        elif kind == "BlockRemoved":
            events.append(
                {
                    "type": kind,
                    "block_hashes": [fold(h) for h in e.block_hashes],
                    "medium": (e.medium or "GPU").upper(),
                    "group_idx": e.group_idx,
                }
            )
        else:
            events.append({"type": kind})
    return {
        "ts_bits": struct.unpack(">Q", struct.pack(">d", batch.ts))[0],
        "data_parallel_rank": batch.data_parallel_rank,
        "events": events,
    }


def write(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    encoder = msgspec.msgpack.Encoder()
    expected = {}
    for encoding, s in ENCODINGS.items():
        for name, batch in fixtures(s).items():
            suffix = "" if name == "rich" else "-canonical"
            with open(os.path.join(out_dir, f"{encoding}{suffix}.msgpack"), "wb") as f:
                f.write(encoder.encode(batch))
            expected[name] = neutral(batch)  # the same meaning in both encodings
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(json.dumps(sorted(os.listdir(out_dir))))


def decode(encoding: str, files: list[str]) -> None:
    decoder = msgspec.msgpack.Decoder(ENCODINGS[encoding]["KVEventBatch"])
    out = []
    for path in files:
        with open(path, "rb") as f:
            out.append(neutral(decoder.decode(f.read())))
    print(json.dumps(out))


def batch_n(s: dict[str, type], n: int) -> Any:
    """The batch the interoperability tests send as number n."""
    return s["KVEventBatch"](
        ts=float(n),
        events=[s["BlockRemoved"](block_hashes=[n], medium="GPU")],
        data_parallel_rank=0,
    )


def zmq_sub(endpoint: str, encoding: str, count: int) -> None:
    import zmq

    decoder = msgspec.msgpack.Decoder(ENCODINGS[encoding]["KVEventBatch"])
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    out = []
    while len(out) < count:
        topic, seq, payload = sock.recv_multipart()
        out.append(
            {
                "topic": topic.decode(),
                "seq": int.from_bytes(seq, "big"),
                "batch": neutral(decoder.decode(payload)),
            }
        )
    sock.close(linger=0)
    print(json.dumps(out))


def zmq_replay(endpoint: str, encoding: str, start: int) -> None:
    import zmq

    decoder = msgspec.msgpack.Decoder(ENCODINGS[encoding]["KVEventBatch"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    sock.send_multipart((b"", start.to_bytes(8, "big")))
    out = []
    while True:
        _, seq, payload = sock.recv_multipart()
        if int.from_bytes(seq, "big", signed=True) == -1:
            break
        out.append({"seq": int.from_bytes(seq, "big"), "batch": neutral(decoder.decode(payload))})
    sock.close(linger=0)
    print(json.dumps(out))


def zmq_pub(encoding: str) -> None:
    import threading

    import zmq

    s = ENCODINGS[encoding]
    encoder = msgspec.msgpack.Encoder()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    kept: dict[int, bytes] = {}
    lock = threading.Lock()

    def serve_replays() -> None:
        # What vLLM's _service_replay does.
        while True:
            frames = router.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            with lock:
                items = sorted(kept.items())
            for seq, payload in items:
                if seq >= start_seq:
                    router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            router.send_multipart((client, b"", (-1).to_bytes(8, "big", signed=True), b""))

    threading.Thread(target=serve_replays, daemon=True).start()
    print(
        json.dumps(
            {
                "endpoint": pub.getsockopt_string(zmq.LAST_ENDPOINT),
                "replay_endpoint": router.getsockopt_string(zmq.LAST_ENDPOINT),
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["warm"] and len(words) <= 2:
            n = int(words[1]) if len(words) == 2 else 0
            pub.send_multipart((b"kv@warm-up@m", (0).to_bytes(8, "big"), encoder.encode(batch_n(s, n))))
        elif len(words) == 2 and words[0] in ("pub", "keep"):
            seq = int(words[1])
            payload = encoder.encode(batch_n(s, seq))
            with lock:
                kept[seq] = payload
            if words[0] == "pub":
                pub.send_multipart((b"kv@py@m", seq.to_bytes(8, "big"), payload))
        print("ok", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "write":
        write(argv[1])
        return 0
    if len(argv) >= 3 and argv[0] == "decode" and argv[1] in ENCODINGS:
        decode(argv[1], argv[2:])
        return 0
    if len(argv) == 4 and argv[0] == "zmq-sub" and argv[2] in ENCODINGS:
        zmq_sub(argv[1], argv[2], int(argv[3]))
        return 0
    if len(argv) == 4 and argv[0] == "zmq-replay" and argv[2] in ENCODINGS:
        zmq_replay(argv[1], argv[2], int(argv[3]))
        return 0
    if len(argv) == 2 and argv[0] == "zmq-pub" and argv[1] in ENCODINGS:
        zmq_pub(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
