"""TensorRT parser constraints checked on an ONNX graph before any engine build (onnx-tensorrt,
TensorRT 10.x): what would fail to parse (errors) and what needs plugins or care (warnings)."""

from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from turbo.graph.summary import node_scopes

MAX_TOPK = 3840
MAX_OPSET = 20  # the newest opset the 10.x parser documents
REDUCE_OPS = {"ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" (the parser rejects it) or "warning" (needs a plugin, or untested)
    node: str
    op_type: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def lint(path: str | Path) -> list[Finding]:
    """Every TensorRT-relevant problem in the graph at `path`, errors first."""
    model = onnx.load(str(path), load_external_data=False)
    findings = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > MAX_OPSET:
        findings.append(Finding("warning", "", "", f"opset {opset} is newer than TensorRT 10's parser documents "
                                                    f"({MAX_OPSET}); export with --opset {MAX_OPSET} if parsing fails"))
    local_functions = {(f.domain, f.name) for f in model.functions}
    for node, constants in ((node, constants) for nodes, constants in node_scopes(model) for node in nodes):
        def add(severity: str, message: str, node=node) -> None:
            findings.append(Finding(severity, node.name, node.op_type, message))

        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) not in local_functions:  # with one, TensorRT imports its body
                add("warning", f"custom op {node.domain}::{node.op_type} has no local function: it needs its plugin")
        elif node.op_type == "TopK":
            if node.input[1] not in constants:
                add("error", "TopK K is computed at run time; TensorRT needs a constant K")
            else:
                k = int(onnx.numpy_helper.to_array(constants[node.input[1]]).reshape(-1)[0])
                if k >= MAX_TOPK:
                    add("error", f"TopK K={k} is not below {MAX_TOPK}")
            if _attribute(node, "sorted", 1) != 1:
                add("error", "TopK with sorted=0 is not supported")
        elif node.op_type in REDUCE_OPS and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            add("error", "reduce axes are computed at run time; TensorRT needs them as an initializer")
        elif node.op_type == "ScatterND" and _attribute(node, "reduction", b"none") not in (b"none", "none"):
            add("error", "ScatterND with a reduction is not supported")
        elif node.op_type == "ScatterElements" and _attribute(node, "reduction", b"none") not in (b"none", "none"):
            add("warning", "ScatterElements with a reduction runs only through TensorRT's bundled plugin "
                           "(init_libnvinfer_plugins; int64 indices; no bf16/int8; order-nondeterministic atomics); "
                           "export with --merge-kernel matmul to avoid it")
    return sorted(findings, key=lambda f: f.severity != "error")
