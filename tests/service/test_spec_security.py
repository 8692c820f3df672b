"""What a job spec may name (issue 15, design section 8; service/access.py): code by the operator's import
allow-list only, and never imported to validate; files under the data roots only (symlinks and `..`
resolved, the service's own files never), with one answer for every path outside them, existing or not,
and nothing outside opened or listed to give it; checkpoints as the caller's own models or capped files."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from service.access import Access
from service.artifacts import ArtifactStore
from service.driver import stored_spec
from service.settings import Settings, get_settings
from service.spec import JobSpec, SpecError, parse_spec
from tests.fswatch import touched, watch
from workers.checkpoint import Checkpoint, CheckpointError, load, save
from workers.models import ModelError, build_model, check_arch


@pytest.fixture
def site(tmp_path):
    """A service whose only data root is `roots/` (with its home, database and artifacts inside it, as an
    operator who makes LADLE_HOME a root would have), a folder `outside/` with a secret in it, and
    datasets, a checkpoint and an hf: folder inside the root."""
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    home = roots / "home"
    for d in (roots / "data" / "corpus", roots / "data" / "llm", home / "artifacts" / "jobs" / "j1", outside):
        d.mkdir(parents=True)
    settings = Settings(home=home, database_url=f"sqlite:///{home / 'ladle.db'}", artifacts=str(home / "artifacts"),
                        data_roots=[roots])
    (home / "ladle.db").write_bytes(b"SQLite format 3\0")
    secret = outside / "secret.npz"
    secret.write_text("the marker: nobody may read this")
    (outside / "notes.txt").write_text("outside text")
    data = roots / "data"
    (data / "corpus" / "a.txt").write_text("hello world " * 50)
    (data / "llm" / "config.json").write_text("{}")
    save(data / "dense.safetensors", Checkpoint(state={"w": torch.zeros(3)}, meta={"arch": "mlp"}))
    save(home / "artifacts" / "jobs" / "j1" / "phase0-dense.safetensors", Checkpoint(state={"w": torch.zeros(3)}))
    return {"settings": settings, "access": Access.from_settings(settings), "roots": roots, "outside": outside,
            "secret": secret, "data": data, "home": home}


def refusal(data, access):
    with pytest.raises(SpecError) as excinfo:
        parse_spec(data, access=access)
    return excinfo.value.errors


def lm(arch, path):
    return {"model": {"arch": arch}, "data": {"name": "text", "path": path}}


# ---------------------------------------------------------------- settings

def test_the_settings_default_to_no_imports_and_roots_without_the_services_own_home(tmp_path, monkeypatch):
    monkeypatch.delenv("LADLE_DATA_ROOTS", raising=False)
    monkeypatch.setenv("LADLE_DATA", str(tmp_path / "ladle-data"))
    s = Settings(home=tmp_path / "home")
    assert s.allowed_import_prefixes == [] and s.max_checkpoint_bytes == 2 << 30
    assert s.data_roots == [tmp_path / "home" / "data", tmp_path / "ladle-data", Path("/usr/share/datasets")]
    monkeypatch.setenv("LADLE_DATA_ROOTS", f"{tmp_path}/a{os.pathsep}{tmp_path}/b/../c")
    monkeypatch.setenv("LADLE_ALLOW_IMPORT", "mymodels, lab.nets")
    s = Settings()
    assert s.data_roots == [tmp_path / "a", tmp_path / "c"] and s.allowed_import_prefixes == ["mymodels", "lab.nets"]
    monkeypatch.setenv("LADLE_DATA_ROOTS", json.dumps([str(tmp_path)]))
    monkeypatch.setenv("LADLE_ALLOWED_IMPORT_PREFIXES", '["x.y"]')
    s = Settings()
    assert s.data_roots == [tmp_path] and s.allowed_import_prefixes == ["x.y"]
    with pytest.raises(ValueError, match="not module names"):
        Settings(allowed_import_prefixes=["", "os;rm"])


# ---------------------------------------------------------------- files

HOSTILE = [
    {"model": {"checkpoint": "/etc/shadow"}},
    {"model": {"checkpoint": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}},
    {"model": {"checkpoint": "file:///dev/zero"}},
    {"model": {"checkpoint": "s3://someone-elses-bucket/model.safetensors"}},
    {"model": {"checkpoint": "/dev/zero"}},
    {"data": {"name": "npz", "path": "/root/.ssh/id_rsa"}},
    {"data": {"name": "imagefolder", "path": "/etc"}},
    {"data": {"name": "cifar10", "path": "/"}},
    {"data": {"name": "fashion_mnist", "path": "/root"}},
    lm("hf:/etc", "/etc/passwd"),
]


@pytest.mark.parametrize("data", HOSTILE, ids=lambda d: json.dumps(d)[:60])
def test_paths_and_urls_outside_the_roots_are_refused_with_one_message(site, data):
    errors = refusal(data, site["access"])
    outside = [(loc, msg) for loc, msg in errors if "not readable" in msg]
    assert outside and all(loc in ("model.checkpoint", "data.path", "model.arch") for loc, _ in outside), errors
    assert all(msg == site["access"].outside(loc) for loc, msg in outside)


def test_the_answer_is_the_same_for_an_existing_and_a_missing_path_outside(site):
    secret, missing = site["secret"], site["outside"] / "no-such-file"
    assert secret.exists() and not missing.exists()
    for field, make in [("model.checkpoint", lambda p: {"model": {"checkpoint": str(p)}}),
                        ("data.path", lambda p: {"data": {"name": "npz", "path": str(p)}}),
                        ("data.path", lambda p: {"data": {"name": "imagefolder", "path": str(p)}}),
                        ("data.path", lambda p: lm(f"hf:{site['data'] / 'llm'}", str(p))),
                        ("model.arch", lambda p: lm(f"hf:{p}", str(site["data"] / "corpus")))]:
        assert refusal(make(secret), site["access"]) == refusal(make(missing), site["access"]) == [
            (field, site["access"].outside(field))]
        # and the folder it is in, which exists, is no different
        assert refusal(make(secret.parent), site["access"]) == refusal(make(missing), site["access"])


def test_symlinks_and_dotdot_are_resolved_before_the_check(site):
    roots, data, secret = site["roots"], site["data"], site["secret"]
    (data / "innocent.npz").symlink_to(secret)
    (data / "corpus" / "b.txt").symlink_to(site["outside"] / "notes.txt")
    (data / "escape").symlink_to(site["outside"], target_is_directory=True)
    for spec in [{"data": {"name": "npz", "path": str(data / "innocent.npz")}},
                 {"data": {"name": "npz", "path": f"{roots}/../outside/secret.npz"}},
                 {"data": {"name": "imagefolder", "path": str(data / "escape")}},
                 {"model": {"checkpoint": str(data / "innocent.npz")}},
                 lm(f"hf:{data / 'escape'}", str(data / "corpus" / "a.txt")),
                 lm(f"hf:{data / 'llm'}", str(data / "corpus")),               # a folder holding a link out
                 lm(f"hf:{data / 'llm'}", f"{data}/corpus/*.txt"),              # a glob matching it
                 lm(f"hf:{data / 'llm'}", f"{data}/escape/*.txt"),              # a glob through a linked folder
                 lm(f"hf:{data / 'llm'}", f"{data}/*/../../outside/*.txt")]:    # `..` after a wildcard
        assert any("not readable" in msg for _, msg in refusal(spec, site["access"])), spec
    # a link from outside into the roots is fine: what is read is inside; the spec keeps the resolved path
    link = site["outside"] / "to-dense"
    link.symlink_to(data / "dense.safetensors")
    assert parse_spec({"model": {"checkpoint": str(link)}}, access=site["access"]).model.checkpoint == \
        str(data / "dense.safetensors")


def test_the_services_own_files_are_never_readable_through_a_root(site):
    home = site["home"]
    for spec in [{"data": {"name": "npz", "path": str(home / "ladle.db")}},
                 {"model": {"checkpoint": str(home / "artifacts" / "jobs" / "j1" / "phase0-dense.safetensors")}},
                 lm(f"hf:{site['data'] / 'llm'}", str(home / "ladle.db")),
                 lm(f"hf:{site['data'] / 'llm'}", f"{home}/**/*")]:
        assert any("not readable" in msg for _, msg in refusal(spec, site["access"])), spec


def test_inside_the_roots_the_precise_messages_stay_and_paths_come_back_resolved(site):
    data, access = site["data"], site["access"]
    [(loc, msg)] = refusal({"data": {"name": "npz", "path": str(data / "missing.npz")}}, access)
    assert loc == "data" and "does not exist" in msg
    [(loc, msg)] = refusal({"model": {"checkpoint": str(data / "missing.safetensors")}}, access)
    assert loc == "model.checkpoint" and "does not exist" in msg
    [(loc, msg)] = refusal({"model": {"checkpoint": str(data)}}, access)
    assert "is not a file" in msg
    [(loc, msg)] = refusal({"data": {"name": "imagefolder", "path": str(data / "corpus")}}, access)
    assert "needs train/ and test/" in msg
    spec = parse_spec({"model": {"checkpoint": f"{data}/corpus/../dense.safetensors"}}, access=access)
    assert spec.model.checkpoint == str(data / "dense.safetensors")
    spec = parse_spec(lm(f"hf:{data}/corpus/../llm", f"{data}/corpus/*.txt"), access=access)
    assert spec.model.arch == f"hf:{data / 'llm'}" and spec.data.path == f"{data}/corpus/*.txt"


def test_nothing_outside_the_roots_is_opened_or_listed_to_answer(site):
    secret, outside, data = site["secret"], site["outside"], site["data"]
    with watch() as seen:                                   # the watch sees what it should: a positive control
        secret.read_bytes()
        os.listdir(outside)
    assert {e for e, _ in touched(seen, outside)} == {"open", "os.listdir"}
    hostile = [{"model": {"checkpoint": str(secret)}}, {"model": {"checkpoint": f"file://{secret}"}},
               {"data": {"name": "npz", "path": str(secret)}}, {"data": {"name": "imagefolder", "path": str(outside)}},
               {"data": {"name": "mnist", "path": str(outside)}}, lm(f"hf:{outside}", str(data / "corpus")),
               lm(f"hf:{data / 'llm'}", str(secret)), lm(f"hf:{data / 'llm'}", str(outside)),
               lm(f"hf:{data / 'llm'}", f"{outside}/*"), lm(f"hf:{data / 'llm'}", f"{outside}/**/*.txt"),
               lm(f"hf:{data / 'llm'}", f"{data}/../../outside/*.txt"),
               {"model": {"arch": f"hf:{data / 'llm'}", "kwargs": {"gguf_file": str(secret)}},
                "data": {"name": "text", "path": str(data / "corpus")}},
               {"model": {"arch": f"hf:{data / 'llm'}", "kwargs": {"gguf_file": "../../../outside/secret.npz"}},
                "data": {"name": "text", "path": str(data / "corpus")}}]
    with watch() as seen:
        for spec in hostile:
            refusal(spec, site["access"])
    assert touched(seen, outside) == []


# ---------------------------------------------------------------- checkpoints

def test_a_checkpoint_over_the_cap_is_refused_at_submission_and_never_read_whole(site, tmp_path):
    small = Access.from_settings(site["settings"].model_copy(update={"max_checkpoint_bytes": 64}))
    [(loc, msg)] = refusal({"model": {"checkpoint": str(site["data"] / "dense.safetensors")}}, small)
    assert loc == "model.checkpoint" and "more than the 64" in msg
    path = site["data"] / "dense.safetensors"
    with pytest.raises(CheckpointError, match="more than 64 bytes"):
        load(path, max_bytes=64)
    with pytest.raises(CheckpointError, match="more than 64 bytes"):
        ArtifactStore(str(tmp_path)).load_checkpoint(str(path), max_bytes=64)
    assert load(path, max_bytes=path.stat().st_size).meta == {"arch": "mlp"}


def test_model_ids_need_the_store_and_the_caller(site):
    [(loc, msg)] = refusal({"model": {"checkpoint": "model:0123abcd"}}, site["access"])
    assert loc == "model.checkpoint" and "no model '0123abcd' among your models" in msg


# ---------------------------------------------------------------- code

def test_import_archs_need_the_operators_allow_list_and_are_never_imported_to_validate(site, marker_modules):
    allowing = Access.from_settings(site["settings"].model_copy(update={"allowed_import_prefixes":
                                                                            ["ladle_marker_allowed"]}))
    spec = parse_spec({"model": {"arch": "import:ladle_marker_allowed:build"}}, access=allowing)
    assert spec.model.arch == "import:ladle_marker_allowed:build"
    for arch in ("import:ladle_marker_denied:build", "import:subprocess:getoutput", "import:os:system",
                 "import:ladle_marker_allowed_not:build", "import:ladle_sec:build"):      # prefixes are whole names
        [(loc, msg)] = refusal({"model": {"arch": arch, "kwargs": {"cmd": "id; env"}}}, allowing)
        assert loc == "model.arch" and "does not run the module" in msg and "ladle_marker_allowed" in msg, msg
    [(_, msg)] = refusal({"model": {"arch": "import:ladle_marker_allowed:build"}}, site["access"])   # none allowed
    assert "only: none" in msg
    [(_, msg)] = refusal({"model": {"arch": "import:ladle_marker_allowed:build.__globals__"}}, allowing)
    assert "no dunders" in msg
    assert not any(m.exists() for m in marker_modules.values())
    assert "ladle_marker_allowed" not in sys.modules and "ladle_marker_denied" not in sys.modules
    # a worker building the model does import it (so the markers above would have shown an import)
    assert isinstance(build_model("import:ladle_marker_allowed:build", num_classes=3, in_shape=(1, 8, 8)), torch.nn.Linear)
    assert marker_modules["ladle_marker_allowed"].exists() and not marker_modules["ladle_marker_denied"].exists()


def test_a_worker_builds_only_callables_defined_in_the_named_package(tmp_path, monkeypatch):
    (tmp_path / "ladle_sec_reexports.py").write_text(
        "import os\nfrom subprocess import getoutput\nimport torch\n_os = os\n"
        "def build(num_classes):\n    return torch.nn.Linear(4, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for attr, words in [("os.system", "passes through the module 'os'"), ("_os.system", "passes through"),
                            ("getoutput", "defined in 'subprocess'")]:
            check_arch(f"import:ladle_sec_reexports:{attr}")                     # the form is fine
            with pytest.raises(ModelError, match=words):
                build_model(f"import:ladle_sec_reexports:{attr}", num_classes=2, in_shape=(1, 2, 2), command="id")
        assert build_model("import:ladle_sec_reexports:build", num_classes=2, in_shape=(1, 2, 2)).out_features == 2
    finally:
        sys.modules.pop("ladle_sec_reexports", None)


def test_trust_remote_code_never_comes_from_a_spec(site):
    for value in (True, False, "yes"):
        errors = refusal({"model": {"arch": f"hf:{site['data'] / 'llm'}", "kwargs": {"trust_remote_code": value}},
                          "data": {"name": "text", "path": str(site["data"] / "corpus")}}, site["access"])
        assert any("trust_remote_code" in msg and "not allowed" in msg for _, msg in errors), errors


# ---------------------------------------------------------------- where the checks apply

def test_without_a_context_the_settings_roots_apply(site, monkeypatch):
    monkeypatch.setenv("LADLE_DATA_ROOTS", json.dumps([str(site["roots"])]))
    get_settings.cache_clear()
    try:
        assert parse_spec({"model": {"checkpoint": str(site["data"] / "dense.safetensors")}}).model.checkpoint
        [(loc, msg)] = refusal({"model": {"checkpoint": str(site["secret"])}}, None)
        assert loc == "model.checkpoint" and "not readable" in msg
        with pytest.raises(SpecError, match="does not run the module"):
            parse_spec({"model": {"arch": "import:subprocess:getoutput"}})
    finally:
        get_settings.cache_clear()


def test_the_driver_reparses_a_stored_spec_whatever_its_settings_say(site, monkeypatch):
    allowing = Access.from_settings(site["settings"].model_copy(update={"allowed_import_prefixes": ["mymodels"]}))
    ckpt = str(site["data"] / "dense.safetensors")
    stored = parse_spec({"model": {"arch": "import:mymodels.nets:build", "checkpoint": ckpt},
                         "data": {"name": "npz", "path": ckpt}}, access=allowing).model_dump(mode="json")
    monkeypatch.setenv("LADLE_DATA_ROOTS", "[]")        # the driver's process knows nothing of the API's settings
    get_settings.cache_clear()
    try:
        with pytest.raises(SpecError):
            parse_spec(stored)
        spec = stored_spec(stored)
        assert isinstance(spec, JobSpec) and spec.model.arch == "import:mymodels.nets:build"
    finally:
        get_settings.cache_clear()
