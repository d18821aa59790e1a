"""Probing a Kafka broker over the wire: does it serve clients, how many brokers it knows.

Two raw Kafka requests (ApiVersions v0 and Metadata v4) on a plain socket, so the
readiness checks need no Kafka client library.
"""

from __future__ import annotations

import socket
import struct

from corpusfactory.engines.broker.processes import HOST


def answers_kafka(port: int, timeout: float = 2.0) -> bool:
    """True when a Kafka ApiVersions request on the port gets a well-formed answer.

    A bound port alone proves little: KRaft brokers accept connections before they
    serve requests. The broker only processes requests once it is unfenced, i.e.
    ready for clients, so any answer means ready. ApiVersions v0 is the one request
    every Kafka version understands.
    """
    payload = _kafka_request(port, api_key=18, version=0, body=b"", timeout=timeout)
    return payload is not None and payload[:2] == b"\x00\x00"  # error code 0


def brokers_known(port: int, timeout: float = 2.0) -> int:
    """How many live brokers the broker on the port knows of (0 if it does not answer).

    A Metadata v4 request for no topics: the answer starts with the throttle time,
    then the array of the brokers in the node's metadata (unfenced ones only).
    """
    body = struct.pack(">ib", 0, 0)  # topics: empty array; allow_auto_topic_creation: false
    payload = _kafka_request(port, api_key=3, version=4, body=body, timeout=timeout)
    if payload is None or len(payload) < 8:
        return 0
    (count,) = struct.unpack(">i", payload[4:8])
    return max(0, count)


def _kafka_request(
    port: int, api_key: int, version: int, body: bytes, timeout: float
) -> bytes | None:
    """Send one request (header v1) and return the response after its correlation id,
    or None when no well-formed answer comes."""
    correlation_id = 0x5EED
    client_id = b"corpusfactory-probe"
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    request = header + body
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if not 6 <= size <= 16 * 1_048_576:
                return None  # not Kafka speaking
            payload = _recv_exact(sock, size)
    except (OSError, struct.error):
        return None
    (got_id,) = struct.unpack(">i", payload[:4])
    return payload[4:] if got_id == correlation_id else None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks.extend(chunk)
    return bytes(chunks)
