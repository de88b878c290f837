"""A response stream may carry messages serialized once ahead for many calls (a round's aggregate): the server's
serializer sends those bytes as they are and serializes every other message as before."""

import pytest

from protocols.wire import lowband_pb2 as pb
from protocols.wire.servicing import serialized_as_is


def test_bytes_go_as_they_are_and_messages_are_serialized() -> None:
    serialize = serialized_as_is(pb.AggregateChunk.SerializeToString)
    message = pb.AggregateChunk(chunk=pb.TensorChunk(entry="w", data=b"\x01\x02"))
    ahead = message.SerializeToString()
    assert serialize(ahead) is ahead  # not copied
    assert serialize(message) == ahead
    assert pb.AggregateChunk.FromString(serialize(ahead)) == message


def test_a_stream_without_a_serializer_is_refused() -> None:
    with pytest.raises(ValueError, match="without a serializer"):
        serialized_as_is(None)
