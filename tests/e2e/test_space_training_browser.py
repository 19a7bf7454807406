"""The Space's training page in a real browser: a visitor pastes their token, fills the form, sees the plan and
cost, starts a job on the local Hub's Jobs executor, and sees the published adapter after a refresh."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT_MS = 120_000


def _fill(page, label: str, value: str, commit: str = "Enter") -> None:  # noqa: ANN001
    field = page.get_by_label(label, exact=True)
    field.fill(value)
    field.press(commit)  # streamlit applies a text input on Enter (a text area on Ctrl+Enter)


def test_train_on_jobs_from_the_space(chromium_browser, space_url: str, hub, hub_datasets) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    bob = hub.other_token  # the visitor; the Space process's own HF_TOKEN is alice's
    expect.set_options(timeout=TIMEOUT_MS)
    page = chromium_browser.new_page(viewport={"width": 1400, "height": 2600})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(space_url)
    expect(page.get_by_text("To train, paste a Hugging Face token")).to_be_visible()
    _fill(page, "Your Hugging Face token (optional, for private adapters)", bob)
    expect(page.get_by_label("Dataset on the Hub (image + caption columns)", exact=True)).to_be_visible()
    _fill(page, "Dataset on the Hub (image + caption columns)", hub_datasets["parquet"])
    _fill(page, "Publish the adapter to", "bob/browser-trained")
    _fill(page, "Trigger word", "nrt style")
    _fill(page, "Steps (0: the preset's epochs)", "4")
    _fill(page, "Advanced settings, one section.key=value per line",
          "data.min_size=16\ndata.resolution=64\ntrain.validation_steps=1\ntrain.batch_size=2", commit="Control+Enter")
    page.get_by_role("button", name="Show plan and cost").click()
    expect(page.get_by_text("HF Jobs plan: flavor a100-large")).to_be_visible()
    expect(page.get_by_text("publishes to bob/browser-trained", exact=False)).to_be_visible()
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_text("Stage:", exact=False)).to_be_visible()
    job = next(j for j in hub.jobs.jobs.values() if (j.spec.get("labels") or {}).get("sd35hub_repo") == "bob--browser-trained")
    assert job.namespace == "bob" and job.spec["secrets"] == {"HF_TOKEN": bob}
    assert hub.jobs.wait(job.id).stage == "COMPLETED", hub.jobs.log_text(job.id)[-2000:]
    page.get_by_role("button", name="Refresh progress").click()
    expect(page.get_by_text("Published:", exact=False)).to_be_visible()
    expect(page.get_by_text("Stage: COMPLETED", exact=False)).to_be_visible()
    assert "pytorch_lora_weights.safetensors" in hub.files("bob/browser-trained")
    page.close()
