"""A training loader whose batch at iteration ``i`` depends only on (seed, i): exact resume, and
bad samples skipped with a log entry instead of ending a long run.

detectron2's :func:`build_detection_train_loader` draws an infinite seeded index stream and
augments with the worker processes' global generators; a run resumed at iteration ``k`` starts
that stream again from the beginning, so it sees other images and other augmentations than the
uninterrupted run. Here:

* sample position ``p = i * total_batch_size + rank * per_rank + j`` (``j < per_rank``) reads
  dataset index ``perm_e[p % N]``, ``perm_e`` a permutation of the ``N`` images seeded by
  ``(seed, e)`` for epoch ``e = p // N`` (no duplicates inside an epoch, as with the usual
  sampler);
* the mapper (augmentations) runs with every global generator seeded by ``(seed, p)``;
* iterations are spread round-robin over the worker processes, which PyTorch reads in order.

Resuming at ``k`` (``set_start_iter(k)``) therefore yields the same batches as iterations ``k,
k+1, ...`` of the uninterrupted run, without reading the earlier images. Batches are the
consecutive samples of the stream (no aspect-ratio grouping; images of different sizes are padded
by the model as usual).

With ``skip_bad_samples=True`` a sample whose reading or mapping fails (unreadable / truncated
image, broken annotation) is logged with its file name, counted (``num_skipped``), and replaced
by another image chosen from the same seed, so the run stays reproducible. Without it the error is
raised with the file name.

:func:`build_resumable_train_loader` also drops, once and with a warning naming the file and the
annotation, the instances whose mask cannot be trained on (empty segmentation, degenerate
polygons; :mod:`convmae_det.data.annotation_checks`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset

from convmae_det.data.annotation_checks import drop_invalid_instances
from convmae_det.utils.seeding import derive_seed, fork_rng, resolve_run_seed

__all__ = ["BadSampleError", "ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)

_PERM, _AUG, _REPLACE = 1, 2, 3  # domain separators for derive_seed
_MAX_REPLACEMENTS = 20


class BadSampleError(RuntimeError):
    """A training sample that cannot be read or mapped; the message names its file."""


def _describe(record: Any) -> str:
    if isinstance(record, dict):
        for key in ("file_name", "sem_seg_file_name", "image_id"):
            if key in record:
                return f"{key}={record[key]!r}"
    return repr(record)[:120]


def _identity(batch: Any) -> Any:
    return batch


class _IterationStream(IterableDataset):
    """Yields ``(batch, skipped)`` for iterations ``start, start+1, ...`` of one rank."""

    def __init__(
        self, dataset, mapper, *, seed, start_iter, total, rank, per_rank, skip_bad, collate=None
    ):
        self.dataset, self.mapper, self.collate = dataset, mapper, collate
        self.seed, self.start_iter, self.total = seed, start_iter, total
        self.rank, self.per_rank, self.skip_bad = rank, per_rank, skip_bad
        self._perms: Dict[int, torch.Tensor] = {}

    def index_at(self, position: int) -> int:
        n = len(self.dataset)
        epoch = position // n
        if epoch not in self._perms:
            self._perms.clear()  # one epoch at a time
            gen = torch.Generator().manual_seed(derive_seed(self.seed, _PERM, epoch))
            self._perms[epoch] = torch.randperm(n, generator=gen)
        return int(self._perms[epoch][position % n])

    def _map(self, index: int, position: int) -> Any:
        record = self.dataset[index]
        try:
            with fork_rng(derive_seed(self.seed, _AUG, position)):
                out = self.mapper(record) if self.mapper is not None else record
        except Exception as exc:
            raise BadSampleError(
                f"training sample {_describe(record)} (dataset index {index}) could not be "
                f"loaded: {type(exc).__name__}: {exc}"
            ) from exc
        if out is None:
            raise BadSampleError(f"training sample {_describe(record)}: the mapper returned None")
        return out

    def sample(self, position: int) -> Tuple[Any, List[str]]:
        skipped: List[str] = []
        index = self.index_at(position)
        for attempt in range(_MAX_REPLACEMENTS + 1):
            try:
                return self._map(index, position), skipped
            except BadSampleError as exc:
                if not self.skip_bad:
                    raise
                skipped.append(str(exc))
                gen = torch.Generator().manual_seed(
                    derive_seed(self.seed, _REPLACE, position, attempt)
                )
                index = int(torch.randint(len(self.dataset), (1,), generator=gen))
        raise BadSampleError(
            f"{_MAX_REPLACEMENTS + 1} samples in a row could not be loaded; last: {skipped[-1]}"
        )

    def batch(self, iteration: int) -> Tuple[List[Any], List[str]]:
        first = iteration * self.total + self.rank * self.per_rank
        batch, skipped = [], []
        for position in range(first, first + self.per_rank):
            data, bad = self.sample(position)
            batch.append(data)
            skipped.extend(bad)
        return (batch if self.collate is None else self.collate(batch)), skipped

    def __iter__(self) -> Iterator[Tuple[List[Any], List[str]]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        iteration = self.start_iter + worker
        while True:
            yield self.batch(iteration)
            iteration += workers


class ResumableTrainLoader:
    """Iterable of per-rank batches (lists of mapped dicts); see the module docstring.

    Args:
        dataset: list of dataset dicts (or any sequence).
        mapper: callable applied to each dict (e.g. :class:`detectron2.data.DatasetMapper`).
        total_batch_size: images per iteration over all processes.
        num_workers: loader processes (0: load in the training process).
        seed: data seed; < 0 or None: a random seed shared by all processes.
        skip_bad_samples: log, count and replace samples that fail to load instead of raising.
        collate_fn: optional function applied to each batch list where it is loaded (in the
            worker), e.g. ``torch.stack`` for image tensors; None: batches are lists.
        pin_memory: pin the loaded batches (tensors) for faster host-to-GPU copies.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        *,
        mapper: Optional[Callable[[Any], Any]],
        total_batch_size: int,
        num_workers: int = 0,
        seed: Optional[int] = None,
        skip_bad_samples: bool = False,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        pin_memory: bool = False,
    ):
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world != 0:
            raise ValueError(
                f"total_batch_size={total_batch_size} must be a positive multiple of the number "
                f"of processes ({world})"
            )
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        self.dataset, self.mapper = dataset, mapper
        self.total_batch_size, self.num_workers = int(total_batch_size), int(num_workers)
        self.per_rank = self.total_batch_size // world
        self.seed = resolve_run_seed(seed)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.collate_fn, self.pin_memory = collate_fn, bool(pin_memory)
        self.start_iter = 0
        self.num_skipped = 0

    def set_seed(self, seed: int) -> None:
        self.seed = int(seed)

    def set_start_iter(self, start_iter: int) -> None:
        """The next ``iter(self)`` starts with the batch of iteration ``start_iter``."""
        self.start_iter = int(start_iter)

    def stream(self) -> _IterationStream:
        return _IterationStream(
            self.dataset, self.mapper, seed=self.seed, start_iter=self.start_iter,
            total=self.total_batch_size, rank=comm.get_rank(), per_rank=self.per_rank,
            skip_bad=self.skip_bad_samples, collate=self.collate_fn,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Any]:
        # its own generator: creating the iterator must not draw from torch's global one
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.start_iter))
        loader = DataLoader(
            self.stream(), batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
            generator=generator, pin_memory=self.pin_memory,
        )  # fmt: skip
        for batch, skipped in loader:
            for message in skipped:
                self.num_skipped += 1
                logger.warning(f"Skipped bad sample #{self.num_skipped}: {message}")
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.num_skipped = int(state.get("num_skipped", 0))


def build_resumable_train_loader(
    dataset: Sequence[Any],
    *,
    mapper: Optional[Callable[[Any], Any]],
    total_batch_size: int,
    num_workers: int = 0,
    seed: Optional[int] = None,
    skip_bad_samples: bool = False,
    aspect_ratio_grouping: bool = False,
    drop_invalid_masks: bool = True,
    **kwargs: Any,
) -> ResumableTrainLoader:
    """Drop-in for :func:`detectron2.data.build_detection_train_loader` in LazyConfigs (same
    ``dataset`` / ``mapper`` / ``total_batch_size`` / ``num_workers`` arguments) returning a
    :class:`ResumableTrainLoader`. ``aspect_ratio_grouping`` is accepted and ignored (batches
    are consecutive samples); a custom ``sampler`` is refused. With ``drop_invalid_masks`` a
    list of dataset dicts goes through :func:`drop_invalid_instances` first, unless the mapper
    trains without masks (``use_instance_mask=False``)."""
    if kwargs.get("sampler") is not None:
        raise ValueError("build_resumable_train_loader draws its own indices; sampler must be None")
    del aspect_ratio_grouping
    if drop_invalid_masks and isinstance(dataset, list):
        with_masks = getattr(mapper, "use_instance_mask", True) is not False
        dataset = drop_invalid_instances(dataset, with_masks=with_masks)
    return ResumableTrainLoader(
        dataset, mapper=mapper, total_batch_size=total_batch_size, num_workers=num_workers,
        seed=seed, skip_bad_samples=skip_bad_samples,
    )  # fmt: skip
