"""The ``convify`` command: a thin layer over the library (:mod:`convify.convert`, :mod:`convify.models`).

Errors: every failure is one ``Error: ...`` line on stderr and exit code 1 (a convify error's own message;
out of memory; anything unexpected named as such), wrong usage is exit code 2, and no traceback is shown
unless ``convify --debug ...`` asks for it. Everything printed that comes from a file (architecture, class
and layer names, image names, error messages that quote them) goes through :func:`convify.text.printable`,
so a file cannot forge report lines or send terminal escapes.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click

from . import limits
from .errors import ConvifyError, OutputExistsError, failure_line
from .text import printable

_DEBUG_HELP = "Show the full traceback of an error instead of its one-line message."


class _Group(click.Group):
    """A group whose commands' exceptions become one ``Error:`` line (exit 1), or a traceback with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(_error_line(e, ctx.invoked_subcommand)) from None


def _error_line(error: BaseException, command: Optional[str] = None) -> str:
    """The one line printed after ``Error: `` for an exception (:func:`convify.errors.failure_line`, escaped)."""
    if isinstance(error, MemoryError) and command != "heatmap":
        return "out of memory (the model is too large for this machine)"
    line = printable(failure_line(error), limit=1000)
    return line if isinstance(error, (ConvifyError, MemoryError)) else f"{line} (run with --debug for the traceback)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convify")
@click.option("--debug", is_flag=True, help=_DEBUG_HELP)
def cli(debug: bool) -> None:
    """Turn CNN classifiers into exact fully-convolutional networks that give class score maps.

    Example:

        convify convert resnet50_weights.pt --arch resnet50

        convify --debug heatmap photo.jpg
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
@click.option("--input-size", type=click.IntRange(min=1, max=limits.MAX_INPUT_SIZE),
              help=f"Native input size in pixels, at most {limits.MAX_INPUT_SIZE} (default: the architecture's, "
                   "else 224).")
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
    from .outputs import check_not_inputs, ensure_directory

    output = output or _default_output(model)
    check_not_inputs([output], [model])
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; use --force to overwrite it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, info = load_model(model, arch=arch, trust_pickle=trust_pickle)
    for warning in caught:
        click.echo(f"Warning: {printable(warning.message, limit=1000)}", err=True)
    size = input_size or info.input_size
    click.echo(f"Loaded {printable(info.arch or type(loaded).__name__)} ({_params(loaded)}); native input {size} px")
    fcn = convert_model(loaded, input_size=size, arch=info.arch, classes=info.classes, mean=info.mean,
                        std=info.std)
    click.echo(_rewrite_lines(fcn))
    click.echo(_geometry_lines(fcn))
    click.echo(_check_line(fcn))
    ensure_directory(output.parent)
    fcn.save(output, force=force)
    click.echo(f"Wrote {printable(output)}")


@cli.command("export")
@click.argument("model")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              help="The ONNX file to write (default: beside MODEL, NAME.onnx).")
@click.option("--weights", help="A state_dict for MODEL given as an architecture.")
@click.option("--stride", type=click.IntRange(min=1), help="Export the finer network whose cells are this many "
              "pixels apart (as convify heatmap --stride).")
@click.option("--opset", type=click.IntRange(min=1), help="ONNX opset (default: torch's; 18 or later).")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--trust-pickle", is_flag=True, help="As for convify convert.")
def export(model: str, output: Optional[Path], weights: Optional[str], stride: Optional[int], opset: Optional[int],
           force: bool, trust_pickle: bool) -> None:
    """Export MODEL to ONNX with dynamic batch, height and width, checked with onnxruntime before it is kept.

    MODEL is a converted file, a model file convify convert accepts, or an architecture (its pretrained
    weights, or --weights), as for convify heatmap --model. The file maps image (N, 3, H, W) to scores
    (N, classes, H', W') and holds the geometry, native size, mean/std and class names in its metadata.
    Needs pip install 'convify[onnx]'.

    Example:

        convify export resnet50.fcn.pt -o resnet50.onnx
    """
    from .export import default_check_sizes, export_onnx
    from .models import network_for
    from .outputs import check_not_inputs

    output = output or _default_onnx_output(model)
    check_not_inputs([output], [model, weights])
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; use --force to overwrite it")
    fcn = network_for(model, weights, trust_pickle=trust_pickle)
    if stride is not None:
        from .finer import finer_stride

        fcn = finer_stride(fcn, stride)
    sizes = default_check_sizes(fcn)
    export_onnx(fcn, output, opset=opset, check_sizes=sizes, force=force)
    shown = ", ".join(f"{h}x{w}" + (f" (batch {n})" if n > 1 else "") for n, h, w in sizes)
    click.echo(f"Exported {printable(fcn.meta.arch or 'the network')} (stride {fcn.geometry.stride} px, window "
               f"{fcn.geometry.window} px) with dynamic batch, height and width"
               + (f", opset {opset}" if opset else ""))
    click.echo(f"Checked: onnxruntime equals torch at {shown}")
    click.echo(f"Wrote {printable(output)}")


def _default_onnx_output(model: str) -> Path:
    """``dir/name.fcn.pt`` -> ``dir/name.onnx``; an architecture name -> ``./name.onnx``."""
    path = Path(model)
    if path.is_file():
        name = path.name.removesuffix(".pt").removesuffix(".pth").removesuffix(".fcn")
        return path.with_name(f"{name}.onnx")
    return Path(f"{model.replace(':', '_').replace('/', '_')}.onnx")


class _Size(click.ParamType):
    """``auto``, ``none`` or a positive number of pixels."""

    name = "auto|none|PIXELS"

    def convert(self, value, param, ctx):
        if value in ("auto", None):
            return value
        text = str(value).strip().lower()
        if text in ("auto", "none"):
            return None if text == "none" else "auto"
        if text.isascii() and text.isdigit() and int(text[:12]) > 0:  # [:12]: no 5000-digit int() in the way
            if len(text) > 12 or int(text) > limits.MAX_SIDE:
                self.fail(f"{printable(value, limit=40)} px is more than the longest side convify allows "
                          f"({limits.MAX_SIDE} px)", param, ctx)
            return int(text)
        self.fail(f"{printable(value, limit=40)!r} is not 'auto', 'none' or a positive number of pixels", param, ctx)


class _Scales(click.ParamType):
    """Comma-separated factors of the size: ``1,1.5,2``."""

    name = "FACTORS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value)[:200].split(",")]
        try:
            factors = tuple(float(p) for p in parts)
        except ValueError:
            factors = ()
        if not factors or len(factors) > limits.MAX_SCALES or not all(0 < f <= limits.MAX_SCALE for f in factors):
            self.fail(f"{printable(value, limit=40)!r} is not 1 to {limits.MAX_SCALES} comma-separated factors above 0 "
                      f"and at most {limits.MAX_SCALE:g} (for example 1,1.5,2)", param, ctx)
        return factors


class _Bytes(click.ParamType):
    """A number of bytes: ``2G``, ``500M``, ``1.5GB``, ``123456``."""

    name = "BYTES"
    _UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
        number, unit = (text[:-1], text[-1]) if text[-1:] in "kmgt" else (text, "")
        try:
            amount = float(number) * self._UNITS[unit] if len(number) <= 20 else -1.0
        except ValueError:
            amount = -1.0
        if not 2 ** 20 <= amount <= 2 ** 50:
            self.fail(f"{printable(value, limit=40)!r} is not an amount of memory from 1M to 1024T "
                      "(write 2G, 500M, ...)", param, ctx)
        return int(amount)


_DEVICE = click.option("--device", help="Where the network runs: cpu, cuda, cuda:N or mps (default: cpu, or where a "
                       "loaded network's weights are).")
_PRECISION = click.option("--precision", type=click.Choice(["float32", "bf16", "bfloat16", "fp16", "float16"]),
                          default="float32", show_default=True,
                          help="bf16 (CPU, GPU) or fp16 (GPU): autocast, faster and NOT exact; convify bench "
                          "--precision bf16 measures the agreement. A non-finite score is an error.")


@cli.command()
@click.argument("images", nargs=-1)
@click.option("--manifest", "manifests", multiple=True, type=click.Path(dir_okay=False),
              help="A text file naming one image a line (relative paths from its directory). Repeatable.")
@click.option("--ext", "extensions", help="Extensions a directory or glob keeps, comma-separated (default: the "
              "image, TIFF and slide formats convify reads).")
@click.option("--model", help="A converted file, a model file convify convert accepts, or an architecture "
                              "(its pretrained weights, or --weights). Default: EfficientNet-Lite0, offline.")
@click.option("--weights", help="A state_dict for --model ARCH.")
@click.option("--class", "queries", multiple=True, metavar="NAME|ID",
              help="A class to draw: ImageNet name (any case, unique prefix) or index. Repeatable.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the best classes to print and to draw in the grid (at most the model's classes; "
                   f"at most {limits.MAX_GRID_PANELS} drawn).")
@click.option("--size", type=_Size(), default="auto", show_default=True,
              help="Shorter side the image is resized to: auto (twice the window, scaled down to fit "
                   f"--max-pixels), a number (at most {limits.MAX_SIDE}), or none.")
@click.option("--max-pixels", "max_pixels", type=click.IntRange(min=1), default=limits.MAX_PIXELS,
              show_default=True, help="Most pixels the network may run on for one image.")
@click.option("--max-memory", "max_memory", type=_Bytes(), default="2G", show_default=True,
              help="Memory budget for the network's tensors (a batch's together); larger images are computed in "
                   "exact tiles.")
@click.option("--batch-size", "batch_size", type=click.IntRange(min=1, max=4096),
              help="Most images of the same size in one forward pass (default: 1 on a CPU, where it is fastest, "
                   "16 on a GPU).")
@click.option("--workers", type=click.IntRange(min=0, max=1024),
              help="Processes that read and resize images while the network runs (default: half the cores; 0: none); "
                   "with --ray, the actors that run the network.")
@click.option("--ray", "ray_address", metavar="auto|ADDRESS", help="Run on a Ray cluster (pip install "
              "'convify[ray]'): auto finds or starts one, ADDRESS joins one. Outputs go to -o, which every node "
              "must see.")
@click.option("--level", type=click.IntRange(min=0), help="Pyramid level of a TIFF or slide to read (0: full "
              "resolution); the image is then streamed (see below).")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), help="A downsample factor instead of "
              "--level: the closest pyramid level (no resampling).")
@click.option("--overlay-size", "overlay_side", type=click.IntRange(min=64, max=limits.MAX_SIDE), default=4096,
              show_default=True, help="Long side of the overlays drawn for streamed images.")
@click.option("--all-classes", is_flag=True, help="Streamed images: store every class's scores, not just "
              "--class ones and each cell's top-k.")
@click.option("--pad", type=click.Choice(["reflect", "zeros", "none"]), default="reflect", show_default=True,
              help="Pad the image so cells reach its edges (reflect, or zeros: the network's own padding "
                   "value); none keeps every window inside the image and hatches the border no cell covers.")
@click.option("--scales", type=_Scales(), help="Multi-scale fusion: run at these factors of --size (1,1.5,2) and "
              "average the class probabilities on one grid, each map placed by its geometry.")
@click.option("--flip", is_flag=True, help="Also run the mirrored image and average its map, mirrored back cell by "
              "cell, in (the VGG paper's dense evaluation, with --scales).")
@click.option("--stride", type=click.IntRange(min=1), help="A finer map: cells this many pixels apart (the "
              "network's stride divided by 2, 4...; 16 or 8 for VGG16), exactly; costs 4x, 16x... the positions "
              "after the removed subsampling.")
@_DEVICE
@_PRECISION
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory for the files written (images found in a directory mirror "
              "their place in it).")
@click.option("--format", "formats", default="png,json", show_default=True,
              help="What to write, comma-separated: png (overlay), json (summary), npy (raw maps).")
@click.option("--table", "tables", multiple=True, metavar="FILE|none",
              help="The results table: FILE.parquet or FILE.csv (one row per image: status, sizes, top classes, "
                   "peak scores, cells, boxes). Repeatable. Default: OUTPUT/results.parquet when the run has "
                   "more than one image; none: no table.")
@click.option("--force", is_flag=True, help="Redo images whose outputs exist and overwrite them (never an input).")
@click.option("--trust-pickle", is_flag=True, help="As for convify convert.")
@click.pass_context
def heatmap(ctx: click.Context, images: tuple[str, ...], manifests: tuple[str, ...], extensions: Optional[str],
            model: Optional[str], weights: Optional[str], queries: tuple[str, ...], top_k: int, size,
            max_pixels: int, max_memory: int, batch_size: Optional[int], workers: Optional[int],
            ray_address: Optional[str], level: Optional[int], scale: Optional[float], overlay_side: int,
            all_classes: bool, pad: str, scales: Optional[tuple], flip: bool, stride: Optional[int],
            device: Optional[str], precision: str, output: Path, formats: str, tables: tuple[str, ...],
            force: bool, trust_pickle: bool) -> None:
    """Draw class heatmaps for IMAGES: files, directories (searched recursively), globs ('photos/**/*.jpg').

    Prints each image's best classes with their score and peak box (in the image's own pixels) and writes
    IMAGE.heatmap.png (the top classes side by side) or, with --class, IMAGE.CLASS.png per class, plus
    IMAGE.json, under -o mirroring the input tree (a/x.jpg and b/x.jpg -> OUT/a/x.*, OUT/b/x.*), and a results
    table for the run. Images of the same size run together in batched forward passes while worker processes
    read the next ones.

    Resumable: an image whose outputs all exist is skipped (--force redoes it); each image's files appear
    together or not at all, so a run that was killed, started again, does only what is left. An image that
    fails (unreadable, too large, out of memory, output not writable) is reported on one line and in the
    table; the others are still done, and the exit code is then 1.

    Images too large for memory (a TIFF or whole-slide image with --size none and more than --max-pixels,
    or any image with --level/--scale) are streamed: read region by region, computed in exact tiles within
    --max-memory, the map written to IMAGE.zarr as it comes (the --class classes' scores, each cell's top-k,
    each class's best cell), overlays drawn at --overlay-size.

    Example:

        convify heatmap samples/cat_and_coffee.jpg --class espresso --class "tiger cat" -o out/

        convify heatmap photos/ -o maps/ --batch-size 8          # again: skips what is done

        convify heatmap photos/ -o /shared/maps --ray auto --workers 4
    """
    from .batch import RunSettings, default_batch_size
    from .collection import find_images, write_table
    from .devices import check_precision, on_device, resolve_device
    from .large import is_large
    from .models import network_for
    from .outputs import check_not_inputs
    from .runner import OutputSpec, in_input_order, run_images, streamer

    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = sorted(set(wanted) - {"png", "json", "npy"})
    if unknown or not wanted:
        raise click.UsageError(f"--format takes png, json and npy, comma-separated; got {printable(formats, 60)!r}")
    if not images and not manifests:
        raise click.UsageError("give IMAGES (files, directories or globs) or --manifest FILE")
    table_paths = _table_paths(tables)
    found = find_images(images, manifests, extensions.split(",") if extensions is not None else None, exclude=output)
    if not found.images:
        raise ConvifyError("no images found in " + ", ".join(printable(i, 80) for i in images + manifests)
                           + " (see --ext)")
    if not tables and len(found.images) > 1:
        table_paths = [output / "results.parquet"]
    check_not_inputs(table_paths, [model, weights, *manifests, *found.images])  # --force or not
    fcn = network_for(model, weights, trust_pickle=trust_pickle)
    if stride is not None:
        from .finer import finer_stride

        fcn = finer_stride(fcn, stride)
    fcn = on_device(fcn, device)
    precision = check_precision(resolve_device(None, fcn), precision)  # refused once, not per image
    if fcn.classes:
        top_k = min(top_k, len(fcn.classes))
    settings = RunSettings(size, max_pixels, max_memory, pad, scales, flip, precision,
                           batch_size or default_batch_size(fcn))
    out = OutputSpec(output, tuple(queries), top_k, tuple(wanted), force,
                     tuple(str(f) for f in (model, weights) if f))
    backend = None
    if ray_address:
        from .ray import jobs_backend

        backend = jobs_backend(fcn, out, settings, address=ray_address, workers=workers)
    outcomes = run_images(found, fcn, out, settings, workers=workers,
                          is_large=lambda path: is_large(path, size, max_pixels, level, scale),
                          stream=streamer(fcn, out, settings, level=level, scale=scale, overlay_side=overlay_side,
                                          all_classes=all_classes), backend=backend)
    debug = bool(ctx.find_root().params.get("debug"))
    rows, failures, skipped = [], 0, 0
    show_bar = len(found.images) > 1
    clock = _Rate()
    with _pillow_limit(), click.progressbar(length=len(found.images), label="heatmaps", file=sys.stderr, show_eta=True,
                                            hidden=not show_bar, item_show_func=clock.show) as bar:
        for outcome in outcomes:
            rows.append(outcome.row)
            clock.count(outcome.status)
            bar.update(1, outcome)
            lead = "\n" if show_bar else ""
            if outcome.status == "failed":
                failures += 1
                if debug and outcome.detail:
                    click.echo(lead + outcome.detail.rstrip(), err=True)
                hint = " (run with --debug for the traceback)" if outcome.message.startswith("unexpected ") and \
                    not debug else ""
                click.echo(f"{lead}Error: {printable(outcome.job.path)}: {printable(outcome.message, 1000)}{hint}",
                           err=True)
            elif outcome.status == "skipped":
                skipped += 1
                click.echo(f"{lead}{printable(outcome.job.path)}: skipped, its outputs exist (--force redoes it)")
            else:
                click.echo(lead + _outcome_lines(outcome, bool(queries)))
    rows = in_input_order(rows, found.images)
    for path in table_paths:
        write_table(rows, path, force=force)
        click.echo(f"Wrote {printable(path)} ({len(rows)} rows: {len(rows) - failures - skipped} done, "
                   f"{skipped} skipped, {failures} failed)")
    if failures:
        raise click.ClickException(f"{failures} of {len(found.images)} images failed")


class _Rate:
    """Throughput shown on the progress bar: images run (not skipped) per second since the first."""

    def __init__(self) -> None:
        self.started: Optional[float] = None
        self.done = 0

    def count(self, status: str) -> None:
        import time

        if status == "skipped":
            return
        if self.started is None:
            self.started = time.perf_counter()
        else:
            self.done += 1

    def show(self, _: Any) -> Optional[str]:
        import time

        if self.started is None or not self.done:
            return None
        elapsed = time.perf_counter() - self.started
        return f"{self.done / elapsed:.1f} img/s" if elapsed > 0 else None


def _table_paths(tables: tuple[str, ...]) -> list[Path]:
    """The --table files (``none``: none); relative names as given."""
    if any(t.strip().lower() == "none" for t in tables):
        if len(tables) > 1:
            raise click.UsageError("--table none cannot be given with a table file")
        return []
    paths = [Path(t) for t in tables]
    for path in paths:
        if path.suffix.lower() not in (".parquet", ".csv"):
            raise click.UsageError(f"--table takes FILE.parquet, FILE.csv or none; got {printable(str(path), 80)!r}")
    return paths


def _outcome_lines(outcome: Any, asked: bool) -> str:
    """An image's report: its size, map size, its best (or asked) classes' peaks, and the files written."""
    row = outcome.row
    how = f", {outcome.streamed}" if outcome.streamed else ""
    lines = [f"{printable(outcome.job.path)} ({row['image_width']}x{row['image_height']} px, map "
             f"{row['map_rows']}x{row['map_cols']}{how}):"]
    prefix = "asked" if asked and row.get("asked_class") else "top"
    for name, score, cell, box in zip(row[f"{prefix}_class"], row[f"{prefix}_probability"], row[f"{prefix}_cell"],
                                      row[f"{prefix}_box"]):
        shown = ", ".join(f"{v:.0f}" for v in box)
        lines.append(f"  {printable(name, 60):<24} {score:6.3f}  peak cell {tuple(cell)}  box ({shown})")
    lines.append("  wrote " + ", ".join(printable(w) for w in outcome.files))
    return "\n".join(lines)


@contextmanager
def _pillow_limit() -> Iterator[None]:
    """In the command, convify's own bound on decoded pixels (MAX_IMAGE_PIXELS) replaces Pillow's lower
    default (89 MP); the library leaves Pillow's setting to the application that imports it."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limits.MAX_IMAGE_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--size", "sizes", type=click.IntRange(min=1, max=limits.MAX_SIDE), multiple=True, default=(384,),
              show_default=True, help="Square image side in pixels. Repeatable.")
@click.option("--stride", "strides", type=click.IntRange(min=1), multiple=True,
              help="Also time a finer stride against shift-and-stitch. Repeatable.")
@click.option("--repeat", type=click.IntRange(min=1, max=100), default=3, show_default=True,
              help="Runs of each measurement; the best is kept.")
@click.option("--batch", type=click.IntRange(min=1, max=4096), default=32, show_default=True,
              help="Crops per forward pass in the crop loop.")
@click.option("--threads", type=click.IntRange(min=1, max=1024), help="torch threads (default: torch's choice).")
@click.option("--precision", "precisions", type=click.Choice(["bf16", "bfloat16", "fp16", "float16"]), multiple=True,
              help="Also time the dense pass in this precision (autocast) against float32, with their top-1 "
              "agreement per cell. Repeatable.")
@click.option("--compiled", is_flag=True, help="Also time torch.compile (inductor, frozen weights) against eager, "
              "with the compile time.")
@click.option("--images", "image_count", type=click.IntRange(min=1, max=limits.MAX_BENCH_IMAGES),
              help="Throughput instead: generate this many 640x480 JPEG photos (at most "
              f"{limits.MAX_BENCH_IMAGES}) and time convify heatmaps over them against the bare batched forward of "
              "the same batches.")
@click.option("--folder", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Throughput over the images in this directory instead of generated ones (the first "
              f"{limits.MAX_BENCH_IMAGES} found: each is held prepared in memory).")
@click.option("--batch-size", "batch_sizes", type=click.IntRange(min=1, max=4096), multiple=True,
              help="Throughput: images per forward pass. Repeatable (default: 1 and 8).")
@click.option("--workers", type=click.IntRange(min=0, max=1024), help="Throughput: worker processes that read "
              "images (default: half the cores).")
@_DEVICE
def bench(models: tuple[str, ...], sizes: tuple[int, ...], strides: tuple[int, ...], repeat: int, batch: int,
          threads: Optional[int], precisions: tuple[str, ...], compiled: bool, image_count: Optional[int],
          folder: Optional[Path], batch_sizes: tuple[int, ...], workers: Optional[int], device: Optional[str]) -> None:
    """Time the dense pass against the crop loop a user would write, side by side in one run.

    MODELS are architecture names (random weights: speed does not depend on them) or converted files. Prints,
    per model and size: the dense pass, the classifier on every cell's crop (batched), the speed-up, the
    FLOP ratio (the speed-up's limit), the efficiency and the dense pass's peak memory; with --stride, the finer
    network against stitching its map from shifted coarse passes; with --precision, the dense pass in that
    precision against float32 (and how many cells keep their top-1 class); with --compiled, torch.compile.

    With --images N or --folder DIR it measures throughput instead: images per second of convify heatmaps
    (read, resize, run, place the cells; then with each JSON summary written) against the bare batched forward
    of the same prepared images in the same batches (target: at least 0.9x), per --batch-size.

    Example:

        convify bench vgg16 resnet50 --size 384 --size 512 --stride 16 --precision bf16

        convify bench efficientnet_lite0 --images 64 --batch-size 1 --batch-size 8
    """
    import platform

    import torch

    from .bench import bench as measure, format_rows

    if threads:
        torch.set_num_threads(threads)
    click.echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} "
               f"{_cpu_name()}, best of {repeat}")
    if image_count is not None or folder is not None:
        _bench_throughput(models, image_count, folder, batch_sizes or (1, 8), workers, repeat)
        return
    header = True
    for name in models:
        fcn, original = _bench_network(name)
        lines = format_rows(measure(printable(name, 40), fcn, original, sizes, strides, repeat, batch, precisions,
                                    compiled, device))
        for line in lines[0 if header else 1:]:
            click.echo(line)
        header = False


def _bench_network(name: str) -> tuple[Any, Any]:
    """``(network, original)`` for a bench MODEL: a converted file (no original), ``default`` (the default model,
    real weights, no original), or an architecture with random weights (speed does not depend on them)."""
    from .convert import convert
    from .fcn import is_convify_file, load
    from .models import build_architecture, default_network

    if Path(name).is_file() and is_convify_file(name):
        return load(name), None
    if name == "default":
        return default_network(), None
    original, model_info = build_architecture(name)
    return convert(original, model_info.input_size, check=False), original


def _bench_throughput(models: tuple[str, ...], count: Optional[int], folder: Optional[Path],
                      batch_sizes: tuple[int, ...], workers: Optional[int], repeat: int) -> None:
    """``convify bench --images/--folder``: the throughput table, images generated in a temporary directory."""
    import tempfile

    from .bench import format_throughput, generated_images, throughput
    from .collection import find_images

    with tempfile.TemporaryDirectory(prefix="convify-bench-") as directory:
        images = find_images([folder]).images[:limits.MAX_BENCH_IMAGES] if folder is not None else \
            generated_images(Path(directory), count)
        if not images:
            raise ConvifyError(f"no images in {folder}")
        header = True
        for name in models:
            fcn, _ = _bench_network(name)
            lines = format_throughput(throughput(printable(name, 40), fcn, images, batch_sizes, workers, repeat=repeat))
            for line in lines[0 if header else 1:]:
                click.echo(line)
            header = False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
def info(file: str) -> None:
    """Show what a converted FILE holds: source architecture, geometry, classes, rewrites.

    Example:

        convify info resnet50.fcn.pt
    """
    from .fcn import load

    fcn = load(file)
    meta = fcn.meta
    click.echo(f"{printable(file)}: convify fully-convolutional network ({_params(fcn)})")
    click.echo(f"Architecture: {printable(meta.arch or 'unknown')}")
    mean = ", ".join(f"{_number(v, '.3f')}" for v in meta.mean)
    std = ", ".join(f"{_number(v, '.3f')}" for v in meta.std)
    click.echo(f"Input: native {printable(meta.input_size)} px, RGB mean ({mean}), std ({std})")
    if meta.classes:
        first = ", ".join(printable(c, 60) for c in meta.classes[:3])
        click.echo(f"Classes: {len(meta.classes)} ({first}, ...)")
    else:
        click.echo("Classes: unnamed")
    click.echo(_geometry_lines(fcn))
    if fcn.rewrites:
        click.echo(_rewrite_lines(fcn))
    click.echo(_check_line(fcn))


def _number(value: Any, spec: str) -> str:
    """A number from a file formatted with ``spec``; anything else shown escaped, not crashed on."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError, OverflowError):
        return printable(repr(value), 40)


def _rewrite_lines(fcn) -> str:
    """``Rewrites:`` and one line per rewrite, layer names aligned; names and descriptions escaped."""
    rows = [(printable(r.layer, 120), printable(r.before, 200), printable(r.after, 200)) for r in fcn.rewrites]
    width = max((len(layer) for layer, _, _ in rows), default=0)
    return "\n".join(["Rewrites:"] + [f"  {layer:<{width}}  {before}  ->  {after}" for layer, before, after in rows])


def _geometry_lines(fcn) -> str:
    g = fcn.geometry
    big = 2 * g.window
    h, w = g.output_size(big)
    lines = [
        f"Geometry: stride {g.stride} px, window {g.window} px, offset {g.offset}, receptive field "
        f"{g.receptive_field} px (cell (0,0) from {g.rf_offset} px)",
        f"  map size: {big}x{big} px in -> {h}x{w} cells out; smallest input {g.min_input_size()} px",
    ]
    if g.size_dependent:
        lines.append("  cells move with the input's size: layers pad by the size they meet (TensorFlow 'SAME'); "
                     "offsets above are the native size's")
    if not g.local:
        shown = ", ".join(printable(n, 80) for n in g.global_context[:3])
        shown += ", ..." if len(g.global_context) > 3 else ""
        lines.append(f"  not local: {len(g.global_context)} layers see the whole image ({shown})")
    return "\n".join(lines)


def _check_line(fcn) -> str:
    check = fcn.check
    if not check:
        return "Check: not checked against the original"
    head = f"Check: equals the original at {printable(fcn.meta.input_size)} px: max |difference|"
    if not isinstance(check, dict):
        return f"Check: {printable(repr(check), 80)}"
    if check.get("max_abs_diff_float64") is None:
        return f"{head} {_number(check.get('max_abs_diff'), '.2g')} (float32)"
    return (f"{head} {_number(check['max_abs_diff_float64'], '.2g')} in float64 "
            f"({_number(check.get('max_abs_diff'), '.2g')} in float32: rounding from a different summation order)")
