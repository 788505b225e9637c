"""searchgym view in a real headless browser: Debian's Chromium driven by Playwright.

Skipped when Playwright or Chromium is missing; ``make test-browser`` installs both and runs these. The
screenshots of the main views go to ``$SEARCHGYM_VIEWER_SCREENSHOTS`` (``make test-browser`` sets it to
``docs/viewer``), else to the test's temporary folder.
"""

import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from viewer_fixtures import write_eval_run, write_training_run

from searchgym.eval.report import compare_runs
from searchgym.policy.models import tiny_random_model
from searchgym.viewer.app import create_app
from searchgym.viewer.runs import find_runs

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SEARCHGYM_CHROMIUM", "/usr/bin/chromium")
# Root in a container needs --no-sandbox; the rest keep Chromium from reaching the network on its own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test-browser)")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (make test-browser)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_training_run(root / "grpo-demo", tiny_random_model().tokenizer, curve_steps=30)
    write_eval_run(root / "eval" / "warm-start", "warm")
    write_eval_run(root / "eval" / "final", "final")
    return root


@pytest.fixture(scope="module")
def server(runs_root):
    """The viewer on a free loopback port, served by waitress as ``searchgym view`` serves it."""
    import waitress.server

    runs = find_runs(
        [runs_root / "grpo-demo", runs_root / "eval" / "warm-start", runs_root / "eval" / "final"]
    )
    served = waitress.server.create_server(create_app(runs), host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{served.effective_port}"
    served.close()
    thread.join(timeout=10)


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    requested: list[str] = []
    opened.on("request", lambda request: requested.append(request.url))
    yield opened
    context.close()
    outside = [url for url in requested if not url.startswith(server)]
    assert outside == [], f"the page fetched from elsewhere: {outside}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("SEARCHGYM_VIEWER_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_filter_to_wrong_answers_and_open_an_episode(page, server, shots):
    page.goto(server)
    page.screenshot(path=shots / "runs.png")
    page.click("text=grpo-demo")
    page.fill("input[name=em_max]", "0")
    page.click("#apply-filters")
    rows = page.locator("tr.episode-row")
    assert rows.count() == 2  # France at step 1 (Lyon), Hamlet at step 2 (Marlowe)
    assert rows.locator("xpath=.").evaluate_all("rows => rows.map(r => r.className)") == [
        "episode-row wrong",
        "episode-row wrong",
    ]
    assert "em_max=0" in page.url
    page.screenshot(path=shots / "episodes.png", full_page=True)
    rows.first.locator("a.episode-link").click()
    assert page.locator(".passage").count() == 3
    gold = page.locator(".passage.gold")
    assert gold.count() == 1 and gold.get_attribute("data-doc-id") == "d0"
    assert page.locator(".passage.gold mark").first.inner_text() == "Paris"
    policy, observation = page.locator(".tokens .tok.m1"), page.locator(".tokens .tok.m0")
    assert policy.count() > 0 and observation.count() > 0
    colours = {
        name: tokens.first.evaluate("t => getComputedStyle(t).backgroundColor")
        for name, tokens in (("policy", policy), ("observation", observation))
    }
    assert colours["policy"] != colours["observation"]
    assert "logprob -0.5000" in policy.first.get_attribute("title")
    policy.first.hover()
    page.screenshot(path=shots / "episode.png", full_page=True)


def test_curves_are_drawn_in_the_page(page, server, shots):
    page.goto(f"{server}/run/0/curves")
    charts = page.locator("svg.chart")
    assert charts.count() == 6
    assert page.locator('svg[data-metric="rollout/reward"] circle').count() == 30
    page.screenshot(path=shots / "curves.png", full_page=True)


def test_compare_two_eval_runs_matches_eval_compare(page, server, shots, runs_root):
    page.goto(server)
    page.select_option(".compare-form select[name=a]", label="warm-start")
    page.select_option(".compare-form select[name=b]", label="final")
    page.click(".compare-form button")
    rows = page.locator("tr.dataset-row")
    shown = {
        row.get_attribute("data-dataset"): [
            float(row.get_attribute(name))
            for name in ("data-em-a", "data-em-b", "data-common", "data-gained", "data-lost")
        ]
        for row in rows.all()
    }
    table = compare_runs([runs_root / "eval" / "warm-start", runs_root / "eval" / "final"])
    printed = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].endswith("(agent)"):
            printed[cells[0].split(" ")[0]] = dict(
                zip(("nq", "hotpotqa"), map(float, cells[1:3]), strict=True)
            )
    for dataset, (em_a, em_b, common, gained, lost) in shown.items():
        assert round(em_a, 3) == printed["warm-start"][dataset]
        assert round(em_b, 3) == printed["final"][dataset]
        assert em_b - em_a == pytest.approx((gained - lost) / common)
    flips = page.locator("li.flip")
    assert flips.count() == sum(gained + lost for _, _, _, gained, lost in shown.values()) == 4
    page.locator("li.flip.lost a.flip-link").click()
    sides = page.locator(".side-by-side .side")
    assert sides.count() == 2
    assert re.search(r"Paris", sides.nth(0).locator(".answer").inner_text())
    assert re.search(r"Lyon", sides.nth(1).locator(".answer").inner_text())
    page.screenshot(path=shots / "compare.png", full_page=True)
