"""The ``convify`` command: a thin layer over the library (:mod:`convify.convert`, :mod:`convify.models`)."""
from __future__ import annotations

import sys
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
        return path.with_name(f"{path.stem}.fcn.pt")
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


class _Size(click.ParamType):
    """``auto``, ``none`` or a positive number of pixels."""

    name = "auto|none|PIXELS"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value in ("auto", None):
            return value
        text = str(value).strip().lower()
        if text in ("auto", "none"):
            return None if text == "none" else "auto"
        if text.isdigit() and int(text) > 0:
            return int(text)
        self.fail(f"{value!r} is not 'auto', 'none' or a positive number of pixels", param, ctx)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", help="A converted file, a model file convify convert accepts, or an architecture "
                              "(its pretrained weights, or --weights). Default: EfficientNet-Lite0, offline.")
@click.option("--weights", help="A state_dict for --model ARCH.")
@click.option("--class", "queries", multiple=True, metavar="NAME|ID",
              help="A class to draw: ImageNet name (any case, unique prefix) or index. Repeatable.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the best classes to print and to draw in the grid.")
@click.option("--size", type=_Size(), default="auto", show_default=True,
              help="Shorter side the image is resized to: auto (twice the window), a number, or none.")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory for the files written.")
@click.option("--format", "formats", default="png,json", show_default=True,
              help="What to write, comma-separated: png (overlay), json (summary), npy (raw maps).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--trust-pickle", is_flag=True, help="As for convify convert.")
def heatmap(images: tuple[str, ...], model: Optional[str], weights: Optional[str], queries: tuple[str, ...],
            top_k: int, size, output: Path, formats: str, force: bool, trust_pickle: bool) -> None:
    """Draw class heatmaps for IMAGES with one forward pass each.

    Prints each image's best classes with their score and peak box (in the image's own pixels) and writes
    IMAGE.heatmap.png (the top classes side by side) or, with --class, IMAGE.CLASS.png per class, plus
    IMAGE.json. An image that cannot be read is reported and skipped; the exit code is then 1.

    Example:

        convify heatmap samples/cat_and_coffee.jpg --class espresso --class "tiger cat" -o out/
    """
    from .engine import heatmap as run_heatmap
    from .models import network_for

    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = sorted(set(wanted) - {"png", "json", "npy"})
    if unknown or not wanted:
        raise click.UsageError(f"--format takes png, json and npy, comma-separated; got {formats!r}")
    stems = [Path(i).stem for i in images]
    if len(set(stems)) != len(stems):
        raise click.UsageError("two IMAGES have the same file name; their outputs would collide")
    try:
        fcn = network_for(model, weights, trust_pickle=trust_pickle)
        if fcn.classes:
            from .engine import resolve_class

            for query in queries:
                resolve_class(fcn.classes, query)
    except ConvifyError as e:
        raise click.ClickException(str(e)) from None
    failures = 0
    show_bar = len(images) > 1
    with click.progressbar(images, label="heatmaps", file=sys.stderr,
                           hidden=not show_bar) as bar:
        for image in bar:
            try:
                result = run_heatmap(image, fcn, size=size)
                written = result.save(output, queries=queries, k=top_k, formats=wanted, force=force)
            except ConvifyError as e:
                failures += 1
                click.echo(f"\nError: {image}: {e}" if show_bar else f"Error: {image}: {e}", err=True)
                continue
            lines = [f"{image} ({result.image.width}x{result.image.height} px, map {result.logits.shape[1]}x"
                     f"{result.logits.shape[2]}):"]
            shown = [result.prediction(q) for q in queries] or result.top(top_k)
            for p in shown:
                box = ", ".join(f"{v:.0f}" for v in p.box)
                lines.append(f"  {p.name:<24} {p.score:6.3f}  peak cell {p.cell}  box ({box})")
            lines.append("  wrote " + ", ".join(str(w) for w in written))
            click.echo(("\n" if show_bar else "") + "\n".join(lines))
    if failures:
        raise click.ClickException(f"{failures} of {len(images)} images failed")


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
