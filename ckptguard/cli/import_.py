"""``ckptguard import SRC DEST``: a torch.save file, safetensors file or set, or DCP directory
saved as a verified ckptguard checkpoint (``ckptguard.importer``). The module's name has a
trailing underscore: ``import`` is a Python keyword."""

from __future__ import annotations

import click

from ckptguard.units import format_size

from ._output import echo, ratio


@click.command("import")
@click.argument("src")
@click.argument("dest")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Unpickle with full pickle, which can run arbitrary code from SRC: only for files you "
    "trust. Without it, torch's weights-only unpickler reads them and refuses other globals.",
)
@click.option("--step", type=int, default=None, help="The training step to record.")
@click.option(
    "--compress",
    default="auto",
    show_default=True,
    help="As ckptguard.save's: auto, lz4, zstd, zstd:N or none.",
)
def command(src: str, dest: str, allow_pickle: bool, step: int | None, compress: str) -> None:
    """Save a checkpoint of another format as a verified ckptguard checkpoint.

    SRC is a torch.save file (zip or legacy), a safetensors file, a sharded safetensors set (its
    directory or its *.safetensors.index.json) or a PyTorch DCP directory; its kind is told by
    content. DEST is a checkpoint path as ckptguard.save takes it (STORE/NAME); it must not
    exist. SRC is read onto the CPU (not verified: it has no ckptguard hashes), saved, then
    every byte of DEST is verified. On any failure nothing is left at DEST.
    """
    from ckptguard.importer import import_checkpoint
    from ckptguard.options import SaveOptions

    try:
        SaveOptions(compress=compress)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--compress") from None
    if allow_pickle:
        echo(
            f"warning: --allow-pickle: unpickling {src} can run arbitrary code; do this only "
            "for a file you trust",
            err=True,
        )
    report = import_checkpoint(src, dest, allow_pickle=allow_pickle, step=step, compress=compress)
    info = report.info
    echo(
        f"imported {report.source} ({report.kind}) as {info.path}",
        f"  {info.tensors} tensors, {format_size(info.raw_bytes)} raw, "
        f"{format_size(info.stored_bytes)} stored ({ratio(info.raw_bytes, info.stored_bytes)})",
        f"  verified: {report.verified.chunks_checked} chunks, "
        f"{format_size(report.verified.bytes_checked)} checked",
    )
