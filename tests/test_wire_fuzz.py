"""Fuzzing a live server with random and mutated frames.

Every connection sends a few valid sealed frames and then one frame that must
be refused: a bit flip, a truncated payload, a replay, two frames swapped, a
corrupted length, garbage, or a random body sealed with the right key (then a
replay, in case the random body happened to be valid). The server must close
each such connection exactly once, count it, stay up, serve a good client and
keep its memory bounded.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leptond.wire.codec import MAX_FRAME, frame
from tests.wire_raw import RawPeer, ServerProc, counter, server_process

CONNECTIONS_PER_EXAMPLE = 16
EXAMPLES = 160
MIN_FRAMES = 10_000
MiB = 1024 * 1024
MUTATIONS = (
    "bit_flip",
    "truncate",
    "replay",
    "swap",
    "length_over_cap",
    "length_shrunk",
    "garbage",
    "random_plain",
    "random_msgpack",
)


@dataclass(frozen=True)
class Script:
    """What one connection sends; random parts are drawn by hypothesis."""

    hello: bool  # send the sealed hello first (else the fuzz hits the pre-auth path)
    valid: int  # valid requests before the bad frame
    mutation: str
    where: int  # a position (bit, byte, length) that the mutation scales to its range
    blob: bytes  # random bytes for garbage and random bodies
    body: dict[str, object]


scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "t": st.sampled_from(["q", "r", "s", "x", "n", "p", "o", "h", "zz"]) | scalars,
        "i": st.integers(0, 2**32) | scalars,
        "m": st.sampled_from(["echo", "stats", "nosuch"]) | scalars,
        "a": scalars | st.binary(max_size=64) | st.lists(scalars, max_size=4),
        "d": scalars,
        "e": scalars | st.fixed_dictionaries({"code": st.text(max_size=4)}),
    },
)
scripts = st.builds(
    Script,
    hello=st.booleans(),
    valid=st.integers(0, 8),
    mutation=st.sampled_from(MUTATIONS),
    where=st.integers(0, 2**31),
    blob=st.binary(min_size=0, max_size=300),
    body=bodies,
)


def bad_bytes(peer: RawPeer, script: Script, frames: list[bytes]) -> tuple[bytes, int]:
    """The bytes that end a connection, and how many frames they hold."""
    target = peer.seal({"t": "q", "i": 10_000, "m": "echo", "a": "target"})
    payload = target[4:]
    cap = MAX_FRAME if script.hello else 256
    match script.mutation:
        case "bit_flip":
            bit = script.where % (len(payload) * 8)
            flipped = bytearray(payload)
            flipped[bit // 8] ^= 1 << (bit % 8)
            return frame(bytes(flipped)), 1
        case "truncate":
            return frame(payload[: script.where % len(payload)]), 1
        case "replay":
            old = frames[script.where % len(frames)] if frames else target
            return target + old, 2
        case "swap":
            later = peer.seal({"t": "q", "i": 10_001, "m": "echo", "a": "later"})
            return later + target, 2
        case "length_over_cap":
            length = cap + 1 + script.where % (2**32 - cap - 1)
            return length.to_bytes(4, "big") + payload, 1
        case "length_shrunk":
            return (script.where % len(payload)).to_bytes(4, "big") + payload, 1
        case "garbage":
            return frame(script.blob + os.urandom(16)), 1
        case "random_plain":
            # Sealed with the right key, so only the body checks stand guard;
            # the replay behind it ends the connection if the body was fine.
            return peer.seal_plain(script.blob) + target + target, 3
        case "random_msgpack":
            plain = b"\x00" + msgpack.packb(script.body, use_bin_type=True)
            return peer.seal_plain(plain) + target + target, 3
    raise AssertionError(script.mutation)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("wire_fuzz")
    with server_process(tmp, "--handshake-timeout-s", "10", "--idle-timeout-s", "60") as srv:
        yield srv


def test_fuzzed_frames_are_refused_and_the_server_carries_on(server: ServerProc) -> None:
    sent: Counter[str] = Counter()
    good = RawPeer.connect(server.port)
    before = server.stats()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(scripts, min_size=CONNECTIONS_PER_EXAMPLE, max_size=CONNECTIONS_PER_EXAMPLE))
    def fuzz(batch: list[Script]) -> None:
        peers: list[tuple[RawPeer, Script]] = []
        try:
            for script in batch:
                peer = RawPeer.connect(server.port, hello=False)
                peers.append((peer, script))
                frames = [peer.seal({"t": "h"})] if script.hello else []
                frames += [
                    peer.seal({"t": "q", "i": k, "m": "echo", "a": k}) for k in range(script.valid)
                ]
                tail, n_bad = bad_bytes(peer, script, frames)
                peer.sock.sendall(b"".join(frames) + tail)
                sent["frames"] += len(frames) + n_bad
                sent["connections"] += 1
                sent[script.mutation] += 1
            for peer, script in peers:
                assert peer.closed_by_server(10.0), f"server kept a connection open: {script}"
        finally:
            for peer, _ in peers:
                peer.close()

    try:
        fuzz()
        print(dict(sent))
        assert sent["frames"] >= MIN_FRAMES, sent
        after = server.stats()
        # Exactly one rejection per connection: the first bad frame closes it.
        assert counter(after, "rejected") - counter(before, "rejected") == sent["connections"]
        assert server.alive()
        assert good.call("echo", "still here") == "still here"
        with RawPeer.connect(server.port) as fresh:
            assert fresh.call("echo", {"big": b"x" * 100_000}) == {"big": b"x" * 100_000}
        assert after["rss"] - before["rss"] < 100 * MiB
        assert after["server"]["connections"] <= 2
    finally:
        good.close()
