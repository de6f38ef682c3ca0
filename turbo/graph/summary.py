"""Read back what an exported graph does: op counts, merge blocks (from TopK constants), I/O shapes.

Each Turbo merge block exports TopK nodes with constant K, in this order: K = Na (every A-side
token ranked, the first r merge) and K = Na - r (the kept A-side tokens put back in order;
absent when it is 0), Na = (N - 1) // 2. The exporter records each node's module scope in its
metadata, which tells the blocks apart.
"""

import ast
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from turbo.core.errors import describe_error


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str, ...]  # ints for static dims, names for symbolic ones
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


MERGE_CLASS = "turbo.merging.module.TokenMerge"
WEIGHTED_MERGE_CLASS = "turbo.merging.module.WeightedMerge"  # the part a TurboMerge node replaces
SPATIAL_CLASS = "turbo.merging.spatial.SpatialMerge"  # MustDrop's spatial merge: it sorts and scatters per image
SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # the exporter's node metadata: module paths, outermost first


@dataclass(frozen=True)
class MergeBlock:
    """One TokenMerge's constant-K TopK nodes, in graph order. The position-split methods rank the
    Na A-side tokens, then sort the Na − r kept ones (no second TopK when r = Na); PiToMe ranks the
    T mergeable tokens by energy, then sorts the r B-side tokens and the T − 2r kept ones (no third
    when 2r = T, which reads like a position split with r = Na)."""

    scope: str  # module path, e.g. model.vit.layers.3.turbo_merge
    topk: tuple[int, ...]

    @property
    def r(self) -> int:
        """Tokens merged."""
        if len(self.topk) == 3:
            return self.topk[1]
        return self.topk[0] - self.topk[1] if len(self.topk) == 2 else self.topk[0]

    @property
    def ranked(self) -> int:
        """Tokens the first TopK ranks: the A side (position split) or all mergeable tokens (PiToMe)."""
        return self.topk[0]


@dataclass(frozen=True)
class GraphSummary:
    op_counts: dict[str, int]
    merge_blocks: tuple[MergeBlock, ...]
    unscoped_topk: int  # constant-K TopK nodes outside any merge block (or without scope metadata)
    dynamic_topk: int  # TopK nodes whose K is computed at run time
    scatter_reductions: tuple[str, ...]  # the reduction of every ScatterElements node
    spatial_nodes: int  # nodes of MustDrop's spatial merge, which the TopK and scatter counts leave out
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int  # of the default ONNX domain

    def to_dict(self) -> dict:
        return {
            "nodes": sum(self.op_counts.values()),
            "merge_blocks": len(self.merge_blocks),
            "merge_r": [block.r for block in self.merge_blocks],
            "turbo_merge_nodes": self.op_counts.get("TurboMerge", 0),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "op_counts": dict(sorted(self.op_counts.items())),
        }


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    return TensorInfo(value.name, dims, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of its model-local functions (folded merge blocks)."""
    return [*model.graph.node, *(node for function in model.functions for node in function.node)]


def node_scopes(model: onnx.ModelProto) -> list[tuple[list[onnx.NodeProto], dict[str, onnx.TensorProto]]]:
    """(nodes, the constants they can see) for the graph and for each model-local function:
    a function sees only its own Constant nodes, the graph its initializers and Constants."""
    def local(nodes, found: dict) -> dict:
        for node in nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                found[node.output[0]] = node.attribute[0].t
        return found

    graph = model.graph
    scopes = [(list(graph.node), local(graph.node, {init.name: init for init in graph.initializer}))]
    return scopes + [(list(f.node), local(f.node, {})) for f in model.functions]


def _scalar(tensor: onnx.TensorProto, base_dir: Path) -> int:
    if external_data_helper.uses_external_data(tensor):
        external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
    return int(np.asarray(numpy_helper.to_array(tensor)).reshape(-1)[0])


def module_scope(node: onnx.NodeProto, module_class: str) -> str | None:
    """The module path of the `module_class` module that emitted `node`, from the exporter's metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta[SCOPES_KEY])
        classes = ast.literal_eval(meta["pkg.torch.onnx.class_hierarchy"])
    except (KeyError, ValueError, SyntaxError):
        return None
    names = (module_class, module_class.removeprefix("turbo."))  # older exports: the class outside the turbo package
    return next((scope for scope, cls in zip(scopes, classes) if cls in names), None)


def merge_scope(node: onnx.NodeProto) -> str | None:
    """The module path of the TokenMerge that emitted `node`."""
    return module_scope(node, MERGE_CLASS)


def summarize(path: str | Path) -> GraphSummary:
    """Summarise the ONNX file at `path` (external data is read only for the TopK constants)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    ks_by_scope: dict[str, list[int]] = {}
    unscoped = dynamic = 0
    def spatial(node: onnx.NodeProto) -> bool:
        return module_scope(node, SPATIAL_CLASS) is not None

    for nodes, constants in node_scopes(model):
        for node in nodes:
            if node.op_type != "TopK" or spatial(node):
                continue
            if node.input[1] not in constants:
                dynamic += 1
                continue
            scope = merge_scope(node)
            if scope is None:
                unscoped += 1
            else:
                ks_by_scope.setdefault(scope, []).append(_scalar(constants[node.input[1]], path.parent))
    blocks = tuple(MergeBlock(scope, tuple(ks)) for scope, ks in ks_by_scope.items())
    reductions = tuple(
        next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
        for node in all_nodes(model) if node.op_type == "ScatterElements" and not spatial(node)
    )
    return GraphSummary(
        op_counts=dict(Counter(node.op_type for node in all_nodes(model))),
        merge_blocks=blocks,
        unscoped_topk=unscoped,
        dynamic_topk=dynamic,
        scatter_reductions=reductions,
        spatial_nodes=sum(map(spatial, all_nodes(model))),
        inputs=tuple(_tensor_info(v) for v in graph.input),
        outputs=tuple(_tensor_info(v) for v in graph.output),
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
    )


def checker_error(path: str | Path) -> str | None:
    """None when `onnx.checker`'s full check (shape inference included) passes, else its error in one line."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, shape-inference and protobuf decode errors alike
        return describe_error(exc)
    return None
