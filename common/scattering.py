"""A fixed 2D scattering transform (Mallat, 2012) that exports to ONNX: the DP-first front end.

Tramer & Boneh (ICLR 2021) showed that DP-SGD learns far better on fixed, data-independent
features than on raw pixels: the features cost no privacy (they never look at the data set),
and the few parameters left to train get a much better signal-to-noise ratio per noisy step.
The scattering transform is such a feature map: cascades of Morlet wavelet filters and complex
moduli, averaged by a low-pass filter, stable to small deformations.

kymatio is the field's implementation. This module uses kymatio's own filter bank
(``kymatio.scattering2d.filter_bank``) and follows kymatio's algorithm step by step (reflect
padding, products in the Fourier domain, subsampling by periodisation, modulus, cropping one
coefficient at each border), so its output equals kymatio's ``Scattering2D`` to float precision
(tests/common/test_scattering.py). What differs is how a 2D DFT is computed: kymatio calls
``torch.fft``, which no ONNX exporter turns into something onnxruntime runs; here each DFT is two
real matrix products with fixed cosine and sine matrices (X = F x F^T) when the model is traced
for export. The whole transform is then MatMul, Mul, Slice, Add, Sqrt and a reflect Pad in ONNX,
and the exported model keeps its input (grey image in, probabilities out) with the front end inside
the graph. Computed eagerly (a site caching its features) the DFTs are torch.fft's, 2-3x faster.

The matrices and filters are non-persistent buffers: they are rebuilt from (J, L, shape) and
never travel in a state_dict, so a ScatterNet's federated weights are only its head.

Only ``kymatio.scattering2d.filter_bank`` and ``...utils`` are imported: ``import kymatio.torch``
fails with scipy >= 1.17 in kymatio 0.3.0 (it pulls in the 3D front end, which needs the
removed ``scipy.special.sph_harm``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from kymatio.scattering2d.filter_bank import filter_bank
from kymatio.scattering2d.utils import compute_padding
from torch import nn


class ScatteringError(ValueError):
    """The scattering transform cannot be built for these settings."""


def scattering_channels(J: int, L: int = 8, max_order: int = 2) -> int:
    """Output channels: 1 (order 0) + J*L (order 1) + L^2 * J(J-1)/2 (order 2)."""
    order2 = L * L * J * (J - 1) // 2 if max_order >= 2 else 0
    return 1 + J * L + order2


def scattering_output_size(size: int, J: int) -> int:
    """Side of the output for an input side ``size``: the padded side / 2^J minus the two cropped borders."""
    padded, _ = compute_padding(size, size, J)
    return padded // 2**J - 2


def _dft_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin parts of the n-point DFT matrix, F[u, t] = exp(-2 pi i u t / n) = C - i S.

    Computed in float64 with the index product reduced mod n, so the float32 result is exact to
    rounding for every size used here.
    """
    idx = np.arange(n)
    angle = 2.0 * np.pi * (np.outer(idx, idx) % n) / n
    return torch.from_numpy(np.cos(angle).astype(np.float32)), torch.from_numpy(np.sin(angle).astype(np.float32))


@functools.lru_cache(maxsize=8)
def _filter_bank(height: int, width: int, J: int, L: int) -> dict:
    """kymatio's filter bank, memoised: a pure function of its arguments that takes ~0.5 s, and a site
    builds the model for every message (simulation reuses the process). Callers copy what they keep."""
    return filter_bank(height, width, J, L)


class Scattering2D(nn.Module):
    """Second-order 2D scattering of [B, H, W] (or [B, 1, H, W]) real images -> [B, K, H', W'].

    ``K = scattering_channels(J, L)`` and ``H' = scattering_output_size(H, J)``; channel order
    is kymatio's: order 0, then order 1 by (j1, theta1), then order 2 by (j1, theta1, j2, theta2).
    No trainable parameters.
    """

    def __init__(self, J: int, shape: tuple[int, int], L: int = 8, max_order: int = 2) -> None:
        super().__init__()
        height, width = int(shape[0]), int(shape[1])
        if J < 1 or L < 1 or max_order not in (1, 2):
            raise ScatteringError(f"scattering J={J}, L={L}, max_order={max_order}: need J >= 1, L >= 1, max_order 1 or 2")
        if 2**J > min(height, width):
            raise ScatteringError(f"scattering J={J} needs images of at least {2**J} px, got {height}x{width}")
        self.J, self.L, self.max_order = J, L, max_order
        self.shape = (height, width)
        self.padded = compute_padding(height, width, J)
        pm, pn = self.padded[0] - height, self.padded[1] - width
        if pm >= height or pn >= width:
            raise ScatteringError(f"images of {height}x{width} px are too small for J={J}: use a smaller J")
        # [left, right, top, bottom] as torch's pad wants it; kymatio pads the extra pixel at the end.
        self._pad = (pn // 2, (pn + 1) // 2, pm // 2, (pm + 1) // 2)

        bank = _filter_bank(self.padded[0], self.padded[1], J, L)
        # Low-pass phi at every resolution 0..J-1; wavelets psi[j][res] stacked over theta: [L, h, w].
        for res, phi in enumerate(bank["phi"]["levels"]):
            self.register_buffer(f"phi_{res}", torch.from_numpy(np.array(phi, np.float32)), persistent=False)
        for j in range(J):
            by_theta = [p for p in bank["psi"] if p["j"] == j]
            for res in range(len(by_theta[0]["levels"])):
                stack = np.stack([np.asarray(p["levels"][res], np.float32) for p in by_theta])
                self.register_buffer(f"psi_{j}_{res}", torch.from_numpy(stack), persistent=False)
        # DFT matrices for every side the signal takes: padded / 2^r, r = 0..J.
        for r in range(J + 1):
            for side in {self.padded[0] // 2**r, self.padded[1] // 2**r}:
                if not hasattr(self, f"cos_{side}"):
                    cos, sin = _dft_matrices(side)
                    self.register_buffer(f"cos_{side}", cos, persistent=False)
                    self.register_buffer(f"sin_{side}", sin, persistent=False)

    def cache_spec(self, image_size: int) -> str:
        """Names these features in the site cache: a change of any setting is a different entry."""
        return f"scatter-J{self.J}-L{self.L}-o{self.max_order}-{image_size}px"

    @property
    def out_channels(self) -> int:
        return scattering_channels(self.J, self.L, self.max_order)

    @property
    def out_size(self) -> tuple[int, int]:
        return (self.padded[0] // 2**self.J - 2, self.padded[1] // 2**self.J - 2)

    # ------------------------------------------------------------------ Fourier helpers

    def _mats(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"cos_{side}"), getattr(self, f"sin_{side}")

    def _fft(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2D DFT of a real [..., h, w] signal: (real, imag) of F_h x F_w^T.

        Eagerly (the site computing its cached features) torch.fft does it, 2-3x faster on CPU; in a
        trace (the ONNX and TorchScript exports) the matrix products, which every runtime runs. Both
        are the same DFT (tests/common/test_scattering.py compares each with kymatio, and the export's
        parity check compares the two on every export).
        """
        if not torch.jit.is_tracing():
            spectrum = torch.fft.fft2(x)
            return spectrum.real, spectrum.imag
        ch, sh = self._mats(x.shape[-2])
        cw, sw = self._mats(x.shape[-1])
        ar, ai = x @ cw, -(x @ sw)  # x F_w^T; the matrices are symmetric
        return ch @ ar + sh @ ai, ch @ ai - sh @ ar

    def _ifft(self, re: torch.Tensor, im: torch.Tensor, real_only: bool = False):
        """Inverse 2D DFT of a complex [..., h, w] spectrum (1/(h w) scaling, as numpy's ifft2)."""
        if not torch.jit.is_tracing():
            signal = torch.fft.ifft2(torch.complex(re, im))
            return signal.real if real_only else (signal.real, signal.imag)
        h, w = re.shape[-2], re.shape[-1]
        ch, sh = self._mats(h)
        cw, sw = self._mats(w)
        # Y G_w^T with G = (C + iS) / w
        br, bi = re @ cw - im @ sw, re @ sw + im @ cw
        scale = 1.0 / (h * w)
        out_re = (ch @ br - sh @ bi) * scale
        if real_only:
            return out_re
        return out_re, (ch @ bi + sh @ br) * scale

    @staticmethod
    def _periodize(x: torch.Tensor, k: int) -> torch.Tensor:
        """Subsampling by k in space is periodisation (mean of the k x k spectral blocks) in Fourier.

        Summed as contiguous slices, rows then columns: a mean over the strided block axes of a
        reshape took 40% of the transform's time on CPU (Slice and Add in ONNX).
        """
        if k == 1:
            return x
        hk, wk = x.shape[-2] // k, x.shape[-1] // k
        rows = x[..., :hk, :]
        for i in range(1, k):
            rows = rows + x[..., i * hk:(i + 1) * hk, :]
        out = rows[..., :wk]
        for j in range(1, k):
            out = out + rows[..., j * wk:(j + 1) * wk]
        return out * (1.0 / (k * k))

    def _lowpass_out(self, re: torch.Tensor, im: torch.Tensor, res: int) -> torch.Tensor:
        """Spectrum at resolution ``res`` -> * phi, subsample to 2^J, real part, crop the borders."""
        phi = getattr(self, f"phi_{res}")
        k = 2 ** (self.J - res)
        out = self._ifft(self._periodize(re * phi, k), self._periodize(im * phi, k), real_only=True)
        return out[..., 1:-1, 1:-1]

    def _wavelet_modulus(self, re: torch.Tensor, im: torch.Tensor, j: int, res: int):
        """Spectrum at resolution ``res`` [..., h, w] -> |x * psi_{j, theta}| at resolution j, spectrum of it.

        Returns (real, imag) of the modulus' spectrum, shape [..., L, h / 2^(j-res), w / 2^(j-res)].
        """
        psi = getattr(self, f"psi_{j}_{res}")  # [L, h, w]
        k = 2 ** (j - res)
        yr = self._periodize(re.unsqueeze(-3) * psi, k)
        yi = self._periodize(im.unsqueeze(-3) * psi, k)
        ur, ui = self._ifft(yr, yi)
        return self._fft(torch.sqrt(ur * ur + ui * ui))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x[:, 0]
        if not torch.jit.is_tracing() and (x.dim() != 3 or tuple(x.shape[-2:]) != self.shape):
            raise ScatteringError(
                f"scattering input has shape {tuple(x.shape)}; expected [B, {self.shape[0]}, {self.shape[1]}] "
                f"(or [B, 1, {self.shape[0]}, {self.shape[1]}]): resize images to the run's image size first"
            )
        batch = x.shape[0]
        padded = nn.functional.pad(x.unsqueeze(1), self._pad, mode="reflect")[:, 0]
        x_re, x_im = self._fft(padded)
        order0 = self._lowpass_out(x_re, x_im, 0).unsqueeze(1)  # [B, 1, h, w]
        order1: list[torch.Tensor] = []
        order2: dict[tuple[int, int], torch.Tensor] = {}
        for j1 in range(self.J):
            u1_re, u1_im = self._wavelet_modulus(x_re, x_im, j1, 0)  # [B, L, ...] at resolution j1
            order1.append(self._lowpass_out(u1_re, u1_im, j1))
            if self.max_order < 2:
                continue
            for j2 in range(j1 + 1, self.J):
                u2_re, u2_im = self._wavelet_modulus(u1_re, u1_im, j2, j1)  # [B, L1, L2, ...]
                order2[(j1, j2)] = self._lowpass_out(u2_re, u2_im, j2)
        blocks = [order0, *order1]
        h, w = self.out_size
        # kymatio's order-2 channel order: (j1, theta1) outer, (j2, theta2) inner.
        for j1 in range(self.J):
            later = [order2[(j1, j2)] for j2 in range(j1 + 1, self.J)]
            if later:
                per_theta1 = torch.cat(later, dim=2)  # [B, L1, (J-j1-1)*L2, h, w]
                blocks.append(per_theta1.reshape(batch, -1, h, w))
        return torch.cat(blocks, dim=1)


def group_count(channels: int) -> int:
    """GroupNorm groups for scattering features: the largest divisor of C that is at most C/3.

    81 channels (J=2, L=8) -> 27 groups of 3, the setting of Tramer & Boneh; 217 (J=3) -> 31.
    """
    for g in range(max(1, channels // 3), 0, -1):
        if channels % g == 0:
            return g
    return 1

