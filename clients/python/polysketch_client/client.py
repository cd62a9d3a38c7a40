"""PolysketchClient: a typed wrapper over the generated polysketch.v1 gRPC stubs.

Results are plain dataclasses so callers never touch protobuf messages. RPC failures raise
PolysketchError carrying the gRPC status code name ("INVALID_ARGUMENT", ...) and message.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import grpc

try:
    from ._proto import generation_pb2 as pb
    from ._proto import generation_pb2_grpc as pb_grpc
except ImportError as error:  # pragma: no cover - only without generated stubs
    raise ImportError(
        "polysketch_client: generated stubs missing; build the CMake target "
        "polysketch_client_py or run clients/python/gen_stubs.sh"
    ) from error

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
# The metadata header of session calls: a proxy hashes it to keep a session on one replica.
SESSION_HEADER = "x-polysketch-session"
SERVICE_NAME = "polysketch.v1.GenerationService"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


class PolysketchError(Exception):
    """A failed RPC: `code` is the gRPC status code name, `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclasses.dataclass(frozen=True)
class Timings:
    queue_seconds: float
    prefill_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclasses.dataclass(frozen=True)
class FinalInfo:
    finish_reason: str  # "LENGTH", "STOP_STRING", "STOP_TOKEN", "CANCELLED", "DEADLINE", "ERROR"
    prompt_tokens: int
    generated_tokens: int
    seed: int
    timings: Timings
    error_message: str
    cached_tokens: int = 0  # tokens not prefilled: from the prefix cache or the session


@dataclasses.dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    logprob: float
    top_logprobs: List[tuple]  # [(token_id, logprob)], most likely first


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    request_id: str
    text: str
    tokens: List[GeneratedToken]
    final: FinalInfo
    # With prompt_logprobs=True: entry i is prompt token i + 1, its log-probability given the
    # prompt tokens before it, and its prompt_top_logprobs alternatives; empty when not asked.
    prompt_logprobs: List[GeneratedToken] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    request_id: str
    text: str  # new text since the previous chunk (may be empty)
    tokens: List[GeneratedToken]
    final: Optional[FinalInfo]  # set on the last chunk only
    # The next entries of the prompt's log-probabilities (GenerateResult.prompt_logprobs), one
    # prefill chunk's worth per message, all before the first generated token; empty otherwise.
    prompt_logprobs: List[GeneratedToken] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_context: int
    max_prompt_tokens: int
    max_new_tokens: int
    state_slots: int
    max_waiting: int
    max_waiting_tokens: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    attention_kinds: List[str]
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    state_bytes_per_request: int
    device: str
    tokenizer: str
    limits: Limits


def _final(message: "pb.FinalInfo") -> FinalInfo:
    t = message.timings
    return FinalInfo(
        finish_reason=pb.FinishReason.Name(message.finish_reason).replace("FINISH_REASON_", ""),
        prompt_tokens=message.prompt_tokens,
        generated_tokens=message.generated_tokens,
        seed=message.seed,
        timings=Timings(
            t.queue_seconds, t.prefill_seconds, t.first_token_seconds, t.total_seconds
        ),
        error_message=message.error_message,
        cached_tokens=message.cached_tokens,
    )


def _tokens(messages: Sequence["pb.GeneratedToken"]) -> List[GeneratedToken]:
    return [
        GeneratedToken(
            token_id=m.token_id,
            logprob=m.logprob,
            top_logprobs=[(alt.token_id, alt.logprob) for alt in m.top_logprobs],
        )
        for m in messages
    ]


def _encode_health_request(service: str) -> bytes:
    # grpc.health.v1.HealthCheckRequest is `string service = 1`; Debian ships no health stubs.
    data = service.encode("utf-8")
    length = bytearray()
    n = len(data)
    while True:
        byte = n & 0x7F
        n >>= 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return (b"\x0a" + bytes(length) + data) if data else b""


def _decode_health_response(data: bytes) -> str:
    # grpc.health.v1.HealthCheckResponse is `ServingStatus status = 1`: tag 0x08 then a varint.
    status = 0
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        value = shift = 0
        while i < len(data):
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if tag == 0x08:
            status = value
        elif tag & 0x07 == 2:  # length-delimited field we do not know: skip it
            i += value
        elif tag & 0x07 != 0:
            raise PolysketchError("INTERNAL", "malformed health response")
    return _HEALTH_STATUS.get(status, f"INVALID({status})")


# An exported state is one message of the state's size (megabytes): no client-side limit.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclasses.dataclass(frozen=True)
class ExportedState:
    state: bytes  # the server's state format (docs/sessions.md)
    tokens: int  # tokens of the conversation it holds


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _token_from_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.strip()
    raise ValueError(f"token_file {path} holds no token")


class PolysketchClient:
    """A connection to one polysketch server. Thread-safe (gRPC channels are).

    `timeout` (seconds) is the gRPC deadline of every call unless a call gives its own.

    Security (docs/security.md): `tls=True` connects with TLS trusting the system's CAs;
    `tls_ca` (a PEM file) trusts that CA instead and implies TLS; `tls_cert` + `tls_key` (PEM
    files) present a client certificate for mutual TLS; `server_name` is checked against the
    server's certificate instead of the target's host. `token` (or `token_file`, whose first
    non-blank line is the token) is sent with every call as `authorization: Bearer <token>`.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        timeout: Optional[float] = None,
        *,
        tls: bool = False,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        server_name: Optional[str] = None,
        token: Optional[str] = None,
        token_file: Optional[str] = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        if token and token_file:
            raise ValueError("give token or token_file, not both")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        if token_file:
            token = _token_from_file(token_file)
        # Sent per call, not as gRPC call credentials: those are refused on plaintext channels,
        # and a token over local plaintext is a legitimate (documented) use.
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.strip()}"),) if token else ()
        )
        if tls or tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca) if tls_ca else None,
                private_key=_read(tls_key) if tls_key else None,
                certificate_chain=_read(tls_cert) if tls_cert else None,
            )
            options = list(_CHANNEL_OPTIONS)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            if server_name:
                raise ValueError("server_name needs TLS (tls=True or tls_ca)")
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=_encode_health_request,
            response_deserializer=_decode_health_response,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PolysketchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout

    def _metadata_for(self, session_id: str) -> Tuple[Tuple[str, str], ...]:
        """The call's metadata: the token, and for a session call the session header, which a
        proxy in front of several replicas hashes so that every turn of a session reaches the
        pod holding it (docs/deploy.md, "Shared sessions")."""
        if not session_id:
            return self._metadata
        return self._metadata + ((SESSION_HEADER, session_id),)

    def _call(self, method, request, timeout: Optional[float], session_id: str = ""):
        """One unary call; a gRPC error becomes PolysketchError(code name, details)."""
        try:
            return method(request, timeout=self._deadline(timeout),
                          metadata=self._metadata_for(session_id))
        except grpc.RpcError as error:
            raise PolysketchError(error.code().name, error.details()) from None

    @staticmethod
    def _request(
        prompt: Union[str, Sequence[int]],
        *,
        max_new_tokens: Optional[int] = None,
        min_new_tokens: int = 0,
        temperature: Optional[float] = None,
        top_k: int = 0,
        top_p: Optional[float] = None,
        min_p: float = 0.0,
        repetition_penalty: Optional[float] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: Optional[int] = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        include_stop_string: bool = False,
        logprobs: bool = False,
        top_logprobs: int = 0,
        time_limit_ms: int = 0,
        request_id: str = "",
        session_id: str = "",
        prompt_logprobs: bool = False,
        prompt_top_logprobs: int = 0,
        cache_salt: str = "",
    ) -> "pb.GenerateRequest":
        request = pb.GenerateRequest(
            request_id=request_id.encode("utf-8"),
            session_id=session_id.encode("utf-8"),
            cache_salt=cache_salt.encode("utf-8"),
            min_new_tokens=min_new_tokens,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            time_limit_ms=time_limit_ms,
            prompt_logprobs=prompt_logprobs,
            prompt_top_logprobs=prompt_top_logprobs,
        )
        # None leaves it unset (the server's default, 256); 0 generates nothing (scoring only).
        if max_new_tokens is not None:
            request.max_new_tokens = max_new_tokens
        if isinstance(prompt, str):
            request.text = prompt.encode("utf-8")
        else:
            request.token_ids.ids.extend(prompt)
        s = request.sampling
        if temperature is not None:
            s.temperature = temperature
        s.top_k = top_k
        if top_p is not None:
            s.top_p = top_p
        s.min_p = min_p
        if repetition_penalty is not None:
            s.repetition_penalty = repetition_penalty
        s.presence_penalty = presence_penalty
        s.frequency_penalty = frequency_penalty
        if seed is not None:
            s.seed = seed
        request.stop.stop_strings.extend(x.encode("utf-8") for x in stop)
        request.stop.stop_token_ids.extend(stop_token_ids)
        request.stop.ignore_eos = ignore_eos
        request.stop.include_stop_string = include_stop_string
        return request

    def generate(
        self, prompt: Union[str, Sequence[int]], *, timeout: Optional[float] = None, **params
    ) -> GenerateResult:
        """Generates for a text (or token-id) prompt; params are GenerateRequest's fields.

        max_new_tokens=None (the default) lets the server choose (256); max_new_tokens=0 with
        prompt_logprobs=True scores the prompt without generating. The unary response carries
        every prompt log-probability in one message: use generate_stream for long prompts.
        """
        response = self._call(self._stub.Generate, self._request(prompt, **params), timeout,
                              params.get("session_id", ""))
        return GenerateResult(
            request_id=response.request_id,
            text=response.text,
            tokens=_tokens(response.tokens),
            final=_final(response.final),
            prompt_logprobs=_tokens(response.prompt_logprobs),
        )

    def generate_stream(
        self, prompt: Union[str, Sequence[int]], *, timeout: Optional[float] = None, **params
    ) -> Iterator[StreamChunk]:
        """Yields chunks as the server produces them; the last has `final` set.

        Closing the iterator early (break, or garbage collection) cancels the request.
        """
        request = self._request(prompt, **params)
        call = self._stub.GenerateStream(
            request, timeout=self._deadline(timeout),
            metadata=self._metadata_for(params.get("session_id", ""))
        )
        try:
            for message in call:
                yield StreamChunk(
                    request_id=message.request_id,
                    text=message.text,
                    tokens=_tokens(message.tokens),
                    final=_final(message.final) if message.HasField("final") else None,
                    prompt_logprobs=_tokens(message.prompt_logprobs),
                )
        except grpc.RpcError as error:
            raise PolysketchError(error.code().name, error.details()) from None
        finally:
            call.cancel()  # no-op once the stream has ended

    def tokenize(self, text: str, *, timeout: Optional[float] = None) -> List[int]:
        request = pb.TokenizeRequest(text=text.encode("utf-8"))
        return list(self._call(self._stub.Tokenize, request, timeout).token_ids)

    def model_info(self, *, timeout: Optional[float] = None) -> ModelInfo:
        m = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        lim = m.limits
        return ModelInfo(
            name=m.name,
            architecture=m.architecture,
            attention_kinds=list(m.attention_kinds),
            vocab_size=m.vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            d_ff=m.d_ff,
            max_seq_len=m.max_seq_len,
            state_bytes_per_request=m.state_bytes_per_request,
            device=m.device,
            tokenizer=m.tokenizer,
            limits=Limits(
                lim.max_context,
                lim.max_prompt_tokens,
                lim.max_new_tokens,
                lim.state_slots,
                lim.max_waiting,
                lim.max_waiting_tokens,
            ),
        )

    def health(self, service: str = "", *, timeout: Optional[float] = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".

        service "" is liveness; SERVICE_NAME is readiness (NOT_SERVING while loading/draining).
        """
        return self._call(self._health, service, timeout)

    def cancel(self, request_id: str, *, timeout: Optional[float] = None) -> None:
        """Cancels a running or queued request; NOT_FOUND when the id is unknown."""
        self._call(
            self._stub.Cancel, pb.CancelRequest(request_id=request_id.encode("utf-8")), timeout
        )

    # Sessions: the server keeps the conversation's state; pass session_id= to generate /
    # generate_stream and send only the new text of each turn.
    def open_session(self, *, timeout: Optional[float] = None) -> str:
        return self._call(self._stub.OpenSession, pb.OpenSessionRequest(), timeout).session_id

    def close_session(self, session_id: str, *, timeout: Optional[float] = None) -> None:
        request = pb.CloseSessionRequest(session_id=session_id.encode("utf-8"))
        self._call(self._stub.CloseSession, request, timeout, session_id)

    def export_state(self, session_id: str, *, timeout: Optional[float] = None) -> ExportedState:
        request = pb.ExportStateRequest(session_id=session_id.encode("utf-8"))
        response = self._call(self._stub.ExportState, request, timeout, session_id)
        return ExportedState(state=response.state, tokens=response.tokens)

    def import_state(self, state: bytes, *, timeout: Optional[float] = None) -> str:
        """A new session holding an exported state; returns its id."""
        response = self._call(self._stub.ImportState, pb.ImportStateRequest(state=state), timeout)
        return response.session_id
