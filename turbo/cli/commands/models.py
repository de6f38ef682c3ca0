"""`turbo models`."""

from rich.table import Table

from turbo.cli.output import print_json, stderr


def run_models(json_output: bool) -> None:
    from turbo.models.loading import family_rows, registry_rows

    rows, families = registry_rows(), family_rows()
    if json_output:
        print_json({"models": rows, "families": families})
        return
    table = Table(title="turbo model registry")
    for column in ("name", "HF id", "family", "image", "tokens", "layers", "method", "default r", "alpha",
                   "threshold"):
        table.add_column(column, justify="left" if column in ("name", "HF id", "family", "method") else "right")
    for row in rows:
        height, width = row["image_size"]
        table.add_row(row["name"], row["hf_id"], row["family"], str(height) if height == width else f"{height}x{width}",
                      str(row["tokens"]), str(row["layers"]), row["method"], str(row["default_r"]),
                      f"{row['alpha']:g}", str(row["threshold"]))
    stderr.print(table)
    kinds = Table(title="families: any Hugging Face id or local directory of these architectures")
    for column in ("family", "architectures", "protected", "methods"):
        kinds.add_column(column)
    for family in families:
        kinds.add_row(family["family"], ", ".join(family["architectures"]), family["protected"],
                      ", ".join(family["methods"]))
    stderr.print(kinds)
