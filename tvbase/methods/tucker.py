"""tvbase's own methods: cluster-shared Tucker-2 with per-task residuals, and per-task SVD.

The fit streams: it asks a *source* for one (task, tensor) at a time and never holds more
than one tensor of one task plus the (small) factors; what it keeps between reads (range
sketches, cores, candidate factors) waits in a temporary file. Reads of each matrix:

1. scan: energies, dense tensors, the task's CountSketch (clusters) and its range sketches
2. per matrix and cluster: projections onto the summed ranges -> shared ``U``, ``V`` and the
   cores ``C_t = U^T tau_t V``; ranks allocated by captured energy per stored byte
   (shared fit only)
3. per-task low-rank candidates of the residual (or of the whole task), truncated by every
   budget allocation; their exact errors come with them, so no pass measures errors. With a
   ``sparse_share``, the same read samples the residual at the seeded random entries of a
   sparse residual; what the allocated factors leave there is computed from the factors alone.
"""

import contextlib
import math
import os
import tempfile
import zlib

import numpy as np
import torch
from tqdm.auto import tqdm

from ..codec import (
    INDEX_ROW_DISK_BYTES,
    TASK_METADATA_DISK_BYTES,
    SharedBasis,
    TaskTensor,
    commit_disk_bytes,
    compressed_nbytes,
    matrix_shape,
    packing_order,
    payload_nbytes,
    store_disk_bytes,
)
from ..codec.quantize import QuantizedMatrix, dequantize, keep_columns, quantize, quantize_clipped
from ..codec.sparse import keep_fraction, keep_threshold, positions, tensor_seed
from ..devices import resolve_device
from ..errors import InvalidInputError
from ..reconstruct import rebuild_tensor
from .budget import allocate_ranks, cumulative, uniform_ranks
from .cluster import TaskClusterer, TaskSketcher
from .params import FitParams
from .result import FitResult, raw_bytes
from .work import LocalWork

# Memory plan (see ClusterTucker.planned_peak_bytes), measured as `tvbase ingest` subprocesses of
# 8 tasks (benchmarks/RESULTS.md, "Scale"): BERT-base (30522 x 768 embedding, 94 MB in float32)
# 1.35 GiB peak RSS, the llama slice (32000 x 4096 embedding and head, 524 MB) 5.00 GiB. The
# process after its imports takes about 0.3 GiB; the rest is 9.5-11 copies of the largest tensor
# (its read, the next one read ahead, the delta, the residual, an SVD's work); planned with a margin.
PROCESS_BYTES = 400 * 2**20
PEAK_TENSOR_COPIES = 12

# A task joining a stored cluster may have a residual of up to this many times max_rank: a joint
# fit gives each task up to max_rank directions in its cluster's bases (fitted to it too) and as
# many in its residual, while a joining task's own directions have only the residual. At one
# max_rank a later GPT-2 small task's error stayed 1.15x the joint fit's at equal bytes, at
# two 1.08x (benchmarks/RESULTS.md, "A task added later").
JOINED_RESIDUAL_CAP = 2

# Columns of a range sketch per rank it must find: one plain (the rank's worth keeps full-rank
# fits exact) and two power-iterated. On the 0.1.0 comparison's zoo, twice the rank half and
# half had 4.4% more error than exact bases, three times 1.5% (ingest 47 s -> 66 s).
SKETCH_COLUMNS_PER_RANK = 3

# Sparse residuals cover matrices with both sides at least this long. Their random entries'
# noise reaches each output summed over a whole row of inputs, so it averages out in wide
# layers: at 0.25% they raised the MiniLM zoo's worst task from 0.94 to 0.97 (sides 384-1536),
# while on the digits zoos (sides 64-256) they lowered the least noisy figure, the agreement
# with the fine-tuned model, at 2% and 3% (benchmarks/RESULTS.md, "Sparse residuals").
SPARSE_MIN_SIDE = 384

# A fit that leaves more than this share of its budget unused is repeated (so is one over it).
_BUDGET_TOLERANCE = 0.01


class ClusterTucker:
    """Cluster-shared Tucker-2 with per-task low-rank residuals (tvbase's main method).

    Tasks are clustered by CountSketch cosine similarity; per cluster and matrix a shared ``U``
    (m, r_u), ``V`` (n, r_v), per task a core ``C_t = U^T tau_t V`` (r_u, r_v) and a residual
    ``A_t B_t^T``; ranks allocated by captured energy per stored byte to meet the budget.

    Parameters
    ----------
    params : FitParams, default FitParams()
    n_components : ignored (the seed methods' M); accepted so every method is built alike.
    device : torch device the linear algebra runs on.
    progress : bool, show progress bars.

    Attributes
    ----------
    result_ : FitResult, set by :meth:`fit`.
    """

    name = "tvbase"
    shared = True
    joins = False  # fits its tasks to a store's stored bases (ProjectedTucker)
    bases = None  # those bases: stored cluster id -> {tensor name: SharedBasis}
    distributed = True  # fit() takes a work object: its items may run on a Dask cluster

    def __init__(self, params=None, *, n_components=None, device="cpu", progress=True):
        self.params = params
        self.n_components = n_components
        self.device = device
        self.progress = progress

    def __repr__(self):
        return f"{type(self).__name__}(params={self.params!r}, device={str(self.device)!r})"

    def planned_peak_bytes(self, shapes, n_tasks):
        """Peak memory a fit of ``n_tasks`` tasks of ``shapes`` is planned to take.

        What one tensor's work holds at once, for the largest tensor: the fine-tune, the base and
        the delta as read, the residual, the rebuilt shared part, an SVD's factors and workspace
        (about ``PEAK_TENSOR_COPIES`` float32 copies, measured on BERT-base and a 7B-LLM slice); plus
        what is kept across tensors: every cluster's quantized candidate bases at the largest
        shared rank, and per task its quantized dense tensors and its candidates' curves. Range
        sketches, cores and per-task factors wait on disk, not in memory.
        """
        params = self.params if self.params is not None else FitParams()
        largest = max(4 * math.prod(int(s) for s in shape) for shape in shapes.values())
        bases = per_task = 0
        for shape in shapes.values():
            mshape = matrix_shape(shape)
            if mshape is None:
                per_task += payload_nbytes(math.prod(int(s) for s in shape), 1, params.dense_bits)
                continue
            r = min(*mshape, params.max_rank * (JOINED_RESIDUAL_CAP if self.joins else 1))
            per_task += 3 * 8 * (r + 1)  # cost, gain and error of every rank, float64
            if self.shared:
                bases += payload_nbytes(mshape[0], r, params.bits) + payload_nbytes(mshape[1], r, params.bits)
        clusters = min(n_tasks, params.n_clusters if isinstance(params.n_clusters, int) else TaskClusterer().max_clusters)
        return PROCESS_BYTES + PEAK_TENSOR_COPIES * largest + clusters * bases + n_tasks * per_task

    def fit(self, source, tasks, shapes, work=None):
        """Factorize the task vectors of ``tasks``.

        Parameters
        ----------
        source : TaskVectors-like, ``tensor(task, name) -> torch.Tensor`` (float32, base shape, CPU)
        tasks : list of str
        shapes : dict tensor name -> shape, in the base's order
        work : where the per-(task, tensor) work runs (see :mod:`tvbase.methods.work`);
            default: this process, reading from ``source``.

        Returns
        -------
        self
        """
        params = self.params if self.params is not None else FitParams()
        work = work if work is not None else LocalWork(source.tensor)
        fit = _Fit(work, list(tasks), shapes, params, self.device, self.progress, bases=self.bases)
        self.result_ = fit.run(self.shared)
        self.result_.method = self.name
        return self


class PerTaskSVD(ClusterTucker):
    """Each task stored as its own truncated SVD per matrix, ranks allocated across tensors and
    tasks to meet the budget (how tvbase stores tasks added to a fitted store until ``compact``)."""

    name = "svd"
    shared = False


class ProjectedTucker(ClusterTucker):
    """Tasks added to a fitted store (how tvbase grows one until ``compact``): each task joins
    the stored cluster whose bases capture most of its energy, with a core ``C_t = U^T tau_t V``
    on those bases for every matrix where core and residual cost the task less than its own
    factors (``_Fit._choose_cores``), plus a per-task low-rank residual; the budget pays for the
    cores and residuals only, the bases being stored already. A per-task SVD pays again for
    what a group of tasks shares: on GPT-2 small such a later task had 1.26x the error of the
    same task fitted with the others at equal bytes (benchmarks/RESULTS.md, "Scale"); a core on
    bases that hold little of the task pays for what it does not capture. Without stored bases
    every task gets a per-task SVD.

    Parameters
    ----------
    params, n_components, device, progress : as for :class:`ClusterTucker`.
    bases : dict stored cluster id -> {tensor name: SharedBasis with U and V}, the store's
        Tucker bases (quantized, as stored); tasks' labels in ``result_`` are these ids.
    """

    name = "project"
    shared = False
    joins = True

    def __init__(self, params=None, *, n_components=None, device="cpu", progress=True, bases=None):
        super().__init__(params, n_components=n_components, device=device, progress=progress)
        self.bases = bases or {}

    def planned_peak_bytes(self, shapes, n_tasks):
        """:meth:`ClusterTucker.planned_peak_bytes` of a per-task fit, plus the stored bases, held
        for the whole fit."""
        held = sum(basis.nbytes for tensors in self.bases.values() for basis in tensors.values())
        return super().planned_peak_bytes(shapes, n_tasks) + held


class _Fit:
    """The driver of a fit: plans each pass's items, runs them through ``work`` and combines
    their results (sums, allocation); the per-item functions are the module's ``_*_item``."""

    def __init__(self, work, tasks, shapes, params, device, progress, bases=None):
        self.work, self.tasks, self.shapes, self.p = work, tasks, shapes, params
        self.device, self.progress = torch.device(device), progress
        # where the items run: this device, or what a Dask work says (None: each worker's default)
        self._item_device = work.device if hasattr(work, "device") else self.device
        self.matrices = {name: matrix_shape(s) for name, s in shapes.items() if matrix_shape(s)}
        self.dense = [name for name in shapes if name not in self.matrices]
        self.result = FitResult(tasks={t: {name: TaskTensor() for name in shapes} for t in tasks})
        self.layer_energy = {}  # (task, name) -> ||tau||^2
        self.error = {}  # (task, name) -> ||tau - tau_hat||^2 of the stored factors
        self._shared_candidates = None  # what _shared_bases computed, reused by every allocation
        self._spill = _Spill()  # range sketches, cores and candidate factors between reads
        self.bases = bases or {}  # stored cluster id -> {tensor: SharedBasis} new tasks may join
        self._captured = {}  # (task, tensor) -> {stored cluster id: energy its bases capture}
        self._joined = {}  # (task, tensor) -> the stored basis the task's core is fitted to
        # the matrices a sparse residual may cover: both sides at least SPARSE_MIN_SIDE, vocabulary
        # matrices aside (a few rows move far, kept whole, the rest little), under 2**32 entries (the hash)
        self._sparse_names = [name for name, (m, n) in self.matrices.items()
                              if min(m, n) >= SPARSE_MIN_SIDE and not _is_vocabulary(m, n) and m * n < 2**32]
        self._sparse_threshold = 0  # of every sparse residual's positions (tvbase.codec.sparse); 0: none
        self._task_seed = {t: _seed(self.p.seed, zlib.crc32(t.encode())) & 0xFFFFFFFF for t in tasks}

    # -- helpers -------------------------------------------------------------------------
    def _stage(self, k, name):
        """Name stage ``k`` of the fit on its one progress bar."""
        self._progress.set_description(f"stage {k}/{self._stages}: {name}")
        return self._progress

    def _start_progress(self, shared):
        """One bar for the whole fit, counted in parameters read: every read of a tensor
        advances it by the tensor's size, so big tensors weigh what they cost and the ETA holds."""
        numel = {name: math.prod(int(d) for d in shape) for name, shape in self.shapes.items()}
        matrices = sum(numel[name] for name in self.matrices)
        reads = sum(numel.values()) + matrices * (2 if shared else 1)  # see run()'s docstring
        self._stages = 3 if shared else 2
        self._progress = tqdm(total=reads * len(self.tasks), disable=not self.progress, leave=False,
                              unit="param", unit_scale=True)
        self._numel = numel

    def _weight(self, t, name):
        """What a captured energy of (task, tensor) is multiplied by before ranks are allocated:
        ``task_energy ** task_weight / tensor_energy ** tensor_weight`` (defaults 0.75, 0.75).

        Dividing by a power of the tensor's energy keeps small critical tensors (the head) from
        starving. The task factor gives tasks that moved the network further more bytes: their
        accuracy rests on more of their vector, and the worst task of a zoo is often one of the
        highest-energy ones. The first weighting, 1 / sqrt(tensor * task energy), equalized the
        tasks' relative errors and left that task furthest behind (benchmarks/RESULTS.md).
        """
        task_energy, tensor_energy = max(self.task_energy[t], 1e-30), max(self.layer_energy[t, name], 1e-30)
        return task_energy ** self.p.task_weight / tensor_energy ** self.p.tensor_weight

    def _budget_bytes(self):
        return self.p.budget * raw_bytes(self.shapes) * len(self.tasks)

    # -- passes --------------------------------------------------------------------------
    def run(self, shared):
        """Reads of each (task, matrix): the scan, the shared bases' projection (shared fit
        only), the residual's. Dense tensors are read once, by the scan."""
        self._start_progress(shared)
        labels = self._scan(shared)
        self.result.labels = labels
        if self.p.rank is not None:
            if shared:
                self._fit_shared(labels, None)
            elif self.bases:
                self._join()
            rank = min(self.p.residual_rank if shared else self.p.rank, self.p.max_rank)
            self._lowrank_candidates(rank, shared)
            self._set_lowrank(uniform_ranks(self._lowrank_curves, rank))
        else:
            self._fit_to_budget(shared)
        self._record_errors()
        self._progress.close()
        joined = "projected" if self.bases else "shared"
        self.result.kind = {t: "svd" if labels[t] is None else joined for t in self.tasks}
        if self.bases:
            self.result.stored_clusters = {c for c in labels.values() if c is not None}
        return self.result

    def _fit_to_budget(self, shared):
        """Fit so that the store grows by at most ``budget`` of the raw bytes on disk.

        Ranks are allocated in payload bytes, but the store compresses its payload and adds an
        offset-table row per factor, metadata per task and, for a shared fit, its own files. The
        compression is predicted by a probe, then each part is allocated again (at most twice)
        with its budget scaled by what its factors measured on disk against what it was allowed:
        first the shared part, to ``1 - residual_share`` of the allowance, then the per-task
        terms, to the rest. No repeat reads anything: the shared part's candidates are kept, and
        the per-task terms truncate the candidate factors of the one residual pass.
        """
        fixed = (
            self._dense_bytes()
            + len(self.dense) * len(self.tasks) * INDEX_ROW_DISK_BYTES
            + len(self.tasks) * TASK_METADATA_DISK_BYTES
            # a shared fit starts a store (or rewrites it, for compact): its own files count too
            + (commit_disk_bytes(len(self.shapes)) + store_disk_bytes(len(self.shapes)) if shared else 0)
        )
        if fixed >= self._budget_bytes():
            need = fixed / (raw_bytes(self.shapes) * len(self.tasks))
            raise InvalidInputError(
                f"budget {self.p.budget:.2%} is too small: the densely stored tensors (biases, norms) and "
                f"the store's bookkeeping alone need {need:.2%} at {self.p.dense_bits} bits; raise --budget "
                "or lower --dense-bits"
            )
        allowed = self._budget_bytes() - fixed
        factors_allowed = allowed - self._plan_sparse(allowed * self.p.sparse_share)  # what the factors may take
        n_rows = 3 * len(self.matrices) * len(self.tasks)  # core, A, B per task and matrix, at most
        payload_budget = (factors_allowed - n_rows * INDEX_ROW_DISK_BYTES) / self._probe_ratio
        spent = shared_disk = 0.0
        choose = not shared and bool(self.bases)
        if choose:  # every core on stored bases a candidate: the residual pass fits them
            self._join()
        if shared:
            shared_allowed = factors_allowed * (1 - self.p.residual_share)
            shared_budget = payload_budget * (1 - self.p.residual_share)
            for _ in range(3):
                spent = self._fit_shared(self.result.labels, shared_budget)
                shared_disk = self._factors_on_disk()  # no per-task term is set yet
                if shared_allowed * (1 - _BUDGET_TOLERANCE) <= shared_disk <= shared_allowed:
                    break
                shared_budget *= shared_allowed * (1 - _BUDGET_TOLERANCE / 2) / max(shared_disk, 1)  # aim mid-band
        self._lowrank_candidates(self.p.max_rank, shared, rows=True, choose=choose)
        if choose:
            spent = self._choose_cores(payload_budget)
        if self._joined:
            shared_disk = self._factors_on_disk()  # the cores: no per-task term is set yet
        residual_budget = payload_budget - spent
        for _ in range(3):
            self._set_lowrank(allocate_ranks(self._lowrank_curves, max(residual_budget, 0.0)))
            # the sparse residuals compress below their plan: what they leave goes to the factors
            sparse_disk = self._set_sparse()
            on_disk = self._factors_on_disk()
            if allowed * (1 - _BUDGET_TOLERANCE) <= on_disk <= allowed:
                break
            residual_allowed = allowed * (1 - _BUDGET_TOLERANCE / 2) - shared_disk - sparse_disk
            residual_budget *= max(residual_allowed, 0.0) / max(on_disk - shared_disk - sparse_disk, 1)  # aim mid-band

    def _plan_sparse(self, allowed):
        """Set the keep probability of the sparse residuals (one for every task and matrix) that
        ``allowed`` disk bytes pay for, at their size before compression; returns the bytes planned."""
        names = self._sparse_names
        n_rows = len(names) * len(self.tasks)
        entries = len(self.tasks) * sum(math.prod(self.matrices[name]) for name in names)
        per_entry = self.p.sparse_bits / 8
        spendable = allowed - n_rows * (INDEX_ROW_DISK_BYTES + 4)  # an index row and a scale per matrix
        if not names or spendable <= 0:
            return 0.0
        self._sparse_threshold = keep_threshold(min(spendable / (entries * per_entry), 1.0))
        if self._sparse_threshold == 0:
            return 0.0
        return n_rows * (INDEX_ROW_DISK_BYTES + 4) + entries * keep_fraction(self._sparse_threshold) * per_entry

    def _sparse_mask(self, task, name):
        """(seed, threshold) of the sparse residual of (task, matrix), or None."""
        if not self._sparse_threshold or name not in self._sparse_names:
            return None
        return tensor_seed(self._task_seed[task], name), self._sparse_threshold

    def _set_sparse(self):
        """The sparse residuals: at each sampled entry, what the allocated factors leave of the
        residual the last pass sampled, divided by the keep probability and quantized; their
        exact squared errors are added to the factors' (no read: the factors give their own
        values at the sampled entries). Follows every ``_set_lowrank``; returns the residuals'
        predicted disk bytes."""
        if not self._sparse_threshold:
            return 0.0
        keep = keep_fraction(self._sparse_threshold)
        payloads = []
        for t in self.tasks:
            for name in self._sparse_names:
                sampled = self._spill.get_tensor(("sparse", t, name))  # (k,) float32
                m, n = self.matrices[name]
                mask = self._sparse_mask(t, name)
                tt = self.result.tasks[t][name]
                left = sampled.double()
                if tt.A is not None:  # one product, as a rebuild forms it: faster than a gather per entry
                    lowrank = rebuild_tensor((m, n), [(1.0, None, TaskTensor(A=tt.A.load(), B=tt.B.load()))], device=self.device)
                    left -= lowrank.reshape(-1)[positions(m * n, *mask, lowrank.device)].double().cpu()
                q = quantize_clipped((left / keep).float()[:, None], self.p.sparse_bits)
                stored = dequantize(q)[:, 0].double()
                # ||E - S||^2 = ||E||^2 - 2 <E, S> + ||S||^2, S nonzero only at the sampled entries
                self.error[t, name] += float(stored.square().sum() - 2 * (left * stored).sum())
                tt.sparse, tt.sparse_mask = self._spill.park(q), mask
                payloads.append(q.to_bytes())
            self.result.sparse[t] = {"seed": self._task_seed[t], "threshold": self._sparse_threshold}
        return compressed_nbytes(payloads) + len(payloads) * INDEX_ROW_DISK_BYTES

    def _factors_on_disk(self):
        """Predicted disk bytes of the factors fitted so far: compressed payload and index rows."""
        # one factor's bytes at a time: all of them listed at once took 0.3 GB more at T = 32
        compressed = compressed_nbytes(q.to_bytes() for q in self._factor_payloads())
        return compressed + sum(1 for _ in self._factor_payloads()) * INDEX_ROW_DISK_BYTES

    def _factor_payloads(self):
        """Every fitted factor but the dense tensors, in the order the store writes them."""
        return (q for *_, role, q in packing_order(self.result.clusters, self.result.tasks) if role != "dense")

    def _scan(self, shared):
        """Pass 1 over every tensor: energies, dense tensors and, for a shared fit, the clusters
        and every matrix's range sketches (see :func:`_range_sketches`)."""
        cluster = shared and len(self.tasks) > 2 and self.p.n_clusters != 1
        sketches, probes = {t: 0 for t in self.tasks}, []
        bar = self._stage(1, "scan")
        items = (
            ((t, name), (i, j, self.matrices.get(name), self._range_widths(name) if shared and name in self.matrices else None,
                         j == 0, cluster, self.p, self._item_device, self._stored_bases(name)))
            for j, t in enumerate(self.tasks) for i, name in enumerate(self.shapes)
        )
        for (t, name), out in self.work.map(_scan_item, items):
            self.layer_energy[t, name] = out["energy"]
            if "captured" in out:
                self._captured[t, name] = out["captured"]
            if "dense" in out:
                self.result.tasks[t][name].dense, self.error[t, name] = out["dense"], out["dense_error"]
            probes += out.get("probes", [])
            for side in ("Y", "Z"):
                if out.get(side) is not None:
                    self._spill.put_tensor((side, t, name), out[side])
            if cluster:
                sketches[t] = sketches[t] + out["sketch"]  # summed in tensor order, so as a serial fit sums
            bar.update(self._numel[name])
        raw = sum(len(p) for p in probes)
        self._probe_ratio = min(1.0, compressed_nbytes(probes) / raw) if raw else 1.0
        self.task_energy = {t: sum(self.layer_energy[t, n] for n in self.shapes) for t in self.tasks}
        if not shared:
            return {t: self._nearest_cluster(t) for t in self.tasks}
        if not cluster:
            return {t: 0 for t in self.tasks}
        # min 2: see TaskClusterer; measured on the 25-task zoos, 2-4 clusters beat 1 on the worst task
        min_clusters = 2 if len(self.tasks) >= 4 else 1
        clusterer = TaskClusterer(n_clusters=self.p.n_clusters, seed=self.p.seed, min_clusters=min_clusters)
        clusterer.fit(np.stack([sketches[t].numpy() for t in self.tasks]))
        return {t: int(c) for t, c in zip(self.tasks, clusterer.labels_)}

    def _stored_bases(self, name):
        """{stored cluster id: basis} of matrix ``name`` that tasks may join, or None."""
        bases = {c: tensors[name] for c, tensors in self.bases.items() if name in tensors and name in self.matrices}
        return bases or None

    def _nearest_cluster(self, task):
        """The stored cluster whose bases capture most of the task's energy (the lowest id of
        equals), or None without stored bases."""
        totals = {}
        for name in self.matrices:
            for c, energy in self._captured.get((task, name), {}).items():
                totals[c] = totals.get(c, 0.0) + energy
        return max(sorted(totals), key=totals.get) if totals else None

    def _join(self):
        """Every matrix of every task with a stored basis in the task's nearest cluster that
        captures some of it may keep a core on that basis: with explicit ranks all do, within a
        budget :meth:`_choose_cores` keeps those that pay for themselves. Each core is whole
        (the stored bases' ranks), as a cluster's other tasks store theirs."""
        self._joined = {}
        for t in self.tasks:
            c = self.result.labels[t]
            for name in self.matrices:
                basis = self.bases.get(c, {}).get(name)
                if basis is not None and self._captured.get((t, name), {}).get(c, 0.0) > 0:
                    self._joined[t, name] = basis
        self._label_unjoined()

    def _label_unjoined(self):
        """A task left without a core is stored on its own (label None)."""
        for t in self.tasks:
            if not any((t, name) in self._joined for name in self.matrices):
                self.result.labels[t] = None

    def _choose_cores(self, budget):
        """Keep a joining task's core on a matrix only where it beats the task's own factors
        there, and return the payload bytes of the cores kept.

        The residual pass fitted both options of each such matrix: the core plus a residual
        against it, and the task's own factors. Which to keep is a knapsack with a choice per
        matrix, solved by its Lagrangian: at a price ``lam`` per byte every candidate takes the
        rank of least ``weight * error + lam * bytes``, and each matrix the option of least
        total (the core's bytes added to its option); ``lam`` is the lowest price (bisected)
        at which that plan fits ``budget``. A core pays for a basis that holds the task's
        directions; one on bases that capture little of the task costs its whole
        ``r_U x r_V`` for little: on the MiniLM zoo at 3%, later tasks had 1.09-1.13x the joint
        fit's error at equal bytes with every core a share of the budget could buy, 1.01-1.07x
        with this choice; on GPT-2 small 1.12x and 1.05x (only the 50257 x 768 embedding's core
        dropped; benchmarks/RESULTS.md, "Which cores a later task keeps").
        """
        core_cost = {key: payload_nbytes(basis.U.shape[1], basis.V.shape[1], self.p.bits) for key, basis in self._joined.items()}
        weighted = [self._weight(t, name) * error for (t, name, _, _), error in zip(self._candidates, self._lowrank_errors)]

        def plan(lam):  # -> ({(t, name): keeps its core}, payload bytes)
            worth, spent = {}, 0.0
            for (t, name, _, _), option, (cost, _), error in zip(self._candidates, self._options, self._lowrank_curves, weighted):
                values = error + lam * cost
                best = int(np.argmin(values))
                if option is None:
                    spent += cost[best]
                else:
                    w, b = worth.get((t, name, option), (lam * core_cost[t, name], core_cost[t, name]) if option == "core" else (0.0, 0.0))
                    worth[t, name, option] = (w + values[best], b + cost[best])
            keeps = {key: worth[(*key, "core")][0] < worth[(*key, "own")][0] for key in core_cost}
            return keeps, spent + sum(worth[(*key, "core" if keep else "own")][1] for key, keep in keeps.items())

        keeps, spent = plan(0.0)
        if spent > budget:  # bytes are scarce: the lowest price at which the plan fits
            lo, hi = 1e-30, 1e30
            for _ in range(60):
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if plan(mid)[1] > budget else (lo, mid)
            keeps, _ = plan(hi)
        spent = 0.0
        for t, name in list(self._joined):
            if keeps[t, name]:
                spent += core_cost[t, name]
                continue
            del self._joined[t, name]
            self.result.tasks[t][name].core = None
            if self._sparse_mask(t, name) is not None:
                self._spill.put_tensor(("sparse", t, name), self._spill.get_tensor(("sparse", t, name, "own")))
        keep = [k for k, ((t, name, _, _), option) in enumerate(zip(self._candidates, self._options))
                if option is None or (option == "core") == ((t, name) in self._joined)]
        self._candidates = [self._candidates[k] for k in keep]
        self._lowrank_curves = [self._lowrank_curves[k] for k in keep]
        self._lowrank_errors = [self._lowrank_errors[k] for k in keep]
        self._options = [None] * len(keep)
        self._label_unjoined()
        return spent

    def _dense_bytes(self):
        """Compressed bytes of every task's densely stored tensors (quantized by the scan)."""
        return compressed_nbytes(self.result.tasks[t][n].dense.to_bytes() for t in self.tasks for n in self.dense)

    def _fit_shared(self, labels, budget):
        """Shared bases, cores, rank allocation (None: explicit ranks), replacing an earlier
        allocation's. Returns the payload bytes spent."""
        if self._shared_candidates is None:  # independent of the budget: kept for a repeat
            self._shared_candidates = self._shared_bases(labels)
        items = self._shared_candidates
        self.result.clusters = {}
        for tensors in self.result.tasks.values():
            for tt in tensors.values():
                tt.core = None
        bits = self.p.bits
        curves = [(it[7], it[8]) for it in items]
        ranks = uniform_ranks(curves, self.p.rank) if budget is None else allocate_ranks(curves, budget)
        spent = 0.0
        for (c, name, qU, qV, group, ru, rv, cost, _), r in zip(items, ranks):
            a, b = int(ru[r]), int(rv[r])
            if a == 0 or b == 0:
                continue  # nothing kept for this tensor in this cluster
            spent += cost[r]
            self.result.clusters.setdefault(c, {})[name] = SharedBasis(U=keep_columns(qU, a), V=keep_columns(qV, b))
            for t in group:
                C = self._spill.get_tensor(("core", t, name))  # (ru_max, rv_max)
                # on disk until the store writes it: T tasks' cores would otherwise grow memory with T
                self.result.tasks[t][name].core = self._spill.park(quantize(C[:a, :b].contiguous(), bits))
        return spent

    def _range_widths(self, name):
        """Columns of the range sketches of a matrix, ``(l_u, l_v)``; ``None`` for a side that
        a sketch would cover whole (then the side is used as it is). Sized for the largest
        cluster possible, all tasks, at ``SKETCH_COLUMNS_PER_RANK`` times the largest rank: a
        budget often keeps ranks near ``max_rank``, where the sketch must find the leading
        directions of a nearly flat tail (benchmarks/RESULTS.md, the 0.1.0 comparison)."""
        m, n = self.matrices[name]
        k = len(self.tasks)
        ru, rv = min(m, k * n, self.p.max_rank), min(n, k * m, self.p.max_rank)
        l_u, l_v = SKETCH_COLUMNS_PER_RANK * ru, SKETCH_COLUMNS_PER_RANK * rv
        return (l_u if l_u < m else None), (l_v if l_v < n else None)

    def _summed_range(self, side, group, name):
        """Orthonormal basis of a cluster's summed range sketch on one side, or None."""
        total = None
        for t in group:
            y = self._spill.get_tensor((side, t, name))
            if y is None:
                return None
            total = y if total is None else total.add_(y)
        return torch.linalg.qr(total.to(self.device)).Q

    def _shared_bases(self, labels):
        """Per tensor and cluster: shared U, V at the largest rank, the tasks' cores (spilled),
        and the cost and captured-energy curves of every rank.

        ``U`` and ``V`` are the leading left and right singular vectors of the cluster's task
        vectors side by side (Tucker-2 by HOSVD), found without an m x m or n x n matrix: a
        randomized range finder (Halko, Martinsson and Tropp 2011, alg. 4.1, with one power
        iteration per task, see :func:`_range_sketches`) gives orthonormal ``Q_U`` (m, l_u) and
        ``Q_V`` (n, l_v) from the scan's sketches; one read projects every
        task, ``K_t = Q_U^T X_t Q_V`` (l_u, l_v), and sums the small Grams of ``Q_U^T X_t`` and
        ``X_t Q_V``, whose leading eigenvectors rotate ``Q_U``, ``Q_V`` into ``U``, ``V``
        (Rayleigh-Ritz). A side no longer than the sketch is taken whole, which makes small
        matrices exact.
        """
        members = {}
        for t, c in labels.items():
            members.setdefault(c, []).append(t)
        items = []  # (cluster, name, qU, qV, group, ru, rv, cost, gain)
        bar = self._stage(2, "shared bases")
        groups = sorted(members.items())
        ranges = {}  # (name, cluster) -> (Q_U, Q_V), from when its items are planned until combined

        def plan():  # drawn a few items ahead of the results: few ranges exist at once
            for name, mshape in self.matrices.items():
                for c, group in groups:
                    ranges[name, c] = (self._summed_range("Y", group, name), self._summed_range("Z", group, name))
                    for t in group:
                        yield (t, name), (mshape, ranges[name, c], self._item_device)

        with contextlib.closing(self.work.map(_project_item, plan())) as results:
            self._combine_projections(results, groups, ranges, items, bar)
        return items

    def _combine_projections(self, results, groups, ranges, items, bar):
        """The shared bases' second half, in ``plan``'s order: per tensor and cluster, the summed
        Grams' eigenvectors, the quantized bases, the cores (spilled) and the curves."""
        bits = self.p.bits
        for name, (m, n) in self.matrices.items():
            for c, group in groups:
                k = len(group)
                ru_max = min(m, k * n, self.p.max_rank)
                rv_max = min(n, k * m, self.p.max_rank)
                gram_u = gram_v = 0
                projected = {}
                for t in group:
                    key, (g_u, g_v, K) = next(results)
                    assert key == (t, name), (key, t, name)  # a bug, not an input
                    gram_u = gram_u + g_u.to(self.device)  # (l_u, l_u)
                    gram_v = gram_v + g_v.to(self.device)  # (l_v, l_v)
                    projected[t] = K.to(self.device)  # K_t (l_u, l_v)
                    bar.update(m * n)
                Q_U, Q_V = ranges.pop((name, c))
                U = _top_eigvecs(gram_u, ru_max).float()  # (l_u, ru_max)
                V = _top_eigvecs(gram_v, rv_max).float()  # (l_v, rv_max)
                del gram_u, gram_v
                qU = quantize((U if Q_U is None else Q_U @ U).cpu(), bits)  # (m, ru_max)
                qV = quantize((V if Q_V is None else Q_V @ V).cpu(), bits)  # (n, rv_max)
                # cores of the stored (quantized) bases: U_q^T X_t V_q = (U_q^T Q_U) K_t (Q_V^T V_q)
                Uq, Vq = dequantize(qU, device=self.device), dequantize(qV, device=self.device)
                to_u = Uq.T if Q_U is None else Uq.T @ Q_U  # (ru_max, l_u)
                to_v = Vq if Q_V is None else Q_V.T @ Vq  # (l_v, rv_max)
                r_max = max(ru_max, rv_max)
                ru = np.minimum(np.arange(r_max + 1), ru_max)
                rv = np.minimum(np.arange(r_max + 1), rv_max)
                cost = np.array(
                    [payload_nbytes(m, a, bits) + payload_nbytes(n, b, bits) + k * payload_nbytes(a, b, bits) for a, b in zip(ru, rv)],
                    dtype=np.float64,
                )
                gain = np.zeros(r_max + 1)
                for t, K in projected.items():
                    C = to_u @ K @ to_v  # (ru_max, rv_max)
                    self._spill.put_tensor(("core", t, name), C)
                    # energy of the leading (ru(r), rv(r)) block of the core, for every r
                    block = torch.cumsum(torch.cumsum(C.square().double(), 0), 1).cpu().numpy()
                    gain[1:] += np.array([block[a - 1, b - 1] for a, b in zip(ru[1:], rv[1:])]) * self._weight(t, name)
                del projected
                items.append((c, name, qU, qV, group, ru, rv, cost, gain))

    def _shared_term(self, task, name):
        """The task's stored shared term of one matrix, ``(basis, core)``, or None; for a task
        joining a stored cluster, ``(basis, None)``: the residual pass fits the core."""
        if self.bases:
            basis = self._joined.get((task, name))
            return None if basis is None else (basis, None)
        c = self.result.labels[task]
        basis = self.result.clusters.get(c, {}).get(name) if c is not None else None
        core = self.result.tasks[task][name].core
        return None if basis is None or core is None else (basis, core.load())

    def _lowrank_candidates(self, q_cap, shared, rows=False, choose=False):
        """One read of every (task, matrix): the per-task low-rank candidates for every rank.

        The residual against the fitted shared part (the whole task without one) gets a
        truncated SVD at ``q_max = min(m, n, q_cap)``, quantized as stored: per-column scales,
        so its first ``q`` columns are exactly the factors of rank ``q``. Kept for every later
        allocation in a temporary file, with the cost and weighted-energy curves of every rank
        and the exact squared error ``||E - A_q B_q^T||^2 = ||E||^2 - 2 sum_i<q a_i^T E b_i +
        sum_i,j<q (A^T A)_ij (B^T B)_ij`` of the stored factors, so that no pass measures errors.

        With ``rows``, a vocabulary matrix's outlying rows (see :func:`_outlying_rows`) are a
        candidate of their own, taken out of the residual before its SVD: kept whole, largest
        first, they are allocated like ranks, and the two candidates' errors add up exactly
        because they cover disjoint rows.

        With ``choose``, a matrix that may keep a core on a stored basis also gets the
        candidates of the task's own factors, without the core (option "own"; the core's are
        option "core"), for :meth:`_choose_cores`.
        """
        self._lowrank_keys = [(t, name) for t in self.tasks for name in self.matrices]
        # (task, matrix, part, spill key), and which option of a matrix with a core to choose each is of
        self._candidates, self._options, self._lowrank_curves, self._lowrank_errors = [], [], [], []
        bar = self._stage(self._stages, "residuals" if shared or self._joined else "per-task SVD")
        items = (
            ((t, name), (mshape, self._shared_term(t, name), min(*mshape, self._residual_cap(t, name, q_cap)), rows,
                         self._sparse_mask(t, name), self.p, self._item_device,
                         min(*mshape, q_cap) if choose and (t, name) in self._joined else 0))
            for t, name in self._lowrank_keys for mshape in [self.matrices[name]]
        )
        for (t, name), (core, candidates, sampled, own) in self.work.map(_residual_item, items):
            if core is not None:  # fitted to a stored cluster's bases: on disk until written
                self.result.tasks[t][name].core = self._spill.park(core)
            options = [(None if own is None else "core", candidates, sampled)]
            if own is not None:
                options.append(("own", *own))
            for option, option_candidates, option_sampled in options:
                tag = ("own",) if option == "own" else ()  # the core's option keeps the plain keys
                if option_sampled is not None:
                    self._spill.put_tensor(("sparse", t, name, *tag), option_sampled)
                for part, cost, gain, error, *factors in option_candidates:
                    self._candidates.append((t, name, part, (t, name, part, *tag)))
                    self._options.append(option)
                    self._lowrank_curves.append((cost, gain * self._weight(t, name)))
                    self._lowrank_errors.append(np.maximum(error, 0.0))
                    self._spill.put((t, name, part, *tag), *factors)
            bar.update(math.prod(self.matrices[name]))

    def _residual_cap(self, task, name, q_cap):
        """Largest residual rank of (task, matrix): ``q_cap``, twice that for a task joining a
        stored cluster. A joint fit gives each task up to ``max_rank`` directions in its
        cluster's bases (fitted to it too) and as many in its residual; a joining task's own
        directions have only the residual (see ``JOINED_RESIDUAL_CAP``)."""
        return JOINED_RESIDUAL_CAP * q_cap if (task, name) in self._joined else q_cap

    def _set_lowrank(self, ranks):
        """Per-task factors at ``ranks`` (one per candidate: a rank, or a number of rows kept
        whole), and their errors."""
        for t, name in self._lowrank_keys:
            self.error[t, name] = 0.0
        for (t, name, part, key), q, error in zip(self._candidates, ranks, self._lowrank_errors):
            tt = self.result.tasks[t][name]
            first, second = ("A", "B") if part == "lowrank" else ("rows", "row_ids")
            if q == 0:
                setattr(tt, first, None)
                setattr(tt, second, None)
            else:  # kept on disk until the store writes them, so memory does not grow with T
                qa, qb = self._spill.get(key)
                setattr(tt, first, self._spill.park(keep_columns(qa, q)))  # (m, q) or (n, q rows)
                setattr(tt, second, self._spill.park(keep_columns(qb, q)))  # (n, q) or (1, q)
            self.error[t, name] += float(error[q])

    def _record_errors(self):
        self.result.energy = dict(self.task_energy)
        for t in self.tasks:
            total = self.task_energy[t]
            err = sum(self.error[t, name] for name in self.shapes)
            self.result.rel_error[t] = (err / total) ** 0.5 if total > 0 else 0.0


def _as_matrix(x, mshape, device):
    """A delta as the source gives it, on ``device`` (None: CUDA where there is one): (m, n) for
    a matrix, else (numel,)."""
    x = x.to(resolve_device(device), torch.float32)
    return x.reshape(mshape) if mshape else x.reshape(-1)


# -- the per-item work of each pass (run by tvbase.methods.work, here or on a Dask worker) --------
def _scan_item(x, i, j, mshape, widths, probe, sketch, p, device, bases=None):
    """Pass 1 on tensor ``i`` of task ``j``: its energy; a dense tensor quantized with its error;
    for a matrix, on the first task, the payloads of a probe of how factors compress
    (:func:`_probe`), with ``widths`` the range sketches, and with ``bases`` ({stored cluster id:
    basis}) the energy each basis captures (:func:`_captured_energy`); with ``sketch``, the
    tensor's share of the task's CountSketch (clusters)."""
    x = _as_matrix(x, mshape, device)
    device = x.device
    out = {"energy": float(x.square().sum())}
    if mshape is None:
        q = out["dense"] = quantize(x.reshape(-1, 1).cpu(), p.dense_bits)
        out["dense_error"] = float((dequantize(q, device=device)[:, 0] - x).square().sum())
    else:
        if probe:
            out["probes"] = _probe(x, p)
        if widths is not None:
            out["Y"], out["Z"] = _range_sketches(x, i, j, widths, p.seed)
        if bases is not None:
            out["captured"] = {c: _captured_energy(x, basis) for c, basis in bases.items()}
    if sketch:
        out["sketch"] = TaskSketcher(dim=p.sketch_dim, seed=p.seed).sketch_tensor(i, x.cpu())
    return out


def _probe(x, p, probe_rank=16):
    """Payloads of the leading singular factors of one matrix (m, n), quantized as the fit
    quantizes them: the scan measures on the first task's how well factors compress, which
    predicts the compressed / payload size of the fit (``_probe_ratio``)."""
    u, s, v = _truncated_svd(x, min(probe_rank, *x.shape), p.seed)
    return [quantize((u * s).cpu(), p.bits).to_bytes(), quantize(v.cpu(), p.bits).to_bytes()]


def _range_sketches(x, i, j, widths, seed):
    """Range sketches of task ``j``'s matrix ``i`` (m, n): ``Y_t`` (m, l_u) and ``Z_t`` (n, l_v),
    None for a side a sketch would cover whole, from Gaussian test matrices drawn from a seed of
    (fit, matrix, task). Summed over a cluster they sketch the ranges of the cluster's task
    vectors side by side, so the scan's read serves the shared bases too.

    A third of each sketch's columns (the largest rank) are plain, ``X_t Omega_t``: they keep
    every direction of a matrix of that rank, however weak, so full-rank fits stay exact. The
    others come after one power iteration, ``(X_t X_t^T) X_t Omega'_t / ||X_t||^2``, which
    weighs directions by the cube of their singular values and so leans to the leading ones
    rather than the flat tail (noise); alone they lose weak directions to float32 rounding.
    Measured on the 0.1.0 comparison's zoo (benchmarks/RESULTS.md), mean error against exact
    bases: plain sketches at twice the rank +6.6%, half plain and half powered +4.4%, this
    +1.5%."""
    l_u, l_v = widths
    gen = torch.Generator(device=x.device).manual_seed(_seed(seed, i, j))
    m, n = x.shape
    energy = x.square().sum().clamp_min(torch.finfo(x.dtype).tiny)

    def sketch(a, width):  # a (rows, cols) -> (rows, width)
        n_plain = width // SKETCH_COLUMNS_PER_RANK
        plain = a @ torch.randn(a.shape[1], n_plain, generator=gen, device=x.device)
        powered = a @ (a.T @ (a @ torch.randn(a.shape[1], width - n_plain, generator=gen, device=x.device))) / energy
        return torch.cat([plain, powered], dim=1)

    return (sketch(x, l_u) if l_u is not None else None), (sketch(x.T, l_v) if l_v is not None else None)


def _core(x, basis):
    """The core of matrix ``x`` (m, n) on a stored basis, ``U^T x V`` (r_u, r_v), with the
    basis's factors as stored (quantized), as a joint fit computes its tasks' cores; and the
    dequantized ``U``, ``V``."""
    U, V = dequantize(basis.U, device=x.device), dequantize(basis.V, device=x.device)
    return U.T @ (x @ V), U, V


def _captured_energy(x, basis):
    """``||x||^2 - ||x - U C V^T||^2`` for the core ``C = U^T x V`` on a stored basis:
    ``2 ||C||^2 - <U^T U C V^T V, C>`` (the quantized bases are nearly, not exactly, orthonormal)."""
    C, U, V = _core(x, basis)
    return float(2 * C.double().square().sum() - ((U.T @ U) @ C @ (V.T @ V) * C).double().sum())


def _project_item(x, mshape, ranges, device):
    """Pass 2 on one task's matrix: its projections onto a cluster's summed ranges ``(Q_U, Q_V)``
    (None for a side taken whole), ``K_t = Q_U^T X_t Q_V`` (l_u, l_v), and its shares of the
    small Grams of ``Q_U^T X_t`` (l_u, l_u) and ``X_t Q_V`` (l_v, l_v), float64."""
    x = _as_matrix(x, mshape, device)
    Q_U, Q_V = (None if q is None else q.to(x.device) for q in ranges)
    left = x if Q_U is None else Q_U.T @ x  # (l_u, n)
    right = x if Q_V is None else x @ Q_V  # (m, l_v)
    left64, right64 = left.double(), right.double()  # one copy each: a side taken whole is the matrix
    gram_u = left64 @ left64.T  # (l_u, l_u)
    gram_v = right64.T @ right64  # (l_v, l_v)
    del left64, right64
    return gram_u, gram_v, (left if Q_V is None else left @ Q_V)


def _residual_item(x, mshape, shared, q_max, rows, sparse, p, device, own_q_max=0):
    """Pass 3 on one task's matrix: the low-rank candidates of its residual against its shared
    term ``shared`` (``(basis, core)``, or None: the whole task), see
    :meth:`_Fit._lowrank_candidates`; a core of None is fitted here, on the basis (a task
    joining a stored cluster). Returns ``(core, [(part, cost, gain, error, *factors)], sampled,
    own)``: the core fitted here (quantized) or None, the gains not yet weighted, the residual at
    the entries of the sparse residual's mask ``sparse`` ((seed, threshold) or None), (k,)
    float32, and with ``own_q_max`` the candidates and samples of the whole task at rank up to
    ``own_q_max`` (the option of no core), else None."""
    x = _as_matrix(x, mshape, device)
    fitted = own = None
    if shared is not None:
        basis, core = shared
        if core is None:
            core = fitted = quantize(_core(x, basis)[0].cpu(), p.bits)
        e = x - rebuild_tensor(mshape, [(1.0, basis, TaskTensor(core=core))], device=x.device)
        if own_q_max:
            own = _residual_candidates(x, own_q_max, rows, sparse, p)
        del x  # before the second SVD: one copy of the matrix fewer alive
    else:
        e = x
    return (fitted, *_residual_candidates(e, q_max, rows, sparse, p), own)


def _residual_candidates(e, q_max, rows, sparse, p):
    """The candidates of a residual ``e`` (changed: its outlying rows zeroed) and its samples
    for the sparse residual: ``([(part, cost, gain, error, *factors)], sampled)``."""
    device = e.device
    sampled = None
    if sparse is not None:
        sampled = e.reshape(-1)[positions(e.numel(), *sparse, device)].cpu()
    candidates = []
    ids = _outlying_rows(e) if rows else None
    if ids is not None:
        candidates.append(_row_candidate(e, ids, p.bits, device))
        e[ids] = 0
    candidates.append(_svd_candidate(e, q_max, p, device))
    return candidates, sampled


def _svd_candidate(e, q_max, p, device):
    """The residual's truncated SVD at ``q_max``, quantized as stored (``V`` rounded, the left
    factor refitted to it: :func:`_refit`), with the cost, captured energy and exact error of
    every rank."""
    m, n = e.shape
    bits = p.bits
    residual_energy = float(e.double().square().sum())
    if q_max == 0:
        return ("lowrank", np.zeros(1), np.zeros(1), np.array([residual_energy]), None, None)
    u, s, v = _truncated_svd(e, q_max, p.seed)
    del u  # the left factor is refitted instead: one (m, q_max) copy fewer alive
    qb = quantize(v.cpu(), bits)  # (n, q_max)
    B = dequantize(qb, device=device)
    EB = e @ B  # (m, q_max)
    BtB = (B.T @ B).double()  # (q_max, q_max)
    qa = quantize(_refit(EB, BtB), bits)  # (m, q_max): makes up for B's rounding
    A = dequantize(qa, device=device)
    cross = (A * EB).sum(0).double()  # (q_max,): a_i^T E b_i
    overlap = (A.T @ A).double() * BtB  # (q_max, q_max)
    quadratic = torch.diagonal(torch.cumsum(torch.cumsum(overlap, 0), 1))  # (q_max,)
    error = np.concatenate([[residual_energy], (residual_energy - 2 * torch.cumsum(cross, 0) + quadratic).cpu().numpy()])
    gain = cumulative(s.double().square().cpu().numpy())
    cost = np.array([payload_nbytes(m, q, bits) + payload_nbytes(n, q, bits) for q in range(len(gain))], dtype=np.float64)
    return ("lowrank", cost, gain, error, qa, qb)


def _refit(EB, BtB):
    """``E B (B^T B)^-1`` (m, q) float32 on the CPU, from ``EB = E B`` (m, q) and ``BtB = B^T B``
    (q, q) float64: the left factor of least squared error for the rounded right factor ``B``
    (n, q) of a residual ``E``, so that it makes up for ``B``'s rounding instead of adding its own
    to it (``U S`` rounded apart from ``V`` does). ``B`` is ``V`` rounded, so ``B^T B`` is nearly
    diagonal: it is solved scaled to unit columns, and a little ridge keeps a zero column solvable
    (its left column is 0). Its first ``q`` columns, the factors of rank ``q``, stay better than
    rounding both apart at every ``q`` (benchmarks/RESULTS.md, "Residual factors refitted to their
    rounded partner"); it costs ``m q^2`` beside the ``m n q`` of ``E B``."""
    norms = torch.diagonal(BtB).sqrt().clamp_min(torch.finfo(torch.float32).tiny)  # (q,) column norms of B
    gram = BtB / torch.outer(norms, norms)  # of unit columns: about the identity
    gram += 1e-6 * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram)).float()
    norms = norms.float()
    left = (EB / norms) @ inverse
    return left.div_(norms).cpu()


def _row_candidate(e, ids, bits, device):
    """Rows ``ids`` (largest first) of the residual kept whole: (n, s) columns, (1, s) ids."""
    n = e.shape[1]
    picked = e[ids]  # (s, n)
    q_rows = quantize(picked.T.contiguous().cpu(), bits)  # (n, s): a scale per row
    energy = picked.double().square().sum(1).cpu().numpy()  # (s,)
    quantization = (dequantize(q_rows, device=device).T - picked).double().square().sum(1).cpu().numpy()
    # k rows kept: their quantization error plus the energy of the rows left out
    error = np.concatenate([[0.0], np.cumsum(quantization)]) + energy.sum() - np.concatenate([[0.0], np.cumsum(energy)])
    gain = cumulative(energy)
    cost = np.array([payload_nbytes(n, k, bits) + payload_nbytes(1, k, 32) for k in range(len(ids) + 1)], dtype=np.float64)
    return ("rows", cost, gain, error, q_rows, quantize(ids.to(torch.float32)[None].cpu(), 32))


class _Spill:
    """What the fit keeps between reads (range sketches, cores, candidate factors), in an
    anonymous temporary file instead of memory: a fit of T tasks would otherwise hold T of each
    for every matrix at once, and its memory would grow with T."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="tvbase-fit-")  # noqa: SIM115 (lives as long as the fit)
        self._matrices = {}  # key -> [_Parked or None, ...]
        self._tensors = {}  # key -> (offset, shape)

    def _append(self, data):
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        self._file.write(data)
        return offset

    def read(self, offset, nbytes):
        self._file.seek(offset)
        return self._file.read(nbytes)

    def put_tensor(self, key, x):
        """Keep a float32 tensor; ``get_tensor(key)`` returns it on the CPU (None if never put)."""
        self._tensors[key] = (self._append(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()), tuple(x.shape))

    def get_tensor(self, key):
        if key not in self._tensors:
            return None
        offset, shape = self._tensors[key]
        data = self.read(offset, 4 * math.prod(shape))
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy()).reshape(shape)

    def park(self, q):
        """Move a quantized matrix to the file: a :class:`_Parked` stand-in that the store can
        write (``bits``, ``shape``, ``nbytes``, ``to_bytes()``) without holding it in memory."""
        return _Parked(self, self._append(q.to_bytes()), q.bits, q.shape, q.nbytes)

    def put(self, key, *matrices):
        """Keep quantized matrices (or None) under ``key``; ``get(key)`` loads them back."""
        self._matrices[key] = [None if q is None else self.park(q) for q in matrices]

    def get(self, key):
        return [None if p is None else p.load() for p in self._matrices[key]]


class _Parked:
    """A quantized factor waiting in a :class:`_Spill`; ``load()`` gives the QuantizedMatrix."""

    def __init__(self, spill, offset, bits, shape, nbytes):
        self._spill, self._offset = spill, offset
        self.bits, self.shape, self.nbytes = bits, shape, nbytes

    def to_bytes(self):
        return self._spill.read(self._offset, self.nbytes)

    def load(self):
        return QuantizedMatrix.from_bytes(self.to_bytes(), self.bits, self.shape)


def _top_eigvecs(gram, r):
    """Top-``r`` eigenvectors of a symmetric PSD matrix, columns sign-fixed for determinism.

    Returns ndarray-like torch.Tensor of shape (d, r).
    """
    _, vecs = torch.linalg.eigh(gram)  # ascending
    top = vecs[:, -r:].flip(1) if r > 0 else vecs[:, :0]
    return top * _column_signs(top)


# A matrix with at least this many rows, and 4 times as many rows as columns, is a vocabulary
# (embedding or head): its rows are tokens, and a fine-tune moves the rows of the tokens its
# data holds far more than the rest.
_VOCABULARY_ROWS = 4096
# Rows kept whole are the residual's rows with more than this many times the mean row energy.
_OUTLYING_ROW_ENERGY = 8.0


def _is_vocabulary(m, n):
    """Whether an (m, n) matrix has the shape of an embedding or head: many rows, each short
    (and few enough rows for their numbers to be exact in float32)."""
    return _VOCABULARY_ROWS <= m <= 2**24 and m >= 4 * n


def _outlying_rows(e):
    """Row numbers (largest energy first) of a vocabulary matrix's residual ``e`` (m, n) that
    are worth keeping whole, or None. A row kept whole costs n entries; a rank of the low-rank
    term costs m + n and spreads over every row, so a row with many times the mean row's energy
    is far cheaper kept apart (measured on the scale zoo: 300 of 30522 rows held 70% of the
    embedding's energy and half of its error at 3%). At most a quarter of the rows; row numbers
    must be exact in float32."""
    m, n = e.shape
    if not _is_vocabulary(m, n):
        return None
    energy = e.square().sum(1)  # (m,)
    ids = torch.nonzero(energy > _OUTLYING_ROW_ENERGY * energy.mean()).flatten()
    if len(ids) == 0:
        return None
    ids = ids[torch.argsort(energy[ids], descending=True, stable=True)][: m // 4]
    return ids


def _seed(*parts):
    """One 63-bit seed from a tuple of integers (a generator per fit, matrix and task)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _oversample(rank):
    """Extra sketch columns for a range of ``rank``: a quarter more, at least 8. The allocated
    ranks are usually far below ``rank`` (max_rank), so they get much more than this."""
    return max(8, rank // 4)


def _column_signs(u):
    """Signs that make the largest-magnitude entry of every column of ``u`` positive (svd_flip)."""
    if u.shape[1] == 0:
        return torch.ones(0, dtype=u.dtype, device=u.device)
    signs = torch.sign(u[u.abs().argmax(0), torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return signs


def _truncated_svd(x, q, seed):
    """Rank-``q`` SVD of ``x`` (m, n): u (m, q), s (q,), v (n, q), signs fixed.

    Exact for small matrices (the digits zoos' are exact at full rank) and where ``q`` is most
    of the short side; randomized otherwise, which is 3-4x faster than a full SVD at rank 256 of
    a 768 x 768 matrix and near-exact at the ranks a budget keeps (benchmarks/RESULTS.md).
    """
    if min(x.shape) <= 512 or q + _oversample(q) >= min(x.shape) / 2:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        u, s, v = u[:, :q], s[:q], vh[:q].T
    else:
        u, s, v = _randomized_svd(x, q, seed)
    signs = _column_signs(u)
    return u * signs, s, v * signs


def _randomized_svd(x, q, seed, n_iter=2):
    """Rank-``q`` randomized SVD (Halko, Martinsson and Tropp 2011, alg. 4.4) from a seeded
    Gaussian test matrix, so equal inputs give equal factors: u (m, q), s (q,), v (n, q).

    Subspace iteration on the short side only: ``Z`` (short, k) is orthonormalized each step,
    the long side is never QR-factorized (a QR of 30522 x 320 costs more than two products with
    the matrix). The small problem is the eigendecomposition of ``(xZ)^T (xZ)`` (k, k), in
    float64: ``x ~ (xZ W) (Z W)^T`` with ``W`` its eigenvectors.
    """
    if x.shape[0] < x.shape[1]:
        v, s, u = _randomized_svd(x.T, q, seed, n_iter)
        return u, s, v
    m, n = x.shape
    k = min(q + _oversample(q), n)
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    omega = torch.randn(m, k, generator=gen, device=x.device, dtype=x.dtype)  # (m, k)
    z = torch.linalg.qr(x.T @ omega).Q  # (n, k)
    for _ in range(n_iter):
        z = torch.linalg.qr(x.T @ (x @ z)).Q
    y = x @ z  # (m, k)
    w, vecs = torch.linalg.eigh((y.T @ y).double())  # ascending
    s = w.flip(0)[:q].clamp_min(0).sqrt().to(x.dtype)
    vecs = vecs.flip(1)[:, :q].to(x.dtype)  # (k, q)
    kept = s > s[:1] * 1e-6  # directions with nothing in them get a zero u
    inv = torch.where(kept, 1 / torch.where(kept, s, 1.0), 0.0)
    return (y @ vecs) * inv, s, z @ vecs  # (m, q), (q,), (n, q)

