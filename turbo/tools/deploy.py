"""`turbo deploy triton`: a Triton model repository from verified exports, written whole or not at all."""

from dataclasses import asdict
from pathlib import Path

from turbo.core.errors import UsageError
from turbo.core.staging import staged_directory
from turbo.graph.export_dir import open_export
from turbo.models.adapters import GENERATION, VQA
from turbo.models.registry import adapter_for
from turbo.serving.model_config import require_client
from turbo.serving.readme import write_readme
from turbo.serving.repository import DeployedModel, DeployOptions, check_options, deploy_export, model_name


def deploy_triton(exports: list[str | Path], output: str | Path, options: DeployOptions,
                  force: bool = False) -> list[DeployedModel]:
    """Every export verified (manifest, file hashes, graph) before anything is written; the
    repository appears only when complete."""
    require_client()
    check_options(options)
    if not exports:
        raise UsageError("name at least one export directory")
    directories = [Path(export) for export in exports]
    names = [model_name(directory) for directory in directories]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"two exports would both be served as {repeated[0]!r} (models are named after their "
                         "folders); rename one folder")
    manifests = []
    for directory in directories:
        manifest = open_export(directory)
        if manifest.failed:
            raise UsageError(f"{directory} failed validation when exported (turbo check {directory} says why); "
                             "re-export it before serving it")
        task = adapter_for(manifest.model.architecture).task_of(manifest.model.architecture)
        if task == VQA:
            raise UsageError(f"{directory} exports {task.name}: serving that task is not supported yet (use turbo "
                             "vqa); deploy classification, embedding, retrieval (image side), captioning or "
                             "LLM-based VLM exports")
        if task == GENERATION and manifest.llm is None:
            raise UsageError(f"{directory} holds the vision graph alone (exported with --no-decoder): re-export it "
                             "with its language model to serve it")
        manifests.append(manifest)
    output = Path(output)
    if any(output.resolve() == d.resolve() or output.resolve() in d.resolve().parents for d in directories):
        raise UsageError(f"-o {output} is inside an export being deployed; choose another -o")
    with staged_directory(output, force) as staging:
        deployed = [deploy_export(directory, manifest, staging, options)
                    for directory, manifest in zip(directories, manifests)]
        write_readme(staging, deployed, options)
    return deployed


def deployed_dicts(deployed: list[DeployedModel]) -> list[dict]:
    return [asdict(model) for model in deployed]
