"""`turbo deploy triton`: a Triton model repository from export directories."""

from turbo.cli.output import print_json, stderr


def run_deploy_triton_command(exports: list[str], output: str, options, force: bool, json_output: bool) -> None:
    from turbo.tools.deploy import deploy_triton, deployed_dicts

    deployed = deploy_triton(exports, output, options, force)
    if json_output:
        print_json({"repository": output, "models": deployed_dicts(deployed)})
    for model in deployed:
        stderr.print(f"{model.export} -> [bold]{model.name}[/] ({model.task}; encoder {model.encoder} on "
                     f"{model.backend}; {model.batching})", highlight=False, soft_wrap=True)
        if model.labels:
            stderr.print(f"  labels: {model.labels}", highlight=False, soft_wrap=True)
    stderr.print(f"wrote {output}: {sum(len(m.models) for m in deployed)} models; serve it with: turbo serve {output}",
                 highlight=False, soft_wrap=True)
