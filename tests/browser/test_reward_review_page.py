"""The expert review page in a real headless Chromium (Debian's), driven by the keyboard only:
judgements submitted on the page appear through the gRPC API.

Needs ``/usr/bin/chromium`` + ``/usr/bin/chromedriver`` (Debian: chromium chromium-driver) and the
``selenium`` package; skipped when they are missing."""

from __future__ import annotations

import numpy as np
import pytest

import clinisynth

pytestmark = pytest.mark.stack


def test_expert_judges_with_the_keyboard_and_judgements_reach_grpc(reward_app, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    running, url = reward_app
    client = clinisynth.Client(endpoints={"reward": running.address}, timeout=60)
    rng = np.random.default_rng(0)
    items = client.review.enqueue(
        [rng.random((32, 32), dtype=np.float32) for _ in range(3)],
        class_name="neutrophil",
        names=["a", "b", "c"],
    )
    # A colleague already judged item "a" elsewhere → agreement on the page is non-trivial.
    wait = WebDriverWait(browser, 30)
    browser.get(f"{url}?rater=dr_web&class_name=neutrophil")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

    def shown() -> str:
        return browser.find_element(By.ID, "image").get_attribute("data-item-id") or ""

    def keys(*ks: str) -> None:
        ActionChains(browser).send_keys(*ks).perform()

    def submitted() -> str:
        return browser.find_element(By.ID, "submitted-count").text

    assert shown() == items[0].id  # no reward model yet: FIFO
    wait.until(
        lambda d: d.execute_script(
            "const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0"
        )
    )
    criteria = [
        li.get_attribute("data-name")
        for li in browser.find_elements(By.CSS_SELECTOR, "#criteria li")
    ]
    assert "nucleus_count" in criteria

    keys(Keys.ENTER)  # no verdict yet: refused on the page, nothing sent
    wait.until(lambda d: "press y" in d.find_element(By.ID, "status").text)
    keys("y", "1", "2", "2", Keys.ENTER)  # plausible; criterion 1 on, 2 toggled twice (off)
    wait.until(lambda d: submitted() == "1" and shown() == items[1].id)
    keys("n", "3", Keys.ENTER)  # implausible; criterion 3 on
    wait.until(lambda d: submitted() == "2" and shown() == items[2].id)
    keys("s")  # skip the third
    wait.until(lambda d: "queue empty" in d.find_element(By.ID, "status").text)
    wait.until(lambda d: "dr_web" in d.find_element(By.ID, "agreement").text)

    got = client.feedback.list(rater_id="dr_web")
    assert [(f.item_id, f.plausible) for f in got] == [(items[0].id, True), (items[1].id, False)]
    assert got[0].criteria[criteria[0]] is True and got[0].criteria[criteria[1]] is False
    assert got[1].criteria[criteria[2]] is True and sum(got[1].criteria.values()) == 1
    assert all(f.time_spent_ms > 0 for f in got)
    assert got[0].condition == {"class_name": "neutrophil"}
    batch = client.review.next("dr_web2", class_name="neutrophil")
    assert [i.id for i in batch.items] == [items[2].id]  # the two judged items are full
    client.close()
