"""The job page's one-shot robustness chart in a real headless Chromium (Debian's, driven by Playwright)
against a live API server without Ray: two small digits jobs are run in-process by the real pipeline
into the server's store (a BatchNorm ResNet with the curve, an MLP with it turned off). The screenshot
goes to SCREENSHOTS with the other dashboard pages'."""

import pytest

from api.client import Client
from service.artifacts import ArtifactStore
from service.executors import SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import DBRecorder
from service.spec import parse_spec
from tests.api.conftest import stored_only_server
from tests.api.test_dashboard import Page, browser, chart_points  # noqa: F401  (browser: the shared fixture)
from workers.robustness import SPARSITIES

pytestmark = [pytest.mark.slow, pytest.mark.browser]

BN_JOB = {"name": "dash-robust", "model": {"arch": "resnet20", "kwargs": {"width": 0.25}}, "data": {"batch_size": 64},
          "dense": {"epochs": 2, "lr": 0.1}, "prune": {"target_sparsity": 0.75, "phases": 2},
          "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}
OFF_JOB = {"name": "dash-no-robust", "data": {"batch_size": 64}, "dense": {"epochs": 2, "lr": 0.1},
           "prune": {"target_sparsity": 0.5, "phases": 1, "robustness": None}, "retrain": {"epochs": 1},
           "soup": {"ingredients": 2}}


def run_job(store, artifacts: str, spec_dict: dict) -> str:
    """Store a job and run it as a driver would, in this process."""
    spec = parse_spec(spec_dict)
    job = store.create_job(spec)
    result = Pipeline(spec, SequentialExecutor(), DBRecorder(store, job.id), ArtifactStore(artifacts),
                      prefix=f"jobs/{job.id}").run()
    store.job_succeeded(job.id, result.final_model_id)
    return job.id


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with stored_only_server(tmp_path_factory.mktemp("dash-robust")) as server:
        artifacts = server.runtime.settings.artifacts
        server.jobs = {"bn": run_job(server.store, artifacts, BN_JOB), "off": run_job(server.store, artifacts, OFF_JOB)}
        yield server


def test_the_job_page_draws_the_one_shot_robustness_chart(browser, server):  # noqa: F811
    job_id = server.jobs["bn"]
    with Client(server.url) as c:
        job = c.job(job_id)
        assert job["status"] == "succeeded"
        dense_id = next(p["model_id"] for p in c.phases(job_id) if p["index"] == 0)
        curve = c.robustness(dense_id)
    assert len(curve["points"]) == len(SPARSITIES) and all(p["accuracy_raw"] is not None for p in curve["points"])
    p = Page(browser, server.url)
    page = p.go(f"#/jobs/{job_id}")
    page.locator(f'#robustness-card[data-points="{len(SPARSITIES)}"]').wait_for()
    note = page.locator("#robustness-note")
    T = BN_JOB["prune"]["phases"]
    assert chart_points(page, "robustness-chart") == {"one-shot, BN recalibrated": len(SPARSITIES),
                                                      "one-shot, before BN recalibration": len(SPARSITIES),
                                                      "dense": 2, "soups (retrained)": T}
    # what is drawn is the API's curve, in percent
    drawn = page.evaluate("""() => Chart.getChart(document.getElementById("robustness-chart")).data.datasets[0].data""")
    assert drawn == [{"x": pytest.approx(100 * q["sparsity"]), "y": pytest.approx(100 * q["accuracy"])}
                     for q in curve["points"]]
    text = note.inner_text()
    assert f"{100 * curve['dense_accuracy']:.1f}%" in text and "BatchNorm recalibrated" in text
    # beside the accuracy-vs-sparsity plot, in the same row of the grid
    acc, robust = (page.locator(f"#{i}").bounding_box() for i in ("acc-sparsity", "robustness-chart"))
    assert abs(acc["y"] - robust["y"]) < 1 and robust["x"] > acc["x"]
    p.shot("job-robustness")
    assert p.errors == []


def test_a_job_without_the_curve_says_why(browser, server):  # noqa: F811
    p = Page(browser, server.url)
    page = p.go(f"#/jobs/{server.jobs['off']}")
    page.locator('#robustness-card[data-points="0"]').wait_for()
    assert "prune.robustness: null" in page.locator("#robustness-note").inner_text()
    assert chart_points(page, "robustness-chart") == {"one-shot, BN recalibrated": 0,
                                                      "one-shot, before BN recalibration": 0,
                                                      "dense": 0, "soups (retrained)": 0}
    assert p.errors == []
