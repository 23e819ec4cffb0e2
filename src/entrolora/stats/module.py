"""``ModuleStats``: the statistics of one target module's gradient (METHODS.md §2).

The record every other statistics module reads; it imports nothing of entrolora, so moments,
the statistics file and ``GradientStats`` can all depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Singular values kept per module (raw, signal): auto's prices (METHODS.md §7). Twice its default
# r_max; an 8B model's 224 modules add ~1 MB of JSON to the statistics file.
SPECTRUM_KEEP = 128


@dataclass(frozen=True)
class ModuleStats:
    """Statistics of one target module's accumulated gradient ``G`` (``d_out × d_in``).

    ``entropy`` and ``erank`` are None for a *degenerate* module (``std == 0``: no gradient
    reached it), METHODS.md §2. ``sensitivity`` (RaLoRA eq. 5) is None when no weight was given.

    With a noise estimate ``D`` (§2, "Probe noise"): ``noise_mean``/``noise_std`` are its moments,
    ``snr = max(‖G‖² − ‖D‖², 0)/‖D‖²`` (inf when ``D = 0``), ``signal_std`` the square root of
    the clipped signal variance ``max(var G − var D, 2·var D/√n)``, ``signal_entropy`` its proxy
    entropy and ``signal_erank`` the effective rank of the clipped eigenvalues of ``GGᵀ − DDᵀ``
    (None when no signal is left). All six are None without a noise estimate.

    ``spectrum``: the top ``SPECTRUM_KEEP`` singular values of ``G``, descending (None for a
    degenerate module, or where the raw effective rank was estimated on a large matrix);
    ``signal_spectrum``: those of the signal, square roots of the clipped eigenvalues of
    ``GGᵀ − DDᵀ`` (None without a noise estimate). Statistics saved before they existed load
    with both None.
    """

    name: str
    module_type: str
    layer: int
    shape: tuple[int, int]
    numel: int
    mean: float
    std: float
    entropy: float | None
    erank: float | None
    sensitivity: float | None
    noise_mean: float | None = None
    noise_std: float | None = None
    snr: float | None = None
    signal_std: float | None = None
    signal_entropy: float | None = None
    signal_erank: float | None = None
    spectrum: tuple[float, ...] | None = None
    signal_spectrum: tuple[float, ...] | None = None

    @property
    def degenerate(self) -> bool:
        return self.std == 0.0

    @property
    def has_noise(self) -> bool:
        """Whether a noise estimate, hence the signal statistics, is there."""
        return self.noise_std is not None

    def entropy_of(self, statistics: str) -> float | None:
        """Proxy entropy of ``G`` (``"raw"``) or of the signal (``"signal"``)."""
        return self.signal_entropy if statistics == "signal" else self.entropy

    def erank_of(self, statistics: str) -> float | None:
        """Effective rank of ``G`` (``"raw"``) or of the signal (``"signal"``)."""
        return self.signal_erank if statistics == "signal" else self.erank

    def spectrum_of(self, statistics: str) -> tuple[float, ...] | None:
        """Top singular values of ``G`` (``"raw"``) or of the signal (``"signal"``)."""
        return self.signal_spectrum if statistics == "signal" else self.spectrum

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return self.shape[1]
