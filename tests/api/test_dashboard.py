"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a live server with
real Ray: a finished digits job and a running one (and, to compare, a second small finished one).
Screenshots of every page go to SCREENSHOTS (printed at the end of the run)."""

import re
import time

import httpx
import pytest

from api.client import Client
from tests.api.conftest import make_server
from tests.conftest import SCREENSHOTS

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
FINISHED = {"name": "dash-done", "dense": {"epochs": 3}, "prune": {"target_sparsity": 0.75, "phases": 2},
            "retrain": {"epochs": 2}, "soup": {"ingredients": 3},
            "search": {"space": {"lr": {"loguniform": [0.01, 0.3]}}, "trials": 3}}
# long enough to watch it move (700 epochs of an MLP on digits); cancelled from the page at the end
# a second finished job for the compare view: same number of phases, a different target
SECOND = {"name": "dash-second", "dense": {"epochs": 2}, "prune": {"target_sparsity": 0.5, "phases": 2},
          "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}
RUNNING = {"name": "dash-running", "dense": {"epochs": 100}, "prune": {"target_sparsity": 0.9, "phases": 3},
           "retrain": {"epochs": 100}, "soup": {"ingredients": 2}}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Page:
    """A fresh page that records console errors and uncaught exceptions, and takes named screenshots."""

    def __init__(self, browser, base: str):
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())
        self.base = base

    def go(self, route: str = ""):
        self.page.goto(f"{self.base}/{route}")
        return self.page

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def server(ray_head, tmp_path_factory):
    with make_server(tmp_path_factory.mktemp("dash"), ray_head) as server:
        with Client(server.url) as c:
            done = c.wait(c.submit(FINISHED)["id"], progress=False, poll=0.5, timeout=300)
            assert done["status"] == "succeeded", done["error"]
            running = c.submit(RUNNING)
            deadline = time.monotonic() + 120
            while c.job(running["id"])["progress"] <= 0:        # started and training
                assert time.monotonic() < deadline, "the long job did not start"
                time.sleep(0.5)
        server.jobs = {"finished": done, "running": running}
        yield server
        with Client(server.url) as c:                            # whatever the tests did, stop the long job
            if c.job(running["id"])["status"] not in ("succeeded", "failed", "cancelled"):
                c.cancel(running["id"])


def chart_points(page, canvas: str) -> dict[str, int]:
    return page.evaluate("""id => Object.fromEntries(Chart.getChart(document.getElementById(id)).data.datasets
                            .map(d => [d.label, d.data.length]))""", canvas)


def test_jobs_page_shows_both_jobs_and_progress_moves_without_reload(browser, server):
    p = Page(browser, server.url)
    page = p.go()
    done, running = server.jobs["finished"], server.jobs["running"]
    row = page.locator(f'tr[data-job="{running["id"]}"]')
    row.wait_for()
    assert page.locator(f'tr[data-job="{done["id"]}"] .badge').inner_text() == "succeeded"
    assert done["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert page.locator(f'tr[data-job="{done["id"]}"] td').nth(5).inner_text() == f"{100 * done['sparsity']:.1f}%"
    page.evaluate("window.__same_page = true")
    first = float(row.locator("td.progress").get_attribute("data-progress"))
    deadline = time.monotonic() + 60
    while float(row.locator("td.progress").get_attribute("data-progress")) <= first:
        assert time.monotonic() < deadline, "the running job's progress did not move on the page"
        page.wait_for_timeout(500)
    assert page.evaluate("window.__same_page") is True            # no reload happened
    assert row.locator(".badge").inner_text() == "running"
    p.shot("jobs")
    page.select_option("#status-filter", "succeeded")
    page.locator(f'tr[data-job="{running["id"]}"]').wait_for(state="detached")
    assert page.locator(f'tr[data-job="{done["id"]}"]').count() == 1
    assert p.errors == []


def test_job_page_plots_and_lineage(browser, server):
    done = server.jobs["finished"]
    p = Page(browser, server.url)
    page = p.go(f"#/jobs/{done['id']}")
    with Client(server.url) as c:
        lineage = c.lineage(done["final_model_id"])
        runs = c.runs(done["id"])
    page.locator("svg#lineage .node").first.wait_for()
    T, m = FINISHED["prune"]["phases"], FINISHED["soup"]["ingredients"]
    assert chart_points(page, "acc-sparsity") == {"soup": T, "ingredients": T * m, "pruned, before retraining": T,
                                                  "dense": 1, "prediction ensemble": T}
    assert chart_points(page, "timeline") == {"dense training": T + 1, "prune": T + 1, "schedule search": T + 1,
                                              "retrain": T + 1, "soup + BN": T + 1, "evaluate": T + 1, "running": T + 1}
    # the phase table: one row per phase, a column per metric the API lists for tables, the values its own
    page_of_phases = httpx.get(f"{server.url}/api/v1/jobs/{done['id']}/phases").json()
    shown = [col["key"] for col in page_of_phases["columns"] if col["table"]]
    assert page.locator("#phases tbody tr").count() == T + 1
    last = page.locator(f'#phases tr[data-phase="{T}"]')
    assert [last.locator("td[data-key]").nth(i).get_attribute("data-key") for i in range(len(shown))] == shown
    soup_acc = page_of_phases["data"][T]["soup_accuracy"]
    assert last.locator('td[data-key="soup_accuracy"]').inner_text() == f"{100 * soup_acc:.2f}%"
    # the last phase's ingredients, one curve each, one point per retraining epoch
    assert chart_points(page, "curve-loss") == {f"ingredient{i}": FINISHED["retrain"]["epochs"] for i in range(m)}
    assert page.locator("svg#lineage .node").count() == len(lineage["nodes"]) == 1 + T * (2 + m)
    assert page.locator("svg#lineage path.edge").count() == len(lineage["edges"])
    for e in lineage["edges"]:
        assert page.locator(f'svg#lineage path.edge.{e["kind"]}[data-parent="{e["parent"]}"]'
                            f'[data-child="{e["child"]}"]').count() == 1
    page.locator(f'svg#lineage .node[data-id="{done["final_model_id"]}"]').click()
    panel = page.locator("#model-panel")
    assert f"phase{T}/soup" in panel.locator("h2").inner_text()
    soup = next(n for n in lineage["nodes"] if n["id"] == done["final_model_id"])
    assert f"{100 * soup['sparsity']:.2f}%" in panel.inner_text()
    with page.expect_download() as dl:
        panel.locator("#download").click()
    size = dl.value.path().stat().st_size
    assert size == soup["size_bytes"]
    assert "job succeeded" in page.locator("#events").inner_text()
    trials = page.locator("#search-trials tbody tr")                # phase 1's search, the winner starred
    assert trials.count() == FINISHED["search"]["trials"]
    assert page.locator("#search-trials tbody tr", has_text="★").count() == 1
    assert page.locator("#cancel").is_hidden()
    page.select_option("#curve-phase", "0")
    assert chart_points(page, "curve-loss") == {"dense": FINISHED["dense"]["epochs"]}
    assert len([r for r in runs if r["kind"] == "ingredient"]) == T * m
    p.shot("job-finished")
    page = p.go(f"#/models/{done['final_model_id']}")
    page.locator("svg#lineage .node.selected").wait_for()
    assert page.locator("svg#lineage .node").count() == len(lineage["nodes"])
    p.shot("model")
    assert p.errors == []


def test_cluster_page(browser, server):
    p = Page(browser, server.url)
    page = p.go("#/cluster")
    page.locator("#nodes tr td").first.wait_for()
    assert "127.0.0.1" in page.locator("#nodes").inner_text()
    assert page.locator('#resources tr[data-resource="CPU"]').inner_text().endswith("/ 2")
    running = server.jobs["running"]
    page.locator(f'#active tr[data-job="{running["id"]}"]').wait_for()
    p.shot("cluster")
    assert p.errors == []


def test_compare_view_refreshes_a_running_job(browser, server):
    done, running = server.jobs["finished"], server.jobs["running"]
    p = Page(browser, server.url)
    page = p.go(f"#/compare?ids={done['id']},{running['id']}")
    row = page.locator(f'#compare-table tr[data-job="{running["id"]}"]')
    row.wait_for()
    assert row.locator(".badge").inner_text() == "running"
    label = "() => Chart.getChart(document.getElementById('compare-chart')).data.datasets[1].label"
    first = page.evaluate(label)
    assert first.startswith("dash-running · ")
    page.wait_for_function(f"first => ({label})() !== first", arg=first, timeout=10_000)   # its wall time so far
    page = p.go(f"#/compare?ids={done['id']}")
    assert "two or more jobs" in page.locator("#view-error").inner_text()
    assert p.errors == []


def test_cancel_from_the_job_page(browser, server):
    running = server.jobs["running"]
    p = Page(browser, server.url)
    page = p.go(f"#/jobs/{running['id']}")
    page.locator("#cancel").wait_for(state="visible")
    page.locator("svg#lineage .node").first.wait_for()        # the dense model at least
    p.shot("job-running")
    page.locator("#cancel").click()                            # the confirm() dialog is accepted
    page.locator("#job-status .badge", has_text="cancelled").wait_for(timeout=60_000)
    assert page.locator("#cancel").is_hidden()
    page.locator("#events", has_text="job cancelled").wait_for()
    assert httpx.get(f"{server.url}/api/v1/jobs/{running['id']}").json()["status"] == "cancelled"
    p.shot("job-cancelled")
    assert p.errors == []


def test_compare_two_finished_jobs(browser, server):
    """Tick two jobs on the jobs page, open the compare view: one curve per job (a point per phase, the
    soup's accuracy at its sparsity), legend labels with name, wall time and compute, and a table row each."""
    done = server.jobs["finished"]
    with Client(server.url) as c:
        second = c.wait(c.submit(SECOND)["id"], progress=False, poll=0.5, timeout=300)
        assert second["status"] == "succeeded", second["error"]
        expected = c.compare([done["id"], second["id"]])
    p = Page(browser, server.url)
    page = p.go()
    button = page.locator("#compare-jobs")
    page.locator(f'tr[data-job="{done["id"]}"] input[type=checkbox]').check()
    assert button.is_visible() and button.is_disabled()              # one job is not a comparison
    page.locator(f'tr[data-job="{second["id"]}"] input[type=checkbox]').check()
    p.shot("compare-pick")
    button.filter(has_text="Compare 2 jobs").click()
    page.wait_for_url(re.compile(r"#/compare\?ids="))
    assert page.evaluate("location.hash") == f"#/compare?ids={done['id']},{second['id']}"
    page.locator("#compare-table tbody tr[data-job]").nth(1).wait_for()   # drawn after the chart
    chart = "Chart.getChart(document.getElementById('compare-chart'))"
    datasets = page.evaluate(f"() => {chart}.data.datasets.map(d => ({{label: d.label, x: d.data.map(p => p.x), "
                             "y: d.data.map(p => p.y)}))")
    legend = page.evaluate(f"() => {chart}.legend.legendItems.map(i => i.text)")
    assert len(datasets) == 2 and len(legend) == 2
    for d, text, item in zip(datasets, legend, expected):
        job, phases = item["job"], item["phases"]
        assert len(phases) == len(d["y"]) == job["spec"]["prune"]["phases"] + 1          # phase 0 (dense) too
        assert d["y"] == pytest.approx([100 * ph["soup_accuracy"] for ph in phases])
        assert d["x"] == pytest.approx([100 * (ph["sparsity"] or 0) for ph in phases])
        assert d["x"][0] == 0 and d["x"][-1] == pytest.approx(100 * job["spec"]["prune"]["target_sparsity"], abs=0.1)
        assert text == d["label"] and text.startswith(f"{job['name']} · ") and " wall" in text
        for field, unit in (("cpu_seconds", "CPU-s"), ("gpu_seconds", "GPU-s"), ("epochs_trained", "epochs")):
            assert (unit in text) == (job.get(field) is not None)      # compute, when the server reports it
        row = page.locator(f'#compare-table tr[data-job="{job["id"]}"] td')
        assert row.nth(0).inner_text().startswith(job["name"]) and row.nth(1).inner_text() == "succeeded"
        assert row.nth(2).inner_text() == f"{100 * job['sparsity']:.1f}%"
        assert row.nth(3).inner_text() == f"{100 * phases[-1]['soup_accuracy']:.2f}%"
        best = max(a for a in phases[-1]["ingredient_accuracies"] if a is not None)
        assert row.nth(4).inner_text() == f"{100 * best:.2f}%"
        ensemble = phases[-1].get("ensemble_accuracy")
        assert row.nth(5).inner_text() == ("–" if ensemble is None else f"{100 * ensemble:.2f}%")
        cpu = job.get("cpu_seconds")
        assert row.nth(7).inner_text() == ("–" if cpu is None else f"{cpu:.1f}")
    p.shot("compare")
    page.locator("a", has_text="change the selection").click()       # the ticks are kept
    page.locator(f'tr[data-job="{second["id"]}"] input:checked').wait_for()
    assert button.inner_text() == "Compare 2 jobs"
    assert p.errors == []


def test_a_language_model_job_page_speaks_perplexity(browser, server, tiny_lm):
    """After the long job is cancelled: an LM job's page plots and tabulates perplexity (lower is better),
    its lineage labels show it, and the job list gives its best perplexity."""
    arch, text = tiny_lm
    spec = {"name": "dash-lm", "model": {"arch": arch}, "soup": {"ingredients": 2},
            "data": {"name": "text", "path": text, "seq_len": 16, "calibration_samples": 8},
            "prune": {"target_sparsity": 0.5, "phases": 1, "criterion": "wanda"},
            "retrain": {"epochs": 2, "params": "mask_lora", "lr": 3e-3}}
    with Client(server.url) as c:
        job = c.wait(c.submit(spec)["id"], progress=False, poll=0.5, timeout=300)
        assert job["status"] == "succeeded", job["error"]
        phases = c.phases(job["id"])
    p = Page(browser, server.url)
    page = p.go(f"#/jobs/{job['id']}")
    page.locator("svg#lineage .node").first.wait_for()
    assert page.locator("#acc-title").inner_text() == "Perplexity vs sparsity"
    assert page.evaluate("Chart.getChart(document.getElementById('acc-sparsity')).options.scales.y.title.text") == \
        "test perplexity"
    assert chart_points(page, "acc-sparsity")["soup"] == 1
    cell = page.locator('#phases tr[data-phase="1"] td[data-key="soup_perplexity"]')
    assert cell.inner_text() == f"{phases[1]['soup_perplexity']:.2f}"
    assert page.locator('#phases td[data-key*="accuracy"]').count() == 0
    assert "ppl " in page.locator(f'svg#lineage .node[data-id="{job["final_model_id"]}"]').text_content()
    p.shot("job-lm")
    page = p.go()
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    row.wait_for()
    assert row.locator("td").nth(6).inner_text() == f"{job['best_score']:.1f}"
    assert p.errors == []


def test_with_auth_the_page_asks_for_a_token_and_shows_only_its_jobs(browser, ray_head, tmp_path):
    with make_server(tmp_path, ray_head, dispatch=False, auth="on") as server:
        store = server.runtime.store
        _, alice = store.create_token("alice")
        _, bob = store.create_token("bob")
        mine = Client(server.url, alice).submit(dict(FINISHED, name="alices-job"))
        theirs = Client(server.url, bob).submit(dict(FINISHED, name="bobs-job"))
        p = Page(browser, server.url)
        page = p.go()
        dialog = page.locator("#token-dialog")
        dialog.wait_for(state="visible")
        page.fill("#token-input", "ladle_wrong")
        page.press("#token-input", "Enter")
        page.locator("#token-error", has_text="refused").wait_for()
        p.shot("sign-in")
        page.fill("#token-input", alice)
        page.press("#token-input", "Enter")
        page.locator(f'tr[data-job="{mine["id"]}"]').wait_for()
        assert page.locator("#jobs tbody tr").count() == 1
        assert page.locator(f'tr[data-job="{theirs["id"]}"]').count() == 0
        assert "alice" in page.locator("#whoami").inner_text()
        page = p.go(f"#/jobs/{theirs['id']}")                    # not hers: the API says 404
        page.locator("#view-error").wait_for()
        assert re.search("not found", page.locator("#view-error").inner_text())
        # the API's 404 is the one console error a browser logs for it
        assert all("404" in e for e in p.errors) and p.errors
