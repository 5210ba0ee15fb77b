"""Regenerate the committed stubs from grpc_service.proto and model_config.proto.

    pip install "grpcio-tools==1.62.3"      # protoc 25: gencode that runs on protobuf 4.25 .. 6.x
    python -m ember.serve.protogen

(grpcio-tools 1.62 pins protobuf < 5; install it in a separate virtual environment and run
`python src/ember/serve/protogen.py` there if your environment has a newer protobuf.)

The stubs are committed so users need no build step. Edits made to protoc's output:

* the descriptors go into a private descriptor pool, because ember's protos share the package
  (`inference`) and file names of Triton's: a process that also imports `tritonclient.grpc`
  would otherwise fail with "duplicate symbol" on whichever of the two is imported second.
  model_config_pb2 owns the pool; grpc_service_pb2, which imports model_config.proto, adds
  itself to the same pool;
* the generated modules import each other relatively (`from . import ...`).

Older protoc is chosen on purpose: newer gencode refuses to load on an older protobuf runtime,
and `tritonclient` pins protobuf below the newest major version.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("model_config.proto", "grpc_service.proto")
PINNED_TOOLS = "1.62"

_OWN_POOL = (
    "# ember: a private pool, so this file never collides with Triton's own {proto}\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
)
_SHARED_POOL = (
    "# ember: the private pool of model_config.proto, which this file imports\n"
    "_POOL = model__config__pb2._POOL\n"
)


def _patch_pb2(text: str, proto: str) -> str:
    if "_descriptor_pool.Default().AddSerializedFile(" not in text:
        raise RuntimeError("unexpected protoc output: no AddSerializedFile call; update ember.serve.protogen")
    text = text.replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")
    text = re.sub(r"^import model_config_pb2 as", "from . import model_config_pb2 as", text, flags=re.M)
    pool = _SHARED_POOL if "model__config__pb2" in text else _OWN_POOL.format(proto=proto)
    return text.replace("\nDESCRIPTOR = _POOL", "\n" + pool + "DESCRIPTOR = _POOL", 1)


def _patch_pb2_grpc(text: str) -> str:
    return re.sub(r"^import grpc_service_pb2 as", "from . import grpc_service_pb2 as", text, flags=re.M)


def generate(out_dir: Path = HERE) -> list[Path]:
    try:
        from grpc_tools import protoc
        import grpc_tools
    except ImportError as e:  # pragma: no cover - developer tool
        raise SystemExit(f'grpcio-tools is not installed: pip install "grpcio-tools=={PINNED_TOOLS}.3"') from e
    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("grpcio-tools")
    if not version.startswith(PINNED_TOOLS):
        print(f"warning: grpcio-tools {version}; the committed stubs use {PINNED_TOOLS}.x so they load on "
              "protobuf 4.25 and newer. Newer gencode may refuse older protobuf runtimes.", file=sys.stderr)
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", *(str(HERE / p) for p in PROTOS)])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc} on {', '.join(PROTOS)}")
    written = []
    for proto in PROTOS:
        pb2 = out_dir / proto.replace(".proto", "_pb2.py")
        pb2.write_text(_patch_pb2(pb2.read_text(), proto))
        written.append(pb2)
    (out_dir / "model_config_pb2_grpc.py").unlink(missing_ok=True)  # model_config.proto has no service
    pb2_grpc = out_dir / "grpc_service_pb2_grpc.py"
    pb2_grpc.write_text(_patch_pb2_grpc(pb2_grpc.read_text()))
    return written + [pb2_grpc]


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path}")
