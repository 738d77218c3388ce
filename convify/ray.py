"""The same run as :func:`convify.runner.run_images` on a Ray cluster, as a Ray Data pipeline (``convify[ray]``).

    windows of paths -> read, resize, normalise (Ray tasks) -> map_batches(_RunWindow, ActorPoolStrategy)
    -> each image's files written to the shared output directory -> one row per image -> results table

- The driver lists the images, decides what is already done (exactly as a local run: :func:`convify.runner.sort_out`)
  and cuts the rest into the same windows a local run uses (:mod:`convify.batch`);
- each window is read and prepared by a Ray task (:func:`convify.batch.prepare_item`, a failing image becomes a
  failure row, not an exception);
- a pool of actors (``workers``, one GPU each where the cluster has GPUs) loads the converted network once each
  (sent as convify's own file format, loaded with :func:`convify.load`: no pickled module), runs each window
  with :func:`convify.batch.run_window` and writes each image's files with :func:`convify.runner.finish`,
  all or nothing, into the output directory, which every node must see (a shared file system);
- rows come back to the driver, which writes the table. (Images too large for memory, streamed region by region
  by :mod:`convify.large`, run on the driver, one at a time.)

Because windows are cut as a local run cuts them and each window's batches depend only on the window, the maps
equal a local run's bit for bit on the same kind of machine (tested); the order rows arrive in may differ.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .batch import RunSettings, _Spec, prepare_item, run_window
from .errors import ConvifyError
from .fcn import FullyConvNet, load
from .runner import Job, Outcome, OutputSpec, finish
from .text import one_line

__all__ = ["run", "run_jobs", "jobs_backend", "connect"]


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConvifyError("running on Ray needs Ray Data: pip install 'convify[ray]'") from None
    return ray


# Ray's own notes (a local instance started, token authentication) are not convify's output: errors only.
_QUIET = {"log_to_driver": False, "logging_level": logging.ERROR}


def connect(address: Optional[str] = "auto", num_cpus: Optional[int] = None) -> Any:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine belongs to, else a new local one);
    nothing happens when Ray is already initialised in this process.

    Raises:
        ConvifyError: Ray is missing, or the address cannot be reached.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    try:
        if address in (None, "local"):
            ray.init(num_cpus=num_cpus, include_dashboard=False, **_QUIET)
        elif address == "auto":
            try:
                ray.init(address="auto", **_QUIET)
            except (ConnectionError, RuntimeError, ValueError):
                ray.init(num_cpus=num_cpus, include_dashboard=False, **_QUIET)
        else:
            ray.init(address=address, **_QUIET)
    except Exception as e:
        raise ConvifyError(f"cannot join the Ray cluster at {address!r} ({one_line(e)}); "
                           "start one (ray start --head) or use --ray auto") from None
    return ray


def _network_bytes(fcn: FullyConvNet) -> bytes:
    """The network as convify's own file (weights and geometry as data, no code), for the actors."""
    with tempfile.TemporaryDirectory(prefix="convify-ray-") as directory:
        path = Path(directory) / "network.fcn.pt"
        fcn.save(path)
        return path.read_bytes()


class _PrepareWindow:
    """Ray task body: one window of paths -> its images read and prepared (pickled: our own objects, made in
    this pipeline, never read from a file)."""

    def __init__(self, spec: _Spec, settings: RunSettings) -> None:
        self.spec, self.settings = spec, settings

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import torch

        torch.set_num_threads(1)
        items = [prepare_item(int(i), path, self.spec, self.settings)
                 for i, path in zip(json.loads(row["indices"]), json.loads(row["paths"]))]
        return {"window": row["window"], "jobs": row["jobs"], "items": pickle.dumps(items)}


class _RunWindow:
    """Ray actor: loads the network once, then runs windows and writes their files; returns one row per image."""

    def __init__(self, network: list, out: OutputSpec, settings: RunSettings, device: Optional[str],
                 threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        network = ray.get(network[0])  # the file's bytes, put in the object store once by the driver
        with tempfile.TemporaryDirectory(prefix="convify-ray-") as directory:
            path = Path(directory) / "network.fcn.pt"
            path.write_bytes(network)
            self.fcn = load(path)
        if device:
            self.fcn = self.fcn.to(device)
        self.out, self.settings = out, settings

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        outcomes = []
        for jobs_text, items_bytes in zip(batch["jobs"], batch["items"]):
            jobs = [Job(Path(path), Path(stem)) for path, stem in json.loads(jobs_text)]
            results = run_window(self.fcn, pickle.loads(items_bytes), self.settings)
            outcomes.extend(_outcome_text(finish(result, job, self.out)) for job, result in zip(jobs, results))
        return {"outcome": outcomes}


def _outcome_text(outcome: Outcome) -> str:
    return json.dumps({"path": str(outcome.job.path), "stem": str(outcome.job.stem), "status": outcome.status,
                       "row": outcome.row, "files": [str(f) for f in outcome.files], "message": outcome.message,
                       "detail": outcome.detail})


def _outcome(text: str) -> Outcome:
    data = json.loads(text)
    return Outcome(Job(Path(data["path"]), Path(data["stem"])), data["status"], data["row"],
                   [Path(f) for f in data["files"]], data["message"], data["detail"])


def run_jobs(jobs: Sequence[Job], fcn: FullyConvNet, out: OutputSpec, settings: RunSettings, *,
             workers: Optional[int] = None, address: Optional[str] = "auto",
             prepare_cpus: float = 0.5) -> Iterator[Outcome]:
    """Run ``jobs`` on Ray and yield an :class:`~convify.runner.Outcome` per image as its window finishes.

    Args:
        jobs: the images to run (what is done already is decided before: :func:`convify.runner.sort_out`).
        fcn: the network; sent to each actor once, as convify's own file.
        out, settings: what each image writes, and how it runs (as a local run).
        workers: actors running the network (default 1); each takes a GPU when the cluster has them.
        address: the cluster (:func:`connect`); ignored when Ray is already initialised in this process.
        prepare_cpus: CPUs a task reading a window of images reserves (less than one: reading and resizing
            share the cores with the network, as a local run's worker processes do).

    Raises:
        ConvifyError: Ray is missing or the cluster cannot be reached (before any image runs).
    """
    if not jobs:
        return
    ray = connect(address)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes are not convify's output
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # convify's own bar counts images
    context.print_on_execution_start = False
    workers = workers or 1
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0
    # The actors reserve what the reading tasks leave of the cluster's CPUs (fractions allowed): reserving every
    # CPU would leave the tasks none, and the pipeline would wait forever.
    share = max(0.1, (ray.cluster_resources().get("CPU", 1) - prepare_cpus) / workers)
    threads = max(1, round(share))
    size = settings.window_size
    windows = [{"window": k, "paths": json.dumps([str(job.path) for job in jobs[start:start + size]]),
                "indices": json.dumps(list(range(start, min(start + size, len(jobs))))),
                "jobs": json.dumps([[str(job.path), str(job.stem)] for job in jobs[start:start + size]])}
               for k, start in enumerate(range(0, len(jobs), size))]
    network = [ray.put(_network_bytes(fcn))]  # a reference (in a list: Ray passes it on unresolved), fetched by each actor
    dataset = ray.data.from_items(windows, override_num_blocks=len(windows))
    prepared = dataset.map(_PrepareWindow(_Spec(fcn), settings), num_cpus=prepare_cpus)
    done = prepared.map_batches(
        _RunWindow, batch_size=1, batch_format="numpy",
        fn_constructor_args=(network, out, settings, "cuda" if gpus else None, threads),
        compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus, num_cpus=0 if gpus else share)
    for row in done.iter_rows():
        yield _outcome(row["outcome"])


def jobs_backend(fcn: FullyConvNet, out: OutputSpec, settings: RunSettings, *, address: Optional[str] = "auto",
                 workers: Optional[int] = None) -> Callable[[list[Job]], Iterator[Outcome]]:
    """A backend for :func:`convify.runner.run_images`: its batched jobs run on Ray (:func:`run_jobs`)."""
    _ray()  # missing Ray is said before any image is looked at
    return lambda jobs: run_jobs(jobs, fcn, out, settings, workers=workers, address=address)


def _paths_in_order(ray: Any, dataset: Any) -> list[str]:
    """A dataset's ``path`` column in the dataset's own order (Ray yields rows as blocks finish unless told; a
    dataset keeps a copy of the context it was made in, so it is told through its own)."""
    paths = dataset.select_columns(["path"])
    paths.context.execution_options.preserve_order = True
    return [str(row["path"]) for row in paths.iter_rows()]


def run(images: Any, model: Any = None, output: Any = ".", *, workers: int = 1, address: Optional[str] = "auto",
        batch_size: Optional[int] = None, size: Any = "auto", pad: Optional[str] = "reflect",
        queries: Sequence[Any] = (), top_k: int = 3, formats: Sequence[str] = ("png", "json"), force: bool = False,
        table: Optional[Any] = "results.parquet") -> list[dict[str, Any]]:
    """Heatmaps for many images on Ray: each image's files under ``output`` (mirroring the input tree), one row
    per image returned (in input order) and written to ``output/table`` (None: not written).

    Args:
        images: paths, a directory, or a Ray dataset with a ``path`` column (its paths are read on the driver:
            which images are done, and the windows, are decided there).
        model: a :class:`~convify.fcn.FullyConvNet`, a converted file, or None (the default model).
        workers, address: as for :func:`run_jobs`; the rest as for ``convify heatmap``.

    Example::

        >>> rows = convify.ray.run("/shared/photos", output="/shared/maps", workers=4)
    """
    from .batch import default_batch_size
    from .collection import find_images, write_table
    from .engine import _as_network
    from .runner import in_input_order, run_images

    ray = connect(address)
    if isinstance(images, ray.data.Dataset):
        images = _paths_in_order(ray, images)
    elif isinstance(images, (str, os.PathLike)):
        images = [images]
    fcn = _as_network(model)
    out_dir = Path(output)
    found = find_images(list(images), exclude=out_dir)
    settings = RunSettings(size=size, pad=pad, batch_size=batch_size or default_batch_size(fcn))
    out = OutputSpec(out_dir, tuple(queries), min(top_k, len(fcn.classes or []) or top_k), tuple(formats), force)
    backend = jobs_backend(fcn, out, settings, address=address, workers=workers)
    rows = in_input_order([outcome.row for outcome in run_images(found, fcn, out, settings, backend=backend)],
                          found.images)
    if table is not None:
        write_table(rows, out_dir / table, force=force)
    return rows

