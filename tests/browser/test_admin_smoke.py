"""A real browser (headless Chromium through Selenium) against the live server: log in to
the admin, open the worklist and a case page, see the slices load and confirm the case."""

import shutil

import pytest

from diagnostics import storage
from diagnostics.models import Status
from tests.factories import CaseFactory, PredictionFactory, RadiologistFactory
from tests.images import image_bytes

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
        "chromium-driver)",
    ),
]


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def loaded_size(browser, image) -> tuple[int, int]:
    """The image's decoded size once the browser has fetched it ((0, 0) if it failed)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(
        lambda driver: driver.execute_script("return arguments[0].complete", image)
    )
    return tuple(
        browser.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
        )
    )


def test_a_radiologist_reviews_a_case_in_the_admin(browser, live_server, s3_bucket):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    radiologist = RadiologistFactory(username="alice")
    radiologist.set_password("correct horse battery")
    radiologist.save()
    case = CaseFactory(uploaded_by=radiologist, status=Status.DONE, reference="study-browser")
    image = PredictionFactory(image__case=case, image__width=200, image__height=160).image
    storage.put(image.s3_key, image_bytes(200, 160), content_type="image/jpeg", sha256=image.sha256)

    browser.get(f"{live_server.url}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys("alice")
    browser.find_element(By.NAME, "password").send_keys("correct horse battery")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    # Wait for the login to land: on a busy machine the next page was requested before the
    # session existed, and the worklist redirected to the login page.
    WebDriverWait(browser, 20).until(lambda driver: "/login/" not in driver.current_url)

    browser.get(f"{live_server.url}/admin/diagnostics/case/")
    row = browser.find_element(By.CSS_SELECTOR, "#result_list tbody tr")
    assert "study-browser" in row.text and "glioma" in row.text and "70%" in row.text
    thumbnail = row.find_element(By.CSS_SELECTOR, "td.field-thumbnail img")
    assert loaded_size(browser, thumbnail) == (96, 77)

    row.find_element(By.PARTIAL_LINK_TEXT, "study-browser").click()
    assert f"/admin/diagnostics/case/{case.id}/change/" in browser.current_url
    slice_image = browser.find_element(By.CSS_SELECTOR, ".slice img")
    assert loaded_size(browser, slice_image) == (200, 160)
    assert "70.0%" in browser.find_element(By.CSS_SELECTOR, ".slice").text

    browser.find_element(By.CSS_SELECTOR, "#review-form input[value=confirm]").click()
    browser.find_element(By.CSS_SELECTOR, "#review-form input[type=submit]").click()

    assert "Your reading is recorded." in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    assert browser.find_element(By.ID, "review-status").text == "Confirmed"
    trail = browser.find_element(By.ID, "audit-trail").text
    assert "review.confirmed" in trail and "alice" in trail
