"""Every factorization method the store can use, by name, with its reference and parameters.

The CLI's ``--method`` choices and ``Store.ingest(method=...)`` both come from :data:`METHODS`;
an unknown name lists the valid ones. A method is built with :meth:`Method.make` into an
estimator in the scikit-learn manner: parameters in ``__init__``, the work in
``fit(source, tasks, shapes)``, what it learned in ``result_`` (a :class:`FitResult`).
"""

import importlib
from dataclasses import dataclass, field

from ..errors import InvalidInputError
from .params import FitParams


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
    estimator : str
        ``"module:Class"`` of the estimator, imported when a fit is made (the registry is read by
        the command line, which should not load torch), built as ``Class(params,
        n_components=..., device=..., progress=..., **options)``.
    options : dict
        Fixed keyword arguments of the estimator.
    default_bits : int or None
        Factor and dense bits when the caller sets none (None: the store's recorded defaults).
    growth : str or None
        The method that stores tasks added to a store that already holds tasks (None: this one).
        The first fit of such a method sets the store's default parameters.
    joins_stored : bool
        The estimator takes the store's Tucker bases (``bases=``, stored cluster id -> {tensor:
        SharedBasis}) for its tasks to join.
    """

    name: str
    summary: str
    reference: str
    parameters: tuple
    estimator: str
    options: dict = field(default_factory=dict)
    default_bits: int | None = None
    growth: str | None = None
    joins_stored: bool = False

    def make(self, params, n_components=None, device="cpu", progress=True, **context):
        """A new, unfitted estimator of this method; ``context`` adds what the store gives it
        (``bases`` for a method that ``joins_stored``)."""
        module, name = self.estimator.split(":")
        estimator = getattr(importlib.import_module(module, __package__), name)
        return estimator(params, n_components=n_components, device=device, progress=progress, **self.options, **context)


_TVBASE_PARAMS = tuple(FitParams.__dataclass_fields__)
_SVD_PARAMS = ("budget", "rank", "bits", "dense_bits", "max_rank", "seed", "task_weight", "tensor_weight")
_SEED_PARAMS = ("n_components", "bits", "seed")
# the seed bases of Task Vector Bases (estimators in .seed)
_SEED_METHODS = [
    (
        "pca",
        "Task Vector Bases seed basis: centered PCA, mean plus M principal directions",
        "Zeng et al., 2025, 'Task Vector Bases: A Unified and Scalable Framework for Compressed "
        "Task Arithmetic', sec. 3 (basis construction: centered PCA baseline)",
    ),
    (
        "autoencoder",
        "Task Vector Bases seed basis: the softmax-encoder Gram autoencoder, M = T/2 by default",
        "Zeng et al., 2025, 'Task Vector Bases', sec. 3 (softmax-encoder Gram autoencoder, "
        "M = T/2, tau = 5, Adam lr 0.01, 6000 steps; github uiuctml/TaskVectorBasis)",
    ),
    (
        "cluster-merge",
        "Task Vector Bases seed basis: spectral clusters of tasks, each cluster's mean",
        "Zeng et al., 2025, 'Task Vector Bases', sec. 3 (spectral clustering on cosine "
        "similarity, eigengap k, inner merge); TIES: Yadav et al., 2023, NeurIPS, sec. 3",
    ),
]

METHODS = {
    m.name: m
    for m in [
        Method(
            "tvbase",
            "cluster-shared Tucker-2 bases plus per-task low-rank residuals, ranks allocated to a byte budget",
            "tvbase (this project), after Tucker 1966 (Tucker-2) and Zeng et al., 2025, 'Task Vector Bases' "
            "(spectral clustering of tasks); README 'Store format'",
            _TVBASE_PARAMS,
            ".tucker:ClusterTucker",
            growth="project",
        ),
        Method(
            "project",
            "tasks join the stored cluster whose bases capture them best: a core on its bases where it beats the "
            "task's own factors, plus a per-task low-rank residual (how tvbase grows a fitted store); a per-task "
            "SVD where no basis is stored",
            "tvbase (this project): Tucker-2 cores on fixed bases (Tucker 1966) and a truncated SVD of the residual",
            _SVD_PARAMS,
            ".tucker:ProjectedTucker",
            joins_stored=True,
        ),
        Method(
            "svd",
            "per-task truncated SVD of every matrix, ranks allocated to a byte budget",
            "Eckart and Young, 1936 (truncated SVD); per-task low-rank deltas as in Delta-CoMe "
            "(Ping et al., NeurIPS 2024) without its mixed precision",
            _SVD_PARAMS,
            ".tucker:PerTaskSVD",
        ),
        *(
            Method(name, summary, reference, _SEED_PARAMS, ".seed:SeedBasisFit", options={"method": name}, default_bits=32)
            for name, summary, reference in _SEED_METHODS
        ),
    ]
}


def get_method(name):
    """The registered method ``name``; an unknown name lists the valid ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InvalidInputError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
