"""The persistent latent cache: VAE latents that survive runs, under ``$XTI_CACHE/latents``.

Encoding every augmentation with the VAE is most of a run's setup on small hardware (SD1.5 at
512 px: 6–8 s per augmentation on a 2-core CPU), and people re-run on the same images all the time
(another lr, placeholder, granularity, seed). This module keeps each augmentation's latent
distribution (mean, std) on disk and hands it back instead of running the VAE.

What a cache entry is keyed by (`entry_key`):

- the *augmented pixels* the VAE would see (a hash of the float32 ``[3, R, R]`` tensor): this is
  the image content, the crop, the flip and the resolution together, exactly — a re-saved file with
  the same pixels hits, any change of crop, flip, resolution or resize filter misses;
- the VAE's identity (`vae_identity`): a hash of its class, config and the *weights of its encoder
  side* (everything but ``decoder.*`` and ``post_quant_conv.*``, which `encode` never uses, so
  decoder-only fine-tunes such as sd-vae-ft-mse share entries), hashed from the loaded tensors.
  Hashing is used rather than path + file sizes/mtimes because it is cheap (0.12 s for SD's 34 M
  encoder-side weights on a 2-core CPU, against 6–8 s for one 512-px encode there) and because it
  is right whatever the model came from (folder, single file, hub cache, a bundle built in memory)
  and after in-place edits;
- how it was encoded: device type, compute dtype, VAE tiling, and the torch and diffusers versions.

Entries are ``<folder>/v1/<key[:2]>/<key>.safetensors`` (tensors ``mean``, ``std``; metadata: key,
a digest of the tensors, the VAE identity). No pickle. Writes are atomic (`xti.export.
atomic_write_bytes`: temporary file, fsync, rename), so concurrent runs filling the same entries
both succeed (the last rename wins; both wrote the same values) and a ``kill -9`` leaves at most a
temporary file, removed by a later `prune` once it is an hour old. An entry that fails to parse or
whose digest does not match is reported with a warning and re-encoded. A hit refreshes the entry's
mtime; `prune` removes the least recently used entries beyond the size cap. `xti cache` shows,
prunes and clears the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xti.paths import atomic_tmp_pattern

logger = logging.getLogger(__name__)

FORMAT = "v1"
"""Layout version: a subfolder, so a future layout never misreads these entries."""

DEFAULT_MAX_GB = 10.0
"""Default size cap (`data.latent_cache_max_gb`)."""

STALE_TMP_SECONDS = 3600
"""Temporary files older than this are left over from killed writes and may be removed."""

_ENTRY = re.compile(r"^[0-9a-f]{40}\.safetensors$")
_TMP = atomic_tmp_pattern(r"[0-9a-f]{40}\.safetensors")
_DECODER_ONLY = ("decoder.", "post_quant_conv.")


def default_folder() -> Path:
    """``$XTI_LATENT_CACHE``, else ``latents`` inside the xti cache folder (``$XTI_CACHE`` or
    ``~/.cache/xti``)."""
    override = os.environ.get("XTI_LATENT_CACHE")
    if override:
        return Path(override).expanduser()
    from xti.paths import cache_dir

    return cache_dir() / "latents"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous), without copying when it already is."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def vae_identity(vae: Any, *, device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """A hex digest naming what `encode_latents` computes with this VAE on this device and dtype.

    Covers the VAE class and config (without ``_``-prefixed bookkeeping such as ``_name_or_path``),
    its tiling flag, every parameter and buffer except the decoder side (name, dtype, shape, bytes),
    the device type, the compute dtype and the torch/diffusers versions.
    """
    import diffusers

    h = hashlib.blake2b(digest_size=20)
    config = getattr(vae, "config", {}) or {}
    items = dict(config.items()) if hasattr(config, "items") else {}
    public = {k: v for k, v in items.items() if not str(k).startswith("_")}
    head = {
        "class": type(vae).__name__,
        "config": public,
        "tiling": bool(getattr(vae, "use_tiling", False)),
        "device": device_type,
        "dtype": str(dtype),
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    tensors = dict(vae.named_parameters())
    tensors.update(dict(vae.named_buffers()))
    for name in sorted(tensors):
        if name.startswith(_DECODER_ONLY):
            continue
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def entry_key(vae_id: str, pixels: torch.Tensor) -> str:
    """The key of one augmentation's entry: the VAE identity and the exact pixels it encodes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{FORMAT}:{vae_id}:{pixels.dtype}:{tuple(pixels.shape)};".encode())
    h.update(_tensor_bytes(pixels))
    return h.hexdigest()


def _digest(mean: torch.Tensor, std: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in (mean, std):
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


@dataclass
class CacheStats:
    """What a cache folder holds: entry count and bytes (temporary files not counted)."""

    entries: int
    bytes: int


class LatentDiskCache:
    """A folder of latent entries (see the module docstring), with a size cap in bytes."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, max_bytes: int | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else default_folder()
        self.max_bytes = int(max_bytes if max_bytes is not None else DEFAULT_MAX_GB * 2**30)
        self._write_failed = False

    @property
    def root(self) -> Path:
        return self.folder / FORMAT

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------ entries

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """The ``(mean, std, channels_last)`` of entry `key`, or None when it is missing or unusable
        (a corrupt or half-written entry is reported with a warning and left for the caller to
        re-encode). ``channels_last``: the memory layout the VAE gave these latents (see `store`)."""
        from safetensors.torch import load as st_load

        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            logger.warning("latent cache entry %s is unreadable (%s); re-encoding it", path, err)
            return None
        problem = None
        try:
            tensors = st_load(data)
            meta = _metadata(data)
            mean, std = tensors["mean"], tensors["std"]
            if meta.get("xti.latent_key") != key:
                problem = "it belongs to another key"
            elif mean.dtype != torch.float32 or std.dtype != torch.float32:
                problem = "its tensors are not float32"
            elif mean.shape != std.shape or mean.dim() != 3:
                problem = f"its shapes {tuple(mean.shape)} / {tuple(std.shape)} are wrong"
            elif meta.get("xti.digest") != _digest(mean, std):
                problem = "its contents do not match their digest"
        except Exception as err:  # safetensors raises several types for damaged files
            problem = f"it cannot be parsed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        if problem is not None:
            logger.warning("latent cache entry %s is corrupt (%s); re-encoding it", path, problem)
            return None
        with contextlib.suppress(OSError):  # mark as recently used for `prune`
            os.utime(path)
        return mean, std, meta.get("xti.memory_format") == "channels_last"

    def store(
        self,
        key: str,
        mean: torch.Tensor,
        std: torch.Tensor,
        vae_id: str,
        *,
        channels_last: bool = False,
    ) -> bool:
        """Write entry `key` atomically; False (and one warning per cache) when it cannot be
        written — the run goes on without caching. ``channels_last`` records the memory layout the
        VAE produced (a CPU VAE gives channels-last latents): a hit restores it, because the UNet's
        convolutions take another code path on another layout and the run would differ in its last
        bits from one that encoded."""
        from safetensors.torch import save as st_save

        from xti.paths import atomic_write_bytes

        mean = mean.detach().to("cpu", torch.float32).contiguous()
        std = std.detach().to("cpu", torch.float32).contiguous()
        meta = {
            "xti.latent_cache": FORMAT,
            "xti.latent_key": key,
            "xti.digest": _digest(mean, std),
            "xti.vae": vae_id,
            "xti.memory_format": "channels_last" if channels_last else "contiguous",
        }
        try:
            atomic_write_bytes(self.path(key), st_save({"mean": mean, "std": std}, metadata=meta))
        except OSError as err:
            if not self._write_failed:
                logger.warning(
                    "cannot write the latent cache in %s (%s); latents are not cached "
                    "(set XTI_CACHE or XTI_LATENT_CACHE to a writable folder)", self.folder, err,
                )  # fmt: skip
            self._write_failed = True
            return False
        return True

    # ------------------------------------------------------------------ housekeeping

    def _files(self) -> Iterator[tuple[Path, os.stat_result, bool]]:
        """(path, stat, is_entry) of every entry and xti temporary file in the cache."""
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for p in sub.iterdir():
                entry = bool(_ENTRY.match(p.name))
                if not entry and not _TMP.match(p.name):
                    continue
                try:
                    st = p.stat()
                except OSError:  # removed meanwhile by another process
                    continue
                yield p, st, entry

    def stats(self) -> CacheStats:
        n = size = 0
        for _, st, entry in self._files():
            if entry:
                n += 1
                size += st.st_size
        return CacheStats(n, size)

    def prune(self, max_bytes: int | None = None) -> CacheStats:
        """Remove the least recently used entries until the cache holds at most `max_bytes`
        (default: this cache's cap), and temporary files of killed writes older than an hour.
        Returns what was removed."""
        cap = self.max_bytes if max_bytes is None else int(max_bytes)
        now = time.time()
        entries = []
        removed = CacheStats(0, 0)
        for p, st, entry in self._files():
            if entry:
                entries.append((st.st_mtime, p, st.st_size))
            elif now - st.st_mtime > STALE_TMP_SECONDS:
                with contextlib.suppress(OSError):
                    p.unlink()
        total = sum(size for _, _, size in entries)
        for _, p, size in sorted(entries):
            if total <= cap:
                break
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.entries += 1
                removed.bytes += size
            total -= size
        self._remove_empty_dirs()
        return removed

    def clear(self) -> CacheStats:
        """Remove every entry and temporary file (only xti's own file names are touched)."""
        removed = CacheStats(0, 0)
        for p, st, entry in list(self._files()):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                if entry:
                    removed.entries += 1
                    removed.bytes += st.st_size
        self._remove_empty_dirs()
        return removed

    def _remove_empty_dirs(self) -> None:
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only when empty


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


@dataclass
class LatentReport:
    """How a run got its latents: ``status`` is ``hit`` (no VAE call), ``miss`` (all encoded),
    ``partial``, or ``off`` (cache disabled); ``encoded`` of ``total`` augmentations went through
    the VAE; ``corrupt`` entries were re-encoded; ``seconds`` includes hashing and disk I/O."""

    status: str
    total: int
    encoded: int
    corrupt: int
    seconds: float
    folder: str | None = None

    def describe(self) -> str:
        if self.status == "off":
            return f"{self.total} encoded by the VAE (disk cache off) in {self.seconds:.1f} s"
        what = {"hit": "disk cache hit", "miss": "disk cache miss", "partial": "partial hit"}
        return (
            f"{what[self.status]}: {self.encoded} of {self.total} encoded by the VAE, "
            f"{self.seconds:.1f} s"
        )


def cached_latents(
    vae: Any,
    aug: Any,
    batch_size: int,
    *,
    cache: LatentDiskCache | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Any, LatentReport]:
    """`xti.data.encode_latents` through the disk cache: the augmentations with a valid entry are
    read from disk, only the others go through the VAE (and are stored). With ``cache=None`` it
    is `encode_latents` itself. Returns the `xti.data.LatentCache` and a `LatentReport`.

    The VAE goes to `device` only while it encodes, and back; on a full hit it is neither called
    nor moved. Pass it on the CPU: hashing its weights reads them there.
    """
    from xti.data import encode_latents, latent_cache_from

    t0 = time.perf_counter()
    k = len(aug)
    device = torch.device(device)
    if cache is None:
        with _on_device(vae, device):
            latents = encode_latents(
                vae, aug, batch_size, dtype=dtype, device=device, progress=progress
            )
        report = LatentReport("off", k, k, 0, time.perf_counter() - t0)
        return latents, report
    vae_id = vae_identity(vae, device_type=device.type, dtype=dtype)
    keys = [entry_key(vae_id, aug.pixels[i]) for i in range(k)]
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    corrupt = 0
    for i, key in enumerate(keys):
        if not cache.path(key).exists():
            continue
        got = cache.load(key)
        if got is None:
            corrupt += 1
        else:
            found[i] = got
    hit_shapes = {tuple(m.shape) for m, *_ in found.values()}
    if len(hit_shapes) > 1:  # cannot happen for one VAE and resolution; distrust the lot
        logger.warning("latent cache entries of one run differ in shape; re-encoding them")
        found, hit_shapes = {}, set()
    missing = [i for i in range(k) if i not in found]
    if missing:
        fresh = _encode(vae, aug, missing, batch_size, dtype, device, progress)
        if hit_shapes and {tuple(m.shape) for m, _ in fresh.values()} != hit_shapes:
            # entries that a fresh encode contradicts: never train on them
            logger.warning("latent cache entries do not match this VAE's latents; re-encoding")
            missing = list(range(k))
            fresh = _encode(vae, aug, missing, batch_size, dtype, device, progress)
        for i, (mean_i, std_i) in fresh.items():
            found[i] = (mean_i, std_i, _channels_last(mean_i))
            cache.store(keys[i], mean_i, std_i, vae_id, channels_last=found[i][2])
        cache.prune()
    mean = torch.stack([found[i][0] for i in range(k)])
    std = torch.stack([found[i][1] for i in range(k)])
    if all(found[i][2] for i in range(k)):  # the layout a fresh encode gives, see `store`
        mean = mean.contiguous(memory_format=torch.channels_last)
        std = std.contiguous(memory_format=torch.channels_last)
    status = "hit" if not missing else ("miss" if len(missing) == k else "partial")
    report = LatentReport(
        status, k, len(missing), corrupt, time.perf_counter() - t0, str(cache.folder)
    )
    return latent_cache_from(mean, std, vae, aug), report


def _encode(
    vae: Any,
    aug: Any,
    indices: list[int],
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Encode the augmentations `indices` (the VAE moves to `device` for it and back)."""
    from xti.data import encode_latents

    subset = aug if indices == list(range(len(aug))) else _Subset(aug, indices)
    with _on_device(vae, device):
        sub = encode_latents(vae, subset, batch_size, dtype=dtype, device=device, progress=progress)
    return {i: (sub.mean[j], sub.std[j]) for j, i in enumerate(indices)}


def _channels_last(latent: torch.Tensor) -> bool:
    """Whether a ``[C, h, w]`` latent is a slice of a channels-last batch (channel stride 1)."""
    return latent.dim() == 3 and latent.shape[0] > 1 and latent.stride(0) == 1


@contextlib.contextmanager
def _on_device(vae: Any, device: torch.device) -> Iterator[None]:
    """Move the VAE to `device` for the block and back to where it was."""
    params = list(vae.parameters()) if hasattr(vae, "parameters") else []
    home = params[0].device if params else None
    if home is not None and home != device:
        vae.to(device)
    try:
        yield
    finally:
        if home is not None and home != device:
            vae.to(home)


class _Subset:
    """The pixels of some augmentations, shaped like `xti.data.Augmentations` for encoding."""

    def __init__(self, aug: Any, indices: list[int]) -> None:
        idx = torch.tensor(indices, dtype=torch.long)
        self.pixels = aug.pixels[idx]
        self.image_index = aug.image_index[idx]
        self.flipped = aug.flipped[idx]
        self.crop_top_left = None
        self.original_size = None

    def __len__(self) -> int:
        return int(self.pixels.shape[0])
