"""Property-based fuzz of the wire decoder (issue 22, item 1): whatever the frames say, ``protocol.decode``
raises only ``ProtocolError`` (a counted rejection), never ``ValueError``/``OverflowError``/``MemoryError``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avloc.stream.wire import protocol

# The 162-byte message of the attack report: prod(shape) is 0, so the size check passed and reshape raised.
ATTACK_HEADER = json.dumps(
    {
        "v": 1,
        "kind": "heartbeat",
        "stream": "x",
        "seq": 0,
        "ts": {},
        "arrays": [{"name": "a", "dtype": "uint8", "shape": [0, 2147483647, 2147483647, 3]}],
        "meta": {},
    }
).encode()

dims = st.one_of(
    st.integers(0, 8),
    st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -1]),
    st.integers(-(2**70), 2**70),
)
dtypes = st.one_of(
    st.sampled_from(sorted(protocol.ALLOWED_DTYPES)),
    st.sampled_from(["object", "V8", "O", "<U4", "S3", "float128", "complex64", "", "int8,int8"]),
    st.text(max_size=12),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
descriptors = st.one_of(
    st.fixed_dictionaries(
        {"name": st.one_of(st.text(max_size=6), json_scalars), "dtype": dtypes, "shape": st.lists(dims, max_size=10)}
    ),
    json_scalars,
    st.lists(json_scalars, max_size=3),
)
headers = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), json_scalars),
        "kind": st.one_of(st.sampled_from(protocol.KINDS), json_scalars),
        "stream": st.one_of(st.text(max_size=140), json_scalars),
        "seq": st.one_of(st.integers(0, 2**70), json_scalars),
        "ts": st.one_of(st.dictionaries(st.text(max_size=4), json_scalars, max_size=3), json_scalars),
        "arrays": st.one_of(st.lists(descriptors, max_size=18), json_scalars),
        "meta": st.one_of(st.dictionaries(st.text(max_size=4), json_scalars, max_size=3), json_scalars),
    }
)
payloads = st.lists(st.binary(max_size=64), max_size=20)


def _decode_or_reject(frames: list[bytes]) -> None:
    try:
        msg = protocol.decode(frames, max_message_bytes=1 << 20)
    except protocol.ProtocolError as err:
        assert err.reason and isinstance(err.reason, str)
        return
    # accepted: every array is what its descriptor says, and its bytes are the payload's
    for array, payload in zip(msg.arrays.values(), frames[1:]):
        assert array.nbytes == len(payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, frames=payloads)
def test_decode_of_any_header_and_payloads_raises_only_protocol_error(header, frames):
    _decode_or_reject([json.dumps(header).encode(), *frames])


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(dims, max_size=9), dtype=dtypes, payload=st.binary(max_size=32), extra=st.integers(0, 3))
def test_decode_of_any_shape_and_dtype_raises_only_protocol_error(shape, dtype, payload, extra):
    header = {"v": 1, "kind": "frame", "stream": "s", "seq": 1, "ts": {}, "meta": {}}
    header["arrays"] = [{"name": "a", "dtype": dtype, "shape": shape}]
    # the payload sized for the shape where that is small, so the size check is not the only line of defence
    try:
        size = math.prod(shape) * np.dtype(dtype).itemsize
    except Exception:  # noqa: BLE001 - any dtype text hypothesis makes
        size = -1
    body = bytes(size) if 0 <= size <= 4096 else payload
    _decode_or_reject([json.dumps(header).encode(), body, *([b""] * extra)])


@settings(max_examples=200, deadline=None)
@given(raw=st.lists(st.binary(max_size=200), min_size=0, max_size=20))
def test_decode_of_random_bytes_raises_only_protocol_error(raw):
    _decode_or_reject(raw)


@pytest.mark.parametrize(
    "shape",
    [[0, 2147483647, 2147483647, 3], [0, 2**31 - 1, 2**31 - 1, 2**31 - 1, 2**31 - 1, 3], [2**31 - 1, 0, 2**31 - 1]],
)
def test_zero_size_axis_with_huge_others_is_a_counted_rejection(shape):
    header = json.loads(ATTACK_HEADER)
    header["arrays"][0]["shape"] = shape
    frames = [json.dumps(header).encode(), b""]
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode(frames)
    assert err.value.reason == "bad_shape"


def test_the_attack_message_is_162_bytes_and_rejected():
    assert len(ATTACK_HEADER) == 162
    with pytest.raises(protocol.ProtocolError):
        protocol.decode([ATTACK_HEADER, b""])
