"""The parameters of tvbase's own methods, recorded in the store so rebuilds never need flags.

Kept apart from the fit itself so that the command line and the store can read and validate
them without loading torch.
"""

from dataclasses import dataclass

from ..errors import InvalidInputError


@dataclass
class FitParams:
    """How task vectors are factorized. Recorded in the store so rebuilds never need flags.

    budget : float or None
        Stored bytes as a fraction of the raw fp32 bytes of the fitted task vectors (0.03 = 3%),
        counted as they lie on disk: after the store's zstd compression, which the fit predicts.
    rank : int or None
        Explicit rank for every matrix (shared rank, or per-task SVD rank); overrides ``budget``.
    residual_rank : int
        With ``rank``: explicit per-task residual rank on top of the shared fit.
    residual_share : float
        With ``budget``: fraction of a shared fit's factor budget spent on per-task residuals
        (a task added later weighs each core against its own factors instead).
    sparse_share : float
        With ``budget``: fraction of the factor budget spent first on sparse residuals: what the
        factors leave of each task's matrices (vocabulary matrices aside), kept at seeded random
        entries and rescaled (:mod:`tvbase.codec.sparse`); ``residual_share`` divides the rest.
        0 stores none. Its noise raises the relative error, not the tasks' accuracy
        (benchmarks/RESULTS.md).
    sparse_bits : int
        Bits per kept entry of a sparse residual (one scale per matrix, chosen by squared error).
    bits : int
        Bits per stored factor entry (32, 16, 8, 4 or 2; integer codes with per-column scales).
    dense_bits : int
        Bits per entry of densely stored tensors (biases, norms).
    lora_bits : int
        Bits per entry of the factors of LoRA adapters, stored as they are (no fit), and of the
        weights an adapter saves whole.
    max_rank : int
        Largest rank considered per matrix; bounds the work of the fit.
    n_clusters : int or "auto"
    seed : int
    task_weight, tensor_weight : float
        With ``budget``: the energy a rank captures in (task, tensor) counts
        ``task_energy ** task_weight / tensor_energy ** tensor_weight`` times when ranks are
        allocated (see ``_Fit._weight``).
    sketch_dim : int
        Length of the CountSketch that tasks are clustered by (see ``TaskSketcher``).

    The defaults were measured on six 25-task zoos (benchmarks/RESULTS.md).
    """

    budget: float | None = 0.03
    rank: int | None = None
    residual_rank: int = 0
    residual_share: float = 0.4
    sparse_share: float = 0.7  # MiniLM zoo at 0.25%, worst task: 0.94 without, 0.965 at 0.5, 0.975 at 0.7 (benchmarks/RESULTS.md)
    sparse_bits: int = 2  # at equal bytes, twice the entries of int4: measured better (benchmarks/RESULTS.md)
    bits: int = 4  # int4 factors: twice the rank of int8 at equal bytes; measured better (benchmarks/RESULTS.md)
    dense_bits: int = 4  # biases and norms: int4 frees budget for rank; measured no worse (benchmarks/RESULTS.md)
    lora_bits: int = 8  # int4 costs a LoRA's factors 18-22% relative error, int8 ~1% (benchmarks/RESULTS.md)
    max_rank: int = 256
    n_clusters: int | str = "auto"
    seed: int = 0
    task_weight: float = 0.75
    tensor_weight: float = 0.75
    sketch_dim: int = 16384

    def to_dict(self):
        return dict(self.__dict__)

    def validate(self):
        """Check every field once, at the boundary; messages quote the offending value."""
        if self.rank is None:
            if self.budget is None or not (0 < self.budget < 1):
                raise InvalidInputError(f"budget must be a fraction in (0, 1) such as 0.03 or '3%', got {self.budget!r}")
        elif not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidInputError(f"rank must be a positive integer, got {self.rank!r}")
        if not (0 <= self.residual_share < 1):
            raise InvalidInputError(f"residual share must be in [0, 1), got {self.residual_share!r}")
        if isinstance(self.sparse_share, bool) or not isinstance(self.sparse_share, (int, float)) or not 0 <= self.sparse_share < 1:
            raise InvalidInputError(f"sparse share must be in [0, 1), got {self.sparse_share!r}")
        for name in ("bits", "dense_bits", "lora_bits", "sparse_bits"):
            if getattr(self, name) not in (32, 16, 8, 4, 2):
                raise InvalidInputError(f"{name} must be one of 32, 16, 8, 4, 2, got {getattr(self, name)!r}")
        if not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise InvalidInputError(f"max rank must be a positive integer, got {self.max_rank!r}")
        if not (self.n_clusters == "auto" or (isinstance(self.n_clusters, int) and self.n_clusters >= 1)):
            raise InvalidInputError(f"n_clusters must be 'auto' or a positive integer, got {self.n_clusters!r}")
        if isinstance(self.sketch_dim, bool) or not isinstance(self.sketch_dim, int) or self.sketch_dim < 1:
            raise InvalidInputError(f"sketch_dim must be a positive integer, got {self.sketch_dim!r}")
        for name in ("task_weight", "tensor_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -4 <= value <= 4:
                raise InvalidInputError(f"{name} must be a number in [-4, 4], got {value!r}")
        return self

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
