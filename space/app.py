"""Streamlit Space: browse, blend and compare published SD3.5 LoRA adapters.

UI only: every decision (bases, adapter sources, limits, requests, error wording) lives in
sd35hub.space_support; generation in sd35hub.blend.BlendEngine. One engine per base is shared by all
sessions (st.cache_resource; its lock serialises "set adapters + generate"); each user's choices
live in st.session_state. Run locally with `make space` (the tiny model when there is no GPU).
"""

from __future__ import annotations

import streamlit as st

from sd35hub import space_support as space
from sd35hub.schedulers import SCHEDULERS

st.set_page_config(page_title="SD3.5 LoRA blender", page_icon="🎨", layout="wide")
state = st.session_state
state.setdefault("adapters", [])  # list[space.AdapterChoice]: this user's blend
state.setdefault("history", [])  # list[dict]: this user's results, newest last
state.setdefault("search_results", None)  # list[AdapterInfo] | None
state.setdefault("hub_unreachable", False)
state.setdefault("messages", [])  # errors from button callbacks, shown once


@st.cache_resource(show_spinner="Loading the base model (once for all users)…", max_entries=2)
def shared_engine(model: str):  # noqa: ANN201 - BlendEngine
    return space.load_engine(model)


def user_token() -> str | None:
    return (state.get("user_token") or "").strip() or None


def report(exc: BaseException) -> None:
    state.messages.append(space.friendly_error(exc, user_token()))


def add_adapter(choice: space.AdapterChoice) -> None:
    if any(existing.source == choice.source for existing in state.adapters):
        return
    if len(state.adapters) >= space.MAX_ADAPTERS:
        state.messages.append(f"At most {space.MAX_ADAPTERS} adapters per image: remove one first.")
        return
    state.adapters.append(choice)


def on_search(base: space.BaseChoice) -> None:
    try:
        state.search_results = space.search_adapters(base, state.get("search_query"), token=user_token())
        state.hub_unreachable = False
    except Exception as exc:  # noqa: BLE001 - shown as a message
        state.search_results = []
        state.hub_unreachable = type(exc).__name__ == "HubRequestError"
        report(exc)


def on_add_pasted(base: space.BaseChoice) -> None:
    try:
        add_adapter(space.lookup_adapter(state.get("paste_source", ""), base, token=user_token()))
        state.paste_source = ""
    except Exception as exc:  # noqa: BLE001
        report(exc)


def on_add_samples(base: space.BaseChoice) -> None:
    try:
        for choice in space.sample_choices(base):
            add_adapter(choice)
    except Exception as exc:  # noqa: BLE001
        report(exc)


def on_remove(source: str) -> None:
    state.adapters = [choice for choice in state.adapters if choice.source != source]


def roll_seed() -> None:
    if state.get("random_seed", True):
        state.seed = space.new_seed()


# --- sidebar: base model and token -----------------------------------------------------------------
bases = space.available_bases()
with st.sidebar:
    st.header("Base model")
    base = st.selectbox("Base model", bases, format_func=lambda b: b.label, key="base_choice")
    if any(choice.base_model and choice.base_model != base.hub_base for choice in state.adapters):
        state.adapters = [c for c in state.adapters if not c.base_model or c.base_model == base.hub_base]
        st.info("Adapters made for another base were removed from your blend.")
    st.text_input(
        "Your Hugging Face token (optional, for private adapters)",
        type="password",
        key="user_token",
        help="Used only for your own downloads in this session; never shown or stored.",
    )
    st.caption(
        "SD3.5 weights are under the Stability AI Community License. "
        f"Limits: {space.MAX_ADAPTERS} adapters per image, prompts up to {space.MAX_PROMPT_CHARS} characters."
    )

st.title("SD3.5 LoRA blender")
st.caption("Find adapters on the Hub, blend them with weights, compare with the base model, take the code.")

try:
    engine = shared_engine(base.model)
except Exception as exc:  # noqa: BLE001 - gated base, missing model, OOM: a message, not a traceback
    st.error(space.friendly_error(exc))
    st.stop()

if "query_adapters_done" not in state:  # a shared link (?adapter=owner/repo:0.8) preselects a blend, once
    state.query_adapters_done = True
    preselected, problems = space.adapters_from_query(
        st.query_params.get_all("adapter"), base, token=user_token()
    )
    state.adapters = preselected
    state.messages.extend(problems)

for message in state.messages:
    st.error(message)
state.messages = []

# --- adapters ------------------------------------------------------------------------------------
find, blend = st.columns([3, 2], gap="large")
with find:
    st.subheader("Find adapters")
    if state.search_results is None:
        on_search(base)  # first visit: the most downloaded adapters of this base
        for message in state.messages:
            st.error(message)
        state.messages = []
    query_col, button_col = st.columns([4, 1], vertical_alignment="bottom")
    query_col.text_input("Search adapters", key="search_query", placeholder="watercolor, ink, portrait…")
    button_col.button("Search", key="search", on_click=on_search, args=(base,))
    results = state.search_results or []
    if not results and not state.hub_unreachable:
        st.caption(f"No adapters for {base.label} match this search.")
    for row in range(0, len(results), 3):
        for column, info in zip(st.columns(3), results[row : row + 3], strict=False):
            with column.container(border=True):
                if info.preview_url:
                    st.image(info.preview_url, width="stretch")
                st.markdown(f"**{info.repo_id}**")
                st.caption("Trigger words: " + (", ".join(info.trigger_words) or "none"))
                st.button(
                    "Add",
                    key=f"add_{info.repo_id}",
                    on_click=add_adapter,
                    args=(space.choice_from_info(info),),
                )
    paste_col, paste_button = st.columns([4, 1], vertical_alignment="bottom")
    paste_col.text_input("Or paste a repo id / URL", key="paste_source", placeholder="owner/my-sd35-lora")
    paste_button.button("Add adapter", key="add_pasted", on_click=on_add_pasted, args=(base,))
    if base.model == "tiny":
        if state.hub_unreachable:
            st.warning("The Hub is unreachable: use the local sample adapters to try the Space offline.")
        st.button("Use local sample adapters", key="add_samples", on_click=on_add_samples, args=(base,))

with blend:
    st.subheader(f"Your blend ({len(state.adapters)}/{space.MAX_ADAPTERS})")
    if not state.adapters:
        st.caption("No adapters yet: generating now renders the base model.")
    for choice in state.adapters:
        with st.container(border=True):
            st.markdown(f"**{choice.source}**")
            choice.weight = st.slider(
                "Weight",
                *space.WEIGHT_RANGE,
                value=float(choice.weight),
                step=0.05,
                key=f"weight_{choice.source}",
            )
            words = ", ".join(choice.trigger_words)
            choice.use_trigger_words = st.checkbox(
                f"Insert trigger words ({words})" if words else "Insert trigger words (none)",
                value=choice.use_trigger_words,
                key=f"trigger_{choice.source}",
                disabled=not words,
            )
            st.button("Remove", key=f"remove_{choice.source}", on_click=on_remove, args=(choice.source,))
    if state.adapters:
        st.caption(
            "Blend: " + " + ".join(f"{choice.source} × {choice.weight:g}" for choice in state.adapters)
        )

# --- generation form -----------------------------------------------------------------------------
st.subheader("Generate")
info = engine.info
presets = space.size_presets(info.native_resolution)
state.setdefault("seed", space.new_seed())
prompt_col, settings_col = st.columns([3, 2], gap="large")
with prompt_col:
    prompt = st.text_area(
        "Prompt", "a lighthouse on a cliff at sunset", max_chars=space.MAX_PROMPT_CHARS, key="prompt"
    )
    negative = st.text_area(
        "Negative prompt", "", max_chars=space.MAX_PROMPT_CHARS, key="negative_prompt", height=68
    )
with settings_col:
    left, right = st.columns(2)
    steps = left.number_input("Steps", 1, space.MAX_STEPS, info.default_steps, key=f"steps_{base.key}")
    cfg = right.number_input("CFG", 0.0, 20.0, float(info.default_guidance_scale), 0.5, key=f"cfg_{base.key}")
    scheduler = left.selectbox("Scheduler", list(SCHEDULERS), key="scheduler")
    labels = list(presets)
    default_label = space.default_size(info.native_resolution, base.model)
    size = right.selectbox(
        "Size",
        labels,
        index=labels.index(default_label) if default_label in labels else len(labels) - 1,
        key=f"size_{base.key}",
    )
    seed = left.number_input("Seed", 0, 2**31 - 1, key="seed")
    right.checkbox("Random seed each time", value=True, key="random_seed")
    compare = st.checkbox("Also render the base model with the same seed (side by side)", key="compare_base")
clicked = st.button("Generate", type="primary", key="generate", on_click=roll_seed)

if clicked:
    form = space.GenerationForm(
        prompt=prompt, negative_prompt=negative, steps=int(steps), guidance_scale=float(cfg), scheduler=scheduler,
        width=presets[size][0], height=presets[size][1], seed=int(state.seed), compare_base=compare,
    )  # fmt: skip
    try:
        with st.spinner("Generating…"):
            request = space.build_request(form, list(state.adapters), token=user_token())
            result = space.generate(engine, request)
        state.history.append(
            {
                "png": space.png_bytes(result.images[0], result.params),
                "base_png": space.png_bytes(result.base_images[0], {**result.params, "adapters": []})
                if result.base_images
                else None,
                "params": result.params,
                "blend": [(choice.source, choice.weight) for choice in state.adapters],
                "snippet": result.diffusers_snippet(),
            }
        )
        del state.history[: -space.HISTORY_SIZE]
    except Exception as exc:  # noqa: BLE001
        st.error(space.friendly_error(exc, user_token()))

# --- results -------------------------------------------------------------------------------------
if state.history:
    latest = state.history[-1]
    params = latest["params"]
    blend_label = " + ".join(f"{source} × {weight:g}" for source, weight in latest["blend"]) or "base"
    if latest["base_png"]:
        base_col, blend_col = st.columns(2)
        base_col.image(latest["base_png"], caption=f"base model · seed {params['seed']}", output_format="PNG")
        blend_col.image(latest["png"], caption=f"{blend_label} · seed {params['seed']}", output_format="PNG")
    else:
        st.image(
            latest["png"], caption=f"{blend_label} · seed {params['seed']}", width=512, output_format="PNG"
        )
    st.download_button(
        "Download PNG (parameters inside)", latest["png"], file_name=f"sd35-{params['seed']}.png", mime="image/png",
        key="download",
    )  # fmt: skip
    with st.expander("Use it in diffusers (reproduces exactly this image)"):
        st.code(latest["snippet"], language="python")
    if len(state.history) > 1:
        with st.expander(f"History ({len(state.history) - 1} earlier)"):
            for entry in reversed(state.history[:-1]):
                thumb, text = st.columns([1, 4])
                thumb.image(entry["png"], width=96)
                names = ", ".join(f"{source} × {weight:g}" for source, weight in entry["blend"]) or "base"
                text.caption(f"{entry['params']['prompt']} — {names} — seed {entry['params']['seed']}")

# --- training on Hugging Face Jobs (space/train_page.py; nothing trains on this Space's hardware) ---------
import train_page  # noqa: E402

train_page.render(user_token())
