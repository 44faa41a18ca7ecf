"""Binary masks over a model's prunable weights."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch

from prunelab.sparsity.indices import count, flatnonzero


def as_dtype(
    mask: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """A bool ``mask`` as 0/1 values of ``dtype`` (on ``device``). Read through its bytes:
    on a CPU converting uint8 to float is about 5x faster than converting bool."""
    if mask.dtype == torch.bool and dtype != torch.bool:
        mask = mask.view(torch.uint8)
    return mask.to(device=device or mask.device, dtype=dtype)


def _all_true(mask: torch.Tensor) -> bool:
    """``bool(mask.all())`` for a bool mask, read as the minimum of its bytes (about 8x
    faster on a CPU)."""
    if mask.numel() == 0:
        return True
    return bool(mask.view(torch.uint8).amin())


# The cached factor of a mask that keeps every entry: nothing to multiply.
_ALL_KEPT = torch.empty(0)


class Masks(Mapping[str, torch.Tensor]):
    """An ordered mapping ``parameter name -> bool tensor`` (True = weight is kept).

    Refuses non-binary values, knows its own sparsity and applies itself in place.
    """

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor],
        kept_indices: Mapping[str, torch.Tensor] | None = None,
        changes: tuple[Masks, Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
    ) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if mask.dtype != torch.bool:
                values = torch.unique(mask)
                if not bool(((values == 0) | (values == 1)).all()):
                    raise ValueError(f"mask '{name}' is not binary: values {values.tolist()[:5]}")
                mask = mask.bool()
            self._masks[name] = mask
        # Masks in the dtype of the tensors they multiply: a bool multiplier would be cast
        # (a new tensor) on every application, on the hot path of every optimizer step.
        self._cast: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        # Flat indices of the kept entries, increasing (see kept_indices); a caller that
        # built a mask from its indices hands them over, which spares a search.
        self._kept: dict[str, torch.Tensor] = dict(kept_indices or {})
        # (base, {name: (dropped, grown)}): the flat indices where these masks differ from
        # the masks ``base`` (see changes_from). A weak reference: masks built from masks
        # built from masks... must not keep every earlier generation (and its cached
        # factors) alive through a run of mask updates.
        self._changes = (weakref.ref(changes[0]), dict(changes[1])) if changes is not None else None
        # Bumped by every ``masks[name] = ...``: a plan built on these masks (the engine's
        # per-step gradient masking) is stale once it differs.
        self.version = 0

    @classmethod
    def dense_like(cls, params: Mapping[str, torch.Tensor]) -> Masks:
        """All-True masks shaped like ``params``."""
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        if name not in self._masks:
            raise KeyError(f"no mask named '{name}'")
        if mask.shape != self._masks[name].shape:
            raise ValueError(
                f"mask '{name}' has shape {tuple(mask.shape)}, expected "
                f"{tuple(self._masks[name].shape)}"
            )
        self._masks[name] = mask.to(dtype=torch.bool, device=self._masks[name].device)
        self._cast = {k: v for k, v in self._cast.items() if k[0] != name}
        self._kept.pop(name, None)
        self._changes = None
        self.version += 1

    def changes_from(self, base: Masks) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """For every layer, the flat indices that ``base`` keeps and these masks drop, and
        those that these masks keep and ``base`` does not, when the method that built these
        masks from ``base`` said so (an update that knows what it changed spares whole-layer
        comparisons); None otherwise."""
        if self._changes is None or self._changes[0]() is not base:
            return None
        changes = self._changes[1]
        return changes if set(changes) == set(self._masks) else None

    def kept_indices(self, name: str) -> torch.Tensor:
        """The flat indices of the entries ``name`` keeps, in increasing order (what
        ``torch.nonzero(mask.flatten())`` gives; found once per mask)."""
        kept = self._kept.get(name)
        if kept is None:
            kept = self._kept[name] = flatnonzero(self._masks[name].reshape(-1))
        return kept

    @property
    def device(self) -> torch.device | None:
        """The device of the masks (the first one's; None when there are none)."""
        for mask in self._masks.values():
            return mask.device
        return None

    # -- counts -----------------------------------------------------------------------------
    def nnz(self) -> dict[str, int]:
        """Kept (non-zero) entries per layer."""
        return {n: self._count(n) for n in self._masks}

    def _count(self, name: str) -> int:
        """Kept entries of ``name``: the number of its kept indices where an update handed
        them over, else a count of the mask."""
        kept = self._kept.get(name)
        return kept.numel() if kept is not None else count(self._masks[name])

    def numel(self) -> int:
        """Total number of masked entries."""
        return sum(m.numel() for m in self._masks.values())

    def density(self) -> float:
        """Fraction of entries kept over all layers."""
        total = self.numel()
        return sum(self.nnz().values()) / total if total else 1.0

    def sparsity(self, names: Iterable[str] | None = None) -> float:
        """Fraction of entries pruned over all layers, or over the layers ``names``."""
        if names is None:
            return 1.0 - self.density()
        names = list(names)
        total = sum(self._masks[n].numel() for n in names)
        return 1.0 - sum(self._count(n) for n in names) / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of entries pruned, per layer."""
        return {n: 1.0 - self._count(n) / m.numel() for n, m in self._masks.items()}

    # -- application ------------------------------------------------------------------------
    def apply_(self, tensors: Mapping[str, torch.Tensor | None]) -> None:
        """Zero, in place, the entries of ``tensors`` (weights or grads) that are masked out.

        One multiplication by the mask per tensor, all in a single foreach call (it runs on
        every optimizer step, twice), outside autograd."""
        names, factors = self.factors(tensors)
        targets = [tensors[n] for n in names]
        if not targets:
            return
        if torch.is_grad_enabled():
            with torch.no_grad():
                torch._foreach_mul_(targets, factors)
        else:
            torch._foreach_mul_(targets, factors)

    def factors(
        self, tensors: Mapping[str, torch.Tensor | None]
    ) -> tuple[list[str], list[torch.Tensor]]:
        """The names of the ``tensors`` a mask removes entries from, and those masks as 0/1
        factors in each tensor's dtype and on its device (cached). A mask that keeps
        everything (a layer kept dense) would multiply by ones and is left out: that leaves
        every value as the product would, NaN included."""
        names: list[str] = []
        factors: list[torch.Tensor] = []
        for name, mask in self._masks.items():
            tensor = tensors.get(name)
            if tensor is None:
                continue
            key = (name, tensor.dtype)
            cast = self._cast.get(key)
            if cast is None or (cast is not _ALL_KEPT and cast.device != tensor.device):
                cast = self._cast[key] = (
                    _ALL_KEPT if _all_true(mask) else as_dtype(mask, tensor.dtype, tensor.device)
                )
            if cast is not _ALL_KEPT:
                names.append(name)
                factors.append(cast)
        return names, factors

    def to(self, device: torch.device | str) -> Masks:
        """The same masks on another device."""
        return Masks({n: m.to(device) for n, m in self._masks.items()})

    def clone(self) -> Masks:
        """An independent copy."""
        return Masks({n: m.clone() for n, m in self._masks.items()})

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain ``{name: bool tensor}`` on the CPU, for checkpoints."""
        return {n: m.detach().cpu().clone() for n, m in self._masks.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device=None) -> Masks:
        """Masks from :meth:`state_dict` output, optionally moved to ``device``."""
        return cls({n: (m.to(device) if device is not None else m) for n, m in state.items()})

    def equal(self, other: Masks) -> bool:
        """True when both hold the same names and bitwise-identical masks."""
        return list(self) == list(other) and all(
            torch.equal(self[n].cpu(), other[n].cpu()) for n in self
        )
