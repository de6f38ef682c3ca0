"""ONNX Runtime runner (CPU by default; any installed execution provider by name)."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from turbo.kernels.ort_merge_kernel import register_merge_kernel
from turbo.runtimes.base import Runner


class OnnxRuntimeRunner(Runner):
    name = "ort"

    def __init__(self, path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 threads: int | None = None, memory_arena: bool = True, exact: bool = False,
                 merge_kernel: str = "auto") -> None:
        """exact: INT4 weight MatMuls in fp32 (ORT's default fuses them into MatMulNBits with int8
        activations, ~4e-3 off the float model); for validation, not speed. merge_kernel: how
        TurboMerge nodes run, "fused" (one C kernel, CPU only), "graph" (their ONNX function, as
        the file says) or "auto" (fused where it can be built)."""

        self.path, self.providers = Path(path), tuple(providers)
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = memory_arena
        if threads:
            options.intra_op_num_threads = threads
        self.threads = threads or 0  # 0: onnxruntime's default (one per physical core)
        options.log_severity_level = 3  # errors only; warnings would interleave with our output
        # Worker threads spin within a run but not after it: an idle session's spinning threads
        # would take cores from the next session run (bench interleaves sessions; captioning
        # alternates encoder and decoder), ~30% of a ViT-B batch-1 run on 2 cores.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if exact:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.merge_kernel, self.merge_kernel_note = register_merge_kernel(options, merge_kernel, self.providers)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
        self.input_dtypes = {i.name: np.dtype(kinds.get(i.type, np.float32)) for i in self.session.get_inputs()}

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: np.asarray(value, dtype=self.input_dtypes[name]) for name, value in feeds.items()}
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def output_shape(self, name: str) -> tuple:
        return tuple(next(o.shape for o in self.session.get_outputs() if o.name == name))

    def memory_probe(self) -> "OnnxRuntimeRunner":
        """Without the CPU arena, which otherwise keeps a run's memory allocated between runs."""
        return OnnxRuntimeRunner(self.path, self.providers, self.threads or None, memory_arena=False,
                                 merge_kernel=self.merge_kernel)

    def describe(self) -> dict:
        described = {"runtime": self.name, "device": "cuda" if "CUDAExecutionProvider" in self.session.get_providers()
                     else "cpu", "providers": self.session.get_providers(), "threads": self.threads,
                     "merge_kernel": self.merge_kernel}
        if self.merge_kernel_note:
            described["merge_kernel_note"] = self.merge_kernel_note
        return described
