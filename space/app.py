"""Streamlit Space: browse, blend and compare published SD3.5 LoRA adapters.

UI only: every decision (bases, adapter sources, limits, requests, error wording) lives in
sd35hub.frontends.space.support and sd35hub.frontends.space.text; generation in sd35hub.blend.engine.BlendEngine. One engine per
base is shared by all sessions (sd35hub.frontends.space.start.engine; its lock serialises "set adapters + generate"); each
visitor's choices live in st.session_state. Run locally with `make space` (the tiny model without a GPU).

Everything a visitor did not type themselves (card fields, repo ids, trigger words, URL parameters,
error messages) is rendered through md_text: Markdown shows as characters, never as links or images.
"""

from __future__ import annotations

import time

import streamlit as st

from sd35hub.blend.schedulers import SCHEDULERS
from sd35hub.frontends.space import oauth, start, view
from sd35hub.frontends.space import support as space
from sd35hub.frontends.space.text import md_text, plain

st.set_page_config(page_title="SD3.5 LoRA blender", page_icon="🎨", layout="wide")
state = st.session_state
state.setdefault("adapters", [])  # list[space.AdapterChoice]: this visitor's blend
state.setdefault("history", [])  # list[dict]: this visitor's results, newest last
state.setdefault("search_results", None)  # list[AdapterInfo] | None
state.setdefault("hub_unreachable", False)
state.setdefault("messages", [])  # errors from button callbacks, shown once
state.setdefault("page", 0)
state.setdefault("generated_at", [])  # monotonic times of this visitor's recent images (rate limit)

PAGE_SIZE = 6
IMAGE_WIDTH = 384  # result images, base and blend alike


def shared_engine(model: str):  # noqa: ANN201 - BlendEngine
    """One engine per base for the whole process (sd35hub.frontends.space.start.engine), often already loaded by
    the container's warm-up thread before the first visit."""
    if start.is_loaded(model):
        return start.engine(model)
    with st.spinner("Loading the base model (once for all visitors)…"):
        return start.engine(model)


def sign_in_available() -> bool:
    """True when the Space has an OAuth app (the [auth] secrets sd35hub.frontends.space.start writes)."""
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all
        return False


def pasted_token() -> str | None:
    return (state.get("user_token") or "").strip() or None


def user_token() -> str | None:
    """This visitor's token for their Hub calls: signed in with Hugging Face, else the pasted one, else None
    (anonymous: the calls pass token=False, never the Space's own HF_TOKEN)."""
    return (oauth.session_token(st.user) if sign_in_available() else None) or pasted_token()


def visitor_address() -> str | None:
    """The visitor's IP address (sd35hub.frontends.space.view.visitor_address says which header is trusted)."""
    return view.visitor_address(st.context.headers, st.context.ip_address, view.proxy_hops())


def report(exc: BaseException) -> None:
    state.messages.append(space.friendly_error(exc, user_token()))


def show_messages() -> None:
    for message in state.messages:
        st.error(md_text(message))
    state.messages = []


def add_choice(choice: space.AdapterChoice) -> None:
    if any(existing.source == choice.source for existing in state.adapters):
        return
    if len(state.adapters) >= space.MAX_ADAPTERS:
        state.messages.append(f"At most {space.MAX_ADAPTERS} adapters per image: remove one first.")
        return
    forget_weight(choice.source)  # the widgets start from choice.weight (their `value`), not a leftover
    state.adapters.append(choice)


def forget_weight(source: str) -> None:
    for prefix in ("weight_", "weightnum_"):
        state.pop(f"{prefix}{source}", None)


def on_search(base: space.BaseChoice) -> None:
    state.page = 0
    try:
        state.search_results = space.search_adapters(
            base, state.get("search_query"), token=user_token(), limit=view.SEARCH_LIMIT
        )
        state.hub_unreachable = False
    except Exception as exc:  # noqa: BLE001 - shown as a message
        state.search_results = []
        state.hub_unreachable = type(exc).__name__ == "HubRequestError"
        report(exc)


def on_add(source: str, base: space.BaseChoice) -> bool:
    """Every add (card, paste box) is checked on the Hub first: exists, access, base, size."""
    try:
        add_choice(space.lookup_adapter(source, base, token=user_token()))
        return True
    except Exception as exc:  # noqa: BLE001
        report(exc)
        return False


def on_add_pasted(base: space.BaseChoice) -> None:
    if on_add(state.get("paste_source", ""), base):
        state.paste_source = ""


def on_add_samples(base: space.BaseChoice) -> None:
    try:
        for choice in space.sample_choices(base):
            add_choice(choice)
    except Exception as exc:  # noqa: BLE001
        report(exc)


def on_remove(source: str) -> None:
    state.adapters = [choice for choice in state.adapters if choice.source != source]
    forget_weight(source)


def sync_weight(source: str, changed: str) -> None:
    other = "weightnum_" if changed == "weight_" else "weight_"
    state[f"{other}{source}"] = state[f"{changed}{source}"]


def roll_seed() -> None:
    if state.get("random_seed", True):
        state.seed = space.new_seed()


# --- sidebar: base model and token -----------------------------------------------------------------
bases = space.available_bases()
with st.sidebar:
    st.header("Base model")
    base = st.selectbox("Base model", bases, format_func=lambda b: b.label, key="base_choice")
    if state.get("results_base") != base.key:  # a new base: its own gallery, not the other one's
        state.results_base, state.search_results, state.page = base.key, None, 0
    if any(choice.base_model and choice.base_model != base.hub_base for choice in state.adapters):
        state.adapters = [c for c in state.adapters if not c.base_model or c.base_model == base.hub_base]
        st.info("Adapters made for another base were removed from your blend.")
    if sign_in_available():
        if oauth.session_token(st.user):
            st.caption(md_text(f"Signed in as {oauth.display_name(st.user)}: your private and gated adapters "
                               "load with your own token, in this session only."))
            if st.button("Sign out", key="sign_out"):
                st.logout()
        elif st.button("Sign in with Hugging Face", key="sign_in", type="primary"):
            st.login()
    st.text_input(
        "Your Hugging Face token (optional, for private adapters)",
        type="password",
        key="user_token",
        help="Used only for your own downloads in this session; never shown or stored.",
    )
    st.caption(
        "SD3.5 weights are under the Stability AI Community License. "
        f"Limits: {space.MAX_ADAPTERS} adapters per image, prompts up to {space.MAX_PROMPT_CHARS} characters, "
        f"{view.MAX_IMAGES_PER_WINDOW} images per {view.RATE_WINDOW_S // 60} minutes."
    )

st.title("SD3.5 LoRA blender")
st.caption("Find adapters on the Hub, blend them with weights, compare with the base model, take the code.")

try:
    engine = shared_engine(base.model)
except Exception as exc:  # noqa: BLE001 - gated base, missing model, OOM: a message, not a traceback
    st.error(md_text(space.friendly_error(exc, loading_base=True)))
    st.stop()

if "query_adapters_done" not in state:  # a shared link (?adapter=owner/repo:0.8) preselects a blend, once
    state.query_adapters_done = True
    preselected, problems = space.adapters_from_query(
        st.query_params.get_all("adapter"), base, token=user_token()
    )
    for choice in preselected:
        add_choice(choice)
    state.messages.extend(problems)

show_messages()

# --- adapters ------------------------------------------------------------------------------------
find, blend = st.columns([3, 2], gap="large")
with find:
    st.subheader("Find adapters")
    if state.search_results is None:
        on_search(base)  # first visit: the most downloaded adapters of this base
        show_messages()
    query_col, button_col = st.columns([4, 1], vertical_alignment="bottom")
    query_col.text_input(
        "Search adapters",
        key="search_query",
        placeholder="watercolor, ink, portrait…",
        max_chars=space.MAX_QUERY_CHARS,
    )
    button_col.button("Search", key="search", on_click=on_search, args=(base,))
    results = state.search_results or []
    if not results and not state.hub_unreachable:
        st.caption(md_text(f"No adapters for {base.label} match this search."))
    pages = max(1, -(-len(results) // PAGE_SIZE))
    state.page = min(state.page, pages - 1)
    shown = results[state.page * PAGE_SIZE : (state.page + 1) * PAGE_SIZE]
    selected = {choice.source for choice in state.adapters}
    for row in range(0, len(shown), 3):
        for column, info in zip(st.columns(3), shown[row : row + 3], strict=False):
            card = view.adapter_card(info)
            with column.container(border=True, key=f"card_{info.repo_id}"):
                if card.image_url:
                    st.image(card.image_url, width="stretch")
                st.markdown(
                    f"**[{md_text(card.repo_id)}]({card.page_url})**"
                    if card.page_url
                    else md_text(card.repo_id)
                )
                st.caption(md_text(card.stats))
                st.caption(md_text(card.trigger_text))
                if info.repo_id in selected:
                    st.button(
                        "✓ In your blend — remove",
                        key=f"unadd_{info.repo_id}",
                        on_click=on_remove,
                        args=(info.repo_id,),
                    )
                else:
                    st.button("Add", key=f"add_{info.repo_id}", on_click=on_add, args=(info.repo_id, base))
    if pages > 1:
        prev_col, page_col, next_col = st.columns([1, 2, 1], vertical_alignment="center")
        prev_col.button(
            "← Previous",
            key="page_prev",
            disabled=state.page == 0,
            on_click=lambda: state.update(page=state.page - 1),
        )
        page_col.caption(f"Page {state.page + 1} of {pages} ({len(results)} adapters)")
        next_col.button(
            "Next →",
            key="page_next",
            disabled=state.page >= pages - 1,
            on_click=lambda: state.update(page=state.page + 1),
        )
    paste_col, paste_button = st.columns([4, 1], vertical_alignment="bottom")
    paste_col.text_input(
        "Or paste a repo id / URL",
        key="paste_source",
        placeholder="owner/my-sd35-lora",
        max_chars=space.MAX_QUERY_CHARS,
    )
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
            thumb, body = st.columns([1, 5]) if choice.preview_url else (None, st.container())
            if thumb is not None:
                thumb.image(choice.preview_url, width=56)
            body.markdown(f"**{md_text(choice.source)}**")
            # `value=` is what the browser shows for a widget it has not seen yet. Never seed a widget only
            # through st.session_state: Streamlit sends that value only in the run that first draws the
            # widget, and that run's messages are lost when the visitor's next action starts a rerun first
            # (the outgoing queue is cleared); the browser then sent back the default, the minimum -1.
            slider_col, number_col = body.columns([3, 1], vertical_alignment="bottom")
            slider_col.slider(
                "Weight", *space.WEIGHT_RANGE, value=float(choice.weight), step=0.05, key=f"weight_{choice.source}",
                on_change=sync_weight, args=(choice.source, "weight_"),
            )  # fmt: skip
            number_col.number_input(
                "Type a weight", *space.WEIGHT_RANGE, value=float(choice.weight), step=0.05,
                key=f"weightnum_{choice.source}", on_change=sync_weight, args=(choice.source, "weightnum_"),
                label_visibility="collapsed",
            )  # fmt: skip
            choice.weight = float(state[f"weight_{choice.source}"])
            words = ", ".join(choice.trigger_words)
            label = f"Insert trigger words ({words})" if words else "Insert trigger words (none)"
            if choice.ignored_trigger_words:
                label += f" — {choice.ignored_trigger_words} over-long or extra ignored"
            choice.use_trigger_words = body.checkbox(
                md_text(label),
                value=choice.use_trigger_words,
                key=f"trigger_{choice.source}",
                disabled=not words,
            )
            body.button("Remove", key=f"remove_{choice.source}", on_click=on_remove, args=(choice.source,))
    if state.adapters:
        st.caption(md_text("Blend: " + view.blend_label([(c.source, c.weight) for c in state.adapters])))
    link_values = [f"{choice.source}:{choice.weight:g}" for choice in state.adapters]
    if st.query_params.get_all("adapter") != link_values:  # the URL follows the blend: a share link
        st.query_params["adapter"] = link_values
    if state.adapters:
        st.caption("Share this blend:")
        st.code(view.share_link(st.context.url, link_values), language=None, wrap_lines=True)

# --- generation form -----------------------------------------------------------------------------
st.subheader("Generate")
info = engine.info
presets = space.size_presets(info.native_resolution)
state.setdefault("seed", space.new_seed())
prompt_col, settings_col = st.columns([3, 2], gap="large")
with prompt_col:
    prompt = st.text_area("Prompt", "a lighthouse on a cliff at sunset", key="prompt")
    negative = st.text_area("Negative prompt", "", key="negative_prompt", height=68)
    for name, text in (("Prompt", prompt), ("Negative prompt", negative)):
        if len(text) > space.MAX_PROMPT_CHARS:
            st.warning(
                f"{name}: {len(text):,} characters; the limit is {space.MAX_PROMPT_CHARS:,}. Shorten it to generate."
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
    seed = left.number_input("Seed", 0, 2**31 - 1, value=int(state.seed), key="seed")  # value=: as the weights
    right.checkbox("Random seed each time", value=True, key="random_seed")
    compare = st.checkbox("Also render the base model with the same seed (side by side)", key="compare_base")
clicked = st.button("Generate", type="primary", key="generate", on_click=roll_seed)
if state.get("cancel"):
    st.info("Cancelled: no image was made.")

if clicked:
    form = space.GenerationForm(
        prompt=prompt, negative_prompt=negative, steps=int(steps), guidance_scale=float(cfg), scheduler=scheduler,
        width=presets[size][0], height=presets[size][1], seed=int(state.seed), compare_base=compare,
    )  # fmt: skip
    try:
        view.check_rate(state.generated_at, time.monotonic())
        request = space.build_request(form, list(state.adapters), base=base, token=user_token())
        view.ADDRESS_LIMITER.take(visitor_address(), time.monotonic())  # all sessions of one address
        bar = st.progress(0.0, text="Starting…")

        def waiting(ahead: int) -> None:  # refreshed while others are ahead (Cancel works here too)
            bar.progress(0.0, text=f"Waiting: {ahead} image(s) ahead of yours…")

        # Any click while generating reruns the script, which stops this run at its next progress update.
        st.button("Cancel", key="cancel")
        first_step: list[float] = []  # when step 1 ended: the time per step counts from there (not the wait)

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            first_step[:] = first_step or [now]
            if done == 1:
                bar.progress(done / total, text=f"Step 1/{total} · measuring the time left…")
                return
            left_s = (now - first_step[0]) / (done - 1) * (total - done)
            bar.progress(done / total, text=f"Step {done}/{total} · about {left_s:.0f} s left")

        result = space.generate(engine, request, progress=progress, waiting=waiting)
        bar.empty()
        state.generated_at.append(time.monotonic())
        state.history.append(view.history_entry(result))
        del state.history[: -space.HISTORY_SIZE]
        state.shown = len(state.history) - 1
    except Exception as exc:  # noqa: BLE001
        st.error(md_text(space.friendly_error(exc, user_token())))

# --- results -------------------------------------------------------------------------------------
if state.history:
    index = min(state.get("shown", len(state.history) - 1), len(state.history) - 1)
    entry = state.history[index]
    params = entry["params"]
    label = md_text(f"{entry['label']} · seed {params['seed']}")
    if entry["base_png"]:  # the same size side by side
        base_col, blend_col = st.columns(2)
        base_col.image(
            entry["base_png"], caption=md_text(f"base model · seed {params['seed']}"), width=IMAGE_WIDTH
        )
        blend_col.image(entry["png"], caption=label, width=IMAGE_WIDTH, output_format="PNG")
    else:
        st.image(entry["png"], caption=label, width=IMAGE_WIDTH, output_format="PNG")
    downloads = st.columns(3)
    downloads[0].download_button(
        "Download PNG (parameters inside)", entry["png"], file_name=f"sd35-{params['seed']}.png", mime="image/png",
        key="download",
    )  # fmt: skip
    if entry["base_png"]:
        downloads[1].download_button(
            "Download the base image", entry["base_png"], file_name=f"sd35-{params['seed']}-base.png",
            mime="image/png", key="download_base",
        )  # fmt: skip
    with st.expander("Use it in diffusers (reproduces exactly this image)"):
        st.code(entry["snippet"], language="python")
    if len(state.history) > 1:
        with st.expander(f"History ({len(state.history)} images)"):
            for number, old in reversed(list(enumerate(state.history))):
                thumb, text, actions = st.columns([1, 4, 2])
                thumb.image(old["png"], width=96)
                text.caption(
                    md_text(
                        f"{plain(old['params']['prompt'], 120)} — {old['label']} — seed {old['params']['seed']}"
                    )
                )
                actions.button(
                    "Show",
                    key=f"show_{number}",
                    on_click=lambda n=number: state.update(shown=n),
                    disabled=number == index,
                )
                actions.download_button(
                    "PNG",
                    old["png"],
                    file_name=f"sd35-{old['params']['seed']}.png",
                    mime="image/png",
                    key=f"dl_{number}",
                )

# --- training on Hugging Face Jobs (space/train_page.py; nothing trains on this Space's hardware) ---------
import train_page  # noqa: E402

train_page.render(pasted_token())  # training needs write access: the sign-in asks only to read
