"""Stored XSS on the review page, tried in a real headless Chromium against a real reward
service with bearer tokens: prompts and class names that are HTML / script are submitted with
feedback over gRPC, a reviewer signs in on the page (token typed into the form, never in the
URL), and the agreement table, the queue and the condition list show the text literally while
none of it runs."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest

import clinisynth

pytestmark = pytest.mark.stack

TOKEN = "review-s3cret"
# Each would set window.__pwned (and the title) if the page parsed it as HTML.
HOSTILE_CLASS = "<img src=x onerror=\"window.__pwned='class';document.title='pwned'\">"
HOSTILE_PROMPT = (
    "</script><script>window.__pwned='script'</script>"
    "<img src=x onerror=\"window.__pwned='prompt';document.title='pwned'\">"
)


def test_hostile_prompt_and_class_render_inert_after_sign_in(start_reward, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    running, url = start_reward(auth_tokens=TOKEN, classes=HOSTILE_CLASS)
    rng = np.random.default_rng(0)
    with clinisynth.Client(
        endpoints={"reward": running.address}, token=TOKEN, timeout=60
    ) as client:
        for cond in ({"prompt": HOSTILE_PROMPT}, {"class_name": HOSTILE_CLASS}):
            for rater, verdict in (("dr_a", True), ("dr_b", False)):
                client.feedback.submit(
                    rng.random((32, 32), dtype=np.float32),
                    rater_id=rater,
                    plausible=verdict,
                    condition=cond,
                )
        names = {HOSTILE_CLASS: HOSTILE_PROMPT, "prompt: " + HOSTILE_PROMPT: HOSTILE_CLASS}
        queued = {
            label: client.review.enqueue(
                [rng.random((32, 32), dtype=np.float32)], **cond, names=[names[label]]
            )[0]
            for label, cond in (
                (HOSTILE_CLASS, {"class_name": HOSTILE_CLASS}),
                ("prompt: " + HOSTILE_PROMPT, {"prompt": HOSTILE_PROMPT}),
            )
        }

    page = urllib.request.urlopen(url, timeout=10)
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert b"<script>" not in page.read()  # the page's code is /review.js: no inline script

    wait = WebDriverWait(browser, 30)
    browser.get(f"{url}?rater=dr_web")
    title = browser.title
    wait.until(lambda d: d.find_element(By.ID, "signin").is_displayed())
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") is None
    browser.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert TOKEN not in browser.current_url
    assert (
        browser.execute_script("return sessionStorage.getItem('clinisynth.review.token')") == TOKEN
    )

    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#condition option")]
    assert sorted(options) == sorted(queued)  # the condition list, as literal text
    for label, item in queued.items():  # each condition: its agreement row and its queue
        Select(browser.find_element(By.ID, "condition")).select_by_visible_text(label)
        wait.until(
            lambda d, item=item: (
                d.find_element(By.ID, "image").get_attribute("data-item-id") == item.id
            )
        )
        wait.until(
            lambda d, label=label: (
                d.execute_script(  # read at once: the table is redrawn
                    "return [...document.querySelectorAll('#agreement td.condition')]"
                    ".map((td) => td.textContent)"
                )
                == [label.removeprefix("prompt: ")]
            )
        )
        assert browser.find_element(By.ID, "item-id").text == names[label]
        assert browser.find_element(By.ID, "item-condition").text == label
        wait.until(
            lambda d: d.execute_script(
                "const i = document.getElementById('image');"
                " return i.complete && i.naturalWidth > 0"
            )
        )

    time.sleep(1.0)  # an <img src=x> would have failed to load and fired onerror by now
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.title == title
    injected = browser.execute_script(
        "return document.querySelectorAll('img:not(#image), script:not([src])').length"
    )
    assert injected == 0

    # A judgement from the signed-in page goes out with the Authorization header.
    ActionChains(browser).send_keys("y", Keys.ENTER).perform()
    wait.until(lambda d: d.find_element(By.ID, "submitted-count").text == "1")
    with clinisynth.Client(
        endpoints={"reward": running.address}, token=TOKEN, timeout=60
    ) as client:
        mine = client.feedback.list(rater_id="dr_web")
    assert [(f.item_id, f.plausible) for f in mine] == [(item.id, True)]
