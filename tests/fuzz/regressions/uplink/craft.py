#!/usr/bin/env python3
"""Writes the uplink target's hand-made reproducers (see README.md here).

An input of the uplink target is: one byte (messages - 1, mod 4), then per message:
who (agent index: a0..a4 = 0..4, late = 5), kind (0 out, 3 hello, 4 hb, 6 status),
a u16 length (little-endian), that many bytes, then mode, sign and damage bytes.
Mode 0xF0 takes the bytes as the payload as they are (raw); sign 0 signs with the
agent's own key; damage 0 leaves it whole. The payloads below are wire version 2:
a version byte, then postcard (varints; i64 zigzag; strings as length + bytes).
"""
import os
import struct
import sys

OUT, HELLO, HB = 0, 3, 4
LATE = 5
I64_MIN = -(1 << 63)


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def zigzag(n):
    return varint((n << 1) ^ (n >> 63))


def string(s):
    b = s.encode()
    return varint(len(b)) + b


def message(who, kind, payload):
    return bytes([who, kind]) + struct.pack("<H", len(payload)) + payload + bytes([0xF0, 0, 0])


def hello(agent, heartbeat_interval_ms=30_000):
    return (
        bytes([2])
        + varint(0)  # Envelope::Hello
        + string(agent)
        + string("0.1.0")  # version
        + string("x86_64")  # arch
        + varint(0)  # modules
        + varint(0)  # tags
        + bytes([0])  # location: None
        + varint(0)  # schedule_version
        + varint(7)  # outbox_epoch
        + varint(0)  # outbox_depth
        + varint(0)  # dropped
        + varint(heartbeat_interval_ms)
        + zigzag(0)  # sent_at_ms
        + varint(0)  # features
        + varint(0) + varint(0) + struct.pack("<d", 0.0)  # limits
    )


def state_batch(request_id, at_ms, state=1):
    """One state record (RequestState::Dispatched by default) at `at_ms`."""
    return (
        bytes([2])
        + varint(2)  # Envelope::Batch
        + varint(1)  # epoch
        + varint(1)  # one record
        + varint(1)  # seq
        + zigzag(at_ms)
        + varint(0)  # RecordBody::State
        + string(request_id)
        + varint(state)
        + bytes([0])  # detail: None
    )


def inputs():
    # An agent's state record far in the past, then its hello: the hello's redelivery
    # computes `now - updated_ms` (service.rs, Backend::redeliver).
    yield "redeliver-stale-overflow", bytes([1]) + message(
        LATE, OUT, state_batch("r-late-1-0", I64_MIN)
    ) + message(LATE, HELLO, hello("late"))
    # A hello whose heartbeat interval is i64::MAX from a0, which runs a recurring
    # measurement the hello does not have (schedule version 0): its schedules are sent
    # at once, through `AgentEntry::alive` (registry.rs): `MISSED_HEARTBEATS * interval`.
    yield "alive-interval-overflow", bytes([0]) + message(
        0, HELLO, hello("a0", heartbeat_interval_ms=(1 << 63) - 1)
    )


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, data in inputs():
        with open(os.path.join(here, name), "wb") as f:
            f.write(data)
        print(name, len(data), "bytes", file=sys.stderr)
