"""The ``headq`` command line: a thin layer over the public Python API."""

from __future__ import annotations

from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from .basis import QueryBasis
from .config import HeadQConfig, bits_per_element

app = typer.Typer(help="HeadQ: 2-bit KV-cache quantization with score-space side codes.", no_args_is_help=True)
console = Console()


@app.command()
def info(basis: Annotated[str, typer.Argument(help="basis folder or Hub repo id")]) -> None:
    """Show what a query basis was calibrated for and its ranks."""
    loaded = QueryBasis.from_pretrained(basis)
    table = Table(title=f"query basis {basis}", show_header=False)
    for key, value in loaded.fingerprint.items():
        table.add_row(key, str(value))
    table.add_row("kind", loaded.kind)
    table.add_row("rank", str(loaded.rank))
    for key, value in loaded.metadata.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def bits(
    head_dim: Annotated[int, typer.Option(help="head dimension of the model")] = 128,
    seq_len: Annotated[int, typer.Option(help="cached tokens per sequence")] = 4096,
    ranks: Annotated[str, typer.Option(help="comma-separated side-code ranks")] = "0,4,8,16",
    key_bits: Annotated[int, typer.Option(help="bits per key code")] = 2,
    key_grouping: Annotated[str, typer.Option(help="'channel' (KIVI) or 'token'")] = "channel",
    block_size: Annotated[int, typer.Option(help="tokens quantized together")] = 64,
    side_bits: Annotated[str, typer.Option(help="comma-separated side-code bit widths")] = "2,4,8",
    side_scale: Annotated[str, typer.Option(help="'token' or 'block'")] = "token",
    value_bits: Annotated[int, typer.Option(help="bits per value code, 0 for dense values")] = 0,
) -> None:
    """Print stored bits per key/value element for a grid of settings (everything counted)."""
    table = Table(title=f"bits per element (head dim {head_dim}, {seq_len} tokens, fp16 model)")
    for column in ("rank", "side bits", "key bits/elem", "value bits/elem"):
        table.add_column(column, justify="right")
    for rank in (int(r) for r in ranks.split(",")):
        for side in [0] if rank == 0 else [int(b) for b in side_bits.split(",")]:
            config = HeadQConfig(
                key_bits=key_bits,
                key_grouping=key_grouping,  # type: ignore[arg-type]
                value_bits=value_bits or None,
                block_size=block_size,
                rank=rank,
                side_bits=side or None,
                side_scale=side_scale,  # type: ignore[arg-type]
            )
            cost = bits_per_element(config, head_dim, rank, seq_len, torch.float16)
            table.add_row(str(rank), str(side or "-"), f"{cost.key:.3f}", f"{cost.value:.3f}")
    console.print(table)


if __name__ == "__main__":
    app()
