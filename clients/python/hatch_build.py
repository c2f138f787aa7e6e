"""Hatchling build hook: the protobuf and gRPC modules of Tidemark's services.

Runs grpcio-tools' protoc over `tidemark/*/v1/*.proto` (the sdist's own copy
in `proto/`, else the checkout's `../../proto`) into a temporary directory and
ships the result in the wheel as the top-level package `tidemark`, the name
protoc's absolute imports use (`from tidemark.job_tracker.v1 import ...`).
The well-known types (`google.protobuf.*`) come from the protobuf runtime.
"""

from __future__ import annotations

import importlib.resources
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class GenerateStubs(BuildHookInterface):  # type: ignore[type-arg]
    """Generates `tidemark/<service>/v1/*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py`."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        from grpc_tools import protoc

        proto = self._proto_dir()
        files = sorted(p.relative_to(proto).as_posix() for p in proto.glob("tidemark/*/v1/*.proto"))
        if not files:
            raise RuntimeError(f"no tidemark/*/v1/*.proto under {proto}")
        out = Path(tempfile.mkdtemp(prefix="tidemark-client-"))
        self._out = out
        include = importlib.resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {files} (protos in {proto})")
        package = out / "tidemark"
        for directory in [package, *(d for d in package.rglob("*") if d.is_dir())]:
            (directory / "__init__.py").touch()
        (package / "py.typed").touch()
        build_data["force_include"][str(package)] = "tidemark"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        out = getattr(self, "_out", None)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)

    def _proto_dir(self) -> Path:
        root = Path(self.root)
        candidates = [root / "proto", root.parent.parent / "proto"]
        for candidate in candidates:
            if (candidate / "tidemark").is_dir():
                return candidate.resolve()
        raise RuntimeError(f"the Tidemark protos are in none of {[str(c) for c in candidates]}")
