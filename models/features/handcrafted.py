"""Hand-crafted features of the CNN/MFA seed system: MFCC, zero-crossing rate, RMS energy
and autocorrelation pitch for the audio; spatio-temporal interest points (Harris3D) for
the video; and :class:`HandcraftedFrontend`, which turns a clip into one fixed-length
vector per modality for Marginal Fisher Analysis (:mod:`models.features.mfa`).

Audio frames follow :mod:`models.features.frontends` (22050 Hz, 2048-sample frames, hop 512,
centred, zero-padded), so MFCC here equals ``librosa.feature.mfcc`` with its defaults (the
tests check it when librosa imports) without needing librosa.

Harris3D (Laptev & Lindeberg 2003; Laptev 2005): the grey-level video f is smoothed into
L = g(sigma^2, tau^2) * f by a spatial (sigma) and a temporal (tau) Gaussian; the
second-moment matrix mu = g(s sigma^2, s tau^2) * (grad L grad L^T) of the scale-normalised
gradient (sigma L_x, sigma L_y, tau L_t) is integrated at s times those variances; interest
points are the positive local maxima of H = det(mu) - k trace(mu)^3, k = 0.005. A static
video has L_t = 0, so mu is singular, H <= 0 and no point fires: only space-time corners
(motion that starts, stops or turns) do. Borders are replicated, so motion running into
the clip's first or last frame reads as motion starting or stopping there.

What the seed paper leaves open, and what we chose:

- the clip-level audio vector: mean and standard deviation over frames of each frame
  feature; pitch statistics over voiced frames only, plus the voiced fraction;
- the STIP descriptor and its pooling: the local jet of scale-normalised derivatives up
  to order two at each point (Laptev's original descriptor, truncated at order two),
  pooled over the clip as mean |jet| and std jet, with the point count (log1p), a 3 x 3
  grid of where the points lie and their temporal spread. A bag of visual words (k-means
  over HOG/HOF descriptors) is the other common choice; it needs a codebook fitted on the
  training set, and pooling needs none.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .frontends import HOP_LENGTH, N_FFT, SAMPLE_RATE, mel_filterbank, power_spectrogram

# ITU-R BT.601 luma weights, for RGB frames to grey levels.
_LUMA = (0.299, 0.587, 0.114)


# --- audio ------------------------------------------------------------------------------


def frame_signal(wave: torch.Tensor, frame_length: int = N_FFT, hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """(..., L) -> (..., frames, frame_length): frames centred on multiples of the hop, the
    signal zero-padded by half a frame at each end (the STFT's framing, so frame i of every
    feature here is STFT column i)."""
    pad = frame_length // 2
    return F.pad(wave, (pad, pad)).unfold(-1, frame_length, hop_length)


def _dct_matrix(n_out: int, n_in: int, dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal DCT-II as an (n_out, n_in) matrix (scipy's ``dct(type=2, norm='ortho')``)."""
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    n = torch.arange(n_in, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * k * (2 * n + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    basis[0] /= math.sqrt(2.0)
    return basis.to(dtype)


def mfcc(
    wave: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    *,
    n_mfcc: int = 13,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    n_mels: int = 128,
    top_db: float = 80.0,
) -> torch.Tensor:
    """MFCCs (..., n_mfcc, frames): the orthonormal DCT-II of the dB mel power spectrogram
    (reference power 1, floored ``top_db`` below each example's maximum), librosa's recipe."""
    power = power_spectrogram(wave, n_fft, hop_length)
    mel = torch.matmul(mel_filterbank(sample_rate, n_fft, n_mels).to(power.dtype), power)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - top_db)
    return torch.matmul(_dct_matrix(n_mfcc, n_mels, db.dtype), db)


def zero_crossing_rate(wave: torch.Tensor, frame_length: int = N_FFT, hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """Sign changes per sample in each frame (..., frames); zero counts as positive. A
    sinusoid of f Hz gives 2 f / sample_rate."""
    positive = frame_signal(wave, frame_length, hop_length) >= 0
    return (positive[..., 1:] != positive[..., :-1]).to(wave.dtype).mean(-1)


def rms_energy(wave: torch.Tensor, frame_length: int = N_FFT, hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """Root mean square of each frame (..., frames). A sinusoid of amplitude A gives A / sqrt(2)."""
    return frame_signal(wave, frame_length, hop_length).square().mean(-1).sqrt()


def autocorrelation_pitch(
    wave: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    *,
    frame_length: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    fmin: float = 60.0,
    fmax: float = 500.0,
    voicing_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fundamental frequency by autocorrelation: (f0 in Hz, 0 where unvoiced; voicing), each
    (..., frames).

    Per mean-removed frame, r(lag) / r(0) of the biased autocorrelation (computed with one
    FFT) is searched over lags sample_rate / fmax .. sample_rate / fmin; the best lag is
    refined by a parabola through its neighbours. The biased estimate tapers as
    (N - lag) / N, so multiples of the period score lower than the period itself, which
    suppresses octave-down errors. A frame is voiced when the peak is an interior maximum
    whose normalised height (returned as voicing, in [0, 1]) reaches ``voicing_threshold``.
    """
    lag_min = max(1, math.floor(sample_rate / fmax))
    lag_max = min(frame_length - 2, math.ceil(sample_rate / fmin))
    if lag_min + 2 > lag_max:
        raise ValueError(f"the lag range [{lag_min}, {lag_max}] from fmin={fmin}, fmax={fmax} is too narrow")
    frames = frame_signal(wave, frame_length, hop_length)
    frames = frames - frames.mean(-1, keepdim=True)
    spectrum = torch.fft.rfft(frames, n=2 * frame_length)
    correlation = torch.fft.irfft(spectrum.abs().square(), n=2 * frame_length)[..., : lag_max + 2]
    energy = correlation[..., :1]
    normalised = torch.where(energy > 0, correlation / energy.clamp_min(torch.finfo(wave.dtype).tiny), 0.0)
    window = normalised[..., lag_min : lag_max + 1]
    peak, best = window.max(-1)
    lag = best + lag_min
    interior = (best > 0) & (best < window.shape[-1] - 1)
    left = normalised.gather(-1, (lag - 1).unsqueeze(-1)).squeeze(-1)
    right = normalised.gather(-1, (lag + 1).clamp_max(normalised.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    curvature = left - 2 * peak + right
    shift = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp_max(-1e-12), 0.0).clamp(-0.5, 0.5)
    voiced = interior & (peak >= voicing_threshold)
    f0 = torch.where(voiced, sample_rate / (lag.to(wave.dtype) + shift), 0.0)
    return f0, peak.clamp(0.0, 1.0)


def audio_frame_features(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, *, n_mfcc: int = 13) -> torch.Tensor:
    """(frames, n_mfcc + 4): MFCCs, zero-crossing rate, RMS energy, f0 (Hz, 0 unvoiced), voicing."""
    f0, voicing = autocorrelation_pitch(wave, sample_rate)
    columns = [mfcc(wave, sample_rate, n_mfcc=n_mfcc), zero_crossing_rate(wave)[None], rms_energy(wave)[None],
               f0[None], voicing[None]]
    return torch.cat(columns).T


def audio_clip_features(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, *, n_mfcc: int = 13) -> torch.Tensor:
    """One vector per clip, (2 n_mfcc + 7,): mean and std over frames of the MFCCs, ZCR and
    RMS; mean and std of f0 over voiced frames (0 when none is); the voiced fraction."""
    frames = audio_frame_features(wave.double(), sample_rate, n_mfcc=n_mfcc)
    spectral = frames[:, : n_mfcc + 2]
    f0 = frames[:, n_mfcc + 2]
    voiced = f0[f0 > 0]
    pitch = torch.stack([voiced.mean(), voiced.std(unbiased=False)]) if voiced.numel() else f0.new_zeros(2)
    parts = [spectral.mean(0), spectral.std(0, unbiased=False), pitch, (f0 > 0).to(f0.dtype).mean()[None]]
    return torch.cat(parts).float()


# --- video ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class STIPConfig:
    """Harris3D settings. ``sigma`` / ``tau``: spatial / temporal scales in pixels / frames
    (Laptev's sigma^2 = 4, tau^2 = 2 level is sigma = 2, tau = 1.41); ``integration``: the
    factor s between integration and local variances; ``k``: Laptev's 0.005; a point needs
    H above ``relative_threshold`` times the clip's largest H; at most ``max_points``
    strongest points are kept."""

    sigma: float = 2.0
    tau: float = 1.5
    integration: float = 2.0
    k: float = 0.005
    relative_threshold: float = 0.01
    max_points: int = 256
    grid: int = 3


def gaussian_smooth(volume: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    """Separable Gaussian blur of (..., T, H, W) with standard deviations (t, y, x) (leading
    axes untouched). Borders are replicated, so a uniform region stays uniform up to the
    edge: zero padding would paint a spurious edge, and so corners, around every clip."""
    full = (0.0,) * (volume.ndim - len(sigmas)) + tuple(sigmas)
    return ndimage.gaussian_filter(volume, full, mode="nearest", truncate=3.0)


def _grey(frames: torch.Tensor) -> np.ndarray:
    """(T, H, W, 3) RGB (uint8, or float in [0, 1]) or (T, H, W) grey -> float64 (T, H, W) in [0, 1]."""
    grey = frames.double()
    if frames.dtype == torch.uint8:
        grey = grey / 255.0
    if grey.dim() == 4:
        grey = grey @ torch.tensor(_LUMA, dtype=grey.dtype)
    if grey.dim() != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (T, H, W), got shape {tuple(frames.shape)}")
    return grey.numpy()


def _local_jet(video: np.ndarray, config: STIPConfig) -> np.ndarray:
    """The 9 scale-normalised derivatives of the smoothed clip, first order (t, y, x) then
    second order (tt, ty, tx, yy, yx, xx), stacked as (9, T, H, W)."""
    scales = (config.tau, config.sigma, config.sigma)
    smooth = gaussian_smooth(video, scales)
    # np.gradient needs 2 samples along an axis; a 1-frame clip has no temporal derivative.
    first = [np.gradient(smooth, axis=a) * s if smooth.shape[a] > 1 else np.zeros_like(smooth)
             for a, s in enumerate(scales)]
    second = [np.gradient(first[i], axis=j) * scales[j] if smooth.shape[j] > 1 else np.zeros_like(smooth)
              for i in range(3) for j in range(i, 3)]
    return np.stack(first + second)


def _harris(jet: np.ndarray, config: STIPConfig) -> np.ndarray:
    s = math.sqrt(config.integration)
    first = jet[:3]
    products = np.stack([first[i] * first[j] for i in range(3) for j in range(i, 3)])
    tt, ty, tx, yy, yx, xx = gaussian_smooth(products, (s * config.tau, s * config.sigma, s * config.sigma))
    det = tt * (yy * xx - yx * yx) - ty * (ty * xx - yx * tx) + tx * (ty * yx - yy * tx)
    return det - config.k * (tt + yy + xx) ** 3


def harris3d_response(frames: torch.Tensor, config: STIPConfig = STIPConfig()) -> torch.Tensor:
    """H = det(mu) - k trace(mu)^3 over the clip, (T, H, W) float64."""
    return torch.from_numpy(_harris(_local_jet(_grey(frames), config), config))


def _detect(response: np.ndarray, config: STIPConfig) -> tuple[np.ndarray, np.ndarray]:
    peak = ndimage.maximum_filter(response, size=3, mode="nearest")
    top = response.max()
    # Strictly positive: a static clip's H is <= 0 up to rounding, and must give no point.
    floor = max(config.relative_threshold * top, 1e-12 * np.abs(response).max(), 0.0)
    candidates = (response == peak) & (response > floor)
    where = np.argwhere(candidates)
    strength = response[candidates]
    order = np.argsort(-strength, kind="stable")[: config.max_points]
    return where[order], strength[order]


def interest_points(frames: torch.Tensor, config: STIPConfig = STIPConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Harris3D interest points of a clip: (N, 3) int64 (t, y, x) and (N,) responses,
    strongest first. N is 0 for a clip without space-time corners (e.g. a static one)."""
    points, strength = _detect(_harris(_local_jet(_grey(frames), config), config), config)
    return torch.from_numpy(points), torch.from_numpy(strength)


def stip_features(frames: torch.Tensor, config: STIPConfig = STIPConfig()) -> torch.Tensor:
    """One vector per clip, (2 * 9 + 2 + grid^2,): mean |jet| and std of the jet over the
    interest points, log(1 + count), the std of their times over the clip length, and the
    fraction of points in each cell of a grid x grid partition of the frame. All zeros
    when no point fires."""
    video = _grey(frames)
    jet = _local_jet(video, config)
    points, _ = _detect(_harris(jet, config), config)
    if len(points) == 0:
        return torch.zeros(2 * 9 + 2 + config.grid**2)
    t, y, x = points.T
    descriptors = jet[:, t, y, x].T  # (N, 9)
    cells = (y * config.grid // video.shape[1]) * config.grid + x * config.grid // video.shape[2]
    layout = np.bincount(cells, minlength=config.grid**2) / len(points)
    parts = [np.abs(descriptors).mean(0), descriptors.std(0), [math.log1p(len(points)), t.std() / video.shape[0]],
             layout]
    return torch.from_numpy(np.concatenate(parts)).float()


# --- frontend for the corpora -----------------------------------------------------------


class HandcraftedFrontend:
    """Media to the seed system's fixed-length vectors: ``audio`` (2 n_mfcc + 7,) from
    :func:`audio_clip_features`, ``video`` (29,) from :func:`stip_features` on frames
    decoded at ``frame_size`` x ``frame_size``. The corpus readers call it and cache what
    it returns under :attr:`config_key`; the vectors are small, so the cache keeps them
    as they are."""

    def __init__(self, *, sample_rate: int = SAMPLE_RATE, frame_size: int = 64, n_mfcc: int = 13,
                 stip: STIPConfig = STIPConfig()):
        self.sample_rate, self.frame_size, self.n_mfcc, self.stip = sample_rate, frame_size, n_mfcc, stip
        self.config_key = f"handcrafted(sr={sample_rate}, frame={frame_size}, n_mfcc={n_mfcc}, {stip})"

    @property
    def dims(self) -> dict[str, int]:
        return {"audio": 2 * self.n_mfcc + 7, "video": 2 * 9 + 2 + self.stip.grid**2}

    def __call__(self, wave: torch.Tensor | None, frames: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {}
        if wave is not None:
            out["audio"] = audio_clip_features(wave, self.sample_rate, n_mfcc=self.n_mfcc)
        if frames is not None:
            out["video"] = stip_features(frames, self.stip)
        return out

    def finish(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The cached vectors are the item's (the corpora's two-step frontend protocol)."""
        return features
