"""Teacher matrices with a known GBLR structure, and a teacher-student regression data module.

A teacher is a list of :class:`Window` components ``(in window, out window, rank)``; its weight is
``sum_k U_k V_k^T`` with Gaussian factors restricted to the windows (cyclic, like GBLR masks), so its
structure and its FLOPs in GBLR accounting (``rank * (w_in + w_out)`` per component) are exact.

    teacher = make_teacher("block_diagonal", seed=0)
    data = TeacherStudentDataModule(teacher.weight, num_train=4096, noise_std=0.01)
    GSMModule(nn.Linear(128, 128, bias=False), task="regression", budget=teacher.flops_ratio, ...)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

__all__ = ["Window", "Teacher", "TEACHERS", "make_teacher", "support_iou", "TeacherStudentDataModule"]


@dataclass(frozen=True)
class Window:
    """One component: ``w_in`` columns from ``l_in`` and ``w_out`` rows from ``l_out`` (cyclic), ``rank``."""

    l_in: int
    w_in: int
    l_out: int
    w_out: int
    rank: int = 1


@dataclass
class Teacher:
    name: str
    in_features: int
    out_features: int
    windows: list[Window]
    weight: Tensor = field(repr=False)

    @property
    def flops(self) -> int:
        """Multiply-adds per token in GBLR accounting."""
        return sum(w.rank * (w.w_in + w.w_out) for w in self.windows)

    @property
    def flops_ratio(self) -> float:
        return self.flops / (self.in_features * self.out_features)

    def support(self) -> Tensor:
        """Boolean ``(out, in)``: the union of the windows' rectangles."""
        return windows_support(self.windows, self.in_features, self.out_features)


def _cyclic(start: int, width: int, n: int) -> Tensor:
    return torch.remainder(torch.arange(n) - start, n) < width


def windows_support(windows: list[Window], in_features: int, out_features: int) -> Tensor:
    sup = torch.zeros(out_features, in_features, dtype=torch.bool)
    for w in windows:
        sup |= _cyclic(w.l_out, w.w_out, out_features)[:, None] & _cyclic(w.l_in, w.w_in, in_features)[None, :]
    return sup


def support_iou(a: Tensor, b: Tensor) -> float:
    """Intersection over union of two boolean supports."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if int(union) else 1.0


def _windows(name: str, g: torch.Generator) -> tuple[int, int, list[Window]]:
    def randint(hi: int) -> int:
        return int(torch.randint(hi, (1,), generator=g))

    if name == "block_diagonal":  # 4 diagonal 32x32 blocks of rank 8
        return 128, 128, [Window(32 * b, 32, 32 * b, 32, 8) for b in range(4)]
    if name == "block_sparse":  # 6 tiles of 32x32, rank 4, at random (unaligned) positions
        return 128, 128, [Window(randint(128), 32, randint(128), 32, 4) for _ in range(6)]
    if name == "few_windows":  # 3 wide low-rank windows, two of which wrap around
        return 128, 128, [Window(96, 64, 16, 80, 3), Window(20, 72, 100, 48, 3), Window(60, 40, 64, 64, 2)]
    if name == "low_rank":  # plain rank 8
        return 128, 128, [Window(0, 128, 0, 128, 8)]
    if name == "rectangular":  # 96 -> 192, three 32x64 blocks of rank 6
        return 96, 192, [Window(32 * b, 32, 64 * b, 64, 6) for b in range(3)]
    if name == "mixture":  # rank 2 everywhere + two diagonal blocks of rank 4 + one random tile of rank 4
        return 128, 128, [Window(0, 128, 0, 128, 2), Window(0, 48, 0, 48, 4), Window(64, 48, 64, 48, 4),
                          Window(randint(128), 32, randint(128), 32, 4)]
    if name == "block_diagonal_low_rank":  # 4 diagonal 32x32 blocks of rank 4 + rank 4 everywhere: equal FLOPs
        return 128, 128, [Window(32 * b, 32, 32 * b, 32, 4) for b in range(4)] + [Window(0, 128, 0, 128, 4)]
    raise ValueError(f"unknown teacher {name!r}; expected one of {TEACHERS}")


TEACHERS = ("block_diagonal", "block_sparse", "few_windows", "low_rank", "rectangular", "mixture",
            "block_diagonal_low_rank")


def make_teacher(name: str, seed: int = 0) -> Teacher:
    """A teacher of family ``name`` (see :data:`TEACHERS`); the weight is scaled so that ``W x`` has unit
    variance per output for ``x ~ N(0, I)``."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out, windows = _windows(name, g)
    weight = torch.zeros(n_out, n_in)
    for w in windows:
        u = torch.randn(n_out, w.rank, generator=g) * _cyclic(w.l_out, w.w_out, n_out)[:, None]
        v = torch.randn(n_in, w.rank, generator=g) * _cyclic(w.l_in, w.w_in, n_in)[:, None]
        weight += u @ v.t()
    weight /= weight.pow(2).sum(1).mean().sqrt()
    return Teacher(name, n_in, n_out, windows, weight)


class TeacherStudentDataModule(LightningDataModule):
    """``(x, y = x W^T + noise)`` pairs with ``x ~ N(0, I)``, for ``GSMModule(task="regression")``.

    Args:
        weight: teacher ``(out, in)``.
        num_train / num_val / num_test: sample counts (validation and test targets are noise-free, so
            their relative MSE measures the distance to the teacher itself).
        noise_std: std of the Gaussian noise added to the training targets.
        batch_size: batch size of every loader.
        seed: seed of the samples and of the training shuffle.
    """

    def __init__(self, weight: Tensor, num_train: int = 4096, num_val: int = 1024, num_test: int = 2048,
                 noise_std: float = 0.0, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"teacher weight must be (out, in), got shape {tuple(weight.shape)}")
        if min(num_train, num_val, num_test) < 1 or batch_size < 1 or noise_std < 0:
            raise ValueError("sample counts and batch_size must be >= 1 and noise_std >= 0, got "
                             f"{num_train}, {num_val}, {num_test}, {batch_size}, {noise_std}")
        self.weight = weight.detach().float()
        self.sizes = (num_train, num_val, num_test)
        self.noise_std, self.batch_size, self.seed = float(noise_std), int(batch_size), int(seed)

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.seed)
        n_in = self.weight.shape[1]
        sets = []
        for i, n in enumerate(self.sizes):
            x = torch.randn(n, n_in, generator=g)
            y = x @ self.weight.t()
            if i == 0 and self.noise_std > 0:
                y = y + self.noise_std * torch.randn(y.shape, generator=g)
            sets.append(TensorDataset(x, y))
        self.train_set, self.val_set, self.test_set = sets

    def train_dataloader(self) -> DataLoader:
        from .datamodules import ResumableDataLoader

        # The generator only seeds the iterator (as before this loader was resumable), so the global RNG is untouched.
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size,
                                   sampler=_SeededStreamSampler(len(self.train_set), self.seed, self.batch_size),
                                   generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test_set.tensors[0]), batch_size=self.batch_size)


class _SeededStreamSampler(Sampler[int]):
    """The order in which Lightning drew the batches from this module's former train loader,
    ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``, as a function of ``(seed, epoch)``
    only: a resumed run sees the same batches, and runs keep the data order (and so the results) they had before.

    Per epoch that loader drew from its generator the iterator's base seed and the permutation, plus a second,
    empty permutation when ``RandomSampler`` was run to its end, which Lightning (it knows the number of batches)
    only does when the last batch is partial (``n % batch_size != 0``).  Lightning calls ``set_epoch`` at every epoch
    start."""

    def __init__(self, n: int, seed: int, batch_size: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.perms_per_epoch = 1 + int(self.n % int(batch_size) != 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            for _ in range(self.perms_per_epoch):
                torch.randperm(self.n, generator=g)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
