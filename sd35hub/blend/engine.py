"""The multi-adapter engine: one base pipeline, any number of LoRAs, weights per request.

    engine = BlendEngine("stabilityai/stable-diffusion-3.5-large", cpu_offload=True)
    result = engine.generate(GenerationRequest(
        prompt="a castle <lora:me/watercolor-sd35:0.8>", adapters=[AdapterRef("me/ink-sd35", 0.5)], seed=7))
    result.images[0].save("castle.png"); print(result.diffusers_snippet())

* The base pipeline is loaded ONCE (sd35hub.models.load.load_pipeline).
* Each adapter is read (any layout: diffusers/kohya/ComfyUI), checked against the base, and loaded
  ONCE into the transformer under a stable peft name; an LRU keeps at most `max_cached_adapters`,
  evicting with `delete_adapters` (the peft modules are really removed). A request never reloads:
  it only calls `set_adapters(names, weights)`, or `disable_lora()` for the base model.
* DoRA, LoKr and LoHa files we train (sd35hub.train.variants) are not low-rank pairs: they are applied
  exactly as weight deltas on the transformer's Linears (sd35hub.models.weight_deltas), weighted per
  request like the LoRAs (W + sum w_i delta_i), and blend with them.
* One lock covers "load missing adapters + set weights + run the pipeline", so a shared engine
  (the Space serves many users) never renders one user's prompt with another's weights. Hub
  downloads happen before taking the lock.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35hub import __version__
from sd35hub.adapters.files import (
    Adapter,
    AdapterMetadata,
    adapter_file,
    delete_from_pipeline,
    disable_pipeline_adapters,
    load_into_pipeline,
    read_adapter,
    set_pipeline_adapters,
)
from sd35hub.blend.request import (
    AdapterRef,
    GenerationRequest,
    GenerationResult,
    parse_prompt,
    with_trigger_words,
)
from sd35hub.errors import (
    AdapterError,
    AdapterTooLargeError,
    ConfigError,
    GenerationCancelled,
    NonFiniteError,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_ADAPTER_BYTES = 2 * 1024**3  # a LoRA is MBs to a few hundred MB; a full model is many GB
_HUB_SOURCE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<file>/[^@]+)?(?:@(?P<rev>[\w./-]+))?$")


@dataclass
class LoadedAdapter:
    name: str  # peft adapter name inside the transformer
    source: str
    file: Path
    format: str
    metadata: AdapterMetadata | None
    trigger_words: list[str] = field(default_factory=list)
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    named: bool = False  # provided by the server under its source name (BlendEngine(named_sources=...))
    embeddings: Any = None  # pivotal-tuning embeddings loaded with it (sd35hub.blend.embeddings.LoadedEmbeddings)


def adapter_name_for(source: str) -> str:
    """A stable peft adapter name for a source (peft names cannot hold '.')."""
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", source.strip()).strip("_")[-40:] or "adapter"
    return f"{stem}_{hashlib.sha256(source.strip().encode()).hexdigest()[:8]}"


class BlendEngine:
    def __init__(
        self,
        model: str = "tiny",
        *,
        dtype: str = "auto",
        device: str | None = None,
        max_cached_adapters: int = 8,
        cpu_offload: bool = False,
        drop_t5: bool = False,
        quantize: str = "none",
        max_adapters_per_request: int = 5,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        token: str | bool | None = None,
        revision: str | None = None,
        local_roots: tuple[Path, ...] | None = None,
        named_sources: Callable[[str], Path | None] | None = None,
        public_model_id: str | None = None,
        mask_t5_padding: bool = False,
    ) -> None:
        import torch

        from sd35hub.models.load import load_pipeline, model_info
        from sd35hub.models.options import torch_dtype

        if max_cached_adapters < 1 or max_adapters_per_request < 1:
            raise ConfigError("max_cached_adapters and max_adapters_per_request must be >= 1")
        self.model = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch_dtype(dtype, self.device)
        self.info = model_info(model, revision)
        self.max_cached_adapters = max_cached_adapters
        self.max_adapters_per_request = min(
            max_adapters_per_request, max_cached_adapters
        )  # must fit the cache
        self.max_adapter_bytes = max_adapter_bytes
        self.token = token  # for adapter downloads only (the base is read by load_pipeline)
        # None: any local path is an adapter (CLI, notebook). Set (a server such as the Space): only
        # paths inside these folders are local; anything else is looked up as a Hub id.
        self.local_roots = None if local_roots is None else tuple(Path(r).resolve() for r in local_roots)
        # Sources the server itself provides under a name (the Space's "sample:<name>" adapters): the
        # name, never the file path, is what requests, parameters and snippets carry.
        self.named_sources = named_sources
        self.cpu_offload = cpu_offload and self.device.startswith("cuda")
        if cpu_offload and not self.cpu_offload:
            log.warning("cpu_offload needs a CUDA GPU; running on %s without offload", self.device)
        self.pipe = load_pipeline(
            model,
            dtype=self.dtype,
            revision=revision,
            quantize=quantize,
            drop_t5=drop_t5,
            device=None if self.cpu_offload or self.device == "cpu" else self.device,
        )
        if self.cpu_offload:
            self.pipe.enable_model_cpu_offload()
        if mask_t5_padding:  # as adapters trained with data.mask_t5_padding saw their prompts
            from sd35hub.models.t5mask import install_t5_padding_mask

            install_t5_padding_mask(self.pipe)
        self.mask_t5_padding = mask_t5_padding
        self.pipe.set_progress_bar_config(disable=True)
        self._base_scheduler_config = dict(self.pipe.scheduler.config)
        self._model_path = str(
            getattr(self.pipe, "name_or_path", "") or self.pipe.config.get("_name_or_path", model)
        )
        # What a snippet loads: the Hub id pinned to the commit that was loaded (from the snapshot folder
        # name), or `public_model_id` for a local copy of a Hub model (the Space's embedded tiny model).
        self.model_id, self.model_revision = _model_coordinates(model, self._model_path, revision)
        if public_model_id is not None:
            self.model_id = public_model_id
        self._lock = threading.Lock()  # set adapters + generate: one request at a time on the pipeline
        self._files_lock = threading.Lock()  # the source -> file cache (downloads happen outside _lock)
        self._files: dict[tuple[str, str | None], tuple[Path, dict[str, Any]]] = {}
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # source -> adapter, LRU order
        self._queue = threading.Condition()
        self._waiting: list[object] = []  # requests in arrival order: the first holds the pipeline

    @property
    def queue_length(self) -> int:
        """Requests now waiting for the pipeline or running on it (a server shows it as "N ahead")."""
        with self._queue:
            return len(self._waiting)

    def _wait_turn(self, ticket: object, waiting: Callable[[int], bool | None] | None) -> None:
        """Wait until `ticket` is first in line (first come, first served). `waiting(ahead)` is called when
        the number of requests ahead changes, and at least every second (a server refreshes its "N ahead"
        and notices a cancel there); returning False cancels (GenerationCancelled)."""
        last = None
        while True:
            with self._queue:
                ahead = self._waiting.index(ticket)
                if ahead and ahead == last:  # reported already: wait for a change (or a second)
                    self._queue.wait(timeout=1.0 if waiting is not None else None)
                    ahead = self._waiting.index(ticket)
            if ahead == 0:
                return
            if waiting is not None and waiting(ahead) is False:  # outside the lock: it may be slow
                raise GenerationCancelled("Cancelled: no image was made.")
            last = ahead

    # --- adapters --------------------------------------------------------------------------------

    @property
    def loaded_adapters(self) -> list[str]:
        """Sources currently loaded, least recently used first."""
        return list(self._loaded)

    def load(self, source: str, token: str | bool | None = None) -> str:
        """Make sure `source` is loaded (local path, 'owner/repo[@rev]' or 'owner/repo/file.safetensors');
        return its adapter name. Loading again is free; it only refreshes the LRU position. `token`: for
        this download only (None: the engine's)."""
        file, hub = self._fetch(source, token)
        with self._lock:
            return self._ensure_loaded(source, file, hub, keep=set()).name

    def _fetch(self, source: str, token: str | bool | None = None) -> tuple[Path, dict[str, Any]]:
        """Local file for a source (downloading Hub adapters once per token), and its Hub coordinates.
        `token` (a request's own, e.g. a Space visitor's) replaces the engine's; the cache is keyed by it,
        so a file fetched with one person's token is never handed to a request without that token."""
        source = source.strip()
        if token is None:
            token = self.token
        key = (source, hashlib.sha256(token.encode()).hexdigest() if isinstance(token, str) else None)
        with self._files_lock:
            if key in self._files:
                return self._files[key]
        named = self.named_sources(source) if self.named_sources is not None else None
        if named is not None:
            file, hub = Path(named), {"named": True}
        else:
            file, hub = fetch_adapter_source(
                source, token=token, max_bytes=self.max_adapter_bytes, local_roots=self.local_roots
            )
        from sd35hub.blend.embeddings import find_embeddings

        hub = {**hub, "embeddings": find_embeddings(file, hub, token=token)}  # embeddings.safetensors beside it
        with self._files_lock:
            self._files[key] = (file, hub)
        return file, hub

    def _ensure_loaded(self, source: str, file: Path, hub: dict[str, Any], keep: set[str]) -> LoadedAdapter:
        """Caller holds self._lock."""
        if source in self._loaded:
            self._loaded.move_to_end(source)
            return self._loaded[source]
        from sd35hub.train.variants import file_variant_kind

        if file_variant_kind(file) is not None:
            return self._load_variant(source, file, hub, keep)
        try:
            adapter: Adapter = read_adapter(file)
        except AdapterError as exc:  # e.g. non-finite values: say which adapter
            if source not in exc.message:
                exc.message = f"The adapter {source}: {exc.message}"
                exc.args = (exc.message,)
            raise
        check_finite(adapter, source, self.dtype)
        while len(self._loaded) >= self.max_cached_adapters:
            self._evict_one(keep)
        name = adapter_name_for(source)
        embeddings = None
        if hub.get("embeddings") is not None:  # checked (untrusted) and its rows in under engine tokens, first
            from sd35hub.blend.embeddings import load_embeddings

            embeddings = load_embeddings(self.pipe, hub["embeddings"], source)
        try:
            load_into_pipeline(self.pipe, adapter, name)  # transformer + text-encoder LoRAs
        except AdapterError as exc:  # say the source, not the internal peft name
            exc.message = exc.message.replace(f"Adapter {name!r}", f"The adapter {source}").replace(
                name, source
            )
            exc.args = (exc.message,)
            raise
        words = list(adapter.metadata.trigger_words) if adapter.metadata else []
        words += [w for w in hub.get("card_trigger_words", []) if w not in words]
        loaded = LoadedAdapter(
            name=name,
            source=source,
            file=adapter.path or file,
            format=adapter.format,
            metadata=adapter.metadata,
            trigger_words=words,
            repo_id=hub.get("repo_id"),
            filename=hub.get("filename"),
            revision=hub.get("revision"),
            named=bool(hub.get("named")),
            embeddings=embeddings,
        )
        self._loaded[source] = loaded
        return loaded

    def _load_variant(self, source: str, file: Path, hub: dict[str, Any], keep: set[str]) -> LoadedAdapter:
        """A DoRA / LoKr / LoHa file: exact weight deltas on the transformer (module docstring)."""
        from sd35hub.models import weight_deltas
        from sd35hub.train.variants import read_variant

        try:
            variant = read_variant(file, weight_deltas.linear_shapes(self.pipe.transformer))
        except AdapterError as exc:
            if source not in exc.message:
                exc.message = f"The adapter {source}: {exc.message}"
                exc.args = (exc.message,)
            raise
        while len(self._loaded) >= self.max_cached_adapters:
            self._evict_one(keep)
        name = adapter_name_for(source)
        embeddings = None
        if hub.get("embeddings") is not None:  # pivotal tuning with a variant: as for a LoRA (_ensure_loaded)
            from sd35hub.blend.embeddings import load_embeddings

            embeddings = load_embeddings(self.pipe, hub["embeddings"], source)
        weight_deltas.apply(self.pipe.transformer, name, variant)
        metadata = variant.metadata
        words = list(metadata.trigger_words) if metadata else []
        words += [w for w in hub.get("card_trigger_words", []) if w not in words]
        loaded = LoadedAdapter(name=name, source=source, file=variant.path or file, format=variant.kind,
                               metadata=metadata, trigger_words=words, repo_id=hub.get("repo_id"),
                               filename=hub.get("filename"), revision=hub.get("revision"), named=bool(hub.get("named")),
                               embeddings=embeddings)
        self._loaded[source] = loaded
        return loaded

    def _delete(self, name: str) -> None:
        from sd35hub.models import weight_deltas

        delete_from_pipeline(self.pipe, name)
        weight_deltas.remove(self.pipe.transformer, name)

    def _evict_one(self, keep: set[str]) -> None:
        for source, loaded in self._loaded.items():
            if source not in keep:
                self._delete(loaded.name)
                del self._loaded[source]
                log.info("Evicted adapter %s (%s) from the cache", loaded.name, source)
                return
        raise ConfigError(
            "all cached adapters are in use by this request; raise max_cached_adapters"
        )  # pragma: no cover

    def unload(self, source: str) -> None:
        """Remove one adapter from the transformer now."""
        with self._lock:
            loaded = self._loaded.pop(source.strip(), None)
            if loaded is not None:
                self._delete(loaded.name)

    # --- generation ------------------------------------------------------------------------------

    def resolve(self, request: GenerationRequest) -> tuple[str, list[AdapterRef]]:
        """The clean prompt and the request's adapters (explicit + prompt tags; duplicates summed)."""
        if request.parse_prompt_tags:
            clean, from_prompt = parse_prompt(request.prompt)
        else:
            clean, from_prompt = request.prompt, []
        weights: dict[str, float] = {}
        tokens: dict[str, str | bool | None] = {}
        for ref in [*request.adapters, *from_prompt]:
            weights[ref.source.strip()] = weights.get(ref.source.strip(), 0.0) + float(ref.weight)
            tokens.setdefault(ref.source.strip(), ref.token)
        if len(weights) > self.max_adapters_per_request:
            raise ConfigError(
                f"{len(weights)} adapters in one request; at most {self.max_adapters_per_request} are allowed "
                "(BlendEngine(max_adapters_per_request=...) or merge some with `sd35hub merge`)"
            )
        return clean, [AdapterRef(source, weight, tokens[source]) for source, weight in weights.items()]

    def generate(
        self,
        request: GenerationRequest,
        progress: Callable[[int, int], bool | None] | None = None,
        waiting: Callable[[int], bool | None] | None = None,
    ) -> GenerationResult:
        """Render a request. `progress(done, total)` is called after every denoising step (total counts
        both passes of compare_base); returning False cancels (GenerationCancelled). Requests take the
        pipeline in arrival order; while others are ahead, `waiting(ahead)` reports how many (see
        _wait_turn). Non-finite latents stop the run with NonFiniteError naming the adapters."""
        import torch

        from sd35hub.blend.schedulers import make_scheduler

        prompt, refs = self.resolve(request)
        steps = request.steps or self.info.default_steps
        guidance = (
            self.info.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
        )
        width = request.width or self.info.native_resolution
        height = request.height or self.info.native_resolution
        if width % 16 or height % 16 or request.num_images < 1 or steps < 1:
            raise ConfigError(
                f"width={width}, height={height} must be multiples of 16, steps={steps} and "
                f"num_images={request.num_images} must be >= 1"
            )
        limit = self.info.max_resolution  # the positional embedding's grid: pos_embed_max_size x patch x 8 px
        if max(width, height) > limit:
            raise ConfigError(
                f"width={width}, height={height}: this base model ({self.info.variant}) covers images up to "
                f"{limit} px a side; choose a width and height of at most {limit}"
            )
        scheduler = make_scheduler(request.scheduler, self._base_scheduler_config)
        fetched = [self._fetch(ref.source, ref.token) for ref in refs]  # downloads before taking the lock
        seeds = [request.seed + i for i in range(request.num_images)]
        passes = 2 if refs and request.compare_base else 1
        done = [0]

        def run(final_prompt: str, blend: str | None, prompts: dict[str, Any] | None = None) -> list[Any]:
            def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                latents = tensors.get("latents")
                if latents is not None and not bool(torch.isfinite(latents).all()):
                    raise NonFiniteError(_non_finite_message(blend, step + 1, steps))
                done[0] += 1
                if progress is not None and progress(done[0], steps * passes) is False:
                    raise GenerationCancelled("Cancelled: no image was made.")
                return tensors

            texts = prompts or {"prompt": final_prompt, "negative_prompt": request.negative_prompt or None}
            return self.pipe(
                **texts,  # pivotal-tuning adapters: per-encoder prompts with their tokens (sd35hub.blend.embeddings)
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                num_images_per_prompt=len(seeds),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=on_step,
                callback_on_step_end_tensor_inputs=["latents"],
                **_skip_layer_kwargs(request, guidance),
            ).images

        ticket = object()
        with self._queue:
            self._waiting.append(ticket)
        try:
            self._wait_turn(ticket, waiting)
            return self._generate_locked(
                request, prompt, refs, fetched, run, scheduler, (steps, guidance, width, height, seeds)
            )
        finally:
            with self._queue:
                self._waiting.remove(ticket)
                self._queue.notify_all()

    def _generate_locked(
        self, request: GenerationRequest, prompt: str, refs: list[AdapterRef], fetched: list[Any], run: Any,
        scheduler: Any, settings: tuple[int, float, int, int, list[int]],
    ) -> GenerationResult:  # fmt: skip
        import torch

        from sd35hub.models import weight_deltas

        steps, guidance, width, height, seeds = settings
        with self._lock:
            keep = {ref.source for ref in refs}
            loaded = [
                self._ensure_loaded(ref.source, f, hub, keep)
                for ref, (f, hub) in zip(refs, fetched, strict=True)
            ]
            final_prompt = prompt
            if request.insert_trigger_words:
                # a negatively weighted adapter removes its concept: its trigger word would ask for it
                final_prompt = with_trigger_words(prompt, [w for ref, a in zip(refs, loaded, strict=True)
                                                           if ref.weight > 0 for w in a.trigger_words])
            self.pipe.scheduler = scheduler
            base_images = None
            with torch.inference_mode():
                if request.compare_base or not loaded:
                    self._disable_adapters()
                    base_images = run(final_prompt, None)  # same prompt and seeds: only the adapters differ
                if loaded:
                    set_pipeline_adapters(self.pipe, [a.name for a in loaded], [ref.weight for ref in refs])
                    weight_deltas.set_weights(self.pipe.transformer, {a.name: ref.weight for ref, a in zip(refs, loaded, strict=True)})
                    blend = ", ".join(f"{ref.source} × {ref.weight:g}" for ref in refs)
                    active = [a.embeddings for a in loaded if a.embeddings is not None]
                    if active:
                        from sd35hub.blend.embeddings import substitute

                        images = run(final_prompt, blend, substitute(final_prompt, request.negative_prompt or None, active))
                    else:
                        images = run(final_prompt, blend)
                else:
                    images = base_images
        params = self._params(request, final_prompt, refs, loaded, steps, guidance, width, height, seeds)
        return GenerationResult(
            images=images, params=params, base_images=base_images if request.compare_base else None
        )

    def _disable_adapters(self) -> None:
        from sd35hub.models import weight_deltas

        disable_pipeline_adapters(self.pipe)
        weight_deltas.set_weights(self.pipe.transformer, {})

    def _params(
        self,
        request: GenerationRequest,
        prompt: str,
        refs: list[AdapterRef],
        loaded: list[LoadedAdapter],
        steps: int,
        guidance: float,
        width: int,
        height: int,
        seeds: list[int],
    ) -> dict[str, Any]:
        from sd35hub.blend.schedulers import scheduler_recipe

        scheduler_class, scheduler_kwargs = scheduler_recipe(request.scheduler, self._base_scheduler_config)
        return {
            "prompt": prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "seeds": seeds,
            "steps": steps,
            "guidance_scale": guidance,
            **({"skip_guidance_layers": list(request.skip_layers), "skip_layer_guidance_scale": request.skip_layer_scale}
               if _skip_layer_kwargs(request, guidance) else {}),
            "width": width,
            "height": height,
            "scheduler": request.scheduler,
            "scheduler_class": scheduler_class,
            "scheduler_kwargs": scheduler_kwargs,
            "model": self.model,
            "model_path": self._model_path,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            **({"mask_t5_padding": True} if self.mask_t5_padding else {}),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "adapters": [
                {
                    "source": a.source,
                    "weight": ref.weight,
                    "name": a.name,
                    "format": a.format,
                    # a Hub adapter is named by repo_id/filename/revision; a server-provided one by its name
                    "file": None if a.repo_id or a.named else str(a.file),
                    "repo_id": a.repo_id,
                    "filename": a.filename,
                    "revision": a.revision,
                    **({"embeddings": {"tokens": a.embeddings.tokens, "keys": _embedding_keys(a.embeddings),
                                       "file": None if a.repo_id or a.named else str(a.embeddings.file)}}
                       if a.embeddings is not None else {}),
                }
                for ref, a in zip(refs, loaded, strict=True)
            ],
            "sd35hub_version": __version__,
        }


def _embedding_keys(embeddings: Any) -> list[str]:
    from sd35hub.adapters.embeddings import FILE_KEYS

    return [FILE_KEYS[name] for name in embeddings.encoders]


def fetch_adapter_source(
    source: str,
    *,
    token: str | bool | None = None,
    max_bytes: int | None = DEFAULT_MAX_ADAPTER_BYTES,
    local_roots: tuple[Path, ...] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Local file for an adapter source, downloading Hub adapters (into the HF cache), and its Hub
    coordinates {repo_id, revision, filename, card_trigger_words} ({} for local paths).

    Sources: a local file or folder; 'owner/repo'; 'owner/repo@revision'; 'owner/repo/file.safetensors'.
    `local_roots`: None accepts any existing local path; otherwise only a path that resolves (symlinks
    and '..' followed) inside one of these folders is local, and every other source is a Hub id.
    `max_bytes` applies to local files too, checked before reading.
    """
    source = source.strip()
    local = Path(source).expanduser()
    if local.exists() and _inside_roots(local, local_roots):
        file = adapter_file(local)  # a folder -> its adapter file; pickles refused unopened
        size = file.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise AdapterTooLargeError(str(file), size, max_bytes)
        return file, {}
    match = _HUB_SOURCE.match(source)
    if match is None:
        hub_forms = "('owner/repo', 'owner/repo@revision' or 'owner/repo/file.safetensors')"
        if local_roots is not None:  # say nothing about local files here: not even whether one exists
            raise AdapterError(f"Adapter {source[:200]!r} is not a Hub id {hub_forms}.")
        raise AdapterError(f"Adapter {source!r} is neither an existing local path nor a Hub id {hub_forms}.")
    from sd35hub.hub.discovery import download_adapter

    filename = match.group("file")[1:] if match.group("file") else None
    repo_id, revision = match.group("repo"), match.group("rev")
    file = download_adapter(repo_id, filename=filename, revision=revision, token=token, max_bytes=max_bytes)
    return file, {
        "repo_id": repo_id,
        "revision": _snapshot_commit(file) or revision,  # pinned: the commit the file came from
        "filename": filename or _repo_relative(file),
        "card_trigger_words": _card_trigger_words(repo_id, revision, token),
    }


def _inside_roots(path: Path, roots: tuple[Path, ...] | None) -> bool:
    if roots is None:
        return True
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def _repo_relative(file: Path) -> str:
    """'.../snapshots/<commit>/sub/x.safetensors' -> 'sub/x.safetensors' (the name inside the repo)."""
    parts = file.parts
    if "snapshots" in parts:
        return "/".join(parts[parts.index("snapshots") + 2 :])
    return file.name


def _card_trigger_words(repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    """Trigger words from the adapter's model card (`instance_prompt`, or `trigger_words`), if any."""
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        readme = hf_hub_download(repo_id, "README.md", revision=revision, token=token)
        data = ModelCard.load(readme).data.to_dict()
    except (HfHubHTTPError, OSError, ValueError):  # no card or an unreadable one: no trigger words
        return []
    words = data.get("trigger_words") or data.get("instance_prompt") or []
    return [words] if isinstance(words, str) else [str(w) for w in words]


def _snapshot_commit(file: Path) -> str | None:
    """'.../snapshots/<commit>/x.safetensors' -> '<commit>' (huggingface_hub's cache layout)."""
    parts = Path(file).parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        commit = parts[parts.index("snapshots") + 1]
        return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None
    return None


def _model_coordinates(model: str, model_path: str, revision: str | None) -> tuple[str, str | None]:
    """(id, revision) a snippet loads the base with: a Hub id pinned to the loaded snapshot's commit;
    a local folder (or "tiny") keeps its path and no revision."""
    commit = _snapshot_commit(Path(model_path) / "model_index.json")
    if commit is not None and not Path(model).expanduser().exists():
        return model, commit
    return model_path, revision


def check_finite(adapter: Adapter, source: str, dtype: Any = None) -> None:
    """NonFiniteError when the adapter holds NaN/inf weights, or values that overflow `dtype` (the
    pipeline's, e.g. float16): such an adapter renders a black image."""
    import torch

    bad: list[str] = []
    for key, tensor in adapter.state_dict().items():
        values = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad.append(key)
    if bad:
        where = f" in {dtype}".replace("torch.", "") if dtype is not None else ""
        raise NonFiniteError(
            f"The adapter {source} has NaN or infinite weights{where} ({len(bad)} tensors, e.g. {bad[0]}): "
            "the file is broken and would render a black image. Use another adapter or re-export this one."
        )


def _non_finite_message(blend: str | None, step: int, steps: int) -> str:
    if blend is None:
        return (
            f"The base model produced NaN/infinite values at step {step} of {steps}: try another size, "
            "scheduler or fewer steps."
        )
    return (
        f"The image became NaN/infinite at step {step} of {steps} with {blend}: an adapter overflows at "
        "these weights. Lower the weights, or remove adapters one at a time to find the one at fault."
    )


def _skip_layer_kwargs(request: GenerationRequest, guidance: float) -> dict[str, Any]:
    """Skip-layer guidance for the pipeline call (it needs classifier-free guidance, guidance > 1)."""
    if not request.skip_layers or guidance <= 1.0:
        return {}
    return {"skip_guidance_layers": list(request.skip_layers), "skip_layer_guidance_scale": request.skip_layer_scale}
