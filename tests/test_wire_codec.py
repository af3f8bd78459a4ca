"""The pure parts of the wire protocol: frames, bodies, sealing, handshake."""

from __future__ import annotations

import os

import lz4.block
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leptond.wire import handshake as hs
from leptond.wire.codec import (
    COMPRESS_MIN,
    FLAG_BATCH,
    FLAG_LZ4,
    MAX_FRAME,
    BatchBuilder,
    FrameReader,
    Opener,
    PlainCodec,
    Sealer,
    decode_body,
    decode_messages,
    encode_body,
    frame,
)
from leptond.wire.errors import ProtocolError

KEY = bytes(range(32))


# -- FrameReader ------------------------------------------------------------
def test_frames_split_at_every_byte_boundary() -> None:
    payloads = [b"", b"a", b"hello world", os.urandom(300), b"\x00" * 5]
    stream = b"".join(frame(p) for p in payloads)
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == payloads, cut
        assert reader.buffered == 0


def test_frames_one_byte_at_a_time() -> None:
    payloads = [os.urandom(n) for n in (0, 1, 7, 70)]
    reader = FrameReader()
    got: list[bytes] = []
    for b in b"".join(frame(p) for p in payloads):
        got += reader.feed(bytes([b]))
    assert got == payloads


@pytest.mark.parametrize("chunk", [1000, 65536, 100_003, 262_144])
def test_big_frames_arrive_in_chunks(chunk: int) -> None:
    payloads = [os.urandom(3 * 1024 * 1024), b"tail", os.urandom(70_000), os.urandom(10)]
    stream = b"".join(frame(p) for p in payloads)
    reader = FrameReader()
    got: list[bytes] = []
    for i in range(0, len(stream), chunk):
        got += reader.feed(stream[i : i + chunk])
    assert got == payloads
    assert reader.buffered == 0


@given(st.lists(st.binary(max_size=200_000), max_size=6), st.data())
@settings(max_examples=60, deadline=None)
def test_frames_survive_any_split(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = FrameReader()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[prev:cut])
        prev = cut
    assert got == payloads


def test_length_over_the_cap_is_refused_before_the_body_arrives() -> None:
    reader = FrameReader(max_frame=100)
    assert reader.feed(frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(ProtocolError) as err:
        reader.feed((101).to_bytes(4, "big"))
    assert err.value.reason == "frame_too_large"
    with pytest.raises(ProtocolError):
        FrameReader().feed((MAX_FRAME + 1).to_bytes(4, "big"))


def test_the_cap_can_change_between_frames_of_one_read() -> None:
    # A small frame (a hello) and a big one right behind it in the same read:
    # the big one must be judged against the cap in force after the first.
    reader = FrameReader(max_frame=256)
    reader.append(frame(b"hello") + frame(b"x" * 10_000))
    assert reader.next() == b"hello"
    reader.max_frame = MAX_FRAME
    assert reader.next() == b"x" * 10_000
    assert reader.next() is None


def test_partial_frame_is_reported_as_buffered() -> None:
    reader = FrameReader()
    assert reader.feed(frame(b"abcdef")[:7]) == []
    assert reader.buffered == 7


# -- bodies -----------------------------------------------------------------
def test_small_bodies_are_not_compressed() -> None:
    msg = {"t": "q", "i": 1, "a": "a" * (COMPRESS_MIN - 100)}
    plain = encode_body(msg)
    assert plain[0] == 0
    assert decode_body(plain) == msg


def test_compressible_bodies_are_compressed() -> None:
    msg = {"t": "q", "i": 1, "a": b"\x00" * 100_000}
    plain = encode_body(msg)
    assert plain[0] == FLAG_LZ4
    assert len(plain) < 2000
    assert decode_body(plain) == msg


@pytest.mark.parametrize("size", [2000, 20_000, 1024 * 1024])
def test_incompressible_bodies_are_sent_as_they_are(size: int) -> None:
    msg = {"t": "q", "i": 1, "a": os.urandom(size)}
    plain = encode_body(msg)
    assert plain[0] == 0
    assert decode_body(plain) == msg


def test_compression_can_be_switched_off() -> None:
    msg = {"t": "q", "a": b"\x00" * 100_000}
    assert encode_body(msg, compress=False)[0] == 0


@given(
    st.dictionaries(
        st.text(max_size=5),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
            ),
            max_leaves=20,
        ),
        max_size=6,
    )
)
@settings(max_examples=80, deadline=None)
def test_bodies_round_trip(msg: dict[str, object]) -> None:
    msg = {**msg, "t": "q"}
    assert decode_body(encode_body(msg)) == msg


def test_lz4_bomb_is_refused_before_decompressing() -> None:
    bomb = b"\x01" + (2**31).to_bytes(4, "little") + b"\x00" * 16
    with pytest.raises(ProtocolError) as err:
        decode_body(bomb)
    assert err.value.reason == "lz4_bomb"


def test_lz4_that_lies_about_its_size_is_refused() -> None:
    packed = lz4.block.compress(msgpack.packb({"t": "p", "x": "y" * 5000}), store_size=True)
    lying = b"\x01" + (len(packed) * 50).to_bytes(4, "little") + packed[4:]
    with pytest.raises(ProtocolError) as err:
        decode_body(lying)
    assert err.value.reason == "bad_lz4"


@pytest.mark.parametrize(
    ("plain", "reason"),
    [
        (b"", "empty_body"),
        (b"\x02" + msgpack.packb({"t": "p"}), "bad_flags"),
        (b"\x00\xc1", "bad_msgpack"),
        (b"\x00" + msgpack.packb({"t": "p"}) + b"\x00", "bad_msgpack"),
        (b"\x00" + msgpack.packb([1]), "not_a_map"),
        (b"\x00" + msgpack.packb({"i": 1}), "no_type"),
        (b"\x01\x00", "bad_lz4"),
    ],
)
def test_defective_bodies_are_protocol_errors(plain: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_body(plain)
    assert err.value.reason == reason


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bodies_decode_or_raise_protocol_error(plain: bytes) -> None:
    try:
        msg = decode_body(plain)
    except ProtocolError:
        return
    assert isinstance(msg, dict) and "t" in msg


# -- batches ------------------------------------------------------------------
small_msgs = st.lists(
    st.dictionaries(
        st.sampled_from(["i", "m", "a", "r"]),
        st.none()
        | st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=30)
        | st.binary(max_size=30),
        max_size=4,
    ).map(lambda m: {**m, "t": "r"}),
    min_size=1,
    max_size=40,
)


@given(small_msgs)
@settings(max_examples=80, deadline=None)
def test_a_batch_gives_back_its_messages_in_order(msgs: list[dict[str, object]]) -> None:
    batch = BatchBuilder()
    for msg in msgs:
        batch.add(encode_body(msg))
    assert batch.count == len(msgs)
    plain = batch.take()
    assert decode_messages(plain) == msgs
    # A lone message goes as a plain body, not as a batch of one.
    assert (plain[0] == FLAG_BATCH) == (len(msgs) > 1)
    assert batch.count == 0 and len(batch) == 1  # ready for the next frame


def test_a_plain_body_is_one_message() -> None:
    assert decode_messages(encode_body({"t": "p"})) == [{"t": "p"}]


def entry(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


PING = b"\x00" + msgpack.packb({"t": "p"})


@pytest.mark.parametrize(
    ("plain", "reason"),
    [
        (b"\x02", "bad_batch"),  # no entries
        (b"\x02\x00\x00", "bad_batch"),  # length cut short
        (b"\x02" + entry(PING)[:-1], "bad_batch"),  # entry longer than the frame
        (b"\x02" + entry(PING) + b"\x00\x00\x00\x00", "bad_batch"),  # empty entry
        (b"\x02" + entry(encode_body({"t": "p", "x": "y" * 5000})), "bad_batch"),  # lz4 inside
        (b"\x02" + entry(b"\x02" + entry(PING)), "bad_batch"),  # a batch inside
        (b"\x02" + entry(PING) + entry(b"\x00\xc1"), "bad_msgpack"),
        (b"\x02" + entry(b"\x00" + msgpack.packb([1])), "not_a_map"),
    ],
)
def test_defective_batches_are_protocol_errors(plain: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_messages(plain)
    assert err.value.reason == reason


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_batches_decode_or_raise_protocol_error(tail: bytes) -> None:
    try:
        msgs = decode_messages(b"\x02" + tail)
    except ProtocolError:
        return
    assert msgs and all(isinstance(m, dict) and "t" in m for m in msgs)


# -- sealing ----------------------------------------------------------------
def test_sealed_frames_open_in_order() -> None:
    sealer, opener = Sealer(KEY), Opener(KEY)
    for k in range(5):
        assert opener.open(sealer.seal(b"msg %d" % k)) == b"msg %d" % k


@pytest.mark.parametrize("size", [10, 5000, 200_000])
def test_seal_frame_equals_frame_of_seal(size: int) -> None:
    plain = os.urandom(size)
    a, b = Sealer(KEY), Sealer(KEY)
    assert bytes(a.seal_frame(plain)) == frame(b.seal(plain))
    assert PlainCodec().seal_frame(plain) == frame(plain)


def test_replay_is_refused() -> None:
    sealer, opener = Sealer(KEY), Opener(KEY)
    first = sealer.seal(b"one")
    assert opener.open(first) == b"one"
    with pytest.raises(ProtocolError) as err:
        opener.open(first)
    assert err.value.reason == "bad_seal"


def test_reordering_is_refused() -> None:
    sealer, opener = Sealer(KEY), Opener(KEY)
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    with pytest.raises(ProtocolError):
        opener.open(second)
    # A refused frame does not advance the counter: the right one still opens.
    assert opener.open(first) == b"one"


def test_every_single_bit_flip_is_refused() -> None:
    sealed = Sealer(KEY).seal(b"pay me 100")
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            Opener(KEY).open(bytes(tampered))


def test_truncated_and_wrong_key_frames_are_refused() -> None:
    sealed = Sealer(KEY).seal(b"hello")
    for bad in (sealed[:-1], sealed[:5], b"", sealed + b"\x00"):
        with pytest.raises(ProtocolError):
            Opener(KEY).open(bad)
    with pytest.raises(ProtocolError):
        Opener(bytes(32)).open(sealed)


def test_the_two_directions_use_separate_counters() -> None:
    a_send, b_recv = Sealer(KEY), Opener(KEY)
    b_send, a_recv = Sealer(bytes(32)), Opener(bytes(32))
    assert b_recv.open(a_send.seal(b"1")) == b"1"
    assert a_recv.open(b_send.seal(b"2")) == b"2"
    assert b_recv.open(a_send.seal(b"3")) == b"3"


# -- handshake --------------------------------------------------------------
def _handshake(client_psk: bytes, server_psk: bytes) -> tuple[hs.Keys, hs.Keys]:
    client, server = hs.HandshakeState(), hs.HandshakeState()
    key_id, c_nonce, c_pub = hs.parse_client_hello(hs.client_hello(client, "cluster"))
    assert key_id == "cluster"
    status, s_nonce, s_pub = hs.parse_server_hello(hs.server_hello(server))
    assert status == hs.STATUS_OK
    server_keys = hs.derive_keys(server, c_pub, c_nonce, server_psk, is_client=False)
    client_keys = hs.derive_keys(client, s_pub, s_nonce, client_psk, is_client=True)
    return client_keys, server_keys


def test_both_sides_derive_the_same_keys() -> None:
    client, server = _handshake(KEY, KEY)
    assert client.send == server.recv
    assert client.recv == server.send
    assert client.send != client.recv
    assert Opener(server.recv).open(Sealer(client.send).seal(b"hi")) == b"hi"


def test_different_psks_give_different_keys() -> None:
    client, server = _handshake(KEY, bytes(32))
    assert client.send != server.recv
    with pytest.raises(ProtocolError):
        Opener(server.recv).open(Sealer(client.send).seal(b"hi"))


def test_every_connection_gets_fresh_keys() -> None:
    first, _ = _handshake(KEY, KEY)
    second, _ = _handshake(KEY, KEY)
    assert first.send != second.send


@pytest.mark.parametrize(
    "hello",
    [
        b"",
        b"LPT1",
        b"XXXX\x07cluster" + bytes(48),
        b"LPT1\x00" + bytes(48),
        b"LPT1\x07cluster" + bytes(47),
        b"LPT1\x02\xff\xfe" + bytes(48),
    ],
)
def test_malformed_client_hellos_are_protocol_errors(hello: bytes) -> None:
    with pytest.raises(ProtocolError):
        hs.parse_client_hello(hello)


def test_invalid_public_key_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        hs.derive_keys(hs.HandshakeState(), bytes(32), bytes(16), KEY, is_client=False)
