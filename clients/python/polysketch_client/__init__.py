"""A small typed Python client for the polysketch generation server (polysketch.v1).

The gRPC stubs are generated from proto/polysketch/v1/generation.proto at build time into
`polysketch_client/_proto/` (CMake target polysketch_client_py, or clients/python/gen_stubs.sh).
"""

from .client import (
    FinalInfo,
    GenerateResult,
    GeneratedToken,
    Limits,
    ModelInfo,
    PolysketchClient,
    PolysketchError,
    StreamChunk,
    Timings,
)

__all__ = [
    "FinalInfo",
    "GenerateResult",
    "GeneratedToken",
    "Limits",
    "ModelInfo",
    "PolysketchClient",
    "PolysketchError",
    "StreamChunk",
    "Timings",
]
