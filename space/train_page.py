"""The Space's training section: a visitor trains their own LoRA on Hugging Face Jobs with their own token.

UI only (sd35hub.frontends.space.training decides and calls the Hub); drawn at the end of app.py by
``train_page.render(token)``. Per-session state lives in st.session_state under ``train_*`` keys.
"""

from __future__ import annotations

import streamlit as st

from sd35hub.frontends.space import support as space
from sd35hub.frontends.space import training


def render(token: str | None) -> None:
    state = st.session_state
    st.divider()
    st.header("Train your own LoRA on the Hub's GPUs")
    st.caption("The job runs on Hugging Face Jobs under your account and is billed to it; nothing trains on "
               "this Space's hardware. Your token is used only for your requests in this session.")
    if not token:
        st.info("To train, paste a Hugging Face token with write access in the sidebar.")
        return
    with st.expander("No dataset on the Hub yet? Upload images (and same-name .txt captions) to a new private one"):
        st.file_uploader("Images and captions", accept_multiple_files=True, key="train_upload_files",
                         type=["png", "jpg", "jpeg", "webp", "txt"])
        st.text_input("New private dataset repo", key="train_upload_repo", placeholder="you/my-photos")
        st.button("Upload", key="train_upload", on_click=_upload, args=(token,))
    for message in state.pop("train_upload_messages", []):
        (st.error if message.startswith("!") else st.success)(message.lstrip("!"))
    bases = [b.model for b in space.available_bases()]
    left, right = st.columns(2)
    with left:
        dataset = st.text_input("Dataset on the Hub (image + caption columns)", key="train_dataset",
                                placeholder="owner/my-photos")
        base = st.selectbox("Base model", bases, key="train_base")
        trigger = st.text_input("Trigger word", key="train_trigger", placeholder="sks style")
        preset = st.selectbox("Preset", list(training.PRESETS), key="train_preset",
                              format_func=lambda p: f"{p}: " + ", ".join(f"{k.split('.')[1]} {v:g}"
                                                                         for k, v in training.PRESETS[p].items()))
    with right:
        repo_id = st.text_input("Publish the adapter to", key="train_repo", placeholder="you/my-lora")
        flavor = st.selectbox("GPU", training.FLAVORS, index=2, key="train_flavor")
        timeout = st.selectbox("Time limit", training.TIMEOUTS, index=1, key="train_timeout")
        resolution = st.selectbox("Resolution", (512, 768, 1024), index=2, key="train_resolution")
        steps = st.number_input("Steps (0: the preset's epochs)", 0, 100000, 0, key="train_steps")
        resume = st.checkbox("Continue from the last checkpoint on the repo's resume branch", key="train_resume")
    extra = st.text_area("Advanced settings, one section.key=value per line", key="train_extra", height=80)
    request = training.TrainingRequest(dataset=dataset, base_model=base, trigger_word=trigger, preset=preset,
                                       repo_id=repo_id, flavor=flavor, timeout=timeout, resolution=int(resolution),
                                       steps=int(steps), extra=extra, resume=resume)  # fmt: skip
    plan_col, start_col = st.columns(2)
    if plan_col.button("Show plan and cost", key="train_plan"):
        try:
            state.train_plan_lines = training.plan(request, token).describe()
        except Exception as exc:  # noqa: BLE001 - a message, never a traceback
            state.train_plan_lines = None
            st.error(space.friendly_error(exc, token))
    if state.get("train_plan_lines"):
        st.code("\n".join(state.train_plan_lines), language=None)
    if start_col.button("Start training", key="train_start", type="primary"):
        try:
            state.train_job = training.start(training.plan(request, token), token)
        except Exception as exc:  # noqa: BLE001
            st.error(space.friendly_error(exc, token))
    job = state.get("train_job")
    if not job:
        return
    st.markdown(f"Job `{job['id']}`: [{job['url']}]({job['url']})")
    st.button("Refresh progress", key="train_refresh")
    try:
        now = training.progress(job, token)
    except Exception as exc:  # noqa: BLE001
        st.error(space.friendly_error(exc, token))
        return
    if now["step"] and now["total"]:
        st.progress(min(now["step"] / now["total"], 1.0),
                    text=f"step {now['step']}/{now['total']}, loss {now['loss']:.4f}, {now['samples_per_s']} samples/s")
    st.markdown(f"Stage: **{now['stage']}**" + (f" ({now['message']})" if now["message"] else ""))
    if now.get("adapter_url"):
        st.success(f"Published: {now['adapter_url']} (search for it above to blend it)")
    elif now["stage"] in ("ERROR", "CANCELED"):
        st.error(f"The job stopped ({now['message'] or now['stage']}). Tick 'Continue from the last checkpoint' and "
                 "start it again with the same settings: it resumes exactly where the checkpoints on the repo's "
                 "`resume` branch stopped.")


def _upload(token: str | None) -> None:
    """Button callback (runs before the widgets are drawn, so it may fill in the dataset field)."""
    state = st.session_state
    files = [(f.name, f.getvalue()) for f in state.get("train_upload_files") or []]
    try:
        result = training.upload_dataset(files, state.get("train_upload_repo", ""), token)
    except Exception as exc:  # noqa: BLE001
        state.train_upload_messages = ["!" + space.friendly_error(exc, token)]
        return
    state.train_dataset = result.repo_id
    state.train_upload_messages = [result.describe()]
