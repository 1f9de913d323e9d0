"""Every factorization method the store can use, by name, with its reference and parameters.

The CLI's ``--method`` choices and ``Store.ingest(method=...)`` both come from :data:`METHODS`;
an unknown name lists the valid ones. A method is built with :meth:`Method.make` into an
estimator in the scikit-learn manner: parameters in ``__init__``, the work in
``fit(source, tasks, shapes)``, what it learned in ``result_`` (a :class:`FitResult`).
"""

from dataclasses import dataclass, field

from ..errors import InvalidInputError
from .seed import SEED_METHODS, SeedBasisFit
from .tucker import ClusterTucker, FitParams, PerTaskSVD


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes
    ----------
    name : str
        Registry key, the CLI's ``--method`` value.
    summary : str
        One line for help texts.
    reference : str
        Where the method comes from.
    parameters : tuple of str
        The :class:`FitParams` fields (and ``n_components``) it reads.
    estimator : type
        Built as ``estimator(params, n_components=..., device=..., progress=..., **options)``.
    options : dict
        Fixed keyword arguments of the estimator.
    default_bits : int or None
        Factor and dense bits when the caller sets none (None: the store's recorded defaults).
    growth : str or None
        The method that stores tasks added to a store that already holds tasks (None: this one).
        The first fit of such a method sets the store's default parameters.
    """

    name: str
    summary: str
    reference: str
    parameters: tuple
    estimator: type
    options: dict = field(default_factory=dict)
    default_bits: int | None = None
    growth: str | None = None

    def make(self, params, n_components=None, device="cpu", progress=True):
        """A new, unfitted estimator of this method."""
        return self.estimator(params, n_components=n_components, device=device, progress=progress, **self.options)


_TVBASE_PARAMS = tuple(FitParams.__dataclass_fields__)
_SVD_PARAMS = ("budget", "rank", "bits", "dense_bits", "max_rank", "seed", "task_weight", "tensor_weight")
_SEED_PARAMS = ("n_components", "bits", "seed")

METHODS = {
    m.name: m
    for m in [
        Method(
            "tvbase",
            "cluster-shared Tucker-2 bases plus per-task low-rank residuals, ranks allocated to a byte budget",
            "tvbase (this project), after Tucker 1966 (Tucker-2) and Zeng et al., 2025, 'Task Vector Bases' "
            "(spectral clustering of tasks); README 'Store format'",
            _TVBASE_PARAMS,
            ClusterTucker,
            growth="svd",
        ),
        Method(
            "svd",
            "per-task truncated SVD of every matrix, ranks allocated to a byte budget",
            "Eckart and Young, 1936 (truncated SVD); per-task low-rank deltas as in Delta-CoMe "
            "(Ping et al., NeurIPS 2024) without its mixed precision",
            _SVD_PARAMS,
            PerTaskSVD,
        ),
        *(
            Method(name, f"Task Vector Bases seed basis: {name}", spec.reference, _SEED_PARAMS, SeedBasisFit,
                   options={"method": name}, default_bits=32)
            for name, spec in SEED_METHODS.items()
        ),
    ]
}


def get_method(name):
    """The registered method ``name``; an unknown name lists the valid ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InvalidInputError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
