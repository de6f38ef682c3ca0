"""`turbo models`."""

from rich.table import Table

from turbo.cli.output import print_json, stderr


def run_models(json_output: bool) -> None:
    from turbo.models.loading import registry_rows
    from turbo.models.registry import supported_architectures

    rows = registry_rows()
    if json_output:
        print_json({"models": rows})
        return
    table = Table(title="turbo model registry")
    for column in ("name", "HF id", "family", "image", "tokens", "layers", "default r", "alpha", "threshold"):
        table.add_column(column, justify="left" if column in ("name", "HF id", "family") else "right")
    for row in rows:
        table.add_row(row["name"], row["hf_id"], row["family"], str(row["image_size"]), str(row["tokens"]),
                      str(row["layers"]), str(row["default_r"]), f"{row['alpha']:g}", str(row["threshold"]))
    stderr.print(table)
    stderr.print("Also accepted: any Hugging Face id or local directory of a supported architecture "
                 f"({', '.join(supported_architectures())}).")
