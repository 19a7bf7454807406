"""The one loading path: tiny, local diffusers folders from other tools, Hub ids (local test Hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sd35hub.errors import (
    ConfigError,
    HardwareError,
    LicenseNotAcceptedError,
    MissingDependencyError,
    ModelLoadError,
    RepoNotFoundError,
)
from sd35hub.models.load import (
    load_pipeline,
    load_text_encoders,
    load_transformer,
    load_vae,
    model_info,
    resolve_model,
)
from sd35hub.models.tiny import tiny_model_path

# transformer/config.json of the public diffusers-format repos
SD35_MEDIUM = {
    "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0.dev0",
    "attention_head_dim": 64, "caption_projection_dim": 1536,
    "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "sample_size": 128,
}  # fmt: skip
SD35_LARGE = {
    "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0.dev0",
    "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16,
    "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm",
    "sample_size": 128,
}  # fmt: skip
SD3_MEDIUM = {
    "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.29.0.dev0",
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128,
}  # fmt: skip
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


# -- variants -----------------------------------------------------------------------------------------
def test_variants_are_detected_from_the_config_not_the_name() -> None:
    from sd35hub.models.info import detect_variant, model_info_from_config

    assert detect_variant(SD35_MEDIUM) == "sd3.5-medium"
    assert detect_variant(SD35_LARGE) == "sd3.5-large"
    assert detect_variant({**SD35_LARGE, "dual_attention_layers": []}) == "sd3.5-large"
    assert detect_variant(SD3_MEDIUM) == "sd3-medium"
    # Large Turbo ships Large's configs: only a name can tell them apart, and only within Large
    assert (
        detect_variant(SD35_LARGE, None, FLOW_SCHEDULER, name_hint="me/sd-3.5-large-turbo-copy")
        == "sd3.5-large-turbo"
    )
    assert (
        detect_variant(SD35_MEDIUM, name_hint="stabilityai/stable-diffusion-3.5-large-turbo")
        == "sd3.5-medium"
    )
    assert (
        detect_variant({**SD35_LARGE, "_name_or_path": "stabilityai/stable-diffusion-3.5-large-turbo"})
        == "sd3.5-large-turbo"
    )
    assert detect_variant({**SD35_MEDIUM, "num_layers": 12}) == "custom"
    assert detect_variant({"_class_name": "FluxTransformer2DModel", "num_layers": 19}) == "custom"

    info = model_info_from_config("stabilityai/stable-diffusion-3.5-medium", SD35_MEDIUM)
    assert (info.variant, info.num_layers, info.hidden_size) == ("sd3.5-medium", 24, 1536)
    assert info.dual_attention_layers == tuple(range(13))
    assert (info.native_resolution, info.joint_attention_dim) == (1024, 4096)
    large = model_info_from_config("my/large", SD35_LARGE, {"text_encoder_3": [None, None]})
    assert (large.variant, large.num_layers, large.has_t5, large.max_resolution) == (
        "sd3.5-large",
        38,
        False,
        3072,
    )


def test_model_info_of_tiny_and_of_a_local_folder_reads_configs_only() -> None:
    info = model_info("tiny")
    assert (info.variant, info.num_layers, info.dual_attention_layers, info.qk_norm) == (
        "tiny",
        3,
        (0, 1),
        "rms_norm",
    )
    assert info.has_t5 and info.joint_attention_dim == 64
    # same folder given as a path: same answer
    assert model_info(str(tiny_model_path())).variant == "tiny"


# -- names --------------------------------------------------------------------------------------------
def test_resolve_model_kinds(tmp_path: Path) -> None:
    tiny = resolve_model("tiny")
    assert (tiny.is_hub, tiny.is_tiny, tiny.local_path) == (False, True, tiny_model_path())
    local = resolve_model(str(tiny_model_path()))
    assert (local.is_hub, local.local_path) == (False, tiny_model_path())
    hub = resolve_model("stabilityai/stable-diffusion-3.5-medium", revision="refs/pr/1")
    assert (hub.is_hub, hub.local_path, hub.revision) == (True, None, "refs/pr/1")


@pytest.mark.parametrize(
    "bad", ["", "   ", "a/b/c", "./missing-folder", "no spaces/allowed", "-x/y", "x/y--z", "x/.."]
)
def test_bad_model_names_say_what_a_valid_one_looks_like(bad: str) -> None:
    with pytest.raises(ModelLoadError, match="stabilityai/stable-diffusion-3.5-medium"):
        resolve_model(bad)


def test_folders_and_files_that_are_not_diffusers_models(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_model(str(tmp_path))
    single_file = tmp_path / "sd3.5_large.safetensors"
    single_file.write_bytes(b"{}")
    with pytest.raises(ModelLoadError, match="single file"):
        resolve_model(str(single_file))


# -- local folders written by other tools ---------------------------------------------------------
@pytest.fixture(scope="module")
def foreign_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD3 pipeline with other sizes than ours, saved sharded by diffusers like the real repos."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tiny = StableDiffusion3Pipeline.from_pretrained(tiny_model_path())  # for its tokenizers
    torch.manual_seed(1)
    clip = {"vocab_size": len(tiny.tokenizer), "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "eos_token_id": tiny.tokenizer.eos_token_id,
            "bos_token_id": tiny.tokenizer.bos_token_id}  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=48,
            caption_projection_dim=32,
            pooled_projection_dim=40,
            pos_embed_max_size=16,
        ),  # fmt: skip  (SD3-Medium style: no qk_norm, no dual attention)
        vae=AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 8, 8),
            latent_channels=16,
            norm_num_groups=4,
            shift_factor=0.0609,
            scaling_factor=1.5305,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),  # fmt: skip
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, **clip)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=24, **clip)),
        text_encoder_3=T5EncoderModel(
            T5Config(vocab_size=len(tiny.tokenizer_3), d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
        ),
        tokenizer=tiny.tokenizer,
        tokenizer_2=tiny.tokenizer_2,
        tokenizer_3=tiny.tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    folder = tmp_path_factory.mktemp("foreign") / "my-sd3-export"
    pipe.save_pretrained(folder, max_shard_size="20KB")
    return folder


def test_loads_a_foreign_sharded_folder_in_fp16(foreign_folder: Path) -> None:
    assert list((foreign_folder / "transformer").glob("diffusion_pytorch_model-0000*-of-*.safetensors"))
    pipe = load_pipeline(str(foreign_folder), dtype="fp16")
    assert pipe.transformer.dtype == torch.float16
    assert pipe.text_encoder_3.dtype == torch.float16
    assert pipe.transformer.config.num_layers == 2 and pipe.text_encoder_2.config.hidden_size == 24
    assert model_info(str(foreign_folder)).variant == "custom"


def test_foreign_folder_generates_and_bad_folders_give_typed_errors(
    foreign_folder: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(str(foreign_folder), dtype="fp32", drop_t5=True)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a cat", height=64, width=64, num_inference_steps=1, generator=torch.Generator().manual_seed(0)
    )
    assert image.images[0].size == (64, 64)

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(foreign_folder, broken)
    for shard in (broken / "transformer").glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated download
    with pytest.raises(ModelLoadError, match="complete SD3/SD3.5 diffusers model"):
        load_pipeline(str(broken))

    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(
        '{"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}'
    )
    with pytest.raises(ModelLoadError, match="not Stable Diffusion 3"):
        load_pipeline(str(other))


def test_components_of_tiny_with_requested_dtypes(tmp_path: Path) -> None:
    transformer = load_transformer("tiny", dtype="bf16")
    assert transformer.dtype == torch.bfloat16 and tuple(transformer.config.dual_attention_layers) == (0, 1)
    vae = load_vae("tiny", dtype=torch.float16)
    assert vae.dtype == torch.float16 and vae.config.scaling_factor == 1.5305

    text = load_text_encoders("tiny")
    assert text.transformer is None and text.vae is None
    prompt_embeds, _, pooled_prompt_embeds, _ = text.encode_prompt(
        "a cat", None, None, do_classifier_free_guidance=False
    )
    assert prompt_embeds.shape == (1, 77 + 256, 64) and pooled_prompt_embeds.shape == (1, 64)

    # a bare transformer folder (what a full fine-tune saves) loads too
    transformer.save_pretrained(tmp_path / "my-transformer")
    assert load_transformer(str(tmp_path / "my-transformer")).config.num_layers == 3


def test_options_that_cannot_work_here_fail_before_loading() -> None:
    with pytest.raises(ConfigError, match="model.dtype"):
        load_pipeline("tiny", dtype="fp8")
    with pytest.raises(ConfigError, match="model.quantize"):
        load_pipeline("tiny", quantize="q4")
    with pytest.raises(ConfigError, match="model.attention"):
        load_pipeline("tiny", attention="flash")
    expected_quant = (
        MissingDependencyError if importlib.util.find_spec("bitsandbytes") is None else HardwareError
    )
    if torch.cuda.is_available() and expected_quant is HardwareError:
        pytest.skip("bitsandbytes and a GPU are present: quantization would work")
    with pytest.raises(expected_quant, match="quant|CUDA"):
        load_transformer("tiny", quantize="nf4")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(MissingDependencyError, match=r"sd35hub\[xformers\]"):
            load_pipeline("tiny", attention="xformers")


# -- Hub ids (local test Hub, real huggingface_hub client) --------------------------------------------
def _tiny_repo_files() -> dict[str, bytes]:
    folder = tiny_model_path()
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # What SD3.5 repos also hold and must never be downloaded for a diffusers load:
    files["sd3.5_tiny.safetensors"] = b"\0" * 1024  # the single-file checkpoint at the root
    files["text_encoders/clip_g.safetensors"] = b"\0" * 16
    files["transformer/diffusion_pytorch_model.bin"] = b"pickle"
    return files


def test_hub_model_downloads_only_the_needed_component_files(hub) -> None:
    hub.seed_repo("alice/tiny-sd35-hub", _tiny_repo_files())
    hub.clear_requests()
    pipe = load_pipeline("alice/tiny-sd35-hub", drop_t5=True)
    assert pipe.transformer.config.qk_norm == "rms_norm" and pipe.text_encoder_3 is None
    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.downloads("alice/tiny-sd35-hub")}
    assert "transformer/diffusion_pytorch_model.safetensors" in fetched and "model_index.json" in fetched
    assert not [
        f for f in fetched if f.startswith(("sd3.5_", "text_encoders/", "text_encoder_3/", "tokenizer_3/"))
    ]
    assert not [f for f in fetched if f.endswith(".bin")]
    assert hub.api_calls("/auth-check")  # access was checked first

    info = model_info("alice/tiny-sd35-hub")
    assert info.variant == "tiny"


def test_cached_hub_model_loads_offline(hub, monkeypatch) -> None:
    from huggingface_hub import constants

    hub.seed_repo("alice/tiny-sd35-offline", _tiny_repo_files())
    load_pipeline("alice/tiny-sd35-offline", drop_t5=True)  # online: checks access, fills the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    hub.clear_requests()
    pipe = load_pipeline("alice/tiny-sd35-offline", drop_t5=True)
    assert pipe.transformer is not None and model_info("alice/tiny-sd35-offline").variant == "tiny"
    assert hub.requests == []  # no access check, no download: the cache served it


def test_gated_hub_model_not_accepted_raises_before_any_download(hub) -> None:
    hub.seed_repo("bob/gated-sd35", _tiny_repo_files(), gated=True, owner_token=hub.other_token)
    hub.clear_requests()
    with pytest.raises(LicenseNotAcceptedError, match="bob/gated-sd35"):
        load_pipeline("bob/gated-sd35")
    assert hub.downloads("bob/gated-sd35") == []
    hub.grant("bob/gated-sd35", "alice")
    assert load_transformer("bob/gated-sd35").config.num_layers == 3


def test_missing_hub_model_is_repo_not_found(hub) -> None:
    with pytest.raises(RepoNotFoundError, match="alice/does-not-exist"):
        load_pipeline("alice/does-not-exist")
