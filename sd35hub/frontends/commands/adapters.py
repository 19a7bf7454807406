"""`sd35hub generate`, `sd35hub convert`, `sd35hub merge`, `sd35hub adapter-info`."""

from __future__ import annotations

from pathlib import Path

import typer

from sd35hub.frontends.commands.options import finite

COMPARE_MODES = ("base", "schedulers", "cfg")  # cfg: sd35hub.blend.grids.GUIDANCE_SWEEP


def _split_weight(spec: str) -> tuple[str, float]:
    from sd35hub.blend.request import parse_lora_option

    ref = parse_lora_option(spec)
    return ref.source, ref.weight


def _parse_layers(text: str) -> tuple[int, ...]:
    from sd35hub.errors import ConfigError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"--skip-layers {text!r} must be block indices separated by commas, e.g. 7,8,9")
    return tuple(int(p) for p in parts)


def generate(
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="Prompt; may hold <lora:owner/repo:0.8> tags."
    ),
    model: str = typer.Option(
        "stabilityai/stable-diffusion-3.5-large", "--model", "-m", help="Base: Hub id, folder, or tiny."
    ),
    lora: list[str] = typer.Option(
        [], "--lora", help="REPO_OR_PATH[:WEIGHT], repeatable (weights may be < 0 or > 1)."
    ),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n"),
    scheduler: str = typer.Option(
        "euler", "--scheduler", help="euler|heun|dpmpp-2m|dpmpp-2m-sde|unipc|deis|lcm"
    ),
    steps: int | None = typer.Option(
        None, "--steps", min=1, max=1000, help="Default: the variant's (Large 28, Medium 40, Turbo 4)."
    ),
    cfg: float | None = typer.Option(None, "--cfg", min=0.0, max=100.0, callback=finite,
                                     help="Guidance scale. Default: the variant's."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Image i uses seed + i."),
    n: int = typer.Option(1, "--n", min=1, max=64, help="Number of images."),
    width: int | None = typer.Option(None, "--width", min=64, max=4096),
    height: int | None = typer.Option(None, "--height", min=64, max=4096),
    output: Path = typer.Option(Path("generated"), "--output", "-o", help="Folder for the PNGs."),
    compare: str | None = typer.Option(
        None, "--compare", help="Also write a labelled grid: base|schedulers|cfg."
    ),
    no_trigger_words: bool = typer.Option(
        False, "--no-trigger-words", help="Don't prepend adapters' trigger words."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto|bf16|fp16|fp32"),
    cpu_offload: bool = typer.Option(False, "--cpu-offload", help="Model CPU offload (small GPUs)."),
    drop_t5: bool = typer.Option(False, "--drop-t5", help="Leave out T5-XXL (~9 GB less)."),
    quantize: str = typer.Option(
        "none", "--quantize", help="Transformer quantization: none|nf4|int8 (CUDA)."
    ),
    skip_layers: str = typer.Option(
        "", "--skip-layers", help="Skip-layer guidance on these blocks, e.g. 7,8,9 (SD3.5 Medium); needs --cfg > 1."
    ),
    skip_layer_scale: float = typer.Option(2.8, "--skip-layer-scale", help="Skip-layer guidance scale."),
    mask_t5_padding: bool = typer.Option(
        False, "--mask-t5-padding", help="Zero T5 padding embeddings (for adapters trained with data.mask_t5_padding)."
    ),
) -> None:
    """Generate images with any number of LoRAs; PNGs carry their parameters in text chunks."""
    from sd35hub.blend.engine import BlendEngine
    from sd35hub.blend.request import AdapterRef, GenerationRequest, parse_lora_option
    from sd35hub.errors import ConfigError
    from sd35hub.pngmeta import save_png

    if compare is not None and compare not in COMPARE_MODES:
        raise ConfigError(f"--compare {compare!r} is not one of {', '.join(COMPARE_MODES)}")
    layers = _parse_layers(skip_layers)
    refs: list[AdapterRef] = [parse_lora_option(spec) for spec in lora]
    engine = BlendEngine(model, dtype=dtype, cpu_offload=cpu_offload, drop_t5=drop_t5, quantize=quantize,
                         mask_t5_padding=mask_t5_padding)
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, adapters=refs, steps=steps, guidance_scale=cfg,
        width=width, height=height, seed=seed, scheduler=scheduler, num_images=n,
        insert_trigger_words=not no_trigger_words, compare_base=compare == "base",
        skip_layers=layers, skip_layer_scale=skip_layer_scale,
    )  # fmt: skip
    result = engine.generate(request)
    for i, image in enumerate(result.images):
        params = {**result.params, "seed": result.params["seeds"][i]}
        typer.echo(str(save_png(image, output / f"image-{i:03d}-seed{params['seed']}.png", params)))
    if compare is None:
        return
    from sd35hub.blend.grids import render_grid, sweep, write_grid

    title, out, params = f"{compare}: {result.params['prompt'][:60]}", output / f"compare-{compare}.png", {"compare": compare}
    if compare == "base":  # the engine rendered the base with the same seeds: base | with adapters, per seed
        images, labels = [], []
        for i, (base, blend) in enumerate(zip(result.base_images or [], result.images, strict=True)):
            images += [base, blend]
            labels += [f"base seed {result.params['seeds'][i]}", f"with adapters seed {result.params['seeds'][i]}"]
        png = write_grid(images, labels, out=out, title=title, columns=2, params={**result.params, **params})
    else:
        requests, labels = sweep(request, compare)
        png = render_grid(engine, requests, labels, out=out, title=title, params=params)
    typer.echo(str(png))


def convert(
    source: str = typer.Argument(..., help="Adapter file/folder (or Hub id) in any supported layout."),
    out: Path = typer.Argument(..., help="Output .safetensors file or folder."),
    to: str = typer.Option("diffusers", "--to", help="diffusers|kohya|comfyui"),
) -> None:
    """Convert an SD3 LoRA between diffusers/peft, kohya and ComfyUI key layouts (exact)."""
    from sd35hub.adapters.files import read_adapter, write_adapter
    from sd35hub.adapters.formats import FORMATS
    from sd35hub.blend.engine import fetch_adapter_source
    from sd35hub.errors import ConfigError

    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    from sd35hub.train.variants import VARIANT_KINDS, convert_variant, file_variant_kind

    local, hub = fetch_adapter_source(source)
    if file_variant_kind(local) is not None:  # DoRA / LoKr / LoHa: only the layout that carries it, as is
        kind, file, count = convert_variant(local, out, to)
        typer.echo(f"{VARIANT_KINDS[kind]} -> {to}: {count} modules written to {file} (the same tensors)")
        _carry_embeddings(local, hub, Path(file))
        return
    adapter = read_adapter(local)
    file = write_adapter(
        adapter.modules, out, metadata=adapter.metadata, fmt=to, text_encoders=adapter.text_encoders
    )
    from sd35hub.adapters.formats import to_mmdit

    # kohya/ComfyUI fuse q, k, v into one MMDiT linear: count the modules the written file holds
    written = len(adapter.modules) if to == "diffusers" else len(to_mmdit(adapter.modules))
    fused = f" ({len(adapter.modules)} read; q, k, v fused)" if written != len(adapter.modules) else ""
    te = sum(len(m) for m in adapter.text_encoders.values())
    te_text = f" + {te} text-encoder modules" if te else ""
    typer.echo(f"{adapter.format} -> {to}: {written} LoRA modules{te_text} written to {file}{fused}")
    if to == "kohya":
        from sd35hub.adapters.formats_mmdit import kohya_training_note

        typer.echo(kohya_training_note(adapter.modules))
    _carry_embeddings(local, hub, Path(file))


def _carry_embeddings(local: Path, hub: dict, file: Path) -> None:
    """A pivotal adapter's ``embeddings.safetensors`` (beside it, or in its Hub repo at the same revision)
    goes next to the converted file, checked first: its clip_l / clip_g / t5xxl keys are already the layout
    diffusers, kohya and ComfyUI read, so it is copied as is (atomically)."""
    import os
    import shutil

    from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, FILE_KEYS, read_embeddings
    from sd35hub.blend.embeddings import find_embeddings

    found = find_embeddings(local, hub, token=None)
    if found is None:
        return
    # untrusted: keys, row counts, values, token strings (the widths are checked against a base when it loads)
    saved = read_embeddings(found, dims=dict.fromkeys(FILE_KEYS))
    target = file.parent / EMBEDDINGS_FILE
    if target.exists() and target.resolve() == found.resolve():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(found, partial)
    os.replace(partial, target)
    typer.echo(f"{EMBEDDINGS_FILE} ({', '.join(saved.tensors)}; tokens {' '.join(saved.tokens)}) copied to {target}: "
               "load it with the LoRA (its keys are the layout diffusers, kohya and ComfyUI read)")


def merge(
    adapters: list[str] = typer.Argument(
        ..., help="SOURCE:WEIGHT ... (local path or Hub id; weight default 1)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (adapter + README.md)."),
    base_model: str = typer.Option(
        "", "--base-model", help="Base model id for the card (default: from the sources)."
    ),
) -> None:
    """Merge a weighted blend into one adapter that reproduces it exactly (ranks concatenated)."""
    from sd35hub.blend.merge import write_merged

    items = [_split_weight(spec) for spec in adapters]
    file = write_merged(items, out, base_model=base_model)
    typer.echo(f"Merged {len(items)} adapters into {file} (card: {file.parent / 'README.md'})")


def adapter_info(source: str = typer.Argument(..., help="Adapter file/folder or Hub id.")) -> None:
    """Show an adapter's layout, ranks, alpha, targets and metadata."""
    from sd35hub.adapters.files import metadata_for, read_adapter
    from sd35hub.blend.engine import fetch_adapter_source
    from sd35hub.train.variants import file_variant_kind, variant_summary

    local = fetch_adapter_source(source)[0]
    if file_variant_kind(local) is not None:  # DoRA / LoKr / LoHa: not a low-rank pair
        info = variant_summary(local)
        typer.echo(f"file: {info['file']}")
        typer.echo(f"format: {info['layout']}  variant: {info['kind']}  modules: {info['modules']}")
        typer.echo(f"loads in: {info['loads_in']}; sd35hub generate and the Space (exact)")
        meta = info["metadata"]
        if meta is not None:
            typer.echo(f"rank: {meta.rank}  alpha: {meta.alpha:g}")
            typer.echo(f"base model: {meta.base_model or '?'} ({meta.variant or '?'})  sd35hub {meta.sd35hub_version}")
            if meta.trigger_words:
                typer.echo(f"trigger words: {', '.join(meta.trigger_words)}")
        return
    adapter = read_adapter(local)
    measured = metadata_for(adapter.modules)
    typer.echo(f"file: {adapter.path}")
    typer.echo(f"format: {adapter.format}")
    typer.echo(f"modules: {len(adapter.modules)}  rank: {measured.rank}  alpha: {measured.alpha:g}")
    for component, modules in adapter.text_encoders.items():
        typer.echo(f"text encoder {component}: {len(modules)} modules")
    if adapter.network_args:
        split = str(adapter.network_args.get("split_qkv", "False")).lower() == "true"
        typer.echo(
            f"kohya network_args: split_qkv={split}"
            + (" (qkv trained as 3 rank-r/3 parts: alpha applies per part)" if split else "")
        )
    if measured.rank_pattern or measured.alpha_pattern:
        typer.echo(
            f"per-module ranks/alphas differ on {len(measured.rank_pattern | measured.alpha_pattern)} modules"
        )
    if adapter.metadata is not None:
        meta = adapter.metadata
        typer.echo(
            f"base model: {meta.base_model or '?'} ({meta.variant or '?'})  sd35hub {meta.sd35hub_version}"
        )
        if meta.trigger_words:
            typer.echo(f"trigger words: {', '.join(meta.trigger_words)}")


def register(app: typer.Typer) -> None:
    """The adapter commands: generate, convert, merge, adapter-info."""
    app.command()(generate)
    app.command()(convert)
    app.command()(merge)
    app.command("adapter-info")(adapter_info)
