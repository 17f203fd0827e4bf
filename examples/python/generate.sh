#!/usr/bin/env bash
# Generates gen/realtime_pb2.py (and its .pyi stub) from the server's schema.
# Needs grpcio-tools (pip install -r requirements.txt); set PYTHON to pick an interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_dir="$here/../../proto"
mkdir -p "$here/gen"
"${PYTHON:-python3}" -m grpc_tools.protoc -I "$proto_dir" \
    --python_out="$here/gen" --pyi_out="$here/gen" "$proto_dir/realtime.proto"
echo "generated $here/gen/realtime_pb2.py"
