"""The only part of the eval tool that talks to a server: three calls over polysketch_client.

Everything else (windows, buckets, trials, tables, JSON) takes a `Backend`, so it is tested with
an in-process backend and no server. Every call carries a gRPC deadline: a server that is down or
stuck ends the run with an EvalError, never a hang.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Protocol, Sequence, Type


class EvalError(Exception):
    """A failure of the run that is not the user's arguments: unreachable server, RPC error,
    a response that breaks the API's contract."""


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    name: str  # the served model
    tokenizer: str  # "bytes" for the shipped models
    max_prompt_tokens: int
    max_context: int  # prompt + generated tokens of one request (0: no limit reported)
    max_new_tokens: int


class Backend(Protocol):
    def info(self) -> ServerInfo:
        """The served model and its limits."""

    def require_prompt_logprobs(self) -> None:
        """EvalError unless prompt log-probabilities can be asked for."""

    def prompt_logprobs(self, ids: Sequence[int]) -> List[float]:
        """Entry i: natural-log probability of ids[i + 1] given ids[:i + 1], from an empty state
        (len(ids) - 1 entries). Nothing is generated."""

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> bytes:
        """Greedy (temperature 0) continuation of the byte prompt `ids`, as bytes."""


def client_has_prompt_logprobs() -> bool:
    """Whether the generated polysketch.v1 stubs know GenerateRequest.prompt_logprobs (the
    proto's field 12); the stubs are built from the proto, so this is the client's API."""
    from polysketch_client._proto import generation_pb2 as pb

    return "prompt_logprobs" in pb.GenerateRequest.DESCRIPTOR.fields_by_name


# Finish reasons that mean the request did not complete.
_FAILED = ("CANCELLED", "DEADLINE", "ERROR")


class ServerBackend:
    """A Backend over a polysketch_client.PolysketchClient. `timeout` is the deadline of one
    request (seconds), `connect_timeout` that of GetModelInfo, the first call."""

    def __init__(self, client, timeout: float, connect_timeout: float,
                 rpc_error: Optional[Type[Exception]] = None) -> None:
        if rpc_error is None:  # what the client raises for a failed RPC
            from polysketch_client import PolysketchError as rpc_error
        self._client = client
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._rpc_error = rpc_error

    def _error(self, what: str, error: Exception) -> EvalError:
        code = getattr(error, "code", "")
        details = getattr(error, "details", str(error))
        hint = ""
        if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and what == "GetModelInfo":
            hint = f" (is a server listening at {self._client.target}?)"
        return EvalError(f"{what} to {self._client.target} failed: {code}: {details}{hint}")

    def info(self) -> ServerInfo:
        try:
            m = self._client.model_info(timeout=self._connect_timeout)
        except self._rpc_error as error:
            raise self._error("GetModelInfo", error) from None
        return ServerInfo(m.name, m.tokenizer, m.limits.max_prompt_tokens, m.limits.max_context,
                          m.limits.max_new_tokens)

    def require_prompt_logprobs(self) -> None:
        if not client_has_prompt_logprobs():
            raise EvalError("this polysketch_client was built from a proto without "
                            "GenerateRequest.prompt_logprobs; rebuild it (scripts/build, or "
                            "clients/python/gen_stubs.sh) from a tree that has the field")

    def prompt_logprobs(self, ids: Sequence[int]) -> List[float]:
        self.require_prompt_logprobs()
        entries = []
        final = None
        try:
            stream = self._client.generate_stream(list(ids), max_new_tokens=0,
                                                  prompt_logprobs=True, timeout=self._timeout)
            for chunk in stream:
                if chunk.tokens:
                    stream.close()  # cancels the request
                    raise EvalError("the server generated tokens for max_new_tokens=0: it does "
                                    "not implement score-only requests (prompt_logprobs)")
                entries.extend(chunk.prompt_logprobs)
                final = chunk.final or final
        except self._rpc_error as error:
            raise self._error("GenerateStream (prompt_logprobs)", error) from None
        if final is None or final.finish_reason in _FAILED:
            reason = final.finish_reason if final else "no final message"
            raise EvalError(f"scoring a prompt of {len(ids)} tokens ended with {reason}")
        if len(entries) != len(ids) - 1:
            raise EvalError(f"the server returned {len(entries)} prompt log-probabilities for a "
                            f"prompt of {len(ids)} tokens (want {len(ids) - 1})")
        got = [e.token_id for e in entries]
        if got != list(ids[1:]):
            first = next(i for i, (a, b) in enumerate(zip(got, ids[1:])) if a != b)
            raise EvalError(f"prompt_logprobs entry {first} is token {got[first]}, the prompt "
                            f"has {ids[first + 1]} there")
        return [e.logprob for e in entries]

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> bytes:
        try:
            result = self._client.generate(list(ids), max_new_tokens=max_new_tokens,
                                           temperature=0.0, timeout=self._timeout)
        except self._rpc_error as error:
            raise self._error("Generate", error) from None
        if result.final.finish_reason in _FAILED:
            raise EvalError(f"a passkey request of {len(ids)} tokens ended with "
                            f"{result.final.finish_reason}: {result.final.error_message}")
        # Byte tokenizer (checked against GetModelInfo): token id = byte value.
        return bytes(t.token_id for t in result.tokens if 0 <= t.token_id < 256)


def connect(target: str, timeout: float, connect_timeout: float,
            tls: bool = False, tls_ca: Optional[str] = None, tls_cert: Optional[str] = None,
            tls_key: Optional[str] = None, server_name: Optional[str] = None,
            token_file: Optional[str] = None) -> ServerBackend:
    """A ServerBackend for `target`; ValueError for inconsistent TLS or token arguments."""
    from polysketch_client import PolysketchClient

    client = PolysketchClient(target, timeout=timeout, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                              tls_key=tls_key, server_name=server_name, token_file=token_file)
    return ServerBackend(client, timeout, connect_timeout)
