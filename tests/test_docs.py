"""The documentation: docs/ builds into a site with MkDocs (--strict: a broken link or anchor, a page left out
of the nav, a lost marker of a generated page fail the build); the job spec reference on it is generated
from service.spec, and the README stays a short front page that links the guides."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly_and_the_spec_reference_names_every_field(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    page = (tmp_path / "site" / "job-spec-reference" / "index.html").read_text()
    from service.spec import JobSpec, PruneSpec, SoupSpec
    for model in (JobSpec, PruneSpec, SoupSpec):
        for name in model.model_fields:
            assert f"<code>{name}</code>" in page, (model.__name__, name)
    assert "lamp" in page                                    # the criteria come from TASK_OPTIONS
    assert (tmp_path / "site" / "figures" / "sfw_vs_sgd.png").exists()


def test_the_readme_is_a_short_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    links = re.findall(r"\]\((docs/[^)#]*)", readme)
    assert len(links) >= 10
    assert all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]
