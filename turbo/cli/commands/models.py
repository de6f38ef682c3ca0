"""`turbo models`."""

from rich.table import Table

from turbo.cli.output import print_json, stderr


def run_models(json_output: bool) -> None:
    from turbo.models.loading import resolve_source
    from turbo.models.registry import list_models

    rows = []
    for name in list_models():
        source = resolve_source(name)
        arch = source.adapter.arch_spec(source.config)
        rows.append({
            "name": name, "hf_id": source.location, "architecture": source.architecture,
            "image_size": source.adapter.image_size(source.config), "tokens": arch.num_tokens,
            "layers": arch.num_layers, "default_r": source.default_r, "alpha": source.alpha,
            "threshold": source.threshold,
        })
    if json_output:
        print_json({"models": rows})
        return
    table = Table(title="turbo model registry")
    for column in ("name", "HF id", "image", "tokens", "layers", "default r", "alpha", "threshold"):
        table.add_column(column, justify="left" if column in ("name", "HF id") else "right")
    for row in rows:
        table.add_row(row["name"], row["hf_id"], str(row["image_size"]), str(row["tokens"]), str(row["layers"]),
                      str(row["default_r"]), f"{row['alpha']:g}", str(row["threshold"]))
    stderr.print(table)
    stderr.print("Also accepted: any Hugging Face id or local directory of a supported architecture "
                 "(ViTForImageClassification, ViTModel, BlipForConditionalGeneration).")
