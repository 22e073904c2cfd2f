"""The review page signed in with a JWT in a real headless Chromium: the rater is the principal.

The page asks the server who signed in and shows that name, read-only, whatever ``?rater=`` said;
the judgement it sends is stored under the principal.
"""

from __future__ import annotations

import numpy as np
import pytest
from auth_helpers import Issuer

import clinisynth

pytestmark = pytest.mark.stack


def test_sign_in_with_a_jwt_fills_the_rater_from_the_token(start_reward, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    issuer = Issuer()
    running, url = start_reward(**issuer.settings(tmp_path))
    with clinisynth.Client(
        endpoints={"reward": running.address}, token=issuer.token("trainer"), timeout=60
    ) as client:
        item = client.review.enqueue(
            [np.random.default_rng(0).random((32, 32), dtype=np.float32)],
            class_name="neutrophil",
        )[0]

    wait = WebDriverWait(browser, 30)
    browser.get(f"{url}?rater=someone_else&class_name=neutrophil")
    wait.until(lambda d: d.find_element(By.ID, "signin").is_displayed())
    token = issuer.token("expert", sub="dr_jwt")
    browser.find_element(By.ID, "token").send_keys(token, Keys.ENTER)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    rater = browser.find_element(By.ID, "rater")
    assert rater.get_attribute("value") == "dr_jwt"
    assert rater.get_attribute("readOnly") == "true"
    assert token not in browser.current_url
    wait.until(lambda d: d.find_element(By.ID, "image").get_attribute("data-item-id") == item.id)
    ActionChains(browser).send_keys("y", Keys.ENTER).perform()
    wait.until(lambda d: d.find_element(By.ID, "submitted-count").text == "1")

    with clinisynth.Client(
        endpoints={"reward": running.address}, token=issuer.token("trainer"), timeout=60
    ) as client:
        stored = client.feedback.list()
    assert [(f.rater_id, f.item_id) for f in stored] == [("dr_jwt", item.id)]
