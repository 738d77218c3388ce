"""The ``convify`` command: a thin layer over the library (:mod:`convify.convert`, :mod:`convify.models`)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import click

from .errors import ConvifyError, OutputExistsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convify")
def cli() -> None:
    """Turn CNN classifiers into exact fully-convolutional networks that give class score maps.

    Example:

        convify convert resnet50_weights.pt --arch resnet50
    """


def _default_output(model: str) -> Path:
    """``dir/name.pt`` -> ``dir/name.fcn.pt``; an architecture name -> ``./name.fcn.pt``."""
    path = Path(model)
    if path.is_file():
        return path.with_name(f"{path.name.split('.')[0]}.fcn.pt")
    return Path(f"{model.replace(':', '_').replace('/', '_')}.fcn.pt")


def _params(module) -> str:
    count = sum(p.numel() for p in module.parameters())
    return f"{count / 1e6:.1f}M parameters"


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the converted network (default: beside MODEL, NAME.fcn.pt).")
@click.option("--arch", help="Architecture of a state_dict file: vgg16, resnet50, timm:efficientnet_lite0, ...")
@click.option("--input-size", type=click.IntRange(min=1),
              help="Native input size in pixels (default: the architecture's, else 224).")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--trust-pickle", is_flag=True,
              help="Unpickle a whole model even if it uses classes outside torch/torchvision/timm "
                   "(runs code from the file: only for files you trust).")
def convert(model: str, output: Optional[Path], arch: Optional[str], input_size: Optional[int], force: bool,
            trust_pickle: bool) -> None:
    """Convert MODEL into a fully-convolutional network and check it equals the original.

    MODEL is a file written by torch.save (a state_dict, which needs --arch, or a whole model), or an
    architecture name alone (random weights, for trying things out).

    Example:

        convify convert resnet50_weights.pt --arch resnet50 -o resnet50.fcn.pt
    """
    from .convert import convert as convert_model
    from .models import load_model

    output = output or _default_output(model)
    if output.exists() and not force:
        raise click.ClickException(f"{output} already exists; use --force to overwrite it")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded, info = load_model(model, arch=arch, trust_pickle=trust_pickle)
        for warning in caught:
            click.echo(f"Warning: {warning.message}", err=True)
        size = input_size or info.input_size
        click.echo(f"Loaded {info.arch or type(loaded).__name__} ({_params(loaded)}); native input {size} px")
        fcn = convert_model(loaded, input_size=size, arch=info.arch, classes=info.classes, mean=info.mean,
                            std=info.std)
        click.echo("Rewrites:")
        width = max((len(r.layer) for r in fcn.rewrites), default=0)
        for r in fcn.rewrites:
            click.echo(f"  {r.layer:<{width}}  {r.before}  ->  {r.after}")
        click.echo(_geometry_lines(fcn))
        click.echo(_check_line(fcn))
        fcn.save(output, force=force)
    except OutputExistsError as e:
        raise click.ClickException(str(e)) from None
    except ConvifyError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Wrote {output}")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
def info(file: str) -> None:
    """Show what a converted FILE holds: source architecture, geometry, classes, rewrites.

    Example:

        convify info resnet50.fcn.pt
    """
    from .fcn import load

    try:
        fcn = load(file)
    except ConvifyError as e:
        raise click.ClickException(str(e)) from None
    meta = fcn.meta
    click.echo(f"{file}: convify fully-convolutional network ({_params(fcn)})")
    click.echo(f"Architecture: {meta.arch or 'unknown'}")
    mean = ", ".join(f"{v:.3f}" for v in meta.mean)
    std = ", ".join(f"{v:.3f}" for v in meta.std)
    click.echo(f"Input: native {meta.input_size} px, RGB mean ({mean}), std ({std})")
    if meta.classes:
        first = ", ".join(meta.classes[:3])
        click.echo(f"Classes: {len(meta.classes)} ({first}, ...)")
    else:
        click.echo("Classes: unnamed")
    click.echo(_geometry_lines(fcn))
    if fcn.rewrites:
        click.echo("Rewrites:")
        width = max(len(r.layer) for r in fcn.rewrites)
        for r in fcn.rewrites:
            click.echo(f"  {r.layer:<{width}}  {r.before}  ->  {r.after}")
    click.echo(_check_line(fcn))


def _geometry_lines(fcn) -> str:
    g = fcn.geometry
    big = 2 * g.window
    h, w = g.output_size(big)
    lines = [
        f"Geometry: stride {g.stride} px, window {g.window} px, offset {g.offset}, receptive field "
        f"{g.receptive_field} px (cell (0,0) from {g.rf_offset} px)",
        f"  map size: {big}x{big} px in -> {h}x{w} cells out; smallest input {g.min_input_size()} px",
    ]
    if not g.local:
        shown = ", ".join(g.global_context[:3]) + (", ..." if len(g.global_context) > 3 else "")
        lines.append(f"  not local: {len(g.global_context)} layers see the whole image ({shown})")
    return "\n".join(lines)


def _check_line(fcn) -> str:
    check = fcn.check
    if not check:
        return "Check: not checked against the original"
    head = f"Check: equals the original at {fcn.meta.input_size} px: max |difference|"
    if check.get("max_abs_diff_float64") is None:
        return f"{head} {check['max_abs_diff']:.2g} (float32)"
    return (f"{head} {check['max_abs_diff_float64']:.2g} in float64 ({check['max_abs_diff']:.2g} in float32: "
            "rounding from a different summation order)")
