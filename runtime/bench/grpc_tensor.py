"""gRPC carrying tensors as raw bytes: the seeds' transport, as a baseline for the
transport benchmark (``runtime.bench.transport``).

No ``.proto`` and no generated code: one generic handler serves two methods on plain
bytes (grpcio passes bytes through untouched when a method has no (de)serializer).

* ``Stream`` (client streaming): the client sends ``count`` tensors, the server turns
  each request back into a tensor and answers with how many it took — a one-way
  throughput run ends when that answer arrives.
* ``Echo`` (unary): the server turns the request into a tensor and sends that tensor's
  bytes back — one ping-pong round trip.

Both ends pay what a user of this approach pays: ``tensor.numpy().tobytes()`` (a copy)
to send and ``torch.frombuffer`` (a view) to receive. The tensor's dtype and shape are
agreed out of band (``TensorSink.expect``), as raw ``torch.distributed`` sends agree
them, so only the payload bytes travel.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import torch

SERVICE = "mindmirror.bench.TensorPipe"
MAX_MESSAGE_BYTES = 64 * 2**20
"""Largest tensor either end accepts (gRPC's default limit is 4 MiB)."""
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def to_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes as they lie in memory (float32 stays float32, uint8 stays uint8)."""
    return tensor.numpy().tobytes()


def to_tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only view of ``data`` as a tensor (torch warns once that bytes are immutable)."""
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


class TensorSink:
    """The server's side: every request becomes a tensor of the expected dtype and shape."""

    def __init__(self) -> None:
        self._dtype: torch.dtype | None = None
        self._shape: tuple[int, ...] = ()

    def expect(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Set what the next requests hold; call before the client starts sending."""
        self._dtype, self._shape = dtype, tuple(shape)

    def _tensor(self, data: bytes) -> torch.Tensor:
        if self._dtype is None:
            raise RuntimeError("TensorSink got a request before expect(dtype, shape)")
        return to_tensor(data, self._dtype, self._shape)

    def stream(self, requests, context) -> bytes:
        taken = 0
        for request in requests:
            self._tensor(request)
            taken += 1
        return taken.to_bytes(8, "little")

    def echo(self, request: bytes, context) -> bytes:
        return to_bytes(self._tensor(request))


def serve(sink: TensorSink, host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    """Start a server for ``sink`` on a free port of ``host``; returns it and the port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-sink"),
                         options=_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.stream_unary_rpc_method_handler(sink.stream),
        "Echo": grpc.unary_unary_rpc_method_handler(sink.echo),
    }),))
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise RuntimeError(f"gRPC server: could not bind a port on {host}")
    server.start()
    return server, port


class TensorClient:
    """The client's side; every call waits at most ``timeout_s``."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(f"{host}:{port}", options=_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise RuntimeError(f"gRPC client: no server at {host}:{port} within {timeout_s} s") from None
        self._stream = self._channel.stream_unary(f"/{SERVICE}/Stream")
        self._echo = self._channel.unary_unary(f"/{SERVICE}/Echo")

    def stream(self, tensor: torch.Tensor, count: int) -> int:
        """Send ``tensor`` ``count`` times in one call; returns how many the server took."""
        answer = self._stream((to_bytes(tensor) for _ in range(count)), timeout=self._timeout_s)
        return int.from_bytes(answer, "little")

    def echo(self, tensor: torch.Tensor) -> torch.Tensor:
        """Send ``tensor`` and return the server's copy of it."""
        return to_tensor(self._echo(to_bytes(tensor), timeout=self._timeout_s), tensor.dtype, tuple(tensor.shape))

    def close(self) -> None:
        self._channel.close()
