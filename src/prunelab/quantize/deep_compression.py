"""Deep Compression: k-means weight sharing, centroid fine-tuning and Huffman-coded storage.

Han, S., Mao, H. & Dally, W. J. (2016). *Deep Compression: Compressing deep neural networks with
pruning, trained quantization and Huffman coding*. ICLR (arXiv:1510.00149). The three stages
after pruning, as in the paper:

1. **Weight sharing** (section 3.1–3.2). Per layer, the surviving (unpruned) weights are
   clustered by one-dimensional k-means into at most ``2**bits`` values with **linear
   initialisation**: the initial centroids are spaced evenly over ``[min, max]`` of the layer's
   surviving weights (the paper's figure 8 finds it best). Pruned weights are not clustered
   and stay exactly zero. Clustering uses scikit-learn's ``KMeans`` (Lloyd's algorithm,
   ``n_init=1``, run until no assignment changes or 300 iterations). :func:`cluster_weights`,
   :func:`share_weights`.
2. **Centroid fine-tuning** (section 3.3, Eq. 3). With the assignments fixed, the gradient of
   a centroid is the *sum* of the gradients of the weights that share it,
   ``dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k)``, and the centroid takes an SGD step with it. Here
   the layer's weight is built as ``W = codebook[assignments]`` inside the forward pass
   (``torch.func.functional_call``), so autograd's backward of that gather is exactly this
   grouped sum. :class:`CentroidTrainer` (one step at a time, e.g. from a Lightning
   ``training_step``) and :func:`finetune_centroids` (a plain loop).
3. **Storage** (sections 2 and 4). Each layer is stored as its codebook (fp32) plus one entry
   per non-zero weight: the *relative index* (the distance to the previous entry, as
   ``distance - 1`` in ``index_bits`` bits; 5 for fc and 8 for conv layers by default, as in
   section 2) and the weight's cluster index. When a gap is longer than ``2**index_bits`` a
   **filler zero** entry is inserted (figure 2). Both entry streams are then Huffman coded
   with a per-layer canonical code (:mod:`prunelab.quantize.huffman`). :func:`save_compressed`
   writes every byte (header, shapes, codebooks, code tables, both streams, biases and any
   other state) to one file; :func:`load_compressed` decodes it back to the identical
   weights; :class:`CompressionReport` breaks the file size down and gives the compression
   ratio against the dense fp32 ``torch.save(state_dict)`` file (measured) and against the
   raw fp32 bytes of the parameters.

Deliberate deviations and choices where the paper is silent:

* **Reserved zero code.** Cluster index 0 of every codebook is the fixed value 0.0 used for
  pruned positions and filler entries, so a ``b``-bit layer has at most ``2**b - 1`` trained
  centroids (indices ``1..k``). This is what the authors' released decoder does
  (``decode.py`` of github.com/songhan/Deep-Compression-AlexNet fills every unlisted
  position and every filler with ``codebook[0]``). Index 0 is not a cluster: no weight is
  assigned to it and it is never trained.
* **One index stream per layer.** Relative indices run over the whole row-major flattened
  weight (``(out, in[, kh, kw])``), with no row pointers, again as the released decoder
  does (``cumsum(index + 1) - 1``); the paper's text describes CSR/CSC in general.
* **Huffman tables are stored and counted**: per layer and stream, one code length per
  symbol, 4 bits each (section 4 gives no table format). The coder is written here
  (canonical codes, ``heapq``); see :mod:`prunelab.quantize.huffman` for why.
* **Headers are counted**: names, shapes, bit widths and entry counts (the released format
  reads shapes from the network definition instead).
* **Fine-tuning** trains the centroids only, with ``torch.optim.SGD`` (the paper's Caffe
  retraining used its solver's momentum; the default here is plain SGD, momentum optional).
  Biases stay as they are unless ``train_biases``. Centroids are stored as fp32 (``b = 32``
  in the paper's Eq. 1); biases and every other state tensor are stored raw in their dtype.
* **Fixed-width option.** ``coding="fixed"`` writes the same file without Huffman coding
  (indices bit-packed at their nominal width): the paper's "P+Q" column, measured.

The file is little-endian; its layout is in :func:`save_compressed`.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.errors import ConfigError
from prunelab.models import prunable_parameters
from prunelab.quantize import huffman

BITS_RANGE = (2, 8)
INDEX_BITS_RANGE = (1, 8)
#: Bits of a relative sparse index by layer kind (section 2 of the paper).
DEFAULT_INDEX_BITS: dict[str, int] = {"fc": 5, "conv": 8}
MAGIC = b"PLDC"
VERSION = 1
CODINGS = ("huffman", "fixed")

LossFn = Callable[[Tensor, Tensor], Tensor]

# dtype <-> one-byte code for the raw tensors (biases, buffers) in the file.
_DTYPES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int16: 6,
    torch.int8: 7,
    torch.uint8: 8,
    torch.bool: 9,
}
_DTYPE_OF_CODE = {code: dtype for dtype, code in _DTYPES.items()}


# -- checks ------------------------------------------------------------------------------------
def check_bits(bits: object, key: str = "quantize.bits") -> int:
    """``bits`` as an int in 2..8, else a one-line :class:`ConfigError`."""
    low, high = BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
        raise ConfigError(
            f"{key}={bits!r} is outside {low}..{high}; set it to an integer from {low} to "
            f"{high} (Deep Compression uses 5 to 8)"
        )
    return int(bits)


def _check_index_bits(bits: object, key: str) -> int:
    low, high = INDEX_BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
        raise ConfigError(
            f"{key}={bits!r} is outside {low}..{high}; set it to an integer from {low} to "
            f"{high} (the paper uses 5 for fc and 8 for conv layers)"
        )
    return int(bits)


def layer_kind(weight: Tensor) -> str:
    """``"conv"`` for a weight with more than two dimensions, else ``"fc"``."""
    return "conv" if weight.dim() > 2 else "fc"


def resolve_index_bits(
    name: str, weight: Tensor, index_bits: Mapping[str, int] | None = None
) -> int:
    """Relative-index bits of a layer: ``index_bits[name]``, else ``index_bits[kind]``, else
    the paper's default for its kind (:data:`DEFAULT_INDEX_BITS`)."""
    table = {**DEFAULT_INDEX_BITS, **(index_bits or {})}
    key = name if name in table else layer_kind(weight)
    return _check_index_bits(table[key], f"index_bits[{key}]")


# -- weight sharing ----------------------------------------------------------------------------
def cluster_weights(
    weight: Tensor, mask: Tensor | None, bits: int, max_iter: int = 300
) -> tuple[Tensor, Tensor]:
    """k-means weight sharing of one layer (section 3.1, linear initialisation of 3.2).

    Args:
        weight: the layer's weight.
        mask: True where the weight survives pruning; None means "the non-zero weights".
        bits: index width, 2..8: at most ``2**bits - 1`` trained centroids plus the fixed zero.
        max_iter: Lloyd iterations at most.

    Returns:
        ``(codebook, assignments)``: float32 ``codebook`` of length ``k + 1`` with
        ``codebook[0] == 0`` and the ``k`` centroids ascending after it; int64 ``assignments``
        of the weight's shape, 0 exactly at the pruned positions and ``1..k`` elsewhere, so
        ``codebook[assignments]`` is the shared weight. With no more distinct surviving values
        than centroids, each distinct value is its own centroid (no k-means needed).
    """
    bits = check_bits(bits)
    w = weight.detach()
    keep = (w != 0) if mask is None else mask.detach().to(device=w.device).bool()
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(w.shape)}")
    assignments = torch.zeros(w.shape, dtype=torch.long, device=w.device)
    values = w[keep].double().cpu().numpy()
    if values.size == 0:
        return torch.zeros(1, dtype=torch.float32, device=w.device), assignments
    distinct = np.unique(values)
    k = min(2**bits - 1, len(distinct))
    if k == len(distinct):
        centers, labels = distinct, np.searchsorted(distinct, values)
    else:
        from sklearn.cluster import KMeans

        init = np.linspace(values.min(), values.max(), k).reshape(-1, 1)
        kmeans = KMeans(
            n_clusters=k, init=init, n_init=1, max_iter=max_iter, tol=0.0, algorithm="lloyd"
        ).fit(values.reshape(-1, 1))
        centers, labels = kmeans.cluster_centers_[:, 0], kmeans.labels_
        used = np.unique(labels)  # drop a cluster left empty, then sort ascending
        order = used[np.argsort(centers[used], kind="stable")]
        remap = np.full(k, -1, dtype=np.int64)
        remap[order] = np.arange(len(order))
        centers, labels = centers[order], remap[labels]
    codebook = torch.zeros(len(centers) + 1, dtype=torch.float32, device=w.device)
    codebook[1:] = torch.as_tensor(centers, dtype=torch.float32)
    assignments[keep] = torch.as_tensor(labels + 1, dtype=torch.long, device=w.device)
    return codebook, assignments


@dataclass
class SharedLayer:
    """One layer's shared weights: ``codebook[assignments]`` (``codebook[0]`` is the zero)."""

    codebook: Tensor
    assignments: Tensor
    bits: int

    @property
    def num_centroids(self) -> int:
        """Trained centroids ``k`` (the fixed zero not counted)."""
        return len(self.codebook) - 1

    def weight(self) -> Tensor:
        """The shared weight tensor (float32)."""
        return self.codebook[self.assignments]


@dataclass
class SharedWeights:
    """The shared weights of a model's prunable layers, by parameter name."""

    layers: dict[str, SharedLayer] = field(default_factory=dict)

    def apply(self, model: nn.Module) -> None:
        """Write ``codebook[assignments]`` into the model's weights, in place."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, layer in self.layers.items():
                params[name].copy_(layer.weight().to(params[name].dtype))


def share_weights(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None,
    bits: int,
    layer_bits: Mapping[str, int] | None = None,
) -> SharedWeights:
    """Cluster every prunable weight of ``model`` (:func:`cluster_weights`) and apply the
    centroids in place.

    ``masks`` maps parameter names (as in :func:`prunelab.models.prunable_parameters`) to
    keep-masks; a layer without one keeps its non-zero weights. ``layer_bits`` overrides
    ``bits`` for single layers. Raises :class:`ConfigError` for bits outside 2..8 or names
    that are no prunable weight.
    """
    bits = check_bits(bits)
    params = prunable_parameters(model)
    masks = dict(masks or {})
    layer_bits = dict(layer_bits or {})
    for what, names in (("masks", masks), ("quantize.layer_bits", layer_bits)):
        unknown = sorted(set(names) - set(params))
        if unknown:
            raise ConfigError(
                f"{what} name(s) {', '.join(unknown)} are no prunable weight of the model; "
                f"use names from: {', '.join(params)}"
            )
    widths = dict.fromkeys(params, bits)
    for name, value in layer_bits.items():
        widths[name] = check_bits(value, f"quantize.layer_bits.{name}")
    shared = SharedWeights()
    for name, param in params.items():
        codebook, assignments = cluster_weights(param, masks.get(name), widths[name])
        shared.layers[name] = SharedLayer(codebook, assignments, widths[name])
    shared.apply(model)
    return shared


# -- centroid fine-tuning ----------------------------------------------------------------------
class CentroidTrainer:
    """SGD on the centroids of :class:`SharedWeights`, assignments and masks fixed (Eq. 3).

    Each :meth:`step` runs the model with ``W = codebook[assignments]`` for every shared layer
    (``torch.func.functional_call``), so backpropagation sums the gradients of the weights of
    each cluster into its centroid; ``codebook[0]`` (the zero of pruned weights) is a constant.
    The model's own weight tensors are untouched until :meth:`finish`, which copies the
    trained centroids into ``shared`` and the shared weights into the model. A Lightning
    module can call :meth:`loss` in its ``training_step`` (manual optimisation over
    :attr:`optimizer`) or :meth:`step` directly.
    """

    def __init__(
        self,
        model: nn.Module,
        shared: SharedWeights,
        lr: float,
        momentum: float = 0.0,
        loss_fn: LossFn | None = None,
        train_biases: bool = False,
    ) -> None:
        if not lr > 0:
            raise ConfigError(f"lr={lr!r} is not positive; set a learning rate such as 1e-3")
        self.model = model
        self.shared = shared
        self.loss_fn: LossFn = loss_fn or F.cross_entropy
        self.centroids = {
            name: layer.codebook[1:].detach().clone().requires_grad_(True)
            for name, layer in shared.layers.items()
        }
        params: list[Tensor] = list(self.centroids.values())
        if train_biases:
            params += [
                p for n, p in model.named_parameters() if n not in shared.layers and p.dim() == 1
            ]
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def weights(self) -> dict[str, Tensor]:
        """``{name: codebook[assignments]}`` built from the trainable centroids."""
        out = {}
        for name, layer in self.shared.layers.items():
            centroids = self.centroids[name]
            codebook = torch.cat([centroids.new_zeros(1), centroids])
            # index_select's backward is index_add_: the per-centroid gradient sums of Eq. 3
            flat = codebook.index_select(0, layer.assignments.reshape(-1))
            out[name] = flat.view(layer.assignments.shape)
        return out

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss of one batch with the shared weights (differentiable in the centroids)."""
        output = torch.func.functional_call(self.model, self.weights(), (x,))
        return self.loss_fn(output, y)

    def step(self, x: Tensor, y: Tensor) -> float:
        """One SGD step of the centroids on a batch; returns the batch loss before the step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def finish(self) -> SharedWeights:
        """Store the trained centroids in ``shared`` and write the weights into the model."""
        for name, layer in self.shared.layers.items():
            layer.codebook = torch.cat(
                [layer.codebook[:1], self.centroids[name].detach().to(layer.codebook.dtype)]
            )
        self.model.zero_grad(set_to_none=True)
        self.shared.apply(self.model)
        return self.shared


def finetune_centroids(
    model: nn.Module,
    shared: SharedWeights,
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    momentum: float = 0.0,
    train_biases: bool = False,
) -> list[float]:
    """Train the centroids of ``shared`` on ``batches`` with the assignments fixed.

    Runs ``steps`` steps (passing over ``batches`` again as often as needed; it must then be
    re-iterable, like a DataLoader) or, when ``steps`` is None, ``epochs`` passes. The model
    is in train mode meanwhile and in its previous mode after; its weights hold the trained
    shared weights at the end. Returns the loss of every step.
    """
    trainer = CentroidTrainer(model, shared, lr, momentum, loss_fn, train_biases)
    device = next(iter(trainer.centroids.values())).device if trainer.centroids else None
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        passes = 0
        while (steps is None and passes < epochs) or (steps is not None and len(losses) < steps):
            before = len(losses)
            for x, y in batches:
                losses.append(trainer.step(x.to(device), y.to(device)))
                if steps is not None and len(losses) >= steps:
                    break
            passes += 1
            if len(losses) == before:
                raise ValueError("batches yielded nothing; give a non-empty, re-iterable loader")
    finally:
        trainer.finish()
        model.train(was_training)
    return losses


# -- sparse entries ----------------------------------------------------------------------------
def relative_entries(codes: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Split a flattened layer of cluster indices (0 = pruned) into stored entries.

    Returns ``(relative, entry_codes, n_fillers)``: per entry the distance to the previous
    entry minus one (the first counts from position -1) and its cluster index; a gap longer
    than ``2**index_bits`` gets filler entries of distance ``2**index_bits`` and code 0
    (figure 2 of the paper).
    """
    span = 1 << index_bits
    positions = np.flatnonzero(codes)
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // span
    counts = fillers + 1
    total = int(counts.sum())
    relative = np.full(total, span - 1, dtype=np.int64)
    entry_codes = np.zeros(total, dtype=np.int64)
    last = np.cumsum(counts) - 1
    relative[last] = gaps - fillers * span - 1
    entry_codes[last] = codes[positions]
    return relative, entry_codes, int(fillers.sum())


def entries_to_codes(relative: np.ndarray, entry_codes: np.ndarray, numel: int) -> np.ndarray:
    """Inverse of :func:`relative_entries`: the flattened cluster indices of the layer."""
    codes = np.zeros(numel, dtype=np.int64)
    if len(relative):
        positions = np.cumsum(relative + 1) - 1
        if positions[-1] >= numel:
            raise ValueError("relative indices run past the end of the layer: corrupt file")
        codes[positions] = entry_codes
    return codes


# -- size report -------------------------------------------------------------------------------
@dataclass
class LayerSize:
    """Bytes of one shared layer in the compressed file, by part.

    ``*_fixed_bytes`` are the index streams bit-packed at their nominal width (before Huffman),
    ``*_huffman_bytes`` the same streams Huffman coded; both are real encodings, and
    :attr:`stored_bytes` counts the one the file holds (``coding``).
    """

    name: str
    shape: tuple[int, ...]
    coding: str
    weight_bits: int
    index_bits: int
    n_weights: int
    n_nonzero: int
    n_fillers: int
    n_centroids: int
    codebook_bytes: int
    weight_index_fixed_bytes: int
    weight_index_huffman_bytes: int
    weight_index_huffman_bits: int
    relative_index_fixed_bytes: int
    relative_index_huffman_bytes: int
    relative_index_huffman_bits: int
    table_bytes: int
    header_bytes: int

    @property
    def n_entries(self) -> int:
        """Stored entries: non-zero weights plus filler zeros."""
        return self.n_nonzero + self.n_fillers

    @property
    def weight_index_bytes(self) -> int:
        """Bytes of the weight-index stream as stored."""
        return (
            self.weight_index_huffman_bytes
            if self.coding == "huffman"
            else self.weight_index_fixed_bytes
        )

    @property
    def relative_index_bytes(self) -> int:
        """Bytes of the relative-index stream as stored."""
        return (
            self.relative_index_huffman_bytes
            if self.coding == "huffman"
            else self.relative_index_fixed_bytes
        )

    @property
    def stored_bytes(self) -> int:
        """All bytes of the layer's record in the file."""
        return (
            self.header_bytes
            + self.codebook_bytes
            + self.table_bytes
            + self.weight_index_bytes
            + self.relative_index_bytes
        )

    @property
    def weight_bits_huffman(self) -> float:
        """Huffman-coded bits per stored entry of the weight indices (the paper's P+Q+H)."""
        return self.weight_index_huffman_bits / max(self.n_entries, 1)

    @property
    def index_bits_huffman(self) -> float:
        """Huffman-coded bits per stored entry of the relative indices."""
        return self.relative_index_huffman_bits / max(self.n_entries, 1)


@dataclass
class CompressionReport:
    """The size of a file written by :func:`save_compressed`, part by part.

    ``bytes_total`` is the size of the file on disk and equals the sum of the parts.
    ``dense_file_bytes`` is the size of ``torch.save(state_dict)`` of the same model in fp32
    (written and measured); ``dense_fp32_bytes`` is 4 bytes per parameter.
    """

    path: str
    coding: str
    layers: list[LayerSize]
    other_bytes: dict[str, int]
    file_header_bytes: int
    bytes_total: int
    dense_file_bytes: int
    dense_fp32_bytes: int

    @property
    def parts(self) -> dict[str, int]:
        """Bytes by part; they add up to :attr:`bytes_total`."""
        return {
            "header": self.file_header_bytes + sum(s.header_bytes for s in self.layers),
            "codebooks": sum(s.codebook_bytes for s in self.layers),
            "huffman tables": sum(s.table_bytes for s in self.layers),
            "weight indices": sum(s.weight_index_bytes for s in self.layers),
            "relative indices": sum(s.relative_index_bytes for s in self.layers),
            "biases and other": sum(self.other_bytes.values()),
        }

    @property
    def ratio_vs_dense_file(self) -> float:
        """Dense fp32 ``torch.save`` file size / this file's size."""
        return self.dense_file_bytes / self.bytes_total

    @property
    def ratio_vs_fp32(self) -> float:
        """Raw fp32 bytes of all parameters / this file's size."""
        return self.dense_fp32_bytes / self.bytes_total

    @property
    def n_fillers(self) -> int:
        return sum(s.n_fillers for s in self.layers)

    def format(self) -> str:
        """A plain-text breakdown: per layer, per part, and both ratios."""
        rows = [
            f"{'layer':<16}{'weights':>9}{'kept':>8}{'fillers':>8}{'k':>5}{'codebook':>9}"
            f"{'w.idx fix':>10}{'w.idx huf':>10}{'rel fix':>9}{'rel huf':>9}{'tables':>7}"
            f"{'header':>7}{'stored':>8}"
        ]
        for s in self.layers:
            rows.append(
                f"{s.name:<16}{s.n_weights:>9}{s.n_nonzero / s.n_weights:>8.2%}{s.n_fillers:>8}"
                f"{s.n_centroids:>5}{s.codebook_bytes:>9}{s.weight_index_fixed_bytes:>10}"
                f"{s.weight_index_huffman_bytes:>10}{s.relative_index_fixed_bytes:>9}"
                f"{s.relative_index_huffman_bytes:>9}{s.table_bytes:>7}{s.header_bytes:>7}"
                f"{s.stored_bytes:>8}"
            )
        rows.append("parts (bytes): " + ", ".join(f"{k} {v}" for k, v in self.parts.items()))
        rows.append(
            f"file {self.bytes_total} B ({self.coding}); dense fp32 torch.save file "
            f"{self.dense_file_bytes} B -> {self.ratio_vs_dense_file:.1f}x; raw fp32 "
            f"parameters {self.dense_fp32_bytes} B -> {self.ratio_vs_fp32:.1f}x"
        )
        return "\n".join(rows)


def dense_file_bytes(model: nn.Module, path: str | os.PathLike | None = None) -> int:
    """Size of ``torch.save(state_dict)`` of ``model`` with floating tensors in fp32.

    Written to ``path`` (kept) or to a temporary file (removed), and measured on disk.
    """
    state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    if path is not None:
        torch.save(state, path)
        return os.path.getsize(path)
    with tempfile.TemporaryDirectory(prefix="prunelab-dense-") as scratch:
        target = Path(scratch) / "dense.pt"
        torch.save(state, target)
        return os.path.getsize(target)


# -- the file ----------------------------------------------------------------------------------
def _name_shape(name: str, shape: tuple[int, ...]) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 255 or len(shape) > 255:
        raise ValueError(f"tensor name or rank too long to store: {name!r}")
    return struct.pack("<B", len(raw)) + raw + struct.pack(f"<B{len(shape)}I", len(shape), *shape)


def _encode_layer(
    name: str, layer: SharedLayer, index_bits: int, coding: str
) -> tuple[bytes, LayerSize]:
    shape = tuple(layer.assignments.shape)
    codes = layer.assignments.detach().cpu().numpy().astype(np.int64).ravel()
    k = layer.num_centroids
    relative, entry_codes, n_fillers = relative_entries(codes, index_bits)
    n_entries = len(relative)
    w_lengths = huffman.code_lengths(np.bincount(entry_codes, minlength=k + 1))
    r_lengths = huffman.code_lengths(np.bincount(relative, minlength=1 << index_bits))
    w_huffman, r_huffman = (
        huffman.encode(entry_codes, w_lengths),
        huffman.encode(relative, r_lengths),
    )
    w_fixed = huffman.pack_fixed(entry_codes, layer.bits)
    r_fixed = huffman.pack_fixed(relative, index_bits)
    tables = huffman.table_to_bytes(w_lengths) + huffman.table_to_bytes(r_lengths)
    if coding == "huffman":
        w_stream, r_stream = w_huffman, r_huffman
    else:
        w_stream, r_stream, tables = w_fixed, r_fixed, b""
    header = _name_shape(name, shape) + struct.pack("<BBBI", layer.bits, index_bits, k, n_entries)
    codebook = layer.codebook[1:].detach().cpu().to(torch.float32).numpy().astype("<f4").tobytes()
    record = b"".join(
        [
            header,
            codebook,
            tables,
            struct.pack("<I", len(w_stream)),
            w_stream,
            struct.pack("<I", len(r_stream)),
            r_stream,
        ]
    )
    size = LayerSize(
        name=name,
        shape=shape,
        coding=coding,
        weight_bits=layer.bits,
        index_bits=index_bits,
        n_weights=len(codes),
        n_nonzero=int(np.count_nonzero(codes)),
        n_fillers=n_fillers,
        n_centroids=k,
        codebook_bytes=len(codebook),
        weight_index_fixed_bytes=len(w_fixed),
        weight_index_huffman_bytes=len(w_huffman),
        weight_index_huffman_bits=huffman.encoded_bits(entry_codes, w_lengths),
        relative_index_fixed_bytes=len(r_fixed),
        relative_index_huffman_bytes=len(r_huffman),
        relative_index_huffman_bits=huffman.encoded_bits(relative, r_lengths),
        table_bytes=len(tables),
        header_bytes=len(header) + 8,  # + the two stream lengths
    )
    assert size.stored_bytes == len(record)
    return record, size


def _raw_tensor(name: str, tensor: Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored")
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return _name_shape(name, tuple(tensor.shape)) + struct.pack("<B", _DTYPES[tensor.dtype]) + data


def save_compressed(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None,
    shared: SharedWeights,
    path: str | os.PathLike,
    index_bits: Mapping[str, int] | None = None,
    coding: str = "huffman",
    dense_reference: int | None = None,
) -> CompressionReport:
    """Write the compressed model to ``path`` and report its size.

    Args:
        model: holds the shared weights (``shared.apply(model)`` state) and every other
            tensor (biases, buffers) to store.
        masks: the pruning masks, checked against the assignments (None: not checked).
        shared: codebooks and assignments of the shared layers.
        index_bits: bits of a relative index, by ``"fc"``/``"conv"`` or by layer name;
            defaults to 5 for fc and 8 for conv layers (the paper's section 2).
        coding: ``"huffman"`` (the paper's P+Q+H) or ``"fixed"`` (P+Q: no Huffman coding).
        dense_reference: the dense fp32 file size to compare with; measured by
            :func:`dense_file_bytes` when None.

    Layout (little-endian): ``b"PLDC"``, version u8, coding u8 (0 fixed, 1 Huffman), shared
    layers u16, other tensors u16. Per shared layer: name (u8 length + UTF-8), rank u8 and
    shape u32 each, weight bits u8, index bits u8, centroids k u8, entries u32, k fp32
    centroids; with Huffman coding the weight-index and the relative-index code tables
    (:func:`prunelab.quantize.huffman.table_to_bytes` of ``k + 1`` and ``2**index_bits``
    lengths); then the weight-index stream and the relative-index stream, each as u32 byte
    count + bytes. Per other tensor: name, shape, dtype u8, raw bytes.
    """
    if coding not in CODINGS:
        raise ConfigError(f"coding={coding!r} is unknown; use one of {', '.join(CODINGS)}")
    state = model.state_dict()
    for name, layer in shared.layers.items():
        if name not in state:
            raise ValueError(f"shared layer {name} is not in the model's state_dict")
        weight = layer.weight().to(device=state[name].device, dtype=state[name].dtype)
        if not torch.equal(state[name], weight):
            raise ValueError(
                f"{name}: the model's weight is not codebook[assignments]; "
                "call shared.apply(model) (or finish the centroid fine-tuning) first"
            )
        if masks is not None and name in masks:
            mask = masks[name].detach().to(layer.assignments.device).bool()
            if not torch.equal(mask, layer.assignments > 0):
                raise ValueError(f"{name}: the mask differs from the non-zero assignments")
    others = [k for k in state if k not in shared.layers]
    header = MAGIC + struct.pack(
        "<BBHH", VERSION, 1 if coding == "huffman" else 0, len(shared.layers), len(others)
    )
    chunks, sizes, other_bytes = [header], [], {}
    for name, layer in shared.layers.items():
        bits = resolve_index_bits(name, layer.assignments, index_bits)
        record, size = _encode_layer(name, layer, bits, coding)
        chunks.append(record)
        sizes.append(size)
    for name in others:
        raw = _raw_tensor(name, state[name])
        chunks.append(raw)
        other_bytes[name] = len(raw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(chunks))
    total = os.path.getsize(path)
    report = CompressionReport(
        path=str(path),
        coding=coding,
        layers=sizes,
        other_bytes=other_bytes,
        file_header_bytes=len(header),
        bytes_total=total,
        dense_file_bytes=dense_file_bytes(model) if dense_reference is None else dense_reference,
        dense_fp32_bytes=4 * sum(p.numel() for p in model.parameters()),
    )
    if sum(report.parts.values()) != total:
        raise AssertionError("the size report does not add up to the file size")
    return report


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise ValueError("compressed file ends early: truncated or corrupt")
        out = self.data[self.offset : self.offset + n]
        self.offset += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def name_shape(self) -> tuple[str, tuple[int, ...]]:
        (length,) = self.unpack("<B")
        name = self.take(length).decode("utf-8")
        (rank,) = self.unpack("<B")
        return name, tuple(self.unpack(f"<{rank}I"))


def read_compressed(path: str | os.PathLike) -> tuple[dict[str, Tensor], SharedWeights]:
    """Decode a file of :func:`save_compressed`: ``(state_dict, shared weights)``."""
    reader = _Reader(Path(path).read_bytes())
    if reader.take(4) != MAGIC:
        raise ValueError(f"{path} is not a Deep Compression file (bad magic bytes)")
    version, coding_code, n_layers, n_others = reader.unpack("<BBHH")
    if version != VERSION or coding_code not in (0, 1):
        raise ValueError(f"{path}: unsupported version {version} or coding {coding_code}")
    state: dict[str, Tensor] = {}
    shared = SharedWeights()
    for _ in range(n_layers):
        name, shape = reader.name_shape()
        bits, index_bits, k, n_entries = reader.unpack("<BBBI")
        codebook = np.frombuffer(reader.take(4 * k), dtype="<f4")
        if coding_code == 1:
            w_lengths, reader.offset = huffman.table_from_bytes(reader.data, reader.offset, k + 1)
            r_lengths, reader.offset = huffman.table_from_bytes(
                reader.data, reader.offset, 1 << index_bits
            )
        (size,) = reader.unpack("<I")
        w_stream = reader.take(size)
        (size,) = reader.unpack("<I")
        r_stream = reader.take(size)
        if coding_code == 1:
            entry_codes = huffman.decode(w_stream, w_lengths, n_entries)
            relative = huffman.decode(r_stream, r_lengths, n_entries)
        else:
            entry_codes = huffman.unpack_fixed(w_stream, bits, n_entries)
            relative = huffman.unpack_fixed(r_stream, index_bits, n_entries)
        if n_entries and entry_codes.max() > k:
            raise ValueError(f"{name}: a cluster index exceeds the codebook: corrupt file")
        numel = math.prod(shape)
        codes = entries_to_codes(relative, entry_codes, numel).reshape(shape)
        full = torch.zeros(k + 1, dtype=torch.float32)
        full[1:] = torch.from_numpy(codebook.astype(np.float32))
        layer = SharedLayer(full, torch.from_numpy(codes), bits)
        shared.layers[name] = layer
        state[name] = layer.weight()
    for _ in range(n_others):
        name, shape = reader.name_shape()
        (code,) = reader.unpack("<B")
        if code not in _DTYPE_OF_CODE:
            raise ValueError(f"{name}: unknown dtype code {code}: corrupt file")
        dtype = _DTYPE_OF_CODE[code]
        n_bytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        raw = bytearray(reader.take(n_bytes))
        state[name] = (
            torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()
            if raw
            else (torch.zeros(shape, dtype=dtype))
        )
    if reader.offset != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.offset} bytes left after decoding")
    return state, shared


def load_compressed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file of :func:`save_compressed` into ``model`` (strict) and return the model."""
    state, _ = read_compressed(path)
    model.load_state_dict(state, strict=True)
    return model
