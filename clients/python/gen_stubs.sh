#!/usr/bin/env bash
# Generates the Python gRPC stubs of proto/polysketch/v1/generation.proto into
# <out>/polysketch_client/_proto/ and copies the package sources next to them, and the eval
# tool's package to <out>/polysketch_eval, so that `PYTHONPATH=<out> python3 -m polysketch_client`
# and `... -m polysketch_eval` work. The CMake build does the same into
# <build>/python (target polysketch_client_py); this script is for use without CMake.
# Usage: clients/python/gen_stubs.sh [out dir, default: build/python, where CMake puts it too]
# Needs protoc and grpc_python_plugin (Debian: protobuf-compiler, protobuf-compiler-grpc).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
out="${1:-${root}/build/python}"
protoc="${PROTOC:-protoc}"
plugin="${GRPC_PYTHON_PLUGIN:-$(command -v grpc_python_plugin || true)}"
[[ -n "${plugin}" ]] || { echo "gen_stubs.sh: grpc_python_plugin not found" >&2; exit 1; }

pkg="${out}/polysketch_client"
gen="${pkg}/_proto"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
"${protoc}" --proto_path="${root}/proto" --python_out="${tmp}" --grpc_python_out="${tmp}" \
  --plugin=protoc-gen-grpc_python="${plugin}" "${root}/proto/polysketch/v1/generation.proto"
mkdir -p "${gen}"
# protoc writes polysketch/v1/generation_pb2{,_grpc}.py with an absolute import of the first from
# the second; flatten them into _proto/ and make that import package-relative.
cp "${tmp}/polysketch/v1/generation_pb2.py" "${gen}/generation_pb2.py"
sed -e 's/^from polysketch\.v1 import generation_pb2/from . import generation_pb2/' \
  "${tmp}/polysketch/v1/generation_pb2_grpc.py" > "${gen}/generation_pb2_grpc.py"
: > "${gen}/__init__.py"
cp "${here}"/polysketch_client/*.py "${pkg}/"
mkdir -p "${out}/polysketch_eval"
cp "${here}"/polysketch_eval/*.py "${out}/polysketch_eval/"
echo "gen_stubs.sh: wrote ${pkg} and ${out}/polysketch_eval"
