"""Contexts computed once (data.cache_contexts): a content-addressed cache on disk.

A pair's student context (caption -> text encoder) and teacher context ((caption, target
image) -> VLM features, image tokens or reference latents) never change in training: the
encoders are frozen, and the data stream gives an image the same caption in every epoch.
With data.cache_contexts the driver computes them once, before training, in one Ray task
on the learner's resources (fill_context_cache); the learner ranks and the rollout workers
then read every context from the cache (cached_contexts) and drop their encoders
(Family.release_encoders): at Z-Image scale the Qwen3-4B text encoder and the VLM's vision
tower leave every GPU. It is meant for small datasets (DreamBooth style): the fill visits
every row once.

    root/fingerprint.json                what the entries were computed with
    root/student/<key>.safetensors       one caption's student context
    root/teacher/<key>.safetensors       one (caption, image)'s teacher context
    root/latent/<key>.safetensors        one image's VAE latent (SFT runs: x0, as a good SFT
                                         trainer caches it; the VAE stays for sample grids)

Never used for anything else, silently:
- key = sha256(fingerprint, caption[, image shape, dtype and values]): another caption,
  image or resolution is another key, computed by the fill;
- fingerprint = sha256 of the model config's context settings, the contents of the files
  that make contexts (the family's CONTEXT_FILES, the teacher VLM's folder), the family's
  code and the library versions. A cache filled for another fingerprint is emptied and
  filled again, with one line naming what changed; a process handed a cache whose
  fingerprint is not the one the fill reported stops, naming both;
- a lookup that misses stops the run with one line naming the caption (the encoders are
  gone by then: the data changed after the fill).

Contexts are stored per item, as computed for a batch of one, and stacked into batches
on lookup: a context dataclass's fields are tensors with the batch first (fixed-length
padding), lists of one tensor per item, or None.
"""

import hashlib
import itertools
import importlib.metadata
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load, save

from .data.batches import collate
from .families import family_module
from .storage import Storage, local_copy
from .tensors import safetensors_metadata
from . import process
from .families import vlm as vlm_module

KINDS = ("student", "teacher", "latent")
LATENT_FILES = ("vae",)  # the subfolder whose files make latents (fingerprinted with the context files)
# The ModelConfig fields that change a context (files and code are fingerprinted separately).
CONTEXT_SETTINGS = ("family", "dtype", "max_sequence_length", "teacher_max_sequence_length", "teacher_context",
                    "vlm_min_pixels", "vlm_max_pixels")
LIBRARIES = ("torch", "transformers", "tokenizers", "diffusers")
FORMAT = "2"  # the entries' layout; bump it when it changes
RECORD = "fingerprint.json"


@dataclass(frozen=True)
class ContextCache:
    """A filled cache, as the fill reports it (the driver hands it to learners and rollout workers)."""

    root: str
    fingerprint: str
    entries: int = 0  # student + teacher contexts of the data
    computed: int = 0  # of them, computed by this fill (the others were there)
    seconds: float = 0.0

    def wrap(self, family) -> "CachedContexts":
        """`family` reading its contexts from here (cached_contexts)."""
        return cached_contexts(family, self)


class ContextCacheMiss(LookupError):
    """A context that is not in the cache, asked for after the encoders were released."""


# -- fingerprint ------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def local_dir(path: str, folders: tuple[str, ...] = ()) -> Path:
    """A local directory with `path`'s files: itself, or a hub id's cached snapshot (downloaded,
    only `folders` if given, when it is not there yet: the fill needs those files anyway)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    patterns = [f"{folder}/*" for folder in folders] or None
    try:
        local = Path(snapshot_download(path, allow_patterns=patterns, local_files_only=True))
        if all((local / folder).is_dir() for folder in folders):
            return local
    except Exception:  # not in the hub cache (LocalEntryNotFoundError and kin)
        pass
    return Path(snapshot_download(path, allow_patterns=patterns))


def fingerprint_parts(model, model_path: str, memo: dict) -> tuple[dict[str, str], dict[str, list]]:
    """What a context depends on, as {part: value}, for `model` (a ModelConfig) at model_path.

    Also returns {real path: [size, mtime_ns, sha256]} of the files hashed: given back as
    `memo` next time, a file whose size and mtime are unchanged is not read again (a 4B
    text encoder is 8 GB).
    """
    module = family_module(model.family)
    parts = {"format": FORMAT}
    parts.update({f"setting model.{k}": json.dumps(getattr(model, k)) for k in CONTEXT_SETTINGS})
    parts.update({f"library {name}": importlib.metadata.version(name) for name in LIBRARIES})
    for source in (module.__file__, vlm_module.__file__):
        parts[f"code {Path(source).name}"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    made_by = tuple(dict.fromkeys(module.CONTEXT_FILES + LATENT_FILES))
    folders = [("model", local_dir(model_path, made_by), made_by)]
    if model.teacher_context == "vlm":
        vlm_path = model.teacher_vlm_path or module.default_teacher_vlm(model_path)
        folders.append(("teacher VLM", local_dir(vlm_path), ("",)))
    files = {}
    for label, root, subfolders in folders:
        for sub in subfolders:
            for path in sorted((root / sub).rglob("*")):
                relative = path.relative_to(root)
                if not path.is_file() or any(p.startswith(".") for p in relative.parts):
                    continue
                real, stat = str(path.resolve()), path.stat()
                known = memo.get(real)
                same = known is not None and known[:2] == [stat.st_size, stat.st_mtime_ns]
                files[real] = [stat.st_size, stat.st_mtime_ns, known[2] if same else file_sha256(path)]
                parts[f"{label} file {relative}"] = files[real][2]
    return parts, files


def read_record(root: Storage) -> dict | None:
    """root/fingerprint.json: {"fingerprint", "parts", "files"}, or None for a new cache."""
    return json.loads(root.read_text(RECORD)) if root.is_file(RECORD) else None


def open_root(root: Storage, parts: dict[str, str], files: dict, old: dict | None) -> str:
    """The fingerprint of `parts`; a cache at `root` filled for another one is emptied first."""
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    if old is not None and old["fingerprint"] != fingerprint:
        changed = sorted(k for k in parts.keys() | old["parts"].keys() if parts.get(k) != old["parts"].get(k))
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        print(f"context cache {root.uri}: filled for another {', '.join(changed[:4])}{more}; emptying it to "
              "fill it again", flush=True)
        for kind in KINDS:
            root.remove(kind)
    root.write(RECORD, json.dumps({"fingerprint": fingerprint, "parts": parts, "files": files}, indent=1))
    return fingerprint


# -- entries -----------------------------------------------------------------------------


def entry_name(fingerprint: str, kind: str, caption: str, image: torch.Tensor | None = None) -> str:
    """Where, under the cache's root, the `kind` context of `caption` (teacher: and its (3, H, W) image) lives."""
    digest = hashlib.sha256(f"{fingerprint}\0{caption}".encode())
    if image is not None:
        image = image.detach().cpu().contiguous()
        digest.update(f"\0{tuple(image.shape)}\0{image.dtype}\0".encode())
        digest.update(image.view(torch.uint8).numpy())
    return f"{kind}/{digest.hexdigest()}.safetensors"


def split_context(context) -> list[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """A batch's context -> per item (tensors, metadata) for a safetensors file."""
    values = {f.name: getattr(context, f.name) for f in fields(context)}
    lists = [name for name, value in values.items() if isinstance(value, list)]
    meta = {"context": type(context).__name__, "lists": ",".join(lists)}
    return [({name: value[i].detach().clone().contiguous() for name, value in values.items() if value is not None},
             meta) for i in range(len(context))]


def join_contexts(module, items: list[tuple[dict[str, torch.Tensor], dict[str, str]]]):
    """Per item (tensors, metadata) -> one batch's context, of the class named in the metadata
    (a dataclass of the family's `module`)."""
    names = {meta["context"] for _, meta in items}
    if len(names) != 1:
        raise ValueError(f"context cache entries of different kinds in one batch: {sorted(names)}")
    cls = getattr(module, names.pop())
    lists = set(items[0][1]["lists"].split(",")) - {""}
    values = {}
    for f in fields(cls):
        if f.name in lists:
            values[f.name] = [tensors[f.name] for tensors, _ in items]
        elif f.name in items[0][0]:
            values[f.name] = torch.stack([tensors[f.name] for tensors, _ in items])
        else:
            values[f.name] = None
    return cls(**values)


def write_entry(root: Storage, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    root.write(name, save(tensors, metadata=meta))


def read_entry(root: Storage, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    data = root.read_bytes(name)
    return load(data), safetensors_metadata(data)


# -- the fill (once, before training) ------------------------------------------------------


def fill_context_cache(config: dict, model_path: str, data, root: str, prompts: list[str] = ()) -> ContextCache:
    """Every pair's student and teacher contexts, and the student contexts of `prompts` (the
    sample grids' columns), written under `root` unless already there; for SFT also every
    image's VAE latent (x0).

    data: a Ray Dataset of decoded rows (data/stream.py), or an iterable of them. Both
    kinds are filled whatever the algorithm: sample grids show the teacher context too.
    The family (encoders on this task's GPU, the transformer left on the CPU) loads only
    if something is missing. Entries no row of `data` needs are deleted.
    """
    cfg = process.begin(config)
    start, root, model_path = time.perf_counter(), Storage(root), local_copy(model_path)
    old = read_record(root)
    parts, files = fingerprint_parts(cfg.model, model_path, old["files"] if old else {})
    fingerprint = open_root(root, parts, files, old)
    present = {f"{kind}/{name}" for kind in KINDS for name in root.listdir(kind)}
    family, wanted, computed = None, set(), 0
    rows = data.iter_rows() if hasattr(data, "iter_rows") else data
    latents = cfg.algorithm.name == "sft"
    wanted_entries = ((("student", caption, None), ("teacher", caption, images[0]))
                      + ((("latent", "", images[0]),) if latents else ())
                      for images, (caption,), _ in (collate([r]) for r in rows))
    extra = ((("student", prompt, None),) for prompt in prompts)
    for entries in itertools.chain(wanted_entries, extra):
        for kind, caption, image in entries:  # a training batch's exact (caption, image)
            name = entry_name(fingerprint, kind, caption, image)
            wanted.add(name)
            if name in present:
                continue
            if family is None:
                family = process.load(cfg, model_path, process.device(), transformer_device="cpu")
            if kind == "latent":
                write_entry(root, name, {"x0": family.encode_images(image[None].to(family.device))[0].cpu()}, {})
            else:
                context = (family.student_context([caption]) if image is None
                           else family.teacher_context([caption], image[None].to(family.device)))
                write_entry(root, name, *split_context(context.to("cpu"))[0])
                present.add(name)
            computed += 1
    for stale in sorted(present - wanted):
        root.remove(stale)
    return ContextCache(root.uri, fingerprint, len(wanted), computed, time.perf_counter() - start)


# -- the lookup (learner ranks, rollout workers) -------------------------------------------


class CachedContexts:
    """A family whose student_context / teacher_context are read from a filled ContextCache;
    every other attribute is the family's own (attribute access falls through to it), so the
    algorithm, the sample grids and the runtime take it for the family."""

    def __init__(self, family, cache: ContextCache):
        # on an object store: copied to this node once (it does not change during a run)
        self.root = Storage(local_copy(cache.root))
        record = read_record(self.root)
        if record is None:
            raise FileNotFoundError(f"context cache {cache.root} is not on this node: put train.output_dir on "
                                    "storage every node sees, or set data.cache_contexts=false")
        if record["fingerprint"] != cache.fingerprint:
            raise ValueError(f"context cache {cache.root} holds {record['fingerprint'][:12]}, not the fill's "
                             f"{cache.fingerprint[:12]} (another run filled it since?): re-run, or set "
                             "data.cache_contexts=false")
        self.family, self.cache = family, cache
        self.module = family_module(family.name)  # where the entries' context classes live
        self.hits = 0  # contexts read
        self.latent_hits = 0  # latents read (SFT)
        self.released_bytes = 0  # set by cached_contexts

    def __getattr__(self, name):
        if name == "family":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.family, name)

    def student_context(self, captions: list[str]):
        return self._lookup("student", captions, [None] * len(captions))

    def teacher_context(self, captions: list[str], images: torch.Tensor):
        self.family.check_images(images)
        return self._lookup("teacher", captions, list(images))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """x0 from the cache when every image's latent is there (an SFT run's training images),
        else from the VAE, which never leaves (a sample grid's or evaluation's images)."""
        names = [entry_name(self.cache.fingerprint, "latent", "", image) for image in images]
        if not all(self.root.is_file(n) for n in names):
            return self.family.encode_images(images)
        self.family.check_images(images)
        self.latent_hits += len(names)
        return torch.stack([read_entry(self.root, n)[0]["x0"] for n in names]).to(self.family.device)

    def _lookup(self, kind: str, captions: list[str], images: list):
        items = []
        for caption, image in zip(captions, images):
            name = entry_name(self.cache.fingerprint, kind, caption, image)
            if not self.root.is_file(name):
                what = "" if image is None else f" and its {image.shape[-2]}x{image.shape[-1]} image"
                raise ContextCacheMiss(
                    f"context cache {self.cache.root} has no {kind} context for caption {caption[:60]!r}{what}: it "
                    "holds the pairs of the data as they were when this run started, and the encoders were "
                    "released. Re-run to fill it from the current data, or set data.cache_contexts=false")
            items.append(read_entry(self.root, name))
        self.hits += len(items)
        return join_contexts(self.module, items).to(self.family.device)


def cached_contexts(family, cache: ContextCache) -> CachedContexts:
    """`family` reading its contexts from the filled `cache`, with its encoders released: the
    fill put every context of the data there, sample grids' included."""
    cached = CachedContexts(family, cache)
    cached.released_bytes = family.release_encoders()
    print(f"contexts from {cache.root} ({cache.entries} entries); encoders released: "
          f"{cached.released_bytes / 2**20:.1f} MiB", flush=True)
    return cached
