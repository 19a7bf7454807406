"""Pivotal tuning / textual inversion (train.new_tokens) on the tiny model: only the new embedding rows
train, the schedule freezes them, embeddings.safetensors loads through stock diffusers'
load_textual_inversion and reproduces the trained model's output, hostile files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, read_embeddings, save_embeddings
from sd35hub.config import Config, DataSpec, LoraSpec, ModelSpec, TrainSpec, load_config
from sd35hub.errors import AdapterError, ConfigError
from sd35hub.models.tiny import CLIP_HIDDEN, T5_D_MODEL
from sd35hub.train.pivotal import PivotalTokens

TOKENS = ["<s0>", "<s1>"]
TINY_DIMS = {"clip_l": CLIP_HIDDEN, "clip_g": CLIP_HIDDEN, "t5": T5_D_MODEL}
PROMPT = "a photo of <s0><s1> on a table"


def _text_pipe():
    from sd35hub.models.load import load_text_encoders

    pipe = load_text_encoders("tiny")
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        encoder.requires_grad_(False)
    return pipe


def _stock_pipeline_class():
    """What the card tells users: StableDiffusion3Pipeline lacks the mixin; a subclass adds diffusers' own."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders import TextualInversionLoaderMixin

    class SD3WithEmbeddings(TextualInversionLoaderMixin, StableDiffusion3Pipeline):
        pass

    return SD3WithEmbeddings


def _encode(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    pe, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
    return pe, pooled


@pytest.mark.slow
def test_only_the_new_rows_train_and_the_base_rows_stay_exactly_unchanged():
    pipe = _text_pipe()
    before = {
        n: getattr(pipe, a).get_input_embeddings().weight.detach().clone()
        for n, a in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3"))
    }
    plain_before = _encode(pipe, "a photo of a dog on a table")[0]
    tokens = PivotalTokens.insert(pipe, TOKENS, encoders=("clip_l", "clip_g", "t5"), init="", seed=3)
    start = tokens.state()
    # weight decay on: it must not reach the base rows (they are in no optimizer group)
    optimizer = torch.optim.AdamW(tokens.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        pe, pooled = _encode(pipe, PROMPT)
        (pe.square().mean() + pooled.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    tokens.sync()
    for name, rows in tokens.state().items():
        assert not torch.equal(rows, start[name]), f"{name}: the new rows did not train"
        weight = getattr(
            pipe, {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}[name]
        )
        weight = weight.get_input_embeddings().weight
        ids = tokens.rows[name].ids
        assert not weight.requires_grad
        assert torch.equal(weight[: before[name].shape[0]][: min(ids)], before[name][: min(ids)])  # bit-exact
        if weight.shape[0] > max(ids) + 1:  # T5's spare rows past the vocabulary are untouched too
            assert torch.equal(weight[max(ids) + 1 :], before[name][max(ids) + 1 :])
        assert torch.equal(weight[ids].float(), rows)
    assert torch.equal(
        _encode(pipe, "a photo of a dog on a table")[0], plain_before
    )  # prompts without them: same


def test_tokens_already_in_the_vocabulary_are_refused():
    pipe = _text_pipe()
    PivotalTokens.insert(pipe, TOKENS, encoders=("clip_l",))
    with pytest.raises(ConfigError, match="already in the .* vocabulary"):
        PivotalTokens.insert(pipe, TOKENS, encoders=("clip_l",))


def test_saved_embeddings_load_through_stock_load_textual_inversion_and_give_the_same_prompt_embeddings(
    tmp_path,
):
    from sd35hub.models.tiny import tiny_model_path

    pipe = _text_pipe()
    tokens = PivotalTokens.insert(pipe, TOKENS, encoders=("clip_l", "clip_g"), seed=5)
    with torch.no_grad():
        for p in tokens.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))  # "trained"
    ours = _encode(pipe, PROMPT)
    path = save_embeddings(tokens.state(), tmp_path / EMBEDDINGS_FILE, tokens=tokens.tokens)

    stock = _stock_pipeline_class().from_pretrained(str(tiny_model_path()))
    state = load_file(str(path))
    assert set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape == (2, CLIP_HIDDEN)
    stock.load_textual_inversion(
        state["clip_l"], token=TOKENS, text_encoder=stock.text_encoder, tokenizer=stock.tokenizer
    )
    stock.load_textual_inversion(
        state["clip_g"], token=TOKENS, text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2
    )
    theirs = _encode(stock, PROMPT)
    # the CLIP parts (where the rows act) bit for bit; T5 (not trained, loaded separately) to float noise
    assert torch.equal(ours[0][:, :77], theirs[0][:, :77]) and torch.equal(ours[1], theirs[1])
    assert torch.allclose(ours[0], theirs[0], atol=1e-4)
    assert not torch.equal(ours[0], _encode(_text_pipe(), PROMPT)[0])  # the rows matter


def _write(path: Path, tensors: dict[str, torch.Tensor], tokens: list[str] | None = TOKENS) -> Path:
    save_file(tensors, str(path), metadata={"tokens": json.dumps(tokens)} if tokens is not None else None)
    return path


def test_a_good_file_reads_back_and_one_without_token_names_gets_s0_s1(tmp_path):
    rows = {"clip_l": torch.randn(2, CLIP_HIDDEN), "clip_g": torch.randn(2, CLIP_HIDDEN)}
    saved = read_embeddings(
        save_embeddings(rows, tmp_path / "e.safetensors", tokens=["<me0>", "<me1>"]), dims=TINY_DIMS
    )
    assert saved.tokens == ["<me0>", "<me1>"] and saved.trigger == "<me0><me1>"
    assert torch.equal(saved.tensors["clip_l"], rows["clip_l"])
    kohya = read_embeddings(_write(tmp_path / "k.safetensors", rows, tokens=None), dims=TINY_DIMS)
    assert kohya.tokens == TOKENS


@pytest.mark.parametrize(
    ("tensors", "tokens", "message"),
    [
        (
            {"clip_l": torch.randn(2, 768)},
            TOKENS,
            r"clip_l is F32 \[2, 768\]; the base's clip_l encoder needs float \[N, 32\]",
        ),
        ({"clip_l": torch.randn(2, CLIP_HIDDEN, 1)}, TOKENS, "needs float"),
        ({"clip_l": torch.zeros(2, CLIP_HIDDEN, dtype=torch.int32)}, TOKENS, "needs float"),
        (
            {"clip_l": torch.randn(2, CLIP_HIDDEN), "clip_g": torch.randn(3, CLIP_HIDDEN)},
            TOKENS,
            "same number of rows",
        ),
        ({"clip_l": torch.randn(65, CLIP_HIDDEN)}, None, "1 to 64"),
        ({"clip_l": torch.full((2, CLIP_HIDDEN), float("nan"))}, TOKENS, "NaN or infinite"),
        (
            {"clip_l": torch.randn(2, CLIP_HIDDEN), "emb_params": torch.randn(2, CLIP_HIDDEN)},
            TOKENS,
            "holds the keys",
        ),
        ({"clip_l": torch.randn(2, CLIP_HIDDEN)}, ["<lora:evil/x:1>", "<s1>"], "not a plain token"),
        (
            {"clip_l": torch.randn(2, CLIP_HIDDEN)},
            ["<s0>", "<img src=x onerror=alert(1)>"],
            "not a plain token",
        ),
        ({"clip_l": torch.randn(2, CLIP_HIDDEN)}, ["<s0>", "<s0>"], "all different"),
        ({"clip_l": torch.randn(2, CLIP_HIDDEN)}, ["<s0>"], "1 tokens for 2 embedding rows"),
    ],
)
def test_hostile_embedding_files_are_refused_with_a_message(tmp_path, tensors, tokens, message):
    with pytest.raises(AdapterError, match=message):
        read_embeddings(_write(tmp_path / "bad.safetensors", tensors, tokens), dims=TINY_DIMS)


def test_huge_and_unreadable_embedding_files_are_refused_before_reading(tmp_path):
    huge = tmp_path / "huge.safetensors"
    with huge.open("wb") as f:
        f.truncate(40 * 1024**2)  # sparse: 40 MiB of nothing
    with pytest.raises(AdapterError, match="MiB; an embeddings file is a few KB"):
        read_embeddings(huge, dims=TINY_DIMS)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="not a readable safetensors embeddings file"):
        read_embeddings(junk, dims=TINY_DIMS)


def test_pivotal_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "train.new_tokens=2",
                "train.token_name=S!",
                "train.token_encoders=[clip_l,bert]",
                "train.embedding_fraction=1.5",
                "train.embedding_lr=0",
            ],
        )
    text = str(err.value)
    for field in ("token_name", "token_encoders", "embedding_fraction", "embedding_lr"):
        assert f"train.{field}" in text
    with pytest.raises(ConfigError, match="does not contain the new tokens <s0><s1>"):
        load_config(None, ["train.new_tokens=2", "data.trigger_word=sks dog"])
    with pytest.raises(ConfigError, match="model.drop_t5"):
        load_config(None, ["train.new_tokens=1", "train.token_encoders=[clip_l,t5]", "model.drop_t5=true"])
    assert load_config(None, ["train.new_tokens=2", "data.trigger_word=<s0><s1> dog"]).train.new_tokens == 2


# ------------------------------------------------------------------------------------- training
def pivotal_config(output: Path, cache: Path, **train: object) -> Config:
    defaults = dict(
        output_dir=str(output),
        max_steps=6,
        batch_size=2,
        learning_rate=2e-3,
        validation_steps=1,
        checkpoint_every=3,
        log_every=1,
        seed=7,
        new_tokens=2,
        embedding_lr=2e-2,
        embedding_steps=3,
    )
    defaults.update(train)
    return Config(
        model=ModelSpec(name="tiny"),
        data=DataSpec(source="sample", resolution=64, max_samples=8, holdout=2, cache_dir=str(cache)),
        lora=LoraSpec(rank=4, alpha=8.0),
        train=TrainSpec(**defaults),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One pivotal run (6 steps, rows train for the first 3), and the trained model's own latents for PROMPT."""
    from sd35hub.train.recipe import Trainer

    root = tmp_path_factory.mktemp("pivotal")
    trainer = Trainer(pivotal_config(root / "run", root / "cache"), log=lambda s: None, progress=False)
    try:
        trainer.setup()
        start_rows = trainer.pivotal.tokens.state()
        trainer.train()
        result = trainer.save()
        from sd35hub.train.validation import EncodedPrompts

        cached = EncodedPrompts(
            [PROMPT],
            {
                "prompt_embeds": torch.zeros(1, 77 + 77, T5_D_MODEL),
                "pooled_prompt_embeds": torch.zeros(1, 2 * CLIP_HIDDEN),
            },
        )
        from sd35hub.train.live_text import live_prompts

        live = live_prompts(cached, trainer.text).embeds  # the CLIP parts, as the trained rows give them
        yield {
            "root": root,
            "out": root / "run",
            "result": result,
            "start_rows": start_rows,
            "live": live,
            "trainer_transformer": trainer.acc.unwrap_model(trainer.transformer),
        }
    finally:
        trainer.cleanup()


@pytest.mark.slow
def test_pivotal_training_lowers_the_heldout_loss_and_freezes_the_rows_at_embedding_steps(trained):
    out, result = trained["out"], trained["result"]
    assert result.validation_loss < result.initial_validation_loss
    final = read_embeddings(out / "adapter" / EMBEDDINGS_FILE, dims=TINY_DIMS)
    at_pivot = read_embeddings(
        out / "checkpoints" / "checkpoint-000003" / "adapter" / EMBEDDINGS_FILE, dims=TINY_DIMS
    )
    assert final.tokens == TOKENS and set(final.tensors) == {"clip_l", "clip_g"}
    for name in ("clip_l", "clip_g"):
        assert not torch.equal(at_pivot.tensors[name], trained["start_rows"][name])  # trained for 3 steps
        assert torch.equal(final.tensors[name], at_pivot.tensors[name])  # then frozen
    lora_pivot = load_file(
        str(out / "checkpoints" / "checkpoint-000003" / "adapter" / "pytorch_lora_weights.safetensors")
    )
    lora_final = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(lora_pivot[k], lora_final[k]) for k in lora_final)  # the LoRA went on alone
    config = (out / "training_config.yaml").read_text()
    assert "trigger_word: <s0><s1>" in config


@pytest.mark.slow
def test_stock_diffusers_with_the_lora_and_embeddings_reproduces_the_trained_model(trained):
    from sd35hub.models.tiny import tiny_model_path

    out = trained["out"]
    stock = _stock_pipeline_class().from_pretrained(str(tiny_model_path()))
    stock.load_lora_weights(str(out / "adapter"), weight_name="pytorch_lora_weights.safetensors")
    state = load_file(str(out / "adapter" / EMBEDDINGS_FILE))
    stock.load_textual_inversion(
        state["clip_l"], token=TOKENS, text_encoder=stock.text_encoder, tokenizer=stock.tokenizer
    )
    stock.load_textual_inversion(
        state["clip_g"], token=TOKENS, text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2
    )
    pe, pooled = _encode(stock, PROMPT)
    clip = trained["live"]["prompt_embeds"][:, :77, : 2 * CLIP_HIDDEN]
    assert torch.allclose(
        pe[:, :77, : 2 * CLIP_HIDDEN], clip, atol=1e-5
    )  # the trained rows, via stock loading
    assert torch.allclose(pooled, trained["live"]["pooled_prompt_embeds"], atol=1e-5)

    def render(transformer):
        generator = torch.Generator().manual_seed(0)
        pipe = (
            stock
            if transformer is None
            else stock.__class__(**{**stock.components, "transformer": transformer})
        )
        with torch.no_grad():
            return pipe(
                prompt_embeds=pe,
                pooled_prompt_embeds=pooled,
                height=64,
                width=64,
                num_inference_steps=2,
                guidance_scale=1.0,
                generator=generator,
                output_type="latent",
            ).images

    assert torch.allclose(
        render(None), render(trained["trainer_transformer"]), atol=1e-4
    )  # LoRA loaded = trained


@pytest.mark.slow
def test_the_cards_snippet_loads_lora_and_embeddings_and_runs(trained, monkeypatch):
    out = trained["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embeddings"]["tokens"] == TOKENS and summary["embeddings"]["keys"] == ["clip_l", "clip_g"]
    card = (out / "README.md").read_text()
    assert "`<s0><s1>` are new tokens" in card and "embedding:NAME" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert (
        'pipe.load_textual_inversion(embeddings["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2'
        in snippet
    )
    snippet = snippet.replace('image.save("sample.png")', "")  # run it as a user would, in the output folder
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), scope)  # noqa: S102 - our own generated card
    pipe = scope["pipe"]
    assert (
        pipe.tokenizer.convert_tokens_to_ids("<s1>")
        == pipe.text_encoder.get_input_embeddings().weight.shape[0] - 1
    )
    rows = load_file(str(out / "adapter" / EMBEDDINGS_FILE))["clip_g"]
    ids = pipe.tokenizer_2.convert_tokens_to_ids(TOKENS)
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids], rows)
    assert scope["image"].size[0] > 0  # it rendered


@pytest.mark.slow
def test_publication_uploads_the_embeddings_and_refuses_a_bad_one(trained, tmp_path):
    import shutil

    from sd35hub.hub.publish import plan_publication

    files, _ = plan_publication(trained["out"], "alice/subject")
    by_path = {f.path_in_repo: f for f in files}
    assert by_path[EMBEDDINGS_FILE].content == (trained["out"] / "adapter" / EMBEDDINGS_FILE).read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(trained["out"], broken, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    save_file(
        {"clip_l": torch.full((2, CLIP_HIDDEN), float("inf"))},
        str(broken / "adapter" / EMBEDDINGS_FILE),
        metadata={"tokens": json.dumps(TOKENS)},
    )
    with pytest.raises(AdapterError, match="NaN or infinite"):
        plan_publication(broken, "alice/subject")


# ------------------------------------------------------------------ generate / the blend engine / the Space
def _engine_request(**kwargs):
    from sd35hub.blend.request import GenerationRequest

    base = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "guidance_scale": 4.5, "seed": 4}
    return GenerationRequest(**{**base, **kwargs})


def _pixels(images: list):
    import numpy as np

    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.mark.slow
def test_the_engine_loads_the_embeddings_with_the_adapter_and_its_snippet_reproduces_the_image(trained, hub):
    import numpy as np

    from sd35hub.blend.engine import BlendEngine
    from sd35hub.blend.request import AdapterRef

    folder = trained["out"] / "adapter"
    engine = BlendEngine("tiny")
    result = engine.generate(
        _engine_request(adapters=[AdapterRef(str(folder), 1.0)], insert_trigger_words=False)
    )
    assert result.params["adapters"][0]["embeddings"]["tokens"] == TOKENS
    snippet = result.diffusers_snippet()
    assert "load_textual_inversion" in snippet
    scope: dict = {}
    exec(compile(snippet, "<snippet>", "exec"), scope)  # noqa: S102 - only diffusers + torch, as a user runs it
    assert np.array_equal(_pixels(scope["images"]), _pixels(result.images))
    # without the embeddings the same adapter draws another image: the rows are in use
    bare = trained["root"] / "bare"
    bare.mkdir()
    (bare / "pytorch_lora_weights.safetensors").write_bytes(
        (folder / "pytorch_lora_weights.safetensors").read_bytes()
    )
    plain = engine.generate(
        _engine_request(adapters=[AdapterRef(str(bare), 1.0)], insert_trigger_words=False)
    )
    assert np.abs(_pixels(plain.images) - _pixels(result.images)).max() > 0
    # from the Hub (generate and the Space: owner/repo), embeddings.safetensors beside the adapter
    hub.seed_repo("alice/subject-pivotal", {
        "pytorch_lora_weights.safetensors": (folder / "pytorch_lora_weights.safetensors").read_bytes(),
        EMBEDDINGS_FILE: (folder / EMBEDDINGS_FILE).read_bytes(),
    })  # fmt: skip
    remote = engine.generate(
        _engine_request(adapters=[AdapterRef("alice/subject-pivotal", 1.0)], insert_trigger_words=False)
    )
    assert np.array_equal(_pixels(remote.images), _pixels(result.images))
    # two adapters that both define <s0><s1> cannot share a prompt
    with pytest.raises(ConfigError, match="both define the token <s0>"):
        engine.generate(_engine_request(adapters=[AdapterRef(str(folder), 0.5),
                                                  AdapterRef("alice/subject-pivotal", 0.5)]))  # fmt: skip


@pytest.mark.slow
def test_the_engine_refuses_a_hostile_embeddings_file_beside_an_adapter(trained, tmp_path):
    from sd35hub.blend.engine import BlendEngine
    from sd35hub.blend.request import AdapterRef

    folder = tmp_path / "evil"
    folder.mkdir()
    lora = trained["out"] / "adapter" / "pytorch_lora_weights.safetensors"
    (folder / "pytorch_lora_weights.safetensors").write_bytes(lora.read_bytes())
    save_file({"clip_l": torch.randn(2, CLIP_HIDDEN)}, str(folder / EMBEDDINGS_FILE),
              metadata={"tokens": json.dumps(["<lora:alice/other:2>", "<s1>"])})  # fmt: skip
    engine = BlendEngine("tiny")
    with pytest.raises(AdapterError, match=r"The embeddings of adapter .*evil.*not a plain token"):
        engine.generate(_engine_request(adapters=[AdapterRef(str(folder), 1.0)]))
    assert engine.loaded_adapters == []  # refused before the LoRA went in


@pytest.mark.slow
def test_a_run_resumed_before_the_pivot_ends_where_the_uninterrupted_one_does(trained):
    """Resumed at step 2 (rows still training): the rows, their optimizer state and the freeze at step 3 carry over."""
    from sd35hub.train import recipe

    root = trained["root"]
    first = pivotal_config(root / "part", root / "cache", max_steps=2, checkpoint_every=2)
    recipe.train(first, log=lambda s: None, progress=False)
    checkpoint = root / "part" / "checkpoints" / "checkpoint-000002"
    resumed = pivotal_config(root / "resumed", root / "cache", resume=str(checkpoint))
    recipe.train(resumed, log=lambda s: None, progress=False)
    ours = load_file(str(root / "resumed" / "adapter" / EMBEDDINGS_FILE))
    theirs = load_file(str(trained["out"] / "adapter" / EMBEDDINGS_FILE))
    assert set(ours) == set(theirs) and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    lora = load_file(str(root / "resumed" / "adapter" / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(trained["out"] / "adapter" / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(lora[k], reference[k], atol=1e-6) for k in reference)


@pytest.mark.slow
def test_cli_flags_reach_the_config_and_the_plan_counts_the_live_encoders(tmp_path, capsys):
    from cli_helpers import run_cli

    from sd35hub.frontends.commands.train import build_overrides

    cfg = load_config(None, build_overrides({"new_tokens": 2, "embedding_lr": 1e-3}, []))
    assert (cfg.train.new_tokens, cfg.train.embedding_lr) == (2, 1e-3)
    code, out, err = run_cli(["train", "--dry-run", "--model", "tiny", "--dataset", "sample", "--profile", "cpu",
                              "--new-tokens", "2", "-o", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 0, err
    assert "CLIP-L, CLIP-G" in out and "kept, run every step" in out  # the memory plan keeps the encoders
    code, out, err = run_cli(["train", "--dry-run", "--model", "tiny", "--dataset", "sample", "--new-tokens", "2",
                              "--trigger-word", "sks dog"], capsys)  # fmt: skip
    assert code == 2 and "does not contain the new tokens <s0><s1>" in out + err


@pytest.mark.slow
def test_t5_rows_train_when_asked_and_load_into_t5_through_stock_diffusers(tmp_path):
    from sd35hub.models.tiny import tiny_model_path
    from sd35hub.train.recipe import Trainer

    cfg = pivotal_config(tmp_path / "run", tmp_path / "cache", max_steps=2, checkpoint_every=0,
                         token_encoders=("clip_l", "clip_g", "t5"))  # fmt: skip
    trainer = Trainer(cfg, log=lambda s: None, progress=False)
    try:
        trainer.setup()
        start = trainer.pivotal.tokens.state()
        trainer.train()
        trainer.save()
        with torch.no_grad():
            live_t5 = trainer.text.t5([PROMPT])
    finally:
        trainer.cleanup()
    state = load_file(str(tmp_path / "run" / "adapter" / EMBEDDINGS_FILE))
    assert set(state) == {"clip_l", "clip_g", "t5xxl"} and state["t5xxl"].shape == (2, T5_D_MODEL)
    assert not torch.equal(state["t5xxl"], start["t5"])  # T5's rows trained
    stock = _stock_pipeline_class().from_pretrained(str(tiny_model_path()))
    stock.load_textual_inversion(
        state["t5xxl"], token=TOKENS, text_encoder=stock.text_encoder_3, tokenizer=stock.tokenizer_3
    )
    with torch.no_grad():
        theirs = stock._get_t5_prompt_embeds([PROMPT], max_sequence_length=cfg.data.max_sequence_length)
    assert torch.allclose(theirs, live_t5.to(theirs.dtype), atol=1e-5)


def test_the_notebooks_subject_path_takes_new_tokens():
    import json as _json

    from sd35hub.frontends import colab as nb

    plan = nb.build_plan(model="tiny", dataset="sample", trigger_word="<s0><s1> shape", new_tokens=2)
    assert plan.config.train.new_tokens == 2 and plan.config.data.trigger_word == "<s0><s1> shape"
    with pytest.raises(ConfigError, match="does not contain the new tokens"):
        nb.build_plan(model="tiny", dataset="sample", trigger_word="sks shape", new_tokens=2)
    notebook = _json.loads((Path(__file__).parents[1] / "colab" / "SD35_Training.ipynb").read_text())
    code = "".join(line for cell in notebook["cells"] for line in cell.get("source", []))
    assert "NEW_TOKENS = 0" in code and "new_tokens=NEW_TOKENS" in code  # the config cell passes it on


@pytest.mark.slow
def test_two_processes_train_and_freeze_the_rows_like_one_with_accumulation(tmp_path):
    """The encoders are outside DDP: the rows' gradients are averaged with the unsynced tensors while they
    train, and once frozen (embedding_steps=2 of 4) they get no zero-gradient update from the averaging."""
    import yaml
    from test_train_ddp import CONFIG, _adapter, _launch, _max_diff

    from sd35hub.train import recipe

    config = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp_path / "cache"), "trigger_word": ""},
              "train": {**CONFIG["train"], "max_steps": 4, "checkpoint_every": 2, "new_tokens": 2,
                        "embedding_lr": 2e-2, "embedding_steps": 2}}  # fmt: skip
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe.train(load_config(config_file, ["train.gradient_accumulation=2", f"train.output_dir={tmp_path / 'one'}"]),
                     log=lambda s: None, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    two = _launch(["-m", "sd35hub", "train", "--config", str(config_file), "--output", str(tmp_path / "two")])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    rows = {n: load_file(str(tmp_path / n / "adapter" / EMBEDDINGS_FILE)) for n in ("one", "two")}
    assert _max_diff(rows["one"], rows["two"]) <= 1e-5
    pivot = load_file(
        str(tmp_path / "two" / "checkpoints" / "checkpoint-000002" / "adapter" / EMBEDDINGS_FILE)
    )
    assert _max_diff(pivot, rows["two"]) == 0  # frozen after step 2 on both processes
    assert _max_diff(_adapter(tmp_path / "one"), _adapter(tmp_path / "two")) <= 1e-5


@pytest.mark.slow
def test_convert_carries_the_checked_embeddings_next_to_the_converted_file(trained, tmp_path, capsys):
    """`convert` of a pivotal adapter writes its embeddings.safetensors beside the output, tensor for tensor;
    a hostile embeddings file beside an adapter stops the convert with the reason."""
    from cli_helpers import run_cli

    adapter = trained["out"] / "adapter"
    code, out, err = run_cli(["convert", str(adapter), str(tmp_path / "kohya" / "lora.safetensors"),
                              "--to", "kohya"], capsys)  # fmt: skip
    assert code == 0, err
    assert "embeddings.safetensors" in out
    copied = load_file(str(tmp_path / "kohya" / EMBEDDINGS_FILE))
    original = load_file(str(adapter / EMBEDDINGS_FILE))
    assert copied.keys() == original.keys() and all(torch.equal(copied[k], original[k]) for k in original)

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "pytorch_lora_weights.safetensors").write_bytes((adapter / "pytorch_lora_weights.safetensors").read_bytes())
    save_file({"clip_l": torch.randn(2, CLIP_HIDDEN)}, str(evil / EMBEDDINGS_FILE),
              metadata={"tokens": json.dumps(["<lora:alice/other:2>", "<s1>"])})  # fmt: skip
    code, out, err = run_cli(["convert", str(evil), str(tmp_path / "out" / "lora.safetensors"), "--to", "comfyui"],
                             capsys)  # fmt: skip
    assert code != 0 and "not a plain token" in out + err
    assert not (tmp_path / "out" / EMBEDDINGS_FILE).exists()
