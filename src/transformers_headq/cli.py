"""The ``headq`` command line: a thin layer over the public Python API."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from .basis import OBLIQUE, QueryBasis
from .config import HeadQConfig, bits_per_element
from .corpus import DEFAULT_CORPUS
from .errors import HeadQError
from .fingerprint import model_fingerprint
from .loading import DEFAULT_MODEL

BESIDE = ("key-pca", OBLIQUE)  # bases `headq calibrate` writes beside the query basis, in sub-folders

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


BITS_NOTE = (
    "Bits count everything a cache holds once the window's last token is stored (codes, scales, zeros, side "
    "codes, kept values, window). While decoding, HeadQ/plain rows also read up to block-1 recent tokens in full "
    "precision (bN: N-token blocks), quanto up to 127."
)
ModelOption = Annotated[
    str, typer.Option(help="'smollm2' (embedded default), a Hub id, a model folder or a .gguf file")
]
CorpusOption = Annotated[str, typer.Option(help="'shakespeare', 'pydoc', 'hf:NAME[:CONFIG]' or a text file")]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(
    model: str, device: str, dtype: str = "float32", tensor_parallel: bool = False, device_map: str | None = None
):  # type: ignore[no-untyped-def]
    from .loading import load_model

    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    with console.status(f"loading {model}"):
        return load_model(
            model, dtype=DTYPES[dtype], device=device, tensor_parallel=tensor_parallel, device_map=device_map
        )


def _windows(tokenizer, corpus: str, split: str, seq_len: int, windows: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from .corpus import load_corpus, token_windows

    text = load_corpus(corpus, split)  # type: ignore[arg-type]
    return token_windows(tokenizer, text.text, seq_len, windows)


def _join_process_group(world: int) -> tuple[int, str]:
    """Join the process group that `accelerate launch` / torchrun set up: ``(rank, device)``.

    accelerate picks each process's GPU and starts NCCL; on CPUs it may leave the group to us
    (torchrun without an accelerate config), so gloo is started here when it did not.
    """
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if state.device.type == "cuda" else "gloo")
    if dist.get_world_size() != world:
        raise typer.BadParameter(f"WORLD_SIZE is {world} but the process group has {dist.get_world_size()} processes")
    return dist.get_rank(), str(state.device)


@app.command()
def calibrate(
    output: Annotated[
        Path, typer.Option(help="folder for the basis (with the key-PCA control and the oblique code in sub-folders)")
    ],
    model: ModelOption = DEFAULT_MODEL,
    corpus: CorpusOption = DEFAULT_CORPUS,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration window")] = 512,
    windows: Annotated[int, typer.Option(help="calibration windows (all processes together)")] = 64,
    batch_size: Annotated[int, typer.Option(help="windows per forward")] = 4,
    rank: Annotated[int, typer.Option(help="directions stored per KV head (0: all, head dim)")] = 0,
    use_rank: Annotated[int, typer.Option(help="side-code rank a cache uses by default (0: head dim / 4)")] = 0,
    side_bits: Annotated[int, typer.Option(help="side-code bits a cache uses by default")] = 3,
    side_scale: Annotated[str, typer.Option(help="side-code scales by default: 'block' or 'token'")] = "block",
    sink_keys: Annotated[
        int, typer.Option(help="first keys a cache holds exact by default (attention sinks)")
    ] = HeadQConfig.sink_keys,
    device: Annotated[str, typer.Option(help="cpu, cuda, ... (under accelerate launch: each process' own)")] = "cpu",
    dtype: Annotated[str, typer.Option(help="model weights: float32, bfloat16 or float16")] = "float32",
    push_to_hub: Annotated[str | None, typer.Option(help="also push the basis to this Hub repo")] = None,
    tensor_parallel: Annotated[
        bool, typer.Option("--tensor-parallel", help="under torchrun: split the model by its tp_plan (all ranks)")
    ] = False,
) -> None:
    """Calibrate a query basis on the calibration split of a corpus.

    Runs on one device, or on several processes with `accelerate launch -m transformers_headq.cli calibrate ...`:
    each process reads its share of the windows and the sums are all-reduced. With --tensor-parallel the
    processes instead hold one model split by its tensor-parallel plan, all read every window, each adds
    the KV heads it computes, and the all-reduce assembles the full basis.
    """
    from .calibrate import calibrate as run_calibration
    from .corpus import batches

    rank_id, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank_id, device = _join_process_group(world)
    loaded = _load(model, device, dtype, tensor_parallel)
    ids = _windows(loaded.tokenizer, corpus, "calibration", seq_len, windows)
    metadata = {"model_id": loaded.name, "corpus": corpus, "sequence_length": seq_len, "processes": world}
    share = ids if tensor_parallel else ids[rank_id::world]  # tensor-parallel ranks run one model together
    head_dim = model_fingerprint(loaded.model.config)["head_dim"]
    settings = HeadQConfig(
        rank=use_rank or head_dim // 4,
        side_bits=side_bits,
        side_scale=side_scale,  # type: ignore[arg-type]
        sink_keys=sink_keys,
    )
    bases = run_calibration(
        loaded.model, batches(share, batch_size), rank or None, metadata, progress=rank_id == 0,
        key_quantizer=settings.key_quantizer(head_dim),  # the oblique code is tuned to this key quantizer
    )  # fmt: skip
    if rank_id == 0:
        for basis in bases.values():
            basis.quantizer = settings.to_dict()
        bases["query"].save_pretrained(output)
        for name in BESIDE:
            if name in bases:
                bases[name].save_pretrained(output / name)
            else:
                console.print(f"[yellow]no {name} basis: windows of {seq_len} tokens hold no whole key block[/yellow]")
        meta = bases["query"].metadata
        tokens, seconds = meta["calibration_tokens"], meta["calibration_seconds"]
        console.print(f"wrote {output}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)")
        if push_to_hub is not None:
            _push(output, push_to_hub)


@app.command(name="eval")
def evaluate(
    model: ModelOption = DEFAULT_MODEL,
    basis: Annotated[str, typer.Option(help="basis folder or Hub id ('shipped': the packaged one)")] = "shipped",
    corpus: CorpusOption = DEFAULT_CORPUS,
    seq_len: Annotated[
        int | None, typer.Option(help="tokens per evaluation window (default 512; long: 4096 or the model's limit)")
    ] = None,
    windows: Annotated[int | None, typer.Option(help="evaluation windows (default 4; full: 16)")] = None,
    full: Annotated[bool, typer.Option("--full", help="all rows (ranks, side bits, blocks), 16 windows")] = False,
    profile: Annotated[
        str, typer.Option(help="rows: 'quick', 'full' (= --full), 'core' (5 rows) or 'long' (long windows)")
    ] = "quick",
    batch_size: Annotated[int, typer.Option(help="windows per forward")] = 4,
    sink_keys: Annotated[
        int, typer.Option(help="every quantized row (plain and HeadQ) keeps its first N keys exact, paid for")
    ] = HeadQConfig.sink_keys,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the rows as a JSON list")] = None,
    plot: Annotated[Path, typer.Option(help="PNG of PPL against bits per element")] = Path("headq-eval.png"),
    markdown: Annotated[Path | None, typer.Option(help="write the markdown table here too")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Decode-exact perplexity of HeadQ, plain quantizers, quanto and the controls, with bits per element."""
    from .evaluate import (
        EvalSetup,
        fair_budget_summary,
        front_bits,
        headline,
        markdown_table,
        plot_results,
        position_table,
        run_evaluation,
        standard_methods,
    )
    from .shipped import resolve_basis

    profile = "full" if full else profile
    if profile not in ("core", "quick", "full", "long"):
        raise typer.BadParameter(f"--profile must be 'core', 'quick', 'full' or 'long', not {profile!r}")
    query_basis = resolve_basis(basis)  # before the model loads: a wrong --basis fails at once
    loaded = _load(model, device)
    query_basis.check_model(loaded.model)
    key_pca, oblique = _beside(basis, "key-pca"), _beside(basis, OBLIQUE)
    if seq_len is None:
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
        seq_len = min(4096, limit) if profile == "long" else 512
    n_windows = windows or (16 if profile == "full" else 4)
    with console.status(f"reading {corpus}"):
        ids = _windows(loaded.tokenizer, corpus, "evaluation", seq_len, n_windows)
    setup = EvalSetup(loaded.model, loaded.name, corpus, ids, query_basis, key_pca, batch_size, oblique)
    head_dim = model_fingerprint(loaded.model.config)["head_dim"]
    methods = standard_methods(profile, head_dim, seq_len, sink_keys)  # type: ignore[arg-type]

    def save(rows: list[Any]) -> None:  # after every row: an interrupted run keeps what it finished
        if markdown is not None:
            markdown.write_text(markdown_table(rows) + "\n")
        if json_path is not None:
            json_path.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")

    rows = run_evaluation(setup, methods, on_row=save)
    console.print(f"\n{loaded.name} on {corpus} (evaluation split), {ids.shape[0]} x {seq_len} tokens\n")
    typer.echo(markdown_table(rows))
    typer.echo(BITS_NOTE)
    for line in [*headline(rows), fair_budget_summary(rows, *front_bits(seq_len, sink_keys))]:
        typer.echo(line)
    by_position = position_table(rows, seq_len)
    if by_position:
        typer.echo("\n" + by_position)
        if markdown is not None:
            markdown.write_text(markdown_table(rows) + "\n\n" + by_position + "\n")
    plot_results(rows, str(plot))
    console.print(f"plot: {plot}")
    _report_skipped(rows)


def _report_skipped(rows: list[Any]) -> None:
    """Name the rows left out; exit non-zero if one failed (an error, not a known limitation)."""
    for r in rows:
        if r.skipped is not None:
            colour = "red" if r.skipped.startswith("failed:") else "yellow"
            console.print(f"[{colour}]{r.mode} {r.method} {r.setting}: {r.skipped}[/{colour}]")
    if any(r.skipped is not None and r.skipped.startswith("failed:") for r in rows):
        raise typer.Exit(1)


@app.command()
def bench(
    model: ModelOption = DEFAULT_MODEL,
    basis: Annotated[str, typer.Option(help="basis folder or Hub id ('shipped': the packaged one)")] = "shipped",
    context: Annotated[str, typer.Option(help="cached tokens a sequence before the timed steps (comma-separated)")] = (
        "1024"
    ),
    batch: Annotated[str, typer.Option(help="sequences decoded together (comma-separated)")] = "1",
    steps: Annotated[int, typer.Option(help="timed decode steps (after block_size + 2 warm-up steps)")] = 16,
    caches: Annotated[
        str,
        typer.Option(help="comma-separated: dynamic, dynamic-flash, static-compiled, quanto, headq, headq-compiled"),
    ] = "dynamic,dynamic-flash,quanto,headq",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="a HeadQ setting over the basis's: key=value, e.g. value_bits=2")
    ] = None,
    tensor_parallel: Annotated[
        bool, typer.Option("--tensor-parallel", help="under torchrun: split the model by its tp_plan (all ranks)")
    ] = False,
    device_map: Annotated[
        str | None, typer.Option(help="spread the model's layers over the GPUs (accelerate): 'auto', 'balanced', ...")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the rows as a JSON list")] = None,
    markdown: Annotated[Path | None, typer.Option(help="write the markdown table here too")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG: tokens/s against context, and KV bytes per cache")] = None,
) -> None:
    """Whole-model decode speed of HeadQ against DynamicCache (sdpa, flash) and quanto 2-bit, on this device.

    Caches hold random states (the speed does not depend on them); on CUDA the GPU's busy time a step
    and peak memory are reported too. The timed steps come after block_size + 2 warm-up steps. Under
    `torchrun --nproc-per-node N -m transformers_headq.cli bench --tensor-parallel ...` the ranks decode
    together and rank 0 reports (its own share of the cache's bytes)."""
    from .factory import HeadQCacheFactory
    from .shipped import resolve_basis
    from .speed import check_cache_kinds, compare_decode_speed, markdown_table, plot_decode_speed

    # arguments first, before the model loads: a typo fails at once
    overrides = _settings(settings or [])
    contexts, batches = _int_list(context, "--context"), _int_list(batch, "--batch")
    names = tuple(name.strip() for name in caches.split(",") if name.strip())
    try:
        check_cache_kinds(names)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--caches") from exc
    rank_id, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not tensor_parallel:
            raise typer.BadParameter(
                "several processes time one model only with --tensor-parallel", param_hint="--tensor-parallel"
            )
        rank_id, device = _join_process_group(world)
    query_basis = resolve_basis(basis)  # its errors (missing, corrupt) say what to do themselves
    loaded = _load(model, device, dtype, tensor_parallel, device_map)
    try:
        factory = HeadQCacheFactory.from_pretrained(query_basis, loaded.model, **overrides)
    except HeadQError:
        raise
    except (TypeError, ValueError) as exc:  # unknown or invalid settings
        raise typer.BadParameter(str(exc), param_hint="--set") from exc
    skipped: dict[str, str] = {}
    rows: list[Any] = []

    def save() -> None:  # after every grid point: an interrupted run keeps what it measured
        if rank_id != 0:
            return
        if markdown is not None:
            markdown.write_text(markdown_table(rows) + "\n")
        if json_path is not None:
            json_path.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")

    for n_tokens in contexts:
        for n_seqs in batches:
            message = f"timing decode steps at {n_tokens} tokens x batch {n_seqs}"
            with console.status(message) if rank_id == 0 else contextlib.nullcontext():
                rows += compare_decode_speed(
                    loaded.model, factory, batch=n_seqs, context=n_tokens, steps=steps, caches=names,
                    block_size=factory.config.block_size, on_skip=skipped.__setitem__,
                )  # fmt: skip
            save()
    if rank_id != 0:
        return
    for name, why in skipped.items():
        console.print(f"[yellow]{name} left out: {why}[/yellow]")  # not run here, or did not fit
    where = torch.cuda.get_device_name(loaded.model.device) if loaded.model.device.type == "cuda" else "CPU"
    split = (
        f", {world} tensor-parallel ranks" if tensor_parallel else f", device_map={device_map}" if device_map else ""
    )
    console.print(f"\n{loaded.name}, {dtype}, on {where}{split}: random states, {steps} timed steps a cache\n")
    typer.echo(markdown_table(rows))
    if plot is not None:
        plot_decode_speed(rows, str(plot))
        console.print(f"plot: {plot}")


def _int_list(text: str, option: str) -> list[int]:
    """Comma-separated positive integers, or a clear error naming ``option``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{option} takes positive integers, comma-separated (e.g. 4096,32768), not {text!r}")
    return values


def _settings(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs as HeadQ setting overrides: integers, floats, ``none`` or strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes key=value (e.g. value_bits=2), not {item!r}")
        value: object = None if text.lower() == "none" else text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        out[key.strip()] = value
    unknown = set(out) - {field.name for field in dataclasses.fields(HeadQConfig)}
    if unknown:
        raise typer.BadParameter(f"unknown HeadQ settings {sorted(unknown)}", param_hint="--set")
    return out


def _beside(basis: str, name: str) -> QueryBasis | None:
    """The basis ``name`` (key-pca, oblique) calibrated beside ``basis``, or ``None``: its rows are then skipped,
    silently where there is none (an older calibration), with the reason where it is there but unusable."""
    from .hub import BasisNotAvailableError
    from .shipped import resolve_basis

    try:
        return resolve_basis(basis, control=name)
    except BasisNotAvailableError:
        return None
    except HeadQError as err:  # corrupt, or of another model: the rows that need it are skipped
        console.print(f"[yellow]the {name} basis beside {basis} is not used: {err}[/yellow]")
        return None


@app.command()
def diagnose(
    model: ModelOption = DEFAULT_MODEL,
    corpus: CorpusOption = DEFAULT_CORPUS,
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 512,
    windows: Annotated[int, typer.Option(help="windows")] = 4,
    key_bits: Annotated[int, typer.Option(help="bits of the plain key quantizer")] = 2,
    key_grouping: Annotated[str, typer.Option(help="'channel' or 'token'")] = "channel",
    plot: Annotated[Path, typer.Option(help="PNG of KL against each measure")] = Path("headq-diagnose.png"),
    json_path: Annotated[Path | None, typer.Option("--json", help="write per-head rows and correlations")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Per layer and head: attention KL against key MSE, score error and Fisher error (Spearman ρ)."""
    from .diagnose import correlations, plot_diagnosis
    from .diagnose import diagnose as run_diagnosis

    loaded = _load(model, device)
    ids = _windows(loaded.tokenizer, corpus, "evaluation", seq_len, windows)
    config = HeadQConfig(key_bits=key_bits, key_grouping=key_grouping, rank=0)  # type: ignore[arg-type]
    rows = run_diagnosis(loaded.model, ids, config)
    table = Table(title=f"Spearman correlation with attention KL over {len(rows)} (layer, KV head) pairs")
    table.add_column("measure")
    table.add_column("Spearman ρ", justify="right")
    rhos = correlations(rows)
    for measure, rho in rhos.items():
        table.add_row(measure, f"{rho:.3f}")
    console.print(table)
    if json_path is not None:
        heads = [dataclasses.asdict(row) for row in rows]
        json_path.write_text(json.dumps({"spearman_vs_kl": rhos, "heads": heads}, indent=2) + "\n")
    plot_diagnosis(rows, str(plot))
    console.print(f"plot: {plot}")


@app.command()
def card(
    basis: Annotated[Path, typer.Argument(help="basis folder: README.md is written into it")],
    repo_id: Annotated[str, typer.Option(help="the Hub repo id the card names")],
    base_model: Annotated[str | None, typer.Option(help="Hub id of the model the basis is for")] = None,
    quality: Annotated[Path | None, typer.Option(help="rows of `headq eval --json` measured with this basis")] = None,
    license: Annotated[str, typer.Option(help="licence of the basis")] = "apache-2.0",
) -> None:
    """Write a model card (Hub metadata, how the basis was made, measured quality, usage)."""
    from .model_card import basis_model_card

    loaded = QueryBasis.from_folder(basis)
    rows = json.loads(quality.read_text()) if quality is not None else None
    basis_model_card(loaded, repo_id, base_model, rows, license).save(basis / "README.md")
    console.print(f"wrote {basis / 'README.md'}")


@app.command()
def push(
    basis: Annotated[Path, typer.Argument(help="basis folder written by `headq calibrate`")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo to create or update, 'org/name'")],
    message: Annotated[str | None, typer.Option(help="commit message")] = None,
    private: Annotated[bool, typer.Option(help="create the repo private")] = False,
    branch: Annotated[str | None, typer.Option(help="branch to commit to (default: main)")] = None,
    create_pr: Annotated[bool, typer.Option(help="open a pull request instead of committing")] = False,
    base_model: Annotated[str | None, typer.Option(help="Hub id of the model, for the card")] = None,
    quality: Annotated[Path | None, typer.Option(help="`headq eval --json` rows for the card")] = None,
    token: Annotated[str | None, typer.Option(help="Hub token (default: `hf auth login`'s)")] = None,
) -> None:
    """Upload a basis (and its key-PCA control, if present) with a model card, in one commit."""
    _push(basis, repo_id, message, private, branch, create_pr, base_model, quality, token)


def _push(
    basis: Path,
    repo_id: str,
    message: str | None = None,
    private: bool = False,
    branch: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    quality: Path | None = None,
    token: str | None = None,
) -> None:
    loaded = QueryBasis.from_folder(basis)
    extra = {name: QueryBasis.from_folder(basis / name) for name in BESIDE if (basis / name).is_dir()}
    rows = json.loads(quality.read_text()) if quality is not None else None
    commit = loaded.push_to_hub(
        repo_id,
        commit_message=message,
        private=private or None,
        token=token,
        branch=branch,
        create_pr=create_pr,
        base_model=base_model,
        quality_rows=rows,
        extra_folders=extra,
    )
    console.print(f"pushed {basis} to {repo_id}: commit {commit.oid} ({commit.commit_url})")


@app.command()
def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub repo of a basis, 'org/name'")],
    revision: Annotated[str | None, typer.Option(help="branch, tag or commit hash")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="HF cache folder (default: the standard one)")] = None,
    token: Annotated[str | None, typer.Option(help="Hub token for private repos")] = None,
) -> None:
    """Download a basis, and the sub-bases beside it (key-pca, oblique) where the repo has them, into the HF
    cache (for offline use later) and check that they load."""
    from .hub import BasisNotAvailableError, download_basis, load_downloaded

    path = download_basis(repo_id, revision=revision, cache_dir=cache_dir, token=token)
    loaded = load_downloaded(repo_id, path, cache_dir, QueryBasis.from_folder)
    beside = []
    for name in BESIDE:
        try:
            QueryBasis.from_pretrained(repo_id, revision=revision, cache_dir=cache_dir, token=token, subfolder=name)
        except BasisNotAvailableError:
            continue
        beside.append(name)
    fp = loaded.fingerprint
    console.print(
        f"{repo_id} -> {path}\n  {fp['model_type']}, {fp['num_hidden_layers']} layers, "
        f"{fp['num_key_value_heads']} KV heads, head dim {fp['head_dim']}, rank {loaded.rank}; "
        f"calibrated for {loaded.metadata.get('model_id', '?')} on {loaded.metadata.get('corpus', '?')}"
        + (f"; with {', '.join(beside)}" if beside else "")
    )


def main() -> None:
    """The ``headq`` command: bad input the library recognises (a missing or corrupt basis, a basis of another
    model, an unsupported model, a model that does not load) ends with its one-paragraph message and exit
    status 2, not a traceback; anything else is a bug and keeps its traceback."""
    try:
        app()
    except HeadQError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
