"""Partial FC: a margin softmax head whose class centres are sharded over ranks and sampled.

After An et al., "Partial FC: Training 10 Million Identities on a Single Machine" (and
"Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs by
Partial FC"). Each rank of the process group holds a contiguous slice of the class-centre
matrix. Every rank sees the whole global batch (embeddings and labels are all-gathered, the
embeddings with a gather that gradients flow back through), scores it against its own
centres, and the softmax cross-entropy is completed with two all-reduces per row (max and
sum of exponentials) plus one for the target logit, so no rank ever holds the
``(global batch x classes)`` matrix. With ``sample_rate < 1`` each rank keeps, per training
step, every class centre of its shard that is a positive in the global batch plus uniformly
drawn negatives. The gradient of the shard is then a sparse tensor holding only those rows
(``weight.grad``, as for ``nn.Embedding(sparse=True)``), and `configure_optimizer` returns an
optimizer that updates only the rows its gradient holds. The head does not keep that optimizer.

Landmark-recognition additions (both optional, both exact under sharding and sampling):
sub-centres (Deng et al., "Sub-center ArcFace", ECCV 2020): each class has k centres, rows
``c*k .. c*k + k - 1`` of the matrix, always on the rank that owns class c and sampled
together; a class's cosine is the largest of its k. Per-class margins ("dynamic margins",
`dynamic_margins`): a (C,) vector sharded like the classes, each row's target getting its
own class's margin through the margin's ``row_margins`` argument.

Differences from the insightface reference: any device/backend (gloo on CPU, NCCL on GPU),
unequal per-rank batch sizes, optimizer state touched only on sampled rows, and checkpoints
(`full_state_dict`) that load on any world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dml.distributed import ProcessGroup, all_gather_rows, all_gather_with_grad, get_rank, get_world_size
from dml.losses.centre_cosine import centre_cosine
from dml.losses.distributed_softmax import distributed_cross_entropy
from dml.losses.shard_state import RowShardedState, gather_shards_to_main, init_centre_shard, mix_seed, shard_bounds
from dml.losses.sparse_optim import SparseRowOptimizer, build_sparse_optimizer

STATE_FORMAT = "dml.partial_fc/1"
SHARDED_FORMAT = "dml.partial_fc.sharded/1"
OPTIMIZER_PREFIX = "optimizer."
RowReader = Callable[[str, int, int, "torch.Tensor | None"], torch.Tensor]


class PartialFC(nn.Module):
    """Sharded, sampled margin-softmax head (see the module docstring).

    Args:
        embedding_dim: D, width of the embeddings.
        num_classes: C, total classes across all ranks (>= world size).
        margin: module mapping ``(cosine (N, k), labels (N,))`` to scaled logits; rows with
            label -1 (target not among this rank's scored centres) must get no margin.
        sample_rate: fraction of each shard scored per training step, in (0, 1]. 1.0 is
            plain model parallelism and equals full-softmax margin cross-entropy.
        process_group: group the classes are sharded over (default: the world; none at all
            in a single-process run).
        seed: seeds the world-size-independent centre initialisation and the sampling.
        sub_centers: k >= 1 centres per class; a class's cosine is the max over its k.
        class_margins: optional (C,) per-class margins (e.g. `dynamic_margins`) replacing
            the margin's ``m``; needs a margin with ``row_margins`` support (ArcFace, CosFace).
            A margin built with a (C,) ``m`` has its vector taken over the same way.

    Attributes: ``weight`` (shard_classes * k, D) is this rank's shard, rows
    ``[class_start * k, class_end * k)`` of the full (C * k, D) matrix: classes
    ``[class_start, class_end)`` (the first ``C % world`` ranks hold one extra class).
    ``class_margin`` (shard_classes,) float64 buffer or None: this rank's rows of the
    per-class margins, aligned with the classes of ``weight``. After a sampled training forward,
    backward leaves ``weight.grad`` as a sparse COO tensor of the sampled rows: `sampled_rows`
    names them (every sub-centre of each class in `sampled_index`).

    All ranks of the group must call `forward`, `full_state_dict` and
    `load_full_state_dict` together (they run collectives).
    """

    class_margin: torch.Tensor | None  # a buffer (see above)

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: nn.Module,
        sample_rate: float = 1.0,
        process_group: ProcessGroup | None = None,
        seed: int = 0,
        sub_centers: int = 1,
        class_margins: torch.Tensor | None = None,
    ):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if sub_centers < 1:
            raise ValueError(f"sub_centers must be >= 1, got {sub_centers}")
        self.group = process_group
        self.rank, self.world_size = get_rank(process_group), get_world_size(process_group)
        if num_classes < self.world_size:
            raise ValueError(f"num_classes ({num_classes}) must be >= the world size ({self.world_size})")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.margin, self.sample_rate, self.seed = margin, sample_rate, seed
        self.sub_centers = k = sub_centers
        self.class_start, self.class_end = shard_bounds(num_classes, self.world_size, self.rank)
        self.weight = nn.Parameter(
            init_centre_shard(num_classes * k, embedding_dim, self.class_start * k, self.class_end * k, seed)
        )
        self.register_buffer("class_margin", self._margin_shard(margin, class_margins))
        self.sample_step = 0  # sampled forwards so far: with the seed, fixes every sample drawn
        self._sampled_index: torch.Tensor | None = None
        self._sampled_rows: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    def _margin_shard(self, margin: nn.Module, class_margins: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's slice of the per-class margins (float64), or None when there are none."""
        if class_margins is None:
            class_margins = getattr(margin, "class_margins", None)
        if class_margins is None:
            return None
        class_margins = torch.as_tensor(class_margins).detach()
        if class_margins.shape != (self.num_classes,):
            raise ValueError(f"class_margins must have shape ({self.num_classes},), got {tuple(class_margins.shape)}")
        check = getattr(margin, "check_class_margins", None)  # only ArcFace / CosFace take a margin per row
        if check is None:
            raise ValueError(f"per-class margins need ArcFace or CosFace, got {type(margin).__name__}")
        check(class_margins)  # the margin's own range (ArcFace: [0, pi - 1e-6])
        return class_margins[self.class_start : self.class_end].to(torch.float64).clone()

    @property
    def shard_size(self) -> int:
        """Classes held by this rank (``weight`` has ``shard_size * sub_centers`` rows)."""
        return self.class_end - self.class_start

    @property
    def num_sampled(self) -> int:
        """Centres scored per training step on this rank (before adding surplus positives)."""
        # round() first: 0.3 * 40 is 12.000000000000002 in floating point, which must give 12
        return min(self.shard_size, math.ceil(round(self.sample_rate * self.shard_size, 6)))

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"shard=[{self.class_start}, {self.class_end}), sample_rate={self.sample_rate}, "
            f"sub_centers={self.sub_centers}, class_margins={self.class_margin is not None}"
        )

    # --- forward -------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin cross-entropy over the global batch; the same value on every rank.

        ``embeddings`` (N_local, D) and ``labels`` (N_local,) may differ in N_local between
        ranks (0 allowed if the global batch is not empty). Gradients: w.r.t. the local
        embeddings, the exact gradient of the global-mean loss (a DDP backbone then averages
        them over ranks, i.e. sees 1/world of it); w.r.t. the centres, on ``weight.grad``: dense,
        or when sampling a sparse COO tensor of the sampled rows (`sampled_rows`).
        Peak extra memory per rank: a few ``(N_global, k)`` score matrices, k = scored centres
        (sub-centres included).

        Raises ValueError when the global batch is empty or a label is outside [0, num_classes).
        """
        self._check_inputs(embeddings, labels)
        global_embeddings = all_gather_with_grad(embeddings, self.group)
        global_labels = all_gather_rows(labels.to(device=self.weight.device, dtype=torch.long), self.group)
        if global_labels.numel() == 0:
            raise ValueError("the global batch is empty: every rank passed 0 embeddings")
        low, high = int(global_labels.min()), int(global_labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got values in [{low}, {high}]")
        local = global_labels - self.class_start
        in_shard = (local >= 0) & (local < self.shard_size)
        no_target = torch.full_like(local, -1)
        if self.training and self.sample_rate < 1.0:
            classes = self._sample_rows(local[in_shard])
            rows = self._centre_rows(classes)
            weight = _SampledRows.apply(self.weight, rows)
            targets = torch.where(in_shard, torch.searchsorted(classes, local), no_target)
        else:
            classes, rows, weight = None, None, self.weight
            targets = torch.where(in_shard, local, no_target)
        self._sampled_index, self._sampled_rows = classes, rows
        cosine = centre_cosine(global_embeddings.to(weight.dtype), weight)
        if self.sub_centers > 1:  # class cosine: the closest of its k sub-centres
            cosine = cosine.view(cosine.shape[0], -1, self.sub_centers).amax(dim=2)
        if self.class_margin is None:
            logits = self.margin(cosine, targets)
        else:
            own = self.class_margin[torch.where(in_shard, local, torch.zeros_like(local))]
            logits = self.margin(cosine, targets, row_margins=torch.where(in_shard, own, torch.zeros_like(own)))
        return distributed_cross_entropy(logits, targets, self.group)

    def _centre_rows(self, classes: torch.Tensor) -> torch.Tensor:
        """Sorted shard rows of the centres of sorted shard ``classes``: every sub-centre of each."""
        k = self.sub_centers
        if k == 1:
            return classes
        return (classes.unsqueeze(1) * k + torch.arange(k, device=classes.device)).reshape(-1)

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have shape (N, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")

    def _sample_rows(self, positives: torch.Tensor) -> torch.Tensor:
        """Sorted shard classes to score: all positives plus uniform negatives up to `num_sampled`.

        If the batch holds more positive classes than `num_sampled`, all of them are kept
        (the sample is then larger than asked). The draw depends only on (seed, sample_step,
        rank, world size), so a resumed run draws what the uninterrupted run would have.
        Cost: one random permutation of the shard's row ids (integers, not D-wide rows).
        """
        positives = torch.unique(positives)
        wanted = self.num_sampled
        step = self.sample_step
        self.sample_step += 1
        if positives.numel() >= wanted:
            return positives
        generator = self._generator_for(step)
        order = torch.randperm(self.shard_size, generator=generator, device=self.weight.device)
        head = order[:wanted]  # at most P of these are positives, so >= wanted - P negatives
        negatives = head[~torch.isin(head, positives)][: wanted - positives.numel()]
        return torch.cat([positives, negatives]).sort().values

    def _generator_for(self, step: int) -> torch.Generator:
        if self._generator is None or self._generator.device != self.weight.device:
            self._generator = torch.Generator(device=self.weight.device)
        self._generator.manual_seed(mix_seed(self.seed, step, self.rank, self.world_size))
        return self._generator

    # --- what the last forward sampled, and the optimizer ---------------------------------
    @property
    def sampled_index(self) -> torch.Tensor | None:
        """Sorted shard classes (k,) scored by the last training forward (None: all). With one
        sub-centre per class these are also the rows of ``weight``."""
        return self._sampled_index

    @property
    def sampled_rows(self) -> torch.Tensor | None:
        """Sorted rows of ``weight`` scored by the last training forward (None: all): every
        sub-centre of each class in `sampled_index`, the rows its sparse gradient holds."""
        return self._sampled_rows

    def configure_optimizer(
        self, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, **kwargs: Any
    ) -> SparseRowOptimizer:
        """A row-sparse optimizer ("sgd" or "adamw") for this head's shard; the caller keeps it.

        It updates only the rows present in the shard's gradient (the sampled ones); see
        `dml.losses.sparse_optim`. Pass it to `full_state_dict` / `load_full_state_dict` (and
        the sharded pair) to save or restore its state with the head. Extra ``kwargs``:
        ``nesterov`` (sgd); ``betas``, ``eps`` (adamw). Raises ValueError for an unknown
        ``name`` or a negative ``lr`` / ``weight_decay``.
        """
        return build_sparse_optimizer(self.weight, name, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)

    # --- world-size independent checkpoints ----------------------------------------------
    def full_state_dict(self, optimizer: SparseRowOptimizer | None = None) -> dict[str, Any] | None:
        """The whole head, gathered to rank 0 of the group as CPU tensors; None on other ranks.

        Keys: ``format``, ``num_classes``, ``embedding_dim``, ``sub_centers`` (k),
        ``weight`` (C * k, D), ``class_margins`` ((C,) float64 or None), ``sampler`` (seed,
        step), ``optimizer`` (None, or the given ``optimizer``'s name, hyperparameters and per-row
        ``state`` tensors with C * k rows). Collective. Peak memory on rank 0: the full matrix plus its
        optimizer state in host RAM, and one shard on the device at a time.
        """
        weight = self._gather_rows(self.weight.detach())
        margins = None
        if self.class_margin is not None:
            margins = gather_shards_to_main(self.class_margin, self.num_classes, self.group)
        saved_optimizer = None
        if optimizer is not None:
            state = {key: self._gather_rows(value) for key, value in optimizer.row_state().items()}
            saved_optimizer = {"name": optimizer.name, "hyperparameters": optimizer.hyperparameters(), "state": state}
        if self.rank != 0:
            return None
        return {
            "format": STATE_FORMAT,
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "sub_centers": self.sub_centers,
            "weight": weight,
            "class_margins": margins,
            "sampler": {"seed": self.seed, "step": self.sample_step},
            "optimizer": saved_optimizer,
        }

    def _gather_rows(self, shard: torch.Tensor) -> torch.Tensor | None:
        """A (shard_classes * k, ...) tensor gathered as (C * k, ...) on rank 0 (None elsewhere)."""
        full = gather_shards_to_main(self._per_class(shard), self.num_classes, self.group)
        return None if full is None else full.reshape(self.num_classes * self.sub_centers, *shard.shape[1:])

    def load_full_state_dict(self, state: dict[str, Any], optimizer: SparseRowOptimizer | None = None) -> None:
        """Take this rank's rows of a `full_state_dict` saved on any world size.

        Every rank passes the full dict (``torch.load(path, mmap=True)`` keeps that cheap).
        With ``optimizer`` (made by `configure_optimizer`), its state becomes this rank's rows
        of the saved optimizer state, or is reset when the state holds none.
        States saved before sub-centres and per-class margins existed load as k = 1 and no
        margins. Raises ValueError for a state of another format, when the shapes, k, or the
        presence of per-class margins differ from this head's, or for another optimizer kind.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a partial-FC full state (expected format {STATE_FORMAT!r})")
        self._check_shape(state, state.get("class_margins") is not None)
        margins = state.get("class_margins")
        k = self.sub_centers
        rows = slice(self.class_start * k, self.class_end * k)
        with torch.no_grad():
            self.weight.copy_(state["weight"][rows])
            if margins is not None and self.class_margin is not None:  # _check_shape: both or neither
                self.class_margin.copy_(margins[self.class_start : self.class_end])
        self.seed, self.sample_step = int(state["sampler"]["seed"]), int(state["sampler"]["step"])
        saved = state.get("optimizer")
        if optimizer is None:
            return
        if saved is None:
            optimizer.reset_state()
        else:
            optimizer.load_row_state({**saved, "state": {key: v[rows] for key, v in saved["state"].items()}})

    # --- row-sharded checkpoints (nothing gathered) --------------------------------------
    def sharded_state_dict(self, optimizer: SparseRowOptimizer | None = None) -> RowShardedState:
        """This rank's rows of the head (and of ``optimizer``'s per-row state, when given), for
        a checkpoint that every rank writes in parallel.

        ``tensors``, one row per class of the shard: ``weight`` (shard_classes, D), or
        (shard_classes, k, D) with k sub-centres; ``class_margins`` (shard_classes,) when the
        head has per-class margins; ``optimizer.<key>`` for each per-row optimizer state
        tensor, shaped like the weight; all views of the live tensors (no copies). ``meta``:
        format, shape, sub-centres, whether there are per-class margins, sampler (seed, step)
        and the optimizer's name and hyperparameters (or None); the same on every rank.
        Not collective.
        """
        tensors = {"weight": self._per_class(self.weight.detach())}
        if self.class_margin is not None:
            tensors["class_margins"] = self.class_margin
        saved_optimizer = None
        if optimizer is not None:
            row_state = optimizer.row_state()
            tensors.update({OPTIMIZER_PREFIX + k: self._per_class(v) for k, v in row_state.items()})
            saved_optimizer = {
                "name": optimizer.name,
                "hyperparameters": optimizer.hyperparameters(),
                "state_keys": sorted(row_state),
            }
        meta = {
            "format": SHARDED_FORMAT,
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "sub_centers": self.sub_centers,
            "class_margins": self.class_margin is not None,
            "sampler": {"seed": self.seed, "step": self.sample_step},
            "optimizer": saved_optimizer,
        }
        return RowShardedState(meta, self.num_classes, self.class_start, self.class_end, tensors)

    def load_sharded_state_dict(
        self, meta: dict[str, Any], read_rows: RowReader, optimizer: SparseRowOptimizer | None = None
    ) -> None:
        """Take this rank's rows from a `sharded_state_dict` saved on any world size.

        ``read_rows(name, start, end, out)`` fills ``out`` (or a new CPU tensor when None) with
        global rows ``[start, end)`` of tensor ``name``; only this shard's rows are asked for
        and the weight is read straight into the parameter. With ``optimizer``, its state is
        this shard's rows of the saved optimizer state, or reset when none was saved. Raises
        ValueError when ``meta`` is not a partial-FC head of this shape, or names another
        optimizer kind. Not collective.
        """
        if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
            raise ValueError(f"not a sharded partial-FC state (expected format {SHARDED_FORMAT!r})")
        self._check_shape(meta, bool(meta.get("class_margins")))
        start, end = self.class_start, self.class_end
        with torch.no_grad():
            read_rows("weight", start, end, self._per_class(self.weight.data))
            if self.class_margin is not None:
                read_rows("class_margins", start, end, self.class_margin)
        self.seed, self.sample_step = int(meta["sampler"]["seed"]), int(meta["sampler"]["step"])
        saved = meta.get("optimizer")
        if optimizer is None:
            return
        if saved is None:
            optimizer.reset_state()
            return
        if saved["name"] != optimizer.name:
            raise ValueError(f"saved head optimizer is {saved['name']!r}, this one is {optimizer.name!r}")
        optimizer.param_groups[0].update(saved["hyperparameters"])
        optimizer.reset_state()
        for key, tensor in optimizer.row_state().items():
            read_rows(OPTIMIZER_PREFIX + key, start, end, self._per_class(tensor))

    def _per_class(self, rows: torch.Tensor) -> torch.Tensor:
        """A (shard_classes * k, ...) tensor as a (shard_classes, k, ...) view (itself when k = 1)."""
        if self.sub_centers == 1:
            return rows
        return rows.view(self.shard_size, self.sub_centers, *rows.shape[1:])

    def _check_shape(self, state: dict[str, Any], has_margins: bool) -> None:
        """Raise ValueError unless a saved head has this one's classes, width, sub-centres
        (1 when the state predates them) and presence of per-class margins."""
        if (state["num_classes"], state["embedding_dim"]) != (self.num_classes, self.embedding_dim):
            raise ValueError(
                f"saved head is {state['num_classes']} classes x {state['embedding_dim']} dims, "
                f"this one is {self.num_classes} x {self.embedding_dim}"
            )
        if state.get("sub_centers", 1) != self.sub_centers:
            raise ValueError(
                f"saved head has {state.get('sub_centers', 1)} sub-centres per class, this one has {self.sub_centers}"
            )
        if has_margins != (self.class_margin is not None):
            have = "has" if self.class_margin is not None else "has no"
            raise ValueError(f"saved head {'has' if has_margins else 'has no'} per-class margins, this one {have}")


class _SampledRows(torch.autograd.Function):
    """Rows ``index`` (k,) of the shard (rows, D) as a (k, D) copy whose gradient reaches the
    shard as a sparse COO tensor of those rows: the backward never builds a (rows, D) tensor."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = weight.shape[0]
        return weight.detach().index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(
            index.unsqueeze(0), grad, (ctx.rows, grad.shape[1]), is_coalesced=True, check_invariants=False
        )  # index: sorted, unique
        return sparse, None
