"""A synthetic audio-video emotion dataset: deterministic, rendered on the fly, no downloads.

Each clip is a short utterance (a harmonic tone with a pitch glide and syllable-rate
bursts, in noise) and a few frames of a drawn face (eyes, brows, a mouth that opens and
closes with the syllables), labelled with one of four emotions placed on the valence /
arousal plane, plus a signed sentiment score in [-3, 3] for the regression heads.

How the label reaches the two modalities:

=========  ===================================  ======================================
factor     audio                                video
=========  ===================================  ======================================
arousal    loudness, syllable rate              how far and how fast the mouth opens
valence    pitch glide, up or down              brows, raised or lowered
intensity  extent of the glide                  displacement of the brows
nuisance   speaker's pitch, noise               face position, size, colours, mouth
                                                curvature, pixel noise
=========  ===================================  ======================================

Valence lives in the *agreement* of the glide and the brows. A negative clip always shows
them disagreeing (up with lowered brows, or down with raised brows, equally often). A
positive clip shows them agreeing: mostly the typical way, rising pitch with raised brows
(probability ``typical_positive``), otherwise falling pitch with lowered brows. So each
modality alone says something about valence (a rising glide makes it more likely), but
only the pair decides it.

A classifier whose class scores are a sum of an audio-only and a video-only term
(concatenation then a linear layer, or averaged unimodal decisions) cannot represent
"agree vs disagree" (an XOR). The best it can do on valence is to call every atypical
positive clip negative: an accuracy ceiling of 1 - (1 - typical_positive) / 2 = 0.875 by
default (:attr:`SyntheticConfig.additive_ceiling`), arousal being easy. Trained with
cross-entropy it does worse: its best fit puts the disagreeing clips at P(positive) = 0.42,
so small shifts of its bias flip half the clips between right and wrong. Multiplicative
fusion (bilinear pooling, LMF, TFN) can reach 1.0 up to the rendering noise. That gap
makes "bilinear beats concatenation" measurable.

Why not a pure XOR (``typical_positive=0.5``)? Then neither modality alone says anything
about valence, no unimodal feature lowers the loss until the other exists, and end-to-end
training from scratch stalls: in our runs (with a 75%-reliable mouth cue as the only
unimodal hint) LMF stayed at the cue's 0.75 accuracy through 6 epochs of 4096 clips. The
typical pattern gives the encoders a first-order reason to learn the glide and the brows.

Difficulty. At the default setting the valence cues are clean enough that every
multiplicative head reaches 1.0, so the data separates additive from multiplicative fusion
but cannot rank the multiplicative heads against each other. :data:`DIFFICULTIES` names
harder settings (:func:`at_difficulty`). Three levers exist: partial interaction
(``typical_positive`` nearer 0.5: less of valence is first-order, more lives only in the
agreement), weaker cues (``audio_snr_db``, ``pixel_noise``) and ``label_noise``: that
fraction of the *training* labels replaced by a uniformly drawn other class
(:func:`train_test_split` keeps the test labels clean). "hard" pulls label noise alone;
the README's Data section gives the runs that chose it: weaker cues alone left every
multiplicative head near 1.0, and any other lever combined with label noise left every
head tried at 0.51-0.73, little above the 0.5 that arousal alone gives. Class imbalance was not used: scored by
accuracy it mostly measures how often a head predicts the majority class.

Sample ``i`` of a dataset with seed ``s`` is rendered from its own generator seeded with
(s, i): datasets are reproducible, random access, and can be rendered lazily by DataLoader
workers at full size or cached in memory at small size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch.utils.data import Dataset

from ..features.frontends import HOP_LENGTH, N_FFT, SAMPLE_RATE, SpectrogramImage, normalize_clip

CLASS_NAMES = ("happy", "calm", "angry", "sad")
# (valence, arousal) of each class, in CLASS_NAMES order.
_VALENCE = torch.tensor([1, 1, 0, 0])
_AROUSAL = torch.tensor([1, 0, 1, 0])


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Rendering parameters. The defaults are the seed papers' sizes (22050 Hz audio as a
    224 x 224 STFT image, 16 RGB frames of 224 x 224); :data:`TINY` is the CPU size.
    ``typical_positive`` sets how often a positive clip agrees the typical way (see the
    module docstring); the noise levels are a loud clip's SNR and the pixel noise std;
    ``label_noise`` is the probability that a clip's class label is replaced by one of the
    other classes, drawn uniformly (the clip is rendered from its true class)."""

    duration_s: float = 1.0
    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    audio_kind: str = "stft"  # "stft" or "logmel"
    n_mels: int = 128
    audio_size: tuple[int, int] = (224, 224)
    frame_size: int = 224
    num_frames: int = 16
    typical_positive: float = 0.75
    audio_snr_db: float = 6.0
    pixel_noise: float = 0.08
    label_noise: float = 0.0

    def __post_init__(self):
        if not 0.5 <= self.typical_positive <= 1.0:
            raise ValueError(f"typical_positive must lie in [0.5, 1], got {self.typical_positive}")
        if not 0.0 <= self.label_noise < 1.0 - 1.0 / len(CLASS_NAMES):
            # At 1 - 1/K the observed label carries no information about the true one.
            raise ValueError(f"label_noise must lie in [0, {1 - 1 / len(CLASS_NAMES)}), got {self.label_noise}")

    @property
    def additive_ceiling(self) -> float:
        """The best accuracy of any classifier additive in the two modalities (noise-free)."""
        return 1.0 - (1.0 - self.typical_positive) / 2.0


# Small enough for the CPU tests and the --quick comparison. The log-mel keeps the pitch
# glide visible at 32 frequency rows, where a linear-frequency STFT image would not.
TINY = SyntheticConfig(audio_kind="logmel", n_mels=32, audio_size=(32, 32), frame_size=32, num_frames=4)

# Overrides of a config's fields by difficulty (the module docstring says why "hard" is
# label noise alone). "easy" is the default data, unchanged.
DIFFICULTIES: dict[str, dict] = {"easy": {}, "hard": {"label_noise": 0.2}}


def at_difficulty(config: SyntheticConfig, difficulty: str) -> SyntheticConfig:
    """``config`` with the overrides of ``difficulty`` (a key of :data:`DIFFICULTIES`)."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    return dataclasses.replace(config, **DIFFICULTIES[difficulty])


class SyntheticAVEmotion(Dataset):
    """``num_samples`` clips; item ``i`` is a dict with

    - ``audio``: (1, H_a, W_a) spectrogram image in [0, 1] (frequency x time),
    - ``video``: (3, T, H, W) clip standardised with the Kinetics statistics,
    - ``label``: int64 class index into :data:`CLASS_NAMES`,
    - ``sentiment``: float32 in [-3, 3], the signed valence intensity.

    Latent factors of all clips are drawn at construction (cheap); clips are rendered on
    access, and kept when ``cache`` is true.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, config: SyntheticConfig = TINY, cache: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.config = config
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        n = num_samples
        self.labels = torch.randint(len(CLASS_NAMES), (n,), generator=g)
        valence, arousal = _VALENCE[self.labels], _AROUSAL[self.labels]
        typical = (torch.rand(n, generator=g) < config.typical_positive).long()
        coin = torch.randint(2, (n,), generator=g)
        self.glide_up = torch.where(valence == 1, typical, coin)
        self.brows_up = torch.where(valence == 1, self.glide_up, 1 - self.glide_up)
        self.smile = torch.randint(2, (n,), generator=g)
        self.arousal = arousal
        self.intensity = 0.2 + 0.8 * torch.rand(n, generator=g)
        self.sentiment = ((2 * valence - 1) * 3 * self.intensity).float()
        # ``labels`` is what a model is trained and scored on; the clips follow ``true_labels``.
        self.true_labels = self.labels
        if config.label_noise > 0:
            # Drawn after every latent factor, so the clips are those of the noise-free set.
            flip = torch.rand(n, generator=g) < config.label_noise
            shift = torch.randint(1, len(CLASS_NAMES), (n,), generator=g)
            self.labels = torch.where(flip, (self.true_labels + shift) % len(CLASS_NAMES), self.true_labels)
        self._spectrogram = SpectrogramImage(
            config.audio_kind, sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
            n_mels=config.n_mels, size=config.audio_size,
        )
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if self._cache is not None and index in self._cache:
            audio, video = self._cache[index]
        else:
            with torch.no_grad(), _single_thread():
                wave, frames = self.render(index)
                audio, video = self._spectrogram(wave), normalize_clip(frames)
            if self._cache is not None:
                self._cache[index] = (audio, video)
        return {"audio": audio, "video": video, "label": self.labels[index], "sentiment": self.sentiment[index]}

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip ``index`` as media, before the front-ends: its waveform (samples,) and its frames
        (T, H, W, 3) in [0, 1], each clip from its own seeded generator (the same every call)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self._render_audio(index, g), self._render_frames(index, g)

    def _render_audio(self, i: int, g: torch.Generator) -> torch.Tensor:
        c = self.config
        t = torch.arange(round(c.duration_s * c.sample_rate), dtype=torch.float64) / c.sample_rate
        progress = t / c.duration_s
        # Pitch glides by up to an octave and a half around a speaker's base pitch.
        base_hz = 150.0 * 2.0 ** _uniform(g, 0.0, 1.0)
        direction = 1.0 if self.glide_up[i] else -1.0
        octaves = direction * (0.5 + 1.0 * self.intensity[i].item()) * (progress - 0.5)
        phase = 2 * math.pi * torch.cumsum(base_hz * 2.0 ** octaves, 0) / c.sample_rate
        voice = sum(torch.sin(k * phase) / k for k in range(1, 5))
        aroused = bool(self.arousal[i])
        rate_hz = _uniform(g, 4.5, 6.5) if aroused else _uniform(g, 2.0, 3.5)
        envelope = torch.sin(math.pi * rate_hz * t + _uniform(g, 0.0, math.pi)) ** 2
        gain = 10.0 ** ((_uniform(g, -2.0, 2.0) + (0.0 if aroused else -10.0)) / 20.0)
        signal = gain * envelope * voice
        # The SNR is that of a loud clip (E[sin^4] = 3/8 for the envelope), so quiet
        # (low-arousal) clips are noisier.
        loud_power = 0.375 * 0.5 * sum(1 / k**2 for k in range(1, 5))
        noise_std = math.sqrt(loud_power / 10.0 ** (c.audio_snr_db / 10.0))
        return (signal + noise_std * torch.randn(t.shape, generator=g, dtype=torch.float64)).float()

    def _render_frames(self, i: int, g: torch.Generator) -> torch.Tensor:
        """(T, H, W, 3) float frames in [0, 1] of a face drawn with soft (anti-aliased) edges."""
        c = self.config
        size, frames = c.frame_size, c.num_frames
        pixel = 2.0 / size
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) * pixel - 1.0
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        cx, cy = _uniform(g, -0.08, 0.08), _uniform(g, -0.08, 0.08)
        scale = _uniform(g, 0.85, 1.0)
        x, y = (x - cx) / scale, (y - cy) / scale
        soft = pixel / scale

        def inside(signed_distance: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(-signed_distance / (0.5 * soft))

        face = inside(torch.sqrt((x / 0.75) ** 2 + (y / 0.9) ** 2) - 1.0)
        eye_y = -0.2
        eyes = inside(torch.minimum(torch.hypot(x - 0.32, y - eye_y), torch.hypot(x + 0.32, y - eye_y)) - 0.1)
        strength = self.intensity[i].item()
        # Raised brows sit high and arch outwards-down; lowered brows sit low and slant
        # inwards-down (a frown). Both poses move further with intensity.
        lift = (0.30 + 0.10 * strength) if self.brows_up[i] else (0.18 - 0.04 * strength)
        inner_drop = -0.08 * strength if self.brows_up[i] else 0.12 * strength
        brows = torch.zeros_like(x)
        for side in (-1.0, 1.0):
            inner = (side * 0.14, eye_y - lift + inner_drop)
            outer = (side * 0.50, eye_y - lift - inner_drop * 0.5)
            brows = torch.maximum(brows, inside(_segment_distance(x, y, inner, outer) - 0.05))
        # The mouth opens with each syllable; its bend (smile or frown) is a nuisance.
        aroused = bool(self.arousal[i])
        rate_hz = _uniform(g, 4.5, 6.5) if aroused else _uniform(g, 2.0, 3.5)
        opening = (0.16 if aroused else 0.05) * _uniform(g, 0.8, 1.2)
        bend = (1.0 if self.smile[i] else -1.0) * 0.22 * _uniform(g, 0.7, 1.0)
        phase0 = _uniform(g, 0.0, math.pi)
        times = (torch.arange(frames, dtype=torch.float32) + 0.5) / frames * c.duration_s
        open_now = opening * torch.sin(math.pi * rate_hz * times + phase0) ** 2 + 0.02
        half_width = 0.32
        across = (1 - (x / half_width) ** 2).clamp_min(0)
        centre = 0.45 - bend * (x / half_width) ** 2
        lips = (y[None] - centre[None]).abs() - (open_now[:, None, None] * across[None] + 0.035)
        mouth = inside(torch.maximum(lips, x.abs()[None] - half_width))

        background = torch.rand(3, generator=g) * 0.35 + 0.05
        skin = torch.tensor([0.85, 0.68, 0.55]) * _uniform(g, 0.75, 1.05)
        ink = torch.tensor([0.12, 0.08, 0.08])
        features = torch.maximum(torch.maximum(eyes, brows)[None], mouth)  # (T, H, W)
        image = background + face[None, ..., None] * (skin - background)
        image = image + (features * face[None])[..., None] * (ink - image)
        noise = c.pixel_noise * torch.randn(image.shape, generator=g)
        return (image + noise).clamp(0.0, 1.0)


@contextlib.contextmanager
def _single_thread():
    # One clip's tensors are far too small to split across threads; on a busy machine the
    # intra-op thread pool makes rendering ~50x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def _segment_distance(x: torch.Tensor, y: torch.Tensor, a: tuple[float, float], b: tuple[float, float]) -> torch.Tensor:
    """Distance from each point (x, y) to the segment a-b."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along = (((x - a[0]) * dx + (y - a[1]) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0)
    return torch.hypot(x - a[0] - along * dx, y - a[1] - along * dy)


def train_test_split(
    num_train: int, num_test: int, *, seed: int = 0, config: SyntheticConfig = TINY, cache: bool = True
) -> tuple[SyntheticAVEmotion, SyntheticAVEmotion]:
    """Independent train and test sets: the test set uses a different seed stream, and its
    labels are clean (``config.label_noise`` applies to the training set only)."""
    return (
        SyntheticAVEmotion(num_train, seed=2 * seed, config=config, cache=cache),
        SyntheticAVEmotion(num_test, seed=2 * seed + 1, config=dataclasses.replace(config, label_noise=0.0), cache=cache),
    )
