"""The README.md of a Triton repository: its models, and how to serve them (one server, the NGC
container, many replicas with KServe)."""

from pathlib import Path

from turbo.serving.repository import DeployedModel, DeployOptions

CONTAINER = "nvcr.io/nvidia/tritonserver:<yy.mm>-py3"


def write_readme(repository: Path, deployed: list[DeployedModel], options: DeployOptions) -> None:
    rows = "\n".join(f"| `{m.name}` | {m.task} | `{m.encoder}` ({m.backend}) | {', '.join(f'`{n}`' for n in m.models)} "
                     f"| {m.batching} |" for m in deployed)
    first = deployed[0]
    python = any(m.backend == "python" for m in deployed)
    labels = "".join(f"\n- `{m.name}` labels come from {m.labels}." for m in deployed if m.labels)
    trt = [m for m in deployed if m.backend == "tensorrt"]
    trt_note = ("\n## TensorRT engines\n\nA `model.plan` runs only on the GPU model and TensorRT version it was built "
                "with (turbo.json's `tensorrt` entry names both). Engines built with the `turbo::TurboMerge` plugin "
                "on TensorRT 10.9 or later carry the compiled merge kernel (PTX) themselves: Triton's TensorRT "
                "backend needs no plugin library for them. Engines built with `--trt-merge native` use only "
                "TensorRT's own layers.\n") if trt else ""
    text = f"""# Triton model repository (written by turbo)

| model to call | task | encoder | models | batching |
|---|---|---|---|---|
{rows}

Clients send encoded images (JPEG or PNG bytes) to the model named after each export as a
`BYTES` tensor `image` of shape (batch, 1); classifiers answer `labels`, `classes` and `scores`
(top 5), captioners `caption` (an optional `prompt` input changes the decoder prompt),
embedding models the encoder's outputs. The `-encoder` models take preprocessed
`pixel_values` directly, for clients that preprocess themselves.{labels}

## Serve it here

    turbo serve {repository.name}            # the bundled server: pip install --no-deps nvidia-pytriton==0.7.0
    turbo bench --url http://127.0.0.1:8000 --model {first.name} --concurrency 1,8,32

## Serve it with NVIDIA's container

The pipeline models {'(and, with `--backend python`, every model) ' if python else ''}run on Triton's python
backend and import turbo, so the container needs turbo installed once:

    FROM {CONTAINER}
    RUN pip install turbo-vlm

    docker build -t triton-turbo .
    docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v $PWD/{repository.name}:/models triton-turbo tritonserver --model-repository=/models

Dynamic batching waits up to {options.max_queue_delay_us} µs to fill a batch of up to {options.max_batch};
`instance_group` runs {options.instances} instance(s) of each model. Metrics (Prometheus) are on port 8002.
{trt_note}
## Many replicas (KServe)

One repository, N identical servers behind one endpoint; put the repository in object storage:

```yaml
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: turbo-models
spec:
  predictor:
    minReplicas: 2
    maxReplicas: 8
    triton:
      storageUri: s3://YOUR-BUCKET/{repository.name}
      runtimeVersion: <yy.mm>-py3   # an image with turbo-vlm installed, as above
      resources:
        limits:
          nvidia.com/gpu: 1
```
"""
    (repository / "README.md").write_text(text)
