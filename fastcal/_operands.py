"""The prototypes prepared for the distance (:class:`DistanceOperands`, the centred form of
:func:`centred_prototypes`) and the cache that keeps them while a prototypes tensor holds the same
values (:func:`distance_operands`): used by every backend, the calibrator and the exported head."""
from __future__ import annotations

import weakref

import torch

from ._fifo import FifoCache


def centred_prototypes(prototypes: torch.Tensor):
    """Prototypes prepared for the expanded distance, centred so that it keeps float32 precision.

    For any vector ``c``, with ``d = p - c`` and ``A[k] = P[k] - c``::

        ||p - P[k]||^2 = ||d||^2 + ||A[k]||^2 - 2 d . A[k]

    and ``||d||^2`` is the same for every k, so ``argmin_k ||A[k]||^2 - 2 d . A[k]`` is the label.
    Uncentred (``c = 0``) the terms are of the size of ``||P[k]||^2`` while the distances can be
    far smaller (at a high temperature every ``p`` and every prototype is close to uniform):
    the differences that decide a label drown in the rounding of the large terms. With ``c``
    the mean of the prototypes every term is bounded by a few times the largest distance of
    the pixel, so the rounding error is relative to the distances themselves, as in the direct
    form ``sum_j (p_j - P[k, j])^2``.

    Returns ``(A, c, bias)`` in float32: ``A`` [C, C], ``c`` [C] and ``bias[k] = ||A[k]||^2``.
    NaN rows ("skip" classes) get a zero row in ``A`` and ``bias = +inf``, so their distance is
    ``+inf`` and they are never the argmin while any other class is left.
    """
    P = prototypes.double()
    skipped = torch.isnan(P).all(dim=1)
    kept = torch.where(skipped[:, None], torch.zeros((), dtype=P.dtype, device=P.device), P)
    # the mean of the kept rows without indexing by a mask, which would read the mask back (on CUDA
    # a synchronisation, which a captured CUDA graph cannot contain)
    c = (kept.sum(dim=0) / (~skipped).sum().clamp_min(1)).float()
    A = torch.where(skipped[:, None], torch.zeros((), dtype=P.dtype, device=P.device), P - c.double())
    bias = (A * A).sum(dim=1)
    bias = torch.where(skipped, torch.full_like(bias, float("inf")), bias)
    return A.float().contiguous(), c.contiguous(), bias.float()


class DistanceOperands:
    """The prototypes as every fast backend consumes them, prepared once per state of the
    prototypes: ``(A, c, bias)`` of :func:`centred_prototypes`, and the same zero-padded to the
    Triton kernels' class blocks (built on first use per block size). ``prototypes`` is kept for
    the reference backend, which reads the prototypes as they are."""

    __slots__ = ("prototypes", "_centred", "_padded", "_derived")

    def __init__(self, prototypes: torch.Tensor, *, padded: dict | None = None, derived: dict | None = None):
        """``padded`` / ``derived``: forms a backend already built with the prototypes (see
        ``operands_pass`` of the backends), kept instead of being derived again."""
        self.prototypes = prototypes
        self._centred = None  # built on first use: the reference backend never needs it
        self._padded = dict(padded or {})
        self._derived = dict(derived or {})

    @property
    def A(self) -> torch.Tensor:
        return self._centred_operands()[0]

    @property
    def centre(self) -> torch.Tensor:
        return self._centred_operands()[1]

    @property
    def bias(self) -> torch.Tensor:
        return self._centred_operands()[2]

    def _centred_operands(self):
        if self._centred is None:
            self._centred = centred_prototypes(self.prototypes)
        return self._centred

    def derived(self, name: str, build):
        """``build(self)``, made once and kept with the operands: a backend's own form of them."""
        if name not in self._derived:
            self._derived[name] = build(self)
        return self._derived[name]

    def padded(self, c_block: int):
        """``(A, c, bias)`` zero-padded to a whole number of ``c_block`` classes, ``bias = +inf`` for
        the padding (never the nearest)."""
        if c_block not in self._padded:
            C = self.A.shape[0]
            c_pad = -(-C // c_block) * c_block
            A = self.A.new_zeros(c_pad, c_pad)
            A[:C, :C] = self.A
            centre = self.centre.new_zeros(c_pad)
            centre[:C] = self.centre
            bias = self.bias.new_full((c_pad,), float("inf"))
            bias[:C] = self.bias
            self._padded[c_block] = (A, centre, bias)
        return self._padded[c_block]


_operands_cache = FifoCache(32)  # id(prototypes) -> (weak reference, snapshot or version, operands)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns (an integer view of the same size): NaN rows compare equal to themselves."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def distance_operands(prototypes: torch.Tensor, check_values=None, prepare=None) -> DistanceOperands:
    """The :class:`DistanceOperands` of ``prototypes``, never stale, whatever wrote to the tensor.

    On the CPU the operands are kept with a copy of the values they were built from, and reused
    while the tensor is alive and holds the same bits in the same dtype (``C * C`` values compared per call: about
    4 us of host work with 19 classes, 20 us with 150); any change, through PyTorch or behind its back (NumPy,
    ``.data``, DLPack, the storage), prepares (and ``check_values``) them again. On other devices
    a comparison would read a number back (a synchronisation), so the operands are prepared from
    the tensor's current values on every call (``prepare(prototypes)``, the backend's one launch,
    or a few small launches; nothing read back), and ``check_values`` (which reads back) runs when
    the tensor is new or its version counter has moved: values written behind PyTorch's back on a
    GPU are used as they are, unchecked."""
    key = id(prototypes)
    entry = _operands_cache.get(key)
    known = entry is not None and entry[0]() is prototypes
    if prototypes.device.type != "cpu":
        try:
            version = prototypes._version
        except RuntimeError:  # an inference tensor: no version counter, checked on every call
            version = None
        if check_values is not None and not (known and version is not None and entry[1] == version):
            check_values(prototypes)
            if version is not None:
                _remember(key, prototypes, version, None)
        return DistanceOperands(prototypes.detach()) if prepare is None else prepare(prototypes)
    # the same bits mean the same values only in the same dtype: `.data` can retype a tensor in place
    if known and entry[1].dtype == prototypes.dtype and torch.equal(_bits(entry[1]), _bits(prototypes)):
        return entry[2]
    snapshot = prototypes.detach().clone()
    if check_values is not None:
        check_values(snapshot)
    operands = DistanceOperands(snapshot)
    _remember(key, prototypes, snapshot, operands)
    return operands


def _remember(key, prototypes, state, operands) -> None:
    _operands_cache.put(key, (weakref.ref(prototypes), state, operands))
