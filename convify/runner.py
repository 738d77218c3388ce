"""``convify heatmap`` over a collection: what to skip, what to run, writing each image's outputs and its table row.

:func:`run_images` is the whole run, as a generator of :class:`Outcome` (one per image) that the CLI prints
and gathers into the results table:

1. each image's output stem mirrors the input tree (:func:`convify.collection.output_stems`); an image whose
   stem another image already took fails (rename one);
2. an image whose outputs all exist is *skipped* (its row read from its JSON summary) unless ``force``; one
   whose outputs exist in part fails without ``force`` (an interrupted run, or other options: nothing of it is
   overwritten);
3. images too large for memory (:func:`convify.large.is_large`) are streamed one at a time; the others run
   batched (:func:`convify.batch.heatmaps`, or on a Ray cluster: :mod:`convify.ray`), and each result's files
   are written all or nothing (:meth:`HeatmapResult.save`), so a killed run restarted does only what is left.

One image's failure, whatever it is, is its own :class:`Outcome` and never stops the others.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from .batch import Failure, RunSettings, heatmaps
from .collection import Found, colliding, failure_row, output_state, output_stems, skipped_row, summary_row
from .engine import HeatmapResult, output_files, resolve_class
from .errors import ConvifyError, OutputError, failure_line as _line
from .fcn import FullyConvNet
from .outputs import InputIndex

__all__ = ["Job", "Outcome", "OutputSpec", "run_images", "finish", "plan_jobs", "sort_out", "in_input_order"]


@dataclass(frozen=True)
class Job:
    """One image of a run: its path and its output stem (relative to the output directory)."""

    path: Path
    stem: Path


@dataclass(frozen=True)
class OutputSpec:
    """What is written for each image, and where."""

    directory: Path
    queries: tuple[Union[str, int], ...] = ()
    top_k: int = 3
    formats: tuple[str, ...] = ("png", "json")
    force: bool = False
    inputs: tuple[str, ...] = ()  # files the run reads (model, weights): never overwritten

    def files(self, job: Job, classes: Sequence[str]) -> list[Path]:
        return output_files(self.directory / job.stem.parent, job.stem.name, classes, self.queries, self.formats)


@dataclass
class Outcome:
    """What became of one image: ``status`` is ``done``, ``skipped`` or ``failed``; ``row`` its table row."""

    job: Job
    status: str
    row: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    message: Optional[str] = None  # why it failed
    detail: str = field(default="", repr=False)  # the traceback, for --debug
    streamed: Optional[str] = None  # for a streamed image: "12 strips" or "4 crops"


def finish(result: Union[HeatmapResult, Failure], job: Job, out: OutputSpec) -> Outcome:
    """Write a result's files (all or nothing) and make its row; a failure (or a failure to write) is an Outcome."""
    if isinstance(result, Failure):
        return Outcome(job, "failed", failure_row(job.path, job.stem, result.message), message=result.message,
                       detail=result.detail)
    try:
        files = result.save(out.directory / job.stem.parent, stem=job.stem.name, queries=out.queries, k=out.top_k,
                            formats=out.formats, force=out.force, inputs=(str(job.path), *out.inputs))
        indices = [result.class_index(q) for q in out.queries]
        row = summary_row(job.path, job.stem, "done", result.summary(out.top_k, indices), out.top_k)
        return Outcome(job, "done", row, files)
    except Exception as e:
        return _failed(job, e)


def _failed(job: Job, error: BaseException) -> Outcome:
    message = _line(error)
    return Outcome(job, "failed", failure_row(job.path, job.stem, message), message=message,
                   detail=traceback.format_exc())


def plan_jobs(images: Sequence[Path], roots: Sequence[Path] = ()) -> tuple[list[Job], list[Outcome]]:
    """Jobs for the images, and a failed Outcome for each whose outputs would collide with an earlier one's."""
    stems = output_stems(images, roots)
    clashes = colliding(stems)
    jobs, failed = [], []
    for i, (path, stem) in enumerate(zip(images, stems)):
        job = Job(path, stem)
        if i in clashes:
            message = (f"its outputs ({stem}.*) would overwrite those of {images[clashes[i]]}; rename one, or run "
                       "them separately")
            failed.append(Outcome(job, "failed", failure_row(path, stem, message), message=message))
        else:
            jobs.append(job)
    return jobs, failed


def sort_out(jobs: Sequence[Job], out: OutputSpec, classes: Sequence[str], is_large: Callable[[Path], bool],
             would_find: Callable[[Path], bool] = lambda path: False) -> tuple[list[Job], list[Job], list[Outcome]]:
    """``(to_run, to_stream, settled)``: jobs to run batched, jobs to stream one at a time, and Outcomes for
    those already done (skipped), whose outputs exist in part (failed without ``force``), or whose outputs
    would be an input of the run or land in a directory the run searches for images (failed, ``force`` or not:
    a later run would read them as images)."""
    inputs = InputIndex([job.path for job in jobs] + list(out.inputs))
    batched, streamed, settled = [], [], []
    for job in jobs:
        try:  # whatever goes wrong with one image (its header, its names) is its own failure
            kind, outcome = _sort_one(job, out, classes, is_large, would_find, inputs)
        except Exception as e:
            kind, outcome = "settled", _failed(job, e)
        if outcome is not None:
            settled.append(outcome)
        else:
            (streamed if kind == "stream" else batched).append(job)
    return batched, streamed, settled


def _sort_one(job: Job, out: OutputSpec, classes: Sequence[str], is_large: Callable[[Path], bool],
              would_find: Callable[[Path], bool], inputs: InputIndex) -> tuple[str, Optional[Outcome]]:
    """``("stream" | "batch", None)`` for a job to run, ``("settled", Outcome)`` for one decided now (sort_out)."""
    large = is_large(job.path)
    directory = out.directory / job.stem.parent
    files = ([directory / f"{job.stem.name}.zarr"] + ([directory / f"{job.stem.name}.json"]
                                                       if "json" in out.formats else [])
             if large else out.files(job, classes))
    inputs.check(files)
    found = next((f for f in files if would_find(f)), None)
    if found is not None:
        raise OutputError(f"its output {found} would be taken for an image by this run's arguments (a later "
                          "run would read it); write elsewhere (-o), or narrow --ext")
    state = output_state(files)
    if state == "complete" and not out.force:
        summary = directory / f"{job.stem.name}.json" if "json" in out.formats else None
        return "settled", Outcome(job, "skipped", skipped_row(job.path, job.stem, summary, out.top_k), files)
    if state == "partial" and not out.force:
        present = [f for f in files if output_state([f]) == "complete"]
        absent = [f for f in files if f not in present]
        message = (f"{present[0]} exists but {absent[0]} does not (an interrupted run, or other options); "
                   "use --force to redo it")
        return "settled", Outcome(job, "failed", failure_row(job.path, job.stem, message), message=message)
    return ("stream" if large else "batch"), None


def run_images(images: Union[Found, Sequence[Path]], fcn: FullyConvNet, out: OutputSpec, settings: RunSettings, *,
               roots: Sequence[Path] = (), workers: Optional[int] = None,
               is_large: Callable[[Path], bool] = lambda path: False,
               stream: Optional[Callable[[Job], Outcome]] = None,
               backend: Optional[Callable[[list[Job]], Iterator[Outcome]]] = None) -> Iterator[Outcome]:
    """The whole run: one :class:`Outcome` per image (module docs). Skipped and refused images come first,
    then the batched ones in order, then the streamed ones.

    Args:
        images: what :func:`convify.collection.find_images` found (or paths, with ``roots``: the directories
            their outputs mirror).
        fcn: the network (on its device); ``settings`` how each image runs.
        is_large, stream: which images are streamed, and how one is (the CLI passes :mod:`convify.large`'s).
        backend: runs the batched jobs and yields their Outcomes (default: this machine,
            :func:`convify.batch.heatmaps` with ``workers``; :func:`convify.ray.run_jobs` on a cluster).
    """
    found = images if isinstance(images, Found) else None
    images = found.images if found is not None else list(images)
    classes = fcn.classes or []
    if classes and out.queries:  # names resolved once (refused before any image), not once per image's file names
        out = replace(out, queries=tuple(dict.fromkeys(resolve_class(classes, q) for q in out.queries)))
    if found is not None and any(os.path.abspath(r) == os.path.abspath(out.directory) for r in found.searched) \
            and ".png" in found.extensions and "png" in out.formats:
        raise ConvifyError(f"the output directory {out.directory} is searched for images by this run: a later run "
                           "would read the overlays as images; choose another -o (a subdirectory is fine: it is "
                           "not searched)")
    jobs, refused = plan_jobs(list(images), roots if found is None else found.roots)
    yield from refused
    batched, streamed, settled = sort_out(jobs, out, classes, is_large,
                                          found.would_find if found is not None else lambda path: False)
    yield from settled
    if batched:
        if backend is not None:
            yield from backend(batched)
        else:
            results = heatmaps([job.path for job in batched], fcn, batch_size=settings.batch_size, workers=workers,
                               size=settings.size, max_pixels=settings.max_pixels, max_memory=settings.max_memory,
                               pad=settings.pad, scales=settings.scales, flip=settings.flip,
                               precision=settings.precision, window=settings.window)
            for job, result in zip(batched, results):
                yield finish(result, job, out)
    for job in streamed:
        try:
            yield stream(job) if stream is not None else Outcome(job, "failed", failure_row(
                job.path, job.stem, "no way to stream it"), message="no way to stream it")
        except Exception as e:
            yield _failed(job, e)


def streamer(fcn: FullyConvNet, out: OutputSpec, settings: RunSettings, *, level: Optional[int] = None,
             scale: Optional[float] = None, overlay_side: int = 4096,
             all_classes: bool = False) -> Callable[[Job], Outcome]:
    """How a run streams one image too large for memory (:func:`convify.large.large_heatmap`) into an Outcome."""
    from .large import large_heatmap

    def stream(job: Job) -> Outcome:
        if settings.fused:
            raise ConvifyError("--scales and --flip are for images in memory; a streamed image runs once")
        if "npy" in out.formats:
            raise ConvifyError("npy is not written for a streamed image: its map is in IMAGE.zarr")
        big = large_heatmap(job.path, out.directory / job.stem.parent, fcn, level=level, scale=scale,
                            pad=settings.pad, queries=out.queries, top_k=out.top_k, all_classes=all_classes,
                            max_memory=settings.max_memory, overlay_side=overlay_side, formats=out.formats,
                            force=out.force, stem=job.stem.name, precision=settings.precision)
        summary = {"image_size": list(big.image_size), "map_size": list(big.map_size), "top": big.top}
        return Outcome(job, "done", summary_row(job.path, job.stem, "done", summary, out.top_k), list(big.files),
                       streamed=f"{big.passes} {'strips' if big.streamed else 'crops'}")

    return stream


def in_input_order(rows: list[dict[str, Any]], images: Sequence[Path]) -> list[dict[str, Any]]:
    """The table's rows in the order the images were given or found, however they finished."""
    order = {os.fspath(path): i for i, path in enumerate(images)}
    return sorted(rows, key=lambda row: order.get(row["path"], len(order)))

